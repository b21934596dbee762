"""ResNets with basic blocks: CIFAR ResNet-(6n+2) and torchvision-shaped ResNet-18/34."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fttw_jax.models.gating import AvgPool, GateConfig, GatedConv, batch_norm, check_images


def pad_shortcut(x, features: int, strides: int):
  """Parameter-free CIFAR shortcut: 2x2 average pool, then zero-pad channels on both sides."""
  if strides != 1:
    x = nn.avg_pool(x, (strides, strides), strides=(strides, strides))
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
  """Two gated 3x3 convs plus a shortcut ('pad' for CIFAR, 'conv' = 1x1 conv + BN)."""
  features: int
  strides: int = 1
  shortcut: str = 'pad'
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(gate=self.gate, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'pad':
        residual = pad_shortcut(x, self.features, self.strides)
      else:
        residual = nn.Conv(self.features, (1, 1), strides=(self.strides, self.strides),
                           padding='VALID', use_bias=False, dtype=self.dtype,
                           name='downsample_conv')(x)
        residual = batch_norm(train, self.bn_axis_name, self.dtype, 'downsample_bn')(residual)
    y, g1 = GatedConv(self.features, 3, self.strides, name='conv1', **kw)(x, train)
    y, g2 = GatedConv(self.features, 3, 1, act='none', name='conv2', **kw)(
        y, train, residual=residual)
    return y, {**g1, **g2}


class ResNet(nn.Module):
  """Basic-block ResNet. ``imagenet`` selects the torchvision stem and shortcuts.

  CIFAR (SPEC 2.3): 3x3 stem 16, stages of 16/32/64 channels, parameter-free
  shortcuts. ImageNet: 7x7/2 stem 64 + 3x3/2 max pool, stages 64..512, 1x1 conv
  shortcuts, so torchvision weights map parameter for parameter.
  """
  stage_sizes: Sequence[int]
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
    base = (64, 128, 256, 512) if self.imagenet else (16, 32, 64)
    widths = [max(1, int(round(c * self.width))) for c in base]
    x = x.astype(self.dtype)
    if self.imagenet:
      x, gates = GatedConv(widths[0], 7, 2, name='stem', **kw)(x, train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x, gates = GatedConv(widths[0], 3, 1, name='stem', **kw)(x, train)
    for stage, (size, features) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(size):
        strides = 2 if stage > 0 and b == 0 else 1
        x, g = BasicBlock(features, strides, 'conv' if self.imagenet else 'pad',
                          name=f'layer{stage + 1}_{b}', **kw)(x, train)
        gates.update(g)
    x = AvgPool(0, counted=True, name='pool')(x).reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32), {'gates': gates}
