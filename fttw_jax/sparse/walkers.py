"""One walk per architecture, over the runner interface every sparse runner implements.

A walker knows the network's control flow (which layer follows which, where the
residuals join); a runner knows how to execute a layer on its own activation
representation (the XLA runner's compact NHWC ``Act``, the native runner's full
width NCHW planes, the static runner's narrow NHWC slices). The activations a
walker passes around are opaque to it. The interface:

* ``conv(name, x, stride=1, relu=True, residual=None, post_relu=True,
  after_block=False)``: the gated conv ``name`` (BN folded in); with ``residual``
  (from ``shortcut``) the block output ``post(mask * act(conv) + residual)``, or
  ``mask * relu(conv + residual)`` with ``after_block`` (SPEC 2.4);
* ``depthwise(name, x, stride)``: the gated depthwise conv (SPEC 2.2);
* ``shortcut(x, conv=None, stride=1, pad=None)``: the residual stream of ``x`` in
  the runner's residual representation: ``conv`` names an unmasked projection
  (conv + BN), ``pad`` a parameter-free NHWC shortcut (``models.resnet.pad_shortcut``);
* ``pool(x, kind, window, stride=None, pad=0)``: 'max' or 'avg' pooling, window 0 =
  global average;
* ``classify(x)``: the dense classifier on the NHWC-flattened features;
* ``out_channels(name)``: output channels of layer ``name``; ``has(name)``.
"""

from __future__ import annotations

import functools
from typing import Callable

from jax import lax

from fttw_jax.models.mobilenet import (MOBILENET_V1_CFG, MOBILENET_V2_CFG, MobileNetV1,
                                       MobileNetV2)
from fttw_jax.models.resnet import ResNet, pad_shortcut
from fttw_jax.models.vgg import VGG


def resnet(run, model: ResNet, x):
  x = run.conv('stem', x, stride=2 if model.imagenet else 1)
  if model.imagenet:
    x = run.pool(x, 'max', 3, 2, 1)
  channels = run.out_channels('stem')
  for stage, size in enumerate(model.stage_sizes):
    for b in range(size):
      name = f'layer{stage + 1}_{b}'
      stride = 2 if stage > 0 and b == 0 else 1
      features = run.out_channels(f'{name}/conv1')
      if stride == 1 and channels == features:
        residual = run.shortcut(x)
      elif model.imagenet:
        residual = run.shortcut(x, conv=f'{name}/downsample', stride=stride)
      else:   # the model's own parameter-free shortcut (NHWC), whatever the runner's layout
        residual = run.shortcut(x, pad=functools.partial(
            pad_shortcut, features=features, strides=stride,
            side=model.options.shortcut_pad))
      y = run.conv(f'{name}/conv1', x, stride)
      x = run.conv(f'{name}/conv2', y, relu=False, residual=residual,
                   after_block=model.gate.gt_after_block)
      channels = features
  return run.classify(run.pool(x, 'avg', 0))


def vgg(run, model: VGG, x):
  index = 0
  for v in model.cfg:
    if v == 'M':
      x = run.pool(x, 'max', 2, 2)
    else:
      x = run.conv(f'conv{index}', x)
      index += 1
  return run.classify(x)


def mobilenet_v1(run, model: MobileNetV1, x):
  x = run.conv('stem', x, stride=2 if model.imagenet else 1)
  for i, (_, s) in enumerate(MOBILENET_V1_CFG):
    x = run.depthwise(f'block{i}_dw', x, s)
    x = run.conv(f'block{i}_pw', x)
  return run.classify(run.pool(x, 'avg', 0 if model.imagenet else 2))


def mobilenet_v2(run, model: MobileNetV2, x):
  x, index = run.conv('stem', x), 0
  for _, _, n, s in MOBILENET_V2_CFG:
    for b in range(n):
      name, stride = f'block{index}', (s if b == 0 else 1)
      residual = None
      if stride == 1:
        projection = f'{name}/shortcut'
        residual = run.shortcut(x, conv=projection if run.has(projection) else None)
      y = run.conv(f'{name}/expand', x)
      y = run.depthwise(f'{name}/dw', y, stride)
      x = run.conv(f'{name}/project', y, relu=False, residual=residual, post_relu=False)
      index += 1
  x = run.conv('final_conv', x)
  return run.classify(run.pool(x, 'avg', 4))


WALKERS: dict[type, Callable] = {ResNet: resnet, VGG: vgg, MobileNetV1: mobilenet_v1,
                                 MobileNetV2: mobilenet_v2}


def check_supported(model) -> Callable:
  """The walker for ``model``, or a ValueError naming what is supported."""
  walker = WALKERS.get(type(model))
  if walker is None:
    raise ValueError(
        f'sparse execution does not support {type(model).__name__}; supported '
        f'architectures: {[t.__name__ for t in WALKERS]}')
  if model.gate is None:
    raise ValueError('sparse execution needs a gated model (gate=GateConfig(...)); '
                     'a baseline model has no heads to predict masks')
  if model.gate.mask_source != 'predicted':
    raise ValueError(f"sparse execution runs the heads' predicted masks; got "
                     f'gate.mask_source={model.gate.mask_source!r} (valid: \'predicted\')')
  # The depthwise kernels implement SPEC 2.2's rule.
  if model.gate.depthwise_rule != 'follow_input' and isinstance(model, (MobileNetV1,
                                                                        MobileNetV2)):
    raise ValueError(f'sparse execution implements gate.depthwise_rule=\'follow_input\'; '
                     f'got {model.gate.depthwise_rule!r} (fidelity=\'reference\')')
  return walker


# ------------------------------------------------------- shared pooling helpers

def pool(x, kind: str, window: int, stride: int | None = None, pad: int = 0,
         axes=(1, 2)):
  """Max / average pooling over the two spatial ``axes`` of ``x`` (any layout);
  ``window=0``: global average (kept as a 1x1 map)."""
  if window == 0:
    return x.mean(axis=axes, keepdims=True)
  stride = stride or window
  dims = [1] * x.ndim
  strides = [1] * x.ndim
  pads = [(0, 0)] * x.ndim
  for a in axes:
    dims[a], strides[a], pads[a] = window, stride, (pad, pad)
  if kind == 'max':
    return lax.reduce_window(x, -float('inf'), lax.max, dims, strides, pads)
  return lax.reduce_window(x, 0.0, lax.add, dims, strides, pads) / (window * window)
