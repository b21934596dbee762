"""CIFAR-10 ResNet-56 dense baseline (paper: 93.66%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_baseline('resnet56', arg=arg)
