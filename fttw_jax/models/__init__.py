"""Registry of gated backbones: config name -> Flax module.

Every model's ``apply(variables, x, train=...)`` returns ``(logits, aux)`` with
``aux['gates']`` a dict ``{layer_path: {'logits', 'target', 'mask', 'in_nz'}}``
(empty in baseline mode, i.e. ``gate=None``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from fttw_jax import choices
from fttw_jax.models.conv_impl import CONV_IMPLS, CPU_IMPLS, compiler_options
from fttw_jax.models.gating import HEAD_NAME, BackboneOptions, GateConfig, GatedConv
from fttw_jax.models.mobilenet import MobileNetV1, MobileNetV2
from fttw_jax.models.resnet import ResNet
from fttw_jax.models.vgg import VGG

_P = functools.partial
MODELS = {
    'resnet8': _P(ResNet, stage_sizes=(1, 1, 1)),  # smallest 6n+2: smoke runs and tests
    'resnet20': _P(ResNet, stage_sizes=(3, 3, 3)),
    'resnet32': _P(ResNet, stage_sizes=(5, 5, 5)),
    'resnet44': _P(ResNet, stage_sizes=(7, 7, 7)),
    'resnet56': _P(ResNet, stage_sizes=(9, 9, 9)),
    'resnet110': _P(ResNet, stage_sizes=(18, 18, 18)),
    'vgg16_bn': VGG,
    'mobilenet_v1': _P(MobileNetV1, imagenet=False),
    'mobilenet_v2': MobileNetV2,
    'resnet18': _P(ResNet, stage_sizes=(2, 2, 2, 2), imagenet=True),
    'resnet34': _P(ResNet, stage_sizes=(3, 4, 6, 3), imagenet=True),
    'mobilenet_v1_imagenet': _P(MobileNetV1, imagenet=True),
}
IMAGENET_MODELS = ('resnet18', 'resnet34', 'mobilenet_v1_imagenet')
DTYPES = {name: getattr(jnp, name) for name in choices.DTYPES}  # jnp.float32, jnp.bfloat16


def create_model(name: str, *, num_classes: int, gate: GateConfig | None = None,
                 width: float = 1.0, dtype: str = 'float32',
                 bn_axis_name: str | None = None,
                 options: BackboneOptions | None = None, conv_impl: str = 'xla') -> Any:
  """Build a registered backbone; ``gate=None`` gives the plain baseline network.

  ``options``: shortcut and BatchNorm behaviours (default: SPEC's, see
  ``BackboneOptions``); ``conv_impl``: 'xla', 'cpu' or 'onednn' (``models.conv_impl``). Neither
  changes a parameter shape.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid models: {sorted(MODELS)}')
  if dtype not in DTYPES:
    raise ValueError(f'unknown dtype {dtype!r}; valid: {sorted(DTYPES)}')
  if not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
  if not width > 0:
    raise ValueError(f'width multiplier must be > 0, got {width!r}')
  if conv_impl not in ('xla', *CPU_IMPLS):
    raise ValueError(f"conv_impl={conv_impl!r} is invalid here; valid: 'xla', "
                     f"{', '.join(map(repr, CPU_IMPLS))} (conv_impl.resolve turns 'auto' "
                     "into one of them)")
  return MODELS[name](num_classes=num_classes, gate=gate, width=width,
                      dtype=DTYPES[dtype], bn_axis_name=bn_axis_name,
                      options=options or BackboneOptions(), conv_impl=conv_impl)


def is_head_path(path) -> bool:
  """True for parameters of a mask predictor head (trained by the heads' optimizer)."""
  return HEAD_NAME in tuple(getattr(k, 'key', k) for k in path)


def split_heads(params) -> tuple[dict, dict]:
  """(backbone params, head params) as two nested dicts of the same layout."""
  flat = traverse_util.flatten_dict(params)
  return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_head_path(k)}),
          traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_head_path(k)}))


def merge_heads(backbone, heads) -> dict:
  """The inverse of ``split_heads``: one params tree holding both."""
  flat = traverse_util.flatten_dict(backbone)
  flat.update(traverse_util.flatten_dict(heads))
  return traverse_util.unflatten_dict(flat)


__all__ = ['MODELS', 'IMAGENET_MODELS', 'BackboneOptions', 'CONV_IMPLS', 'compiler_options',
           'GateConfig', 'GatedConv', 'create_model',
           'is_head_path', 'merge_heads', 'split_heads']
