"""Sparse inference with one C++ custom call per gated conv (``kernel.gated_conv``).

The same contract and architectures as ``xla.SparseModel`` (equal to
``model.apply`` in eval mode; ``__call__`` sparse, ``predict`` its logits,
``masked_dense`` and ``dense`` the fair baselines with the same kernel), CPU only.
Activations stay full width in NCHW order between layers: a switched-off channel is
a zero plane the next layer skips (it skips every input channel that is
identically zero), so no index bookkeeping crosses layers and the jitted graph is
one call per conv plus a handful of shortcut and pooling ops. A batch goes through
each call whole: the samples (independent: each has its own masks) are split
across XLA's intra-op threads; one sample splits its layers' tiles instead.

Usage::

  sm = NativeSparseModel.from_variables(model, variables)
  logits, aux = sm(x)        # x: (H, W, 3) or (N, H, W, 3); aux[layer]['mask']
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from fttw_jax.sparse import base, kernel, walkers


class _Runner:
  """The walkers' runner on NCHW batches; ``mode``: 'sparse', 'masked' or 'dense'."""

  def __init__(self, params, gate, mode):
    self.params, self.gate, self.mode = params, gate, mode
    self.aux = {}

  def out_channels(self, name):
    return self.params[name]['w'].shape[0]

  def has(self, name):
    return name in self.params

  def conv(self, name, x, stride=1, relu=True, residual=None, post_relu=True,
           after_block=False, depthwise=False):
    p = self.params[name]
    gated = self.mode != 'dense' and 'head_w' in p
    shape = x.shape
    pointwise = p['w'].shape[-1] == 1 and stride == 1
    if pointwise:    # pixels as one row: full 8-pixel vectors on 4x4 and 2x2 maps too
      x = x.reshape(*shape[:2], 1, -1)
      residual = None if residual is None else residual.reshape(*residual.shape[:2], 1, -1)
    head = (p['head_w'], p['head_b'], p['head_colsum']) if gated else None
    y, logits, mask = kernel.gated_conv(
        x, p['w'], p['b'], head, residual, stride=stride, relu=relu, post_relu=post_relu,
        after_block=after_block, pool=self.gate.pool, softmax=self.gate.softmax,
        head_norm=self.gate.head_norm, sparse=self.mode == 'sparse', depthwise=depthwise)
    if gated:
      self.aux[name] = {'logits': logits, 'mask': mask}
    return y.reshape(*y.shape[:2], *shape[2:]) if pointwise else y

  def depthwise(self, name, x, stride=1):
    return self.conv(name, x, stride, depthwise=True)

  def shortcut(self, x, conv=None, stride=1, pad=None):
    if conv is not None:
      return self.conv(conv, x, stride, relu=False)
    if pad is not None:
      return jnp.transpose(pad(jnp.transpose(x, (0, 2, 3, 1))), (0, 3, 1, 2))
    return x

  def pool(self, x, kind, window, stride=None, pad=0):
    return walkers.pool(x, kind, window, stride, pad, axes=(2, 3))

  def classify(self, x):
    p = self.params['classifier']
    x = jnp.transpose(x, (0, 2, 3, 1)).reshape(x.shape[0], -1)   # NHWC flatten order
    return x @ p['w'] + p['b']


class NativeSparseModel(base.Executor):
  """Sparse inference, one custom call per conv; equal to ``model.apply`` (eval mode).
  See ``base.Executor`` for the calls."""

  def __init__(self, model, params: dict):
    self.walker = walkers.check_supported(model)
    kernel.ensure()
    self.model, self.params = model, params

  @classmethod
  def from_variables(cls, model, variables) -> 'NativeSparseModel':
    """Fold BN into the convs once, lay the kernels out OIHW, sum the heads' columns."""
    walkers.check_supported(model)
    params = base.fold_variables(variables)
    for entry in params.values():
      if entry['w'].ndim == 4:
        entry['w'] = jnp.transpose(entry['w'], (3, 2, 0, 1))
      if 'head_w' in entry:
        entry['head_colsum'] = jnp.sum(entry['head_w'], axis=0)
    return cls(model, params)

  def _forward_fn(self, mode):
    return functools.partial(_forward, self.walker, self.model, mode)


def _forward(walker, model, mode, params, xs):
  run = _Runner(params, model.gate, mode)
  return walker(run, model, jnp.transpose(xs, (0, 3, 1, 2))), run.aux
