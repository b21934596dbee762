"""A statically pruned network: fixed channel lists per layer, physically narrower convs.

The comparison point for dynamic sparsity: every sample keeps the same channels,
so the network is simply smaller. Given per gated layer the output channels to
keep (e.g. the ones the heads switch on most often, at the same mean count),
the weights are sliced once at load time (inputs x outputs) and the batch runs
through plain dense convs (``xla.conv2d``) with no heads. Residual streams stay
full width (a block's output is scatter-added into them), as in ``xla``.

Usage::

  sm = StaticModel.from_variables(model, variables, {layer: [channel, ...], ...})
  logits = sm.predict(x)        # x: (H, W, 3) or (N, H, W, 3)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fttw_jax.sparse import base, walkers
from fttw_jax.sparse.xla import conv2d, depthwise2d


@dataclasses.dataclass(frozen=True)
class Narrow:
  """NHWC activation holding the channels ``idx`` (sorted) of ``channels``; ``idx``
  None: all of them, in order."""
  x: jax.Array
  idx: np.ndarray | None = None
  channels: int = 0

  def full(self):
    """Original width and order (the channels not held are zero)."""
    if self.idx is None:
      return self.x
    shape = (*self.x.shape[:-1], self.channels)
    return jnp.zeros(shape, self.x.dtype).at[..., self.idx].set(self.x)


class _Runner:
  """The walkers' runner on NHWC batches. ``weights``: the sliced weights per layer;
  a layer missing there is sliced from ``params`` in numpy and added (at load time,
  under ``jax.eval_shape``)."""

  def __init__(self, params, keep, weights):
    self.params, self.keep, self.weights = params, keep, weights

  def out_channels(self, name):
    return self.params[name]['w'].shape[-1]

  def has(self, name):
    return name in self.params

  def _sliced(self, name, in_idx, out_idx, depthwise=False):
    if name not in self.weights:
      w, b = (np.asarray(self.params[name][k]) for k in ('w', 'b'))
      if in_idx is not None and not depthwise:
        w = w[:, :, in_idx]
      if out_idx is not None:
        w, b = w[..., out_idx], b[out_idx]
      self.weights[name] = {'w': w, 'b': b}
    return self.weights[name]

  def conv(self, name, a: Narrow, stride=1, relu=True, residual=None, post_relu=True,
           after_block=False):
    out_idx = self.keep[name]
    p = self._sliced(name, a.idx, out_idx)
    y = conv2d(a.x, p['w'], stride) + p['b']
    if relu:
      y = jax.nn.relu(y)
    if residual is None:
      return Narrow(y, out_idx, self.out_channels(name))
    if after_block:
      y = jax.nn.relu(y + residual[..., out_idx])
      return Narrow(jnp.zeros_like(residual).at[..., out_idx].set(y))
    y = residual.at[..., out_idx].add(y)
    return Narrow(jax.nn.relu(y) if post_relu else y)

  def depthwise(self, name, a: Narrow, stride=1):
    """Channel c reads input channel c only: kept = the list & the input's channels."""
    channels = self.out_channels(name)
    have = np.arange(channels) if a.idx is None else a.idx
    kept = np.intersect1d(self.keep[name], have)
    x = a.x
    if len(kept) < len(have):
      x = jnp.take(x, np.searchsorted(have, kept), axis=-1)
    p = self._sliced(name, None, kept)
    return Narrow(jax.nn.relu(depthwise2d(x, p['w'], stride) + p['b']), kept, channels)

  def shortcut(self, a: Narrow, conv=None, stride=1, pad=None):
    if conv is not None:
      p = self._sliced(conv, a.idx, None)
      return conv2d(a.x, p['w'], stride) + p['b']
    x = a.full()
    return pad(x) if pad is not None else x

  def pool(self, a: Narrow, kind, window, stride=None, pad=0):
    return dataclasses.replace(a, x=walkers.pool(a.x, kind, window, stride, pad))

  def classify(self, a: Narrow):
    if 'classifier' not in self.weights:
      p = self.params['classifier']
      w = np.asarray(p['w'])
      if a.idx is not None:
        pixels = a.x.shape[1] * a.x.shape[2]
        w = w.reshape(pixels, -1, w.shape[-1])[:, a.idx].reshape(-1, w.shape[-1])
      self.weights['classifier'] = {'w': w, 'b': np.asarray(p['b'])}
    p = self.weights['classifier']
    return a.x.reshape(a.x.shape[0], -1) @ p['w'] + p['b']


class StaticModel:
  """The gated ``model``'s network with only the channels ``keep[layer]`` of every
  gated layer, no heads: ``predict(x)`` -> (N, classes), the whole batch at once."""

  def __init__(self, model, params: dict, keep: dict):
    self.walker = walkers.check_supported(model)
    gated = sorted(k for k, v in params.items() if 'head_w' in v)
    if sorted(keep) != gated:
      raise ValueError(f'keep must list the channels of every gated layer: missing '
                       f'{sorted(set(gated) - set(keep))}, unknown {sorted(set(keep) - set(gated))}')
    self.model = model
    self.keep = {k: np.unique(np.asarray(v, np.int64)) for k, v in keep.items()}
    for k, v in self.keep.items():
      c = params[k]['w'].shape[-1]
      if len(v) and (v[0] < 0 or v[-1] >= c):
        raise ValueError(f'keep[{k!r}]: channels must be a subset of 0..{c - 1}, got {v}')
    self.params, self.weights = params, {}

  @classmethod
  def from_variables(cls, model, variables, keep: dict) -> 'StaticModel':
    walkers.check_supported(model)
    return cls(model, base.fold_variables(variables), keep)

  def _forward(self, weights, xs):
    run = _Runner(self.params, self.keep, weights)
    return self.walker(run, self.model, Narrow(xs, None, xs.shape[-1]))

  def predict(self, x):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      x = x[None]
    if not self.weights:     # slice once (numpy), tracing abstractly: no compute
      sliced = {}
      jax.eval_shape(functools.partial(self._forward, sliced), x)
      self.weights = jax.tree.map(jnp.asarray, sliced)
    if '_fn' not in self.__dict__:
      self._fn = jax.jit(self._forward)
    return self._fn(self.weights, x)

  __call__ = predict
