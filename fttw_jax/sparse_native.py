"""Batch-1 sparse inference with one C++ custom call per gated conv (``fttw_jax.native``).

The same contract and architectures as ``fttw_jax.sparse.SparseModel`` (equal to
``model.apply`` in eval mode; ``__call__`` sparse, ``predict`` its logits,
``masked_dense`` and ``dense`` the fair baselines with the same kernel), CPU only.
Activations stay full width in CHW order between layers: a switched-off channel is
a zero plane the next layer skips (it skips every input channel that is
identically zero), so no index bookkeeping crosses layers and the jitted graph is
one call per conv plus a handful of shortcut and pooling ops.

Usage::

  sm = NativeSparseModel.from_variables(model, variables)
  logits, aux = sm(x)        # x: (H, W, 3) or (N, H, W, 3); aux[layer]['mask']
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fttw_jax import native, sparse
from fttw_jax.models.mobilenet import (MOBILENET_V1_CFG, MOBILENET_V2_CFG, MobileNetV1,
                                       MobileNetV2)
from fttw_jax.models.resnet import ResNet
from fttw_jax.models.vgg import VGG


class _Runner:
  """Runs one CHW sample; ``mode`` picks sparse / masked dense / plain dense."""

  def __init__(self, params, gate, mode):
    self.params, self.gate, self.mode = params, gate, mode
    self.aux = {}

  def conv(self, name, x, stride=1, relu=True, residual=None, post_relu=True,
           after_block=False, depthwise=False):
    p = self.params[name]
    gated = self.mode != 'dense' and 'head_w' in p
    shape = x.shape
    pointwise = p['w'].shape[-1] == 1 and stride == 1
    if pointwise:    # pixels as one row: full 8-pixel vectors on 4x4 and 2x2 maps too
      x = x.reshape(shape[0], 1, -1)
      residual = None if residual is None else residual.reshape(residual.shape[0], 1, -1)
    head = (p['head_w'], p['head_b'], p['head_colsum']) if gated else None
    y, logits, mask = native.gated_conv(
        x, p['w'], p['b'], head, residual, stride=stride, relu=relu, post_relu=post_relu,
        after_block=after_block, pool=self.gate.pool, softmax=self.gate.softmax,
        sparse=self.mode == 'sparse', depthwise=depthwise)
    if gated:
      self.aux[name] = {'logits': logits, 'mask': mask}
    return y.reshape(y.shape[0], *shape[1:]) if pointwise else y


def _max_pool(x, window, stride, pad=0):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window), (1, stride, stride),
                           ((0, 0), (pad, pad), (pad, pad)))


def _avg_pool(x, window):
  """CHW average pool; ``window=0``: global."""
  if window == 0:
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  return lax.reduce_window(x, 0.0, lax.add, (1, window, window), (1, window, window),
                           'VALID') / (window * window)


def _pad_shortcut(x, features, stride, side='both'):
  """CHW version of ``models.resnet.pad_shortcut``."""
  if stride != 1:
    x = _avg_pool(x, stride)
  extra = features - x.shape[0]
  before = extra // 2 if side == 'both' else 0
  return jnp.pad(x, ((before, extra - before), (0, 0), (0, 0)))


def _classify(run, x):
  p = run.params['classifier']
  return jnp.transpose(x, (1, 2, 0)).reshape(1, -1) @ p['w'] + p['b']   # NHWC flatten order


def _resnet(run: _Runner, model: ResNet, x):
  x = run.conv('stem', x, stride=2 if model.imagenet else 1)
  if model.imagenet:
    x = _max_pool(x, 3, 2, 1)
  after_block = model.gate.gt_after_block
  for stage, size in enumerate(model.stage_sizes):
    for b in range(size):
      name = f'layer{stage + 1}_{b}'
      stride = 2 if stage > 0 and b == 0 else 1
      features = run.params[f'{name}/conv1']['w'].shape[0]
      residual = x
      if stride != 1 or x.shape[0] != features:
        if model.imagenet:
          residual = run.conv(f'{name}/downsample', x, stride, relu=False)
        else:
          residual = _pad_shortcut(x, features, stride, model.options.shortcut_pad)
      y = run.conv(f'{name}/conv1', x, stride)
      x = run.conv(f'{name}/conv2', y, relu=False, residual=residual,
                   after_block=after_block)
  return _classify(run, _avg_pool(x, 0))


def _vgg(run: _Runner, model: VGG, x):
  index = 0
  for v in model.cfg:
    if v == 'M':
      x = _max_pool(x, 2, 2)
    else:
      x = run.conv(f'conv{index}', x)
      index += 1
  return _classify(run, x)


def _mobilenet_v1(run: _Runner, model: MobileNetV1, x):
  x = run.conv('stem', x, stride=2 if model.imagenet else 1)
  for i, (_, s) in enumerate(MOBILENET_V1_CFG):
    x = run.conv(f'block{i}_dw', x, s, depthwise=True)
    x = run.conv(f'block{i}_pw', x)
  return _classify(run, _avg_pool(x, 0 if model.imagenet else 2))


def _mobilenet_v2(run: _Runner, model: MobileNetV2, x):
  x, index = run.conv('stem', x), 0
  for _, _, n, s in MOBILENET_V2_CFG:
    for b in range(n):
      name, stride = f'block{index}', (s if b == 0 else 1)
      y = run.conv(f'{name}/expand', x)
      y = run.conv(f'{name}/dw', y, stride, depthwise=True)
      shortcut = None
      if stride == 1:
        shortcut = x
        if f'{name}/shortcut' in run.params:
          shortcut = run.conv(f'{name}/shortcut', x, relu=False)
      x = run.conv(f'{name}/project', y, relu=False, residual=shortcut, post_relu=False)
      index += 1
  x = run.conv('final_conv', x)
  return _classify(run, _avg_pool(x, 4))


ARCHS = {ResNet: _resnet, VGG: _vgg, MobileNetV1: _mobilenet_v1, MobileNetV2: _mobilenet_v2}


def check_supported(model):
  """The walker for ``model``, or a ValueError naming what is supported (the same
  architectures as ``fttw_jax.sparse``)."""
  sparse.check_supported(model)
  return ARCHS[type(model)]


class NativeSparseModel(sparse.Executor):
  """Batch-1 sparse inference, one custom call per conv; equal to ``model.apply``
  (eval mode). Batches run sample by sample. See ``sparse.Executor`` for the calls."""

  def __init__(self, model, params: dict):
    self.walker = check_supported(model)
    native.ensure()
    self.model, self.params = model, params

  @classmethod
  def from_variables(cls, model, variables) -> 'NativeSparseModel':
    """Fold BN into the convs once, lay the kernels out OIHW, sum the heads' columns."""
    check_supported(model)
    params = sparse.fold_variables(variables, input_major=False)
    for entry in params.values():
      if entry['w'].ndim == 4:
        entry['w'] = jnp.transpose(entry['w'], (3, 2, 0, 1))
      if 'head_w' in entry:
        entry['head_colsum'] = jnp.sum(entry['head_w'], axis=0)
    return cls(model, params)

  def _forward_fn(self, mode):
    return functools.partial(_forward, self.walker, self.model, mode)


def _forward(walker, model, mode, params, xs):
  def one(x):
    run = _Runner(params, model.gate, mode)
    return walker(run, model, jnp.transpose(x, (2, 0, 1)))[0], run.aux
  return sparse.map_samples(one, xs)
