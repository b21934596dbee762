"""ResNets with basic blocks: CIFAR ResNet-(6n+2) and torchvision-shaped ResNet-18/34."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fttw_jax.models.gating import AvgPool, Backbone, GatedNetwork, check_images


def pad_shortcut(x, features: int, strides: int, side: str = 'both', grad: str = 'flow'):
  """Parameter-free CIFAR shortcut: 2x2 average pool, then zero channels split on
  ``side='both'`` sides or appended at the ``'end'`` (SPEC 9.1); ``grad='detached'``
  stops the gradient through it, as the reference's ``x.data`` does."""
  if strides != 1:
    x = nn.avg_pool(x, (strides, strides), strides=(strides, strides))
  if grad == 'detached':
    x = jax.lax.stop_gradient(x)
  extra = features - x.shape[-1]
  before = extra // 2 if side == 'both' else 0
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


class BasicBlock(GatedNetwork, kw_only=True):
  """Two gated 3x3 convs plus a shortcut ('pad' for CIFAR, 'conv' = 1x1 conv + BN)."""
  features: int
  strides: int = 1
  shortcut: str = 'pad'

  @nn.compact
  def __call__(self, x, train: bool = False):
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'pad':
        residual = pad_shortcut(x, self.features, self.strides, self.options.shortcut_pad,
                                self.options.shortcut_grad)
      else:
        residual = self.conv(self.features, (1, 1), strides=(self.strides, self.strides),
                             padding='VALID', use_bias=False, name='downsample_conv')(x)
        residual = self.batch_norm(train, 'downsample_bn')(residual)
    y, g1 = self.gated_conv(self.features, 3, self.strides, name='conv1')(x, train)
    y, g2 = self.gated_conv(self.features, 3, 1, act='none', name='conv2')(
        y, train, residual=residual)
    return y, {**g1, **g2}


class ResNet(Backbone, kw_only=True):
  """Basic-block ResNet. ``imagenet`` selects the torchvision stem and shortcuts.

  CIFAR (SPEC 2.3): 3x3 stem 16, stages of 16/32/64 channels, parameter-free
  shortcuts. ImageNet: 7x7/2 stem 64 + 3x3/2 max pool, stages 64..512, 1x1 conv
  shortcuts, so torchvision weights map parameter for parameter.
  """
  stage_sizes: Sequence[int]
  imagenet: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    base = (64, 128, 256, 512) if self.imagenet else (16, 32, 64)
    widths = [self.scaled(c) for c in base]
    x = x.astype(self.dtype)
    if self.imagenet:
      x, gates = self.gated_conv(widths[0], 7, 2, name='stem')(x, train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x, gates = self.gated_conv(widths[0], 3, 1, name='stem')(x, train)
    for stage, (size, features) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(size):
        x, g = BasicBlock(
            features=features, strides=2 if stage > 0 and b == 0 else 1,
            shortcut='conv' if self.imagenet else 'pad', name=f'layer{stage + 1}_{b}',
            **self.shared())(x, train)
        gates.update(g)
    return self.classify(AvgPool(0, counted=True, name='pool')(x), gates)
