"""ImageNet ResNet-18 dense (paper: torchvision weights, 69.76%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_baseline('resnet18', arg=arg)
