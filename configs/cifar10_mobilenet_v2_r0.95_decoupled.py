"""CIFAR-10 MobileNetV2 FTWT r=0.95 decoupled (no paper row; our choice of r)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('mobilenet_v2', 0.95, 'decoupled', arg=arg)
