"""CIFAR VGG16-BN (SPEC 2.3): 13 gated 3x3 convs with bias, 5 max pools, one dense."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fttw_jax.models.gating import GateConfig, GatedConv, check_images

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
             512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG(nn.Module):
  num_classes: int
  cfg: tuple = VGG16_CFG
  width: float = 1.0
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    x = x.astype(self.dtype)
    gates, index = {}, 0
    for v in self.cfg:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x, g = GatedConv(max(1, int(round(v * self.width))), 3, use_bias=True, gate=self.gate,
                       dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                       name=f'conv{index}')(x, train)
      gates.update(g)
      index += 1
    x = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return logits.astype(jnp.float32), {'gates': gates}
