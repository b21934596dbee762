"""Batch-1 sparse inference with one C++ custom call per gated conv (``fttw_jax.native``).

The same contract as ``fttw_jax.sparse.SparseModel`` (equal to ``model.apply`` in
eval mode; ``__call__`` sparse, ``masked_dense`` and ``dense`` the fair baselines
with the same kernel), for the ResNets and VGG16-BN. Activations stay full width
in CHW order between layers: a switched-off channel is a zero plane the next
layer skips (it skips every input channel that is identically zero), so no
index bookkeeping crosses layers and the jitted graph is one call per conv plus
a handful of shortcut and pooling ops.

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
from fttw_jax.models.resnet import ResNet
from fttw_jax.models.vgg import VGG

MODES = ('sparse', 'masked', 'dense')


class _Runner:
  """Runs one CHW sample; ``mode`` picks sparse / masked dense / plain dense."""

  def __init__(self, params, gate, mode):
    self.params, self.gate, self.mode = params, gate, mode
    self.aux = {}

  def conv(self, name, x, stride=1, relu=True, residual=None, post_relu=True,
           after_block=False):
    p = self.params[name]
    gated = self.mode != 'dense' and 'head_w' in p
    y, logits = native.gated_conv(
        x, p['w'], p['b'], (p['head_w'], p['head_b']) if gated else None, residual,
        stride=stride, relu=relu, post_relu=post_relu, after_block=after_block,
        pool=self.gate.pool, softmax=self.gate.softmax, sparse=self.mode == 'sparse')
    if gated:
      self.aux[name] = {'logits': logits, 'mask': (logits > 0).astype(jnp.float32)}
    return y


def _max_pool(x, window, stride, pad=0):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window), (1, stride, stride),
                           ((0, 0), (pad, pad), (pad, pad)))


def _pad_shortcut(x, features, stride):
  """CHW version of ``models.resnet.pad_shortcut``."""
  if stride != 1:
    x = lax.reduce_window(x, 0.0, lax.add, (1, stride, stride), (1, stride, stride),
                          'VALID') / (stride * stride)
  extra = features - x.shape[0]
  return jnp.pad(x, ((extra // 2, extra - extra // 2), (0, 0), (0, 0)))


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
          residual = _pad_shortcut(x, features, stride)
      y = run.conv(f'{name}/conv1', x, stride)
      x = run.conv(f'{name}/conv2', y, relu=False, residual=residual,
                   after_block=after_block)
  return _classify(run, jnp.mean(x, axis=(1, 2), keepdims=True))


def _vgg(run: _Runner, model: VGG, x):
  index = 0
  for v in model.cfg:
    if v == 'M':
      x = _max_pool(x, 2, 2)
    else:
      x = run.conv(f'conv{index}', x)
      index += 1
  return _classify(run, x)


ARCHS = {ResNet: _resnet, VGG: _vgg}


def check_supported(model):
  """The walker for ``model``, or a ValueError naming what is supported."""
  sparse.check_supported(model)
  walker = ARCHS.get(type(model))
  if walker is None:
    raise ValueError(
        f'native sparse execution does not support {type(model).__name__} (depthwise '
        f'convs); supported: {[t.__name__ for t in ARCHS]}; use fttw_jax.sparse.SparseModel')
  return walker


class NativeSparseModel(sparse.Executor):
  """Batch-1 sparse inference, one custom call per conv; equal to ``model.apply``
  (eval mode). Batches run sample by sample. See ``sparse.Executor`` for the calls."""

  def __init__(self, model, params: dict):
    self.walker = check_supported(model)
    native.ensure()
    self.model, self.params = model, params

  @classmethod
  def from_variables(cls, model, variables) -> 'NativeSparseModel':
    """Fold BN into the convs once and lay the kernels out OIHW."""
    check_supported(model)
    params = sparse.fold_variables(variables, input_major=False)
    for entry in params.values():
      if entry['w'].ndim == 4:
        entry['w'] = jnp.transpose(entry['w'], (3, 2, 0, 1))
    return cls(model, params)

  def _forward_fn(self, mode):
    return functools.partial(_forward, self.walker, self.model, mode)


def _forward(walker, model, mode, params, xs):
  def one(x):
    run = _Runner(params, model.gate, mode)
    return walker(run, model, jnp.transpose(x, (2, 0, 1)))[0], run.aux
  return sparse.map_samples(one, xs)
