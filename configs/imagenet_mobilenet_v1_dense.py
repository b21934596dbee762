"""ImageNet MobileNetV1 dense (paper: 69.57%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_baseline('mobilenet_v1_imagenet', arg=arg)
