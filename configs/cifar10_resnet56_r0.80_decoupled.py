"""CIFAR-10 ResNet-56 FTWT r=0.80 decoupled (paper: 92.63%, 66%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('resnet56', 0.80, 'decoupled', arg=arg)
