"""CIFAR-10 MobileNetV1 dense baseline (paper: 90.89%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_baseline('mobilenet_v1', arg=arg)
