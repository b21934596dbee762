"""CIFAR-10 VGG16-BN dense baseline (paper: 93.82%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_baseline('vgg16_bn', arg=arg)
