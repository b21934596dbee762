"""BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), and its hand-written VJP.

One module, ``BatchNorm``: the same variables as ``nn.BatchNorm`` (params
scale/bias, batch_stats mean/var) and the same float32 statistics, global over
``axis_name``. ``running_var`` says which batch variance updates the running one:
'biased' (as ``nn.BatchNorm``) or 'unbiased', n/(n-1) over the global batch
(PyTorch, SPEC 9.4); normalisation always uses the biased one, as both frameworks do.

``custom_vjp`` (train mode under ``conv_impl`` 'cpu' or 'onednn', for XLA:CPU): autodiff of BN
gives XLA:CPU a backward graph that it fuses into long recomputing chains; this
one states the classic BN gradient directly:
``dx = a * (g - mean(g) - xhat * mean(g * xhat))``, ``dscale = sum(g * xhat)``,
``dbias = sum(g)`` with ``a = scale / sqrt(var + eps)``. The forward is Flax's
(one-pass mean and E[x^2], variance clipped at 0, ``(x - mean) * a + bias``),
so checkpoints move freely between the two implementations.

With ``axis_name`` (inside ``shard_map``) the statistics are global means over
that axis, and so are the two means of the backward. ``scale``/``bias`` enter
the VJP cast to ``x``'s varying axes, so their per-device gradients are summed
by JAX (the transpose of that cast), as for any replicated parameter.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def update_running_stats(ra_mean, ra_var, mean, var, momentum: float, correction=1.0):
  """Running averages (PyTorch momentum = 1 - ``momentum``); ``var * correction`` is the
  batch variance that updates the running one (n/(n-1) for 'unbiased')."""
  return (momentum * ra_mean + (1 - momentum) * mean,
          momentum * ra_var + (1 - momentum) * var * correction)


def _global_mean(v, axis_name):
  return v if axis_name is None else jax.lax.pmean(v, axis_name)


def _global_sum(v, axis_name):
  return v if axis_name is None else jax.lax.psum(v, axis_name)


def _stats(x, axis_name):
  axes = tuple(range(x.ndim - 1))
  moments = _global_mean(jnp.stack([jnp.mean(x, axes), jnp.mean(x * x, axes)]), axis_name)
  mean = moments[0]
  return mean, jnp.maximum(0.0, moments[1] - mean * mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: str | None):
  """(y, batch mean, batch variance) of float32 NHWC ``x``; the statistics take no gradient."""
  return _forward(x, scale, bias, epsilon, axis_name)[0]


def _forward(x, scale, bias, epsilon, axis_name):
  mean, var = _stats(x, axis_name)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _backward(epsilon, axis_name, res, cotangents):
  x, mean, inv, scale = res
  g = cotangents[0]  # the statistics are stop_gradient'ed by the caller
  axes = tuple(range(x.ndim - 1))
  xhat = (x - mean) * inv
  local = jnp.stack([jnp.sum(g, axes), jnp.sum(g * xhat, axes)])
  sums = _global_sum(local, axis_name)
  count = _global_sum(jnp.asarray(x.size // x.shape[-1], jnp.float32), axis_name)
  dx = (inv * scale) * (g - sums[0] / count - xhat * (sums[1] / count))
  return dx, local[1], local[0]


batch_norm_train.defvjp(_forward, _backward)


def vary_like(p, x):
  """``p`` cast to the shard_map axes over which ``x`` varies (no-op outside one)."""
  varying = lambda v: jax.typeof(v).manual_axis_type.varying
  axes = tuple(sorted(varying(x) - varying(p)))
  return jax.lax.pcast(p, axes, to='varying') if axes else p


class BatchNorm(nn.Module):
  """Drop-in for ``nn.BatchNorm`` (feature axis -1, scale and bias); see the module doc."""
  use_running_average: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32
  running_var: str = 'biased'
  custom_vjp: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    if self.use_running_average:
      y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return y.astype(self.dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    xf = x.astype(jnp.float32)
    if self.custom_vjp:
      y, mean, var = batch_norm_train(xf, vary_like(scale, x), vary_like(bias, x),
                                      self.epsilon, axis_name)
    else:
      (y, mean, var), _ = _forward(xf, scale, bias, self.epsilon, axis_name)
    if not self.is_initializing():
      correction = 1.0
      if self.running_var == 'unbiased':
        n = x.size // x.shape[-1] * (1 if axis_name is None else jax.lax.psum(1, axis_name))
        correction = n / jnp.maximum(n - 1, 1)
      ra_mean.value, ra_var.value = update_running_stats(
          ra_mean.value, ra_var.value, jax.lax.stop_gradient(mean),
          jax.lax.stop_gradient(var), self.momentum, correction)
    return y.astype(self.dtype)
