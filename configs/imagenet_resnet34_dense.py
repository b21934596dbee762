"""ImageNet ResNet-34 dense (paper: torchvision weights, 73.30%)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.imagenet_baseline('resnet34', arg=arg)
