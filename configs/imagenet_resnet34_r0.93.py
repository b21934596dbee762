"""ImageNet ResNet-34 FTWT r=0.93 decoupled (paper: 72.17%, 47.42% FLOPs reduction)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_ftwt('resnet34', 0.93, arg=arg)
