"""MobileNetV1 (CIFAR and ImageNet) and CIFAR MobileNetV2 (SPEC 2.3)."""

from __future__ import annotations

import flax.linen as nn

from fttw_jax.models.gating import AvgPool, Backbone, GatedNetwork, check_images

# (output channels, stride) of the depthwise-separable blocks.
MOBILENET_V1_CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# (expansion t, output channels c, repeats n, first stride s).
MOBILENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV1(Backbone, kw_only=True):
  """First 3x3 conv 32 (stride 1 on CIFAR, 2 on ImageNet), 13 dw-separable blocks."""
  imagenet: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    x = x.astype(self.dtype)
    x, gates = self.gated_conv(self.scaled(32), 3, 2 if self.imagenet else 1,
                               name='stem')(x, train)
    for i, (c, s) in enumerate(MOBILENET_V1_CFG):
      x, g = self.gated_conv(x.shape[-1], 3, s, depthwise=True, name=f'block{i}_dw')(x, train)
      gates.update(g)
      x, g = self.gated_conv(self.scaled(c), 1, name=f'block{i}_pw')(x, train)
      gates.update(g)
    return self.classify(AvgPool(0 if self.imagenet else 2, counted=True, name='pool')(x),
                         gates)


class InvertedResidual(GatedNetwork, kw_only=True):
  """1x1 expansion (always), 3x3 depthwise, linear 1x1 projection, shortcut if stride 1."""
  expansion: int
  features: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = x.shape[-1] * self.expansion
    y, g1 = self.gated_conv(hidden, 1, name='expand')(x, train)
    y, g2 = self.gated_conv(hidden, 3, self.strides, depthwise=True, name='dw')(y, train)
    y, g3 = self.gated_conv(self.features, 1, act='none', name='project')(y, train)
    if self.strides == 1:
      shortcut = x
      if x.shape[-1] != self.features:
        shortcut = self.conv(self.features, (1, 1), use_bias=False, name='shortcut_conv')(x)
        shortcut = self.batch_norm(train, 'shortcut_bn')(shortcut)
      y = y + shortcut
    return y, {**g1, **g2, **g3}


class MobileNetV2(Backbone, kw_only=True):
  """CIFAR MobileNetV2: stem 3x3/1 32, inverted residuals, 1x1 conv 1280, 4x4 avg pool."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    x = x.astype(self.dtype)
    x, gates = self.gated_conv(self.scaled(32), 3, 1, name='stem')(x, train)
    index = 0
    for t, c, n, s in MOBILENET_V2_CFG:
      for b in range(n):
        x, g = InvertedResidual(
            expansion=t, features=self.scaled(c), strides=s if b == 0 else 1,
            name=f'block{index}', **self.shared())(x, train)
        gates.update(g)
        index += 1
    x, g = self.gated_conv(self.scaled(1280), 1, name='final_conv')(x, train)
    gates.update(g)
    return self.classify(AvgPool(4, counted=False, name='pool')(x), gates)
