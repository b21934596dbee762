"""The custom-VJP train-mode BatchNorm (conv_impl='cpu') against nn.BatchNorm's autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fttw_jax.errors import UserError
from fttw_jax.models import batch_norm, conv_impl, onednn_conv

X = jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) * 3 + 1
G = jax.random.normal(jax.random.key(1), (8, 5, 5, 6))
PARAMS = {'scale': jnp.linspace(0.5, 2.0, 6), 'bias': jnp.linspace(-1.0, 1.0, 6)}


def grads_and_stats(module, x, g):
  """Loss value, (d params, d x) and updated batch_stats of sum(sin(BN(x)) * g)."""
  stats = module.init(jax.random.key(0), x)['batch_stats']

  def loss(params, x):
    y, new = module.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
    value = jnp.sum(jnp.sin(y) * g)
    if module.axis_name:
      value = jax.lax.psum(value, module.axis_name)
    return value, new['batch_stats']

  (value, new), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(PARAMS, x)
  return value, grads, new


def flax_bn(axis_name=None):
  return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                      axis_name=axis_name)


def custom_bn(axis_name=None):
  return batch_norm.BatchNorm(custom_vjp=True, axis_name=axis_name)


def autodiff_bn(axis_name=None):
  return batch_norm.BatchNorm(axis_name=axis_name)


def assert_trees_close(a, b, tol):
  for (path, u), v in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('module', [custom_bn, autodiff_bn])
def test_gradients_and_running_stats_match_flax(module):
  ref = grads_and_stats(flax_bn(), X, G)
  ours = grads_and_stats(module(), X, G)
  assert_trees_close(ref, ours, 2e-5)


def test_float64_reference():
  """Both float32 implementations are equally close to the exact gradient."""
  with jax.enable_x64(True):
    exact = grads_and_stats(flax_bn(), X.astype(jnp.float64), G.astype(jnp.float64))
  ours = grads_and_stats(custom_bn(), X, G)
  assert_trees_close(jax.tree.map(np.float32, exact), ours, 2e-5)


@pytest.mark.parametrize('module', [flax_bn, custom_bn, autodiff_bn])
def test_sharded_statistics_and_gradients_equal_one_device(module):
  """Under shard_map over 4 devices the statistics and both means of the backward are
  global, and d scale / d bias are summed over the devices."""
  assert jax.device_count() == 4, 'conftest forces 4 CPU devices'
  whole = grads_and_stats(module(), X, G)
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(jax.shard_map(
      lambda x, g: grads_and_stats(module(axis_name='data'), x, g), mesh=mesh,
      in_specs=(P('data'), P('data')), out_specs=(P(), (P(), P('data')), P())))(X, G)
  assert_trees_close(whole, sharded, 2e-5)


def test_wrong_device_count_would_show():
  """The sharded check above can fail: per-device statistics give other gradients."""
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  local = jax.jit(jax.shard_map(
      lambda x, g: grads_and_stats(custom_bn(), x, g)[1][1], mesh=mesh,
      in_specs=(P('data'), P('data')), out_specs=P('data')))(X, G)
  whole = grads_and_stats(custom_bn(), X, G)[1][1]
  assert np.abs(local - whole).max() > 1e-2


def test_resolve_per_backend_and_bad_values():
  assert conv_impl.resolve('auto', 'cpu') == ('cpu' if onednn_conv.unavailable() else 'onednn')
  assert conv_impl.resolve('auto', 'gpu') == 'xla'
  assert conv_impl.resolve('auto', 'tpu') == 'xla'
  assert conv_impl.resolve('xla', 'cpu') == 'xla'
  assert conv_impl.compiler_options('xla') is None
  with pytest.raises(UserError, match=r"conv_impl='cpu' is for the CPU backend"):
    conv_impl.resolve('cpu', 'gpu')
  with pytest.raises(UserError, match=r"conv_impl='onednn' is for the CPU backend"):
    conv_impl.resolve('onednn', 'gpu')
  with pytest.raises(ValueError, match=r"conv_impl='eigen'.*'auto', 'xla', 'cpu', 'onednn'"):
    conv_impl.resolve('eigen', 'cpu')
