"""Small shared helpers for the tests."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

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


def head_paths(params, prefix=()):
  for k, v in params.items():
    if k == models.gating.HEAD_NAME:
      yield prefix
    elif isinstance(v, dict):
      yield from head_paths(v, prefix + (k,))


def set_heads(variables, seed, off=1, on=2):
  """Margin masks: small head kernels, biases +-[0.06, 0.3]; the ``off``-th head (in
  sorted path order) all off, the ``on``-th all on, the others keep a random 20-80%
  of their channels. Returns (variables, off layer, on layer)."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables['params'])
  paths = sorted(head_paths(params))
  for i, path in enumerate(paths):
    head = params
    for k in path:
      head = head[k]
    head = head[models.gating.HEAD_NAME]
    c = head['bias'].shape[0]
    keep = 0.0 if i == off else 1.0 if i == on else rng.uniform(0.2, 0.8)
    sign = np.where(rng.random(c) < keep, 1.0, -1.0)
    head['bias'] = (sign * rng.uniform(0.06, 0.3, c)).astype(np.float32)
    head['kernel'] = (0.01 * rng.standard_normal(head['kernel'].shape)).astype(np.float32)
  return {**variables, 'params': params}, '/'.join(paths[off]), '/'.join(paths[on])


def skip_without_compiler():
  """The native custom call needs a C++ compiler; where there is none, say so and skip
  (a compiler that is there but fails the build is a test failure, not a skip)."""
  cxx = os.environ.get('CXX', 'c++')
  if shutil.which(cxx) is None:
    pytest.skip(f'no C++ compiler {cxx!r}: fttw_jax.sparse.kernel cannot be built here')


def assert_matches_apply(runner, model, variables, x):
  """A sparse runner's logits, head logits and masks equal ``model.apply``'s (eval);
  returns (apply's gates, apply's logits)."""
  ref, aux = jax.jit(model.apply)(variables, x)
  out, raux = runner(x)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  gates = aux['gates']
  assert set(raux) == set(gates)
  for name, g in gates.items():
    np.testing.assert_array_equal(raux[name]['mask'], g['mask'], err_msg=name)
    np.testing.assert_allclose(raux[name]['logits'], g['logits'], atol=1e-4, err_msg=name)
  return gates, ref


def assert_off_and_on(gates, off, on):
  """``set_heads``' all-off layer is off, its all-on layer on, the rest in between."""
  kept = {k: float(np.mean(g['mask'])) for k, g in gates.items()}
  assert kept[off] == 0.0 and 0.0 < np.mean(list(kept.values())) < 1.0
  assert kept[on] == 1.0 or on.endswith('dw')  # a depthwise mask also needs its input
