"""MobileNetV1 (CIFAR and ImageNet) and CIFAR MobileNetV2 (SPEC 2.3)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fttw_jax.models.gating import AvgPool, GateConfig, GatedConv, batch_norm, check_images

# (output channels, stride) of the depthwise-separable blocks.
MOBILENET_V1_CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# (expansion t, output channels c, repeats n, first stride s).
MOBILENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _scaled(c, width):
  return max(1, int(round(c * width)))


class MobileNetV1(nn.Module):
  """First 3x3 conv 32 (stride 1 on CIFAR, 2 on ImageNet), 13 dw-separable blocks."""
  num_classes: int
  imagenet: bool = False
  width: float = 1.0
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    kw = dict(gate=self.gate, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    x = x.astype(self.dtype)
    x, gates = GatedConv(_scaled(32, self.width), 3, 2 if self.imagenet else 1,
                         name='stem', **kw)(x, train)
    for i, (c, s) in enumerate(MOBILENET_V1_CFG):
      x, g = GatedConv(x.shape[-1], 3, s, depthwise=True, name=f'block{i}_dw', **kw)(x, train)
      gates.update(g)
      x, g = GatedConv(_scaled(c, self.width), 1, name=f'block{i}_pw', **kw)(x, train)
      gates.update(g)
    x = AvgPool(0 if self.imagenet else 2, counted=True, name='pool')(x)
    x = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32), {'gates': gates}


class InvertedResidual(nn.Module):
  """1x1 expansion (always), 3x3 depthwise, linear 1x1 projection, shortcut if stride 1."""
  expansion: int
  features: int
  strides: int
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(gate=self.gate, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    hidden = x.shape[-1] * self.expansion
    y, g1 = GatedConv(hidden, 1, name='expand', **kw)(x, train)
    y, g2 = GatedConv(hidden, 3, self.strides, depthwise=True, name='dw', **kw)(y, train)
    y, g3 = GatedConv(self.features, 1, act='none', name='project', **kw)(y, train)
    if self.strides == 1:
      shortcut = x
      if x.shape[-1] != self.features:
        shortcut = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                           name='shortcut_conv')(x)
        shortcut = batch_norm(train, self.bn_axis_name, self.dtype, 'shortcut_bn')(shortcut)
      y = y + shortcut
    return y, {**g1, **g2, **g3}


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2: stem 3x3/1 32, inverted residuals, 1x1 conv 1280, 4x4 avg pool."""
  num_classes: int
  width: float = 1.0
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    kw = dict(gate=self.gate, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    x = x.astype(self.dtype)
    x, gates = GatedConv(_scaled(32, self.width), 3, 1, name='stem', **kw)(x, train)
    index = 0
    for t, c, n, s in MOBILENET_V2_CFG:
      for b in range(n):
        x, g = InvertedResidual(t, _scaled(c, self.width), s if b == 0 else 1,
                                name=f'block{index}', **kw)(x, train)
        gates.update(g)
        index += 1
    x, g = GatedConv(_scaled(1280, self.width), 1, name='final_conv', **kw)(x, train)
    gates.update(g)
    x = AvgPool(4, counted=False, name='pool')(x)
    x = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32), {'gates': gates}
