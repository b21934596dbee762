"""CIFAR-100 ResNet-56 dense baseline (no paper row)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_baseline('resnet56', 'cifar100', arg=arg)
