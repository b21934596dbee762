"""CIFAR-10 VGG16-BN FTWT r=0.88 joint (paper: 92.65%, 74%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('vgg16_bn', 0.88, 'joint', arg=arg)
