"""Small shared helpers for the tests."""

import dataclasses

import numpy as np

import jax
import jax.numpy as jnp

from fttw_jax import models


def small_input_size(name: str) -> int:
  return 64 if name in models.IMAGENET_MODELS else 32


def init_gated(name, gate=None, batch=2, num_classes=10, width=1.0, seed=0):
  """(gated model, random variables, x) without compiling an init (slow on CPU)."""
  gate = gate or models.GateConfig(threshold=0.8)
  model = models.create_model(name, num_classes=num_classes, gate=gate, width=width)
  size = small_input_size(name)
  x = jax.random.normal(jax.random.key(seed), (batch, size, size, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, random_variables(shapes, seed), x


def random_variables(shapes, seed=0):
  """Random weights (fan-in scaled) and non-trivial BatchNorm statistics and affines."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    n = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'kernel':
      return n / np.sqrt(np.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return 1.0 + 0.1 * np.abs(n)
    return 0.1 * n  # biases, BN offsets and means

  return jax.tree.map_with_path(fill, shapes)


def with_gate(model, **changes):
  return model.clone(gate=dataclasses.replace(model.gate, **changes))


def strip_heads(params):
  """Baseline params: the gated params without any head subtree."""
  if isinstance(params, dict):
    return {k: strip_heads(v) for k, v in params.items() if k != models.gating.HEAD_NAME}
  return params
