"""ImageNet ResNet-34 FTWT r=0.97 decoupled (paper: 73.25%, 25.86% FLOPs reduction)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_ftwt('resnet34', 0.97, arg=arg)
