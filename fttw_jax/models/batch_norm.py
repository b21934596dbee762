"""Train-mode BatchNorm with a hand-written VJP, for XLA:CPU (``conv_impl='cpu'``).

Autodiff of ``nn.BatchNorm`` gives XLA:CPU a backward graph that it fuses into
long recomputing chains; this one states the classic BN gradient directly:
``dx = a * (g - mean(g) - xhat * mean(g * xhat))``, ``dscale = sum(g * xhat)``,
``dbias = sum(g)`` with ``a = scale / sqrt(var + eps)``. The forward is Flax's
(one-pass mean and E[x^2], variance clipped at 0, ``(x - mean) * a + bias``),
the variables are ``nn.BatchNorm``'s (params ``scale``/``bias``, batch_stats
``mean``/``var``), so checkpoints move freely between the two implementations.

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


def update_running_stats(ra_mean, ra_var, mean, var, momentum: float):
  """Flax's running averages (PyTorch momentum = 1 - ``momentum``), biased variance."""
  return (momentum * ra_mean + (1 - momentum) * mean,
          momentum * ra_var + (1 - momentum) * var)


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


def _vary_like(p, x):
  """``p`` cast to the shard_map axes over which ``x`` varies (no-op outside one)."""
  varying = lambda v: jax.typeof(v).manual_axis_type.varying
  axes = tuple(sorted(varying(x) - varying(p)))
  return jax.lax.pcast(p, axes, to='varying') if axes else p


class BatchNorm(nn.Module):
  """Drop-in for ``nn.BatchNorm`` (feature axis -1, scale and bias) in train mode."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    axis_name = None if self.is_initializing() else self.axis_name
    scale, bias = (_vary_like(p, x) for p in (scale, bias))
    y, mean, var = batch_norm_train(x.astype(jnp.float32), scale, bias, self.epsilon,
                                    axis_name)
    if not self.is_initializing():
      ra_mean.value, ra_var.value = update_running_stats(
          ra_mean.value, ra_var.value, jax.lax.stop_gradient(mean),
          jax.lax.stop_gradient(var), self.momentum)
    return y.astype(self.dtype)
