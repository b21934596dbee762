"""ImageNet ResNet-18 FTWT r=0.91 decoupled (paper: 67.49%, 51.56%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_ftwt('resnet18', 0.91, arg=arg)
