"""What every sparse runner shares: BN folding at load time and the calling convention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fttw_jax.models.gating import HEAD_NAME

BN_EPS = 1e-5


def fold_bn(kernel, bias, bn_params, bn_stats):
  """Fold inference BatchNorm into the preceding conv: (kernel', bias'), in numpy."""
  f = lambda a: np.asarray(a, np.float64)
  scale = f(bn_params['scale']) / np.sqrt(f(bn_stats['var']) + BN_EPS)
  b = f(bias) if bias is not None else 0.0
  return f(kernel) * scale, (b - f(bn_stats['mean'])) * scale + f(bn_params['bias'])


def _get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _fold_conv(params, stats, path, conv='conv', bn='bn'):
  p, s = _get(params, path), _get(stats, path)
  w, b = fold_bn(np.asarray(p[conv]['kernel']), p[conv].get('bias'), p[bn], s[bn])
  return {'w': jnp.asarray(w, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}


_PROJECTIONS = ('downsample_conv', 'downsample_bn', 'shortcut_conv', 'shortcut_bn')


def fold_variables(variables) -> dict:
  """{layer path: {'w' (HWIO), 'b'[, 'head_w', 'head_b']}} with BN folded into every
  conv; shortcut projections are ``<block>/downsample`` or ``<block>/shortcut``."""
  params, stats = variables['params'], variables['batch_stats']
  out = {}

  def walk(tree, path):
    if 'conv' in tree and 'bn' in tree:
      entry = _fold_conv(params, stats, path)
      if HEAD_NAME in tree:
        entry['head_w'] = jnp.asarray(tree[HEAD_NAME]['kernel'], jnp.float32)
        entry['head_b'] = jnp.asarray(tree[HEAD_NAME]['bias'], jnp.float32)
      out[path] = entry
      return
    for proj in ('downsample', 'shortcut'):
      if f'{proj}_conv' in tree:
        out[f'{path}/{proj}'] = _fold_conv(params, stats, path, f'{proj}_conv', f'{proj}_bn')
    for key, sub in tree.items():
      if isinstance(sub, dict) and key not in _PROJECTIONS:
        walk(sub, f'{path}/{key}' if path else key)

  walk(params, '')
  cls = params['classifier']
  out['classifier'] = {'w': jnp.asarray(cls['kernel'], jnp.float32),
                       'b': jnp.asarray(cls['bias'], jnp.float32)}
  return out


class Executor:
  """The calls every runner's model shares.

  ``__call__(x)`` is the sparse path, ``predict(x)`` its logits alone;
  ``masked_dense`` and ``dense`` run the same kernels at full width with and
  without masks: the fair baselines for timing. Subclasses set ``params`` and
  define ``_forward_fn(mode)`` -> ``f(params, xs) -> (logits, aux)``.
  """

  def __call__(self, x):
    """Sparse forward: (logits (N, classes), {layer: {'logits', 'mask'}} each (N, C))."""
    return self._run('sparse', x)

  def predict(self, x):
    """Sparse forward, logits only (N, classes): the masks are not materialised."""
    return self._run('sparse', x, logits_only=True)

  def masked_dense(self, x):
    """Masked dense forward with the same kernels (every layer at full width)."""
    return self._run('masked', x)

  def dense(self, x):
    """The plain network (no heads, no masks) with the same kernels: (N, classes)."""
    return self._run('dense', x, logits_only=True)

  def _run(self, mode, x, logits_only=False):
    fns = self.__dict__.setdefault('_fns', {})
    key = (mode, logits_only)
    if key not in fns:
      fn = self._forward_fn(mode)
      fns[key] = jax.jit((lambda p, x: fn(p, x)[0]) if logits_only else fn)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      x = x[None]
    if x.ndim != 4:
      raise ValueError(f'expected images (N, H, W, C) or (H, W, C), got shape {x.shape}')
    return fns[key](self.params, x)


def map_samples(one, xs):
  """``one(x) -> (logits (classes,), aux)`` over the batch: directly for one sample,
  else ``lax.map`` (a ``vmap`` would run every ``lax.switch`` branch)."""
  if xs.shape[0] == 1:
    logits, aux = one(xs[0])
    return logits[None], jax.tree.map(lambda a: a[None], aux)
  return lax.map(one, xs)
