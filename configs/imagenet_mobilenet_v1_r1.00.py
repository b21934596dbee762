"""ImageNet MobileNetV1 FTWT r=1.00 decoupled (paper: 69.66%, 41.07%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_ftwt('mobilenet_v1_imagenet', 1.0, arg=arg)
