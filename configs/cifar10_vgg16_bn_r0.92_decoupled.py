"""CIFAR-10 VGG16-BN FTWT r=0.92 decoupled (paper: 93.73%, 56%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('vgg16_bn', 0.92, 'decoupled', arg=arg)
