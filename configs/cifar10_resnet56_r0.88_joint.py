"""CIFAR-10 ResNet-56 FTWT r=0.88 joint (paper: 92.28%, 54%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('resnet56', 0.88, 'joint', arg=arg)
