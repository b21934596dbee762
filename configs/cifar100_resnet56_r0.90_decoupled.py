"""CIFAR-100 ResNet-56 FTWT r=0.90 decoupled (no paper row; our choice of r)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('resnet56', 0.90, 'decoupled', 'cifar100', arg=arg)
