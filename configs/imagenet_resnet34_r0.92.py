"""ImageNet ResNet-34 FTWT r=0.92 decoupled (paper: 71.71%, 52.24% FLOPs reduction)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_ftwt('resnet34', 0.92, arg=arg)
