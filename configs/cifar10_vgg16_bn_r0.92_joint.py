"""CIFAR-10 VGG16-BN FTWT r=0.92 joint (paper: 93.55%, 65% FLOPs reduction)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_ftwt('vgg16_bn', 0.92, 'joint', arg=arg)
