"""ImageNet ResNet-34 FTWT r=0.95 decoupled (paper: 72.79%, 37.77% FLOPs reduction)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_ftwt('resnet34', 0.95, arg=arg)
