"""CIFAR VGG16-BN (SPEC 2.3): 13 gated 3x3 convs with bias, 5 max pools, one dense."""

from __future__ import annotations

import flax.linen as nn

from fttw_jax.models.gating import Backbone, check_images

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
             512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG(Backbone, kw_only=True):
  cfg: tuple = VGG16_CFG

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_images(x)
    x = x.astype(self.dtype)
    gates, index = {}, 0
    for v in self.cfg:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x, g = self.gated_conv(self.scaled(v), 3, use_bias=True, name=f'conv{index}')(x, train)
      gates.update(g)
      index += 1
    return self.classify(x, gates)
