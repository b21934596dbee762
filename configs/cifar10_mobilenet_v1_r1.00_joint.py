"""CIFAR-10 MobileNetV1 FTWT r=1.00 joint (paper: 91.21%, 78%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('mobilenet_v1', 1.0, 'joint', arg=arg)
