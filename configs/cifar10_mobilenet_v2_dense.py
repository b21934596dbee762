"""CIFAR-10 MobileNetV2 dense baseline (cosine schedule; no paper row)."""

from fttw_jax import recipes


def get_config(arg: str = ''):
  return recipes.cifar_baseline('mobilenet_v2', arg=arg)
