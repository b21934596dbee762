"""The C++ gated-conv custom call and the native sparse runner (issue 6).

The layer kernel is checked against a lax reference over the shapes it has code
paths for (stride 1/2, 1x1 to 7x7 kernels, outputs narrower than a vector, the
residual modes, avg/max pools), and the whole runner against ``model.apply`` with
margin masks that switch one layer entirely off and one entirely on.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fttw_jax import models
from fttw_jax.sparse import kernel, native, walkers
from helpers import (assert_matches_apply, assert_off_and_on, init_gated, set_heads,
                     skip_without_compiler, strip_heads, with_gate)


@pytest.fixture(autouse=True)
def compiled():
  skip_without_compiler()
  kernel.ensure()


def with_colsum(head):
  """(head_w, head_b) -> the custom call's head: plus head_w's column sums, as
  ``NativeSparseModel`` computes them once at load time."""
  return None if head is None else (*head, jnp.sum(jnp.asarray(head[0]), axis=0))


def layer(x, w, b, head=None, residual=None, **options):
  """``kernel.gated_conv`` on one CHW sample (a batch of one): (y, logits, mask)."""
  res = None if residual is None else np.asarray(residual)[None]
  return [a[0] for a in kernel.gated_conv(np.asarray(x)[None], w, b, with_colsum(head), res,
                                          **options)]


def reference(x, w, b, head, residual, stride, relu, post_relu, after_block, pool, softmax):
  k = w.shape[2]
  z = lax.conv_general_dilated(x[None], w, (stride, stride), [(k // 2, k // 2)] * 2,
                               dimension_numbers=('NCHW', 'OIHW', 'NCHW'))[0]
  z = z + b[:, None, None]
  act = jax.nn.relu if relu else (lambda t: t)
  if head is None:
    return act(z), jnp.zeros(w.shape[0])
  pooled = x.max(axis=(1, 2)) if pool == 'max' else x.mean(axis=(1, 2))
  if softmax:
    pooled = jax.nn.softmax(pooled)
  logits = pooled @ head[0] + head[1]
  m = (logits > 0).astype(jnp.float32)[:, None, None]
  if residual is None:
    return act(z) * m, logits
  if after_block:
    return m * jax.nn.relu(z + residual), logits
  a = act(z) * m + residual
  return (jax.nn.relu(a) if post_relu else a), logits


SHAPES = [  # (Cin, H, Cout, k, stride)
    (16, 32, 16, 3, 1), (16, 32, 32, 3, 2), (64, 8, 64, 3, 1), (5, 7, 9, 3, 2),
    (3, 12, 16, 3, 1), (32, 2, 24, 3, 1), (8, 9, 12, 1, 2), (4, 15, 8, 7, 2),
    (32, 4, 64, 3, 1), (16, 3, 32, 1, 2), (24, 1, 16, 1, 1), (8, 5, 40, 3, 2)]
OPTIONS = [  # (relu, post_relu, after_block, pool, softmax)
    (True, True, False, 'avg', True), (False, True, False, 'max', False),
    (False, False, False, 'avg', True), (False, True, True, 'avg', True)]


@pytest.mark.parametrize('cin,h,cout,k,stride', SHAPES)
def test_layer_matches_reference(cin, h, cout, k, stride):
  rng = np.random.default_rng(cin * h + k)
  x = rng.standard_normal((cin, h, h)).astype(np.float32)
  x[rng.random(cin) < 0.4] = 0                       # channels switched off upstream
  w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
  b = rng.standard_normal(cout).astype(np.float32)
  head = (rng.standard_normal((cin, cout)).astype(np.float32),
          (0.3 * rng.standard_normal(cout)).astype(np.float32))
  ho = (h + 2 * (k // 2) - k) // stride + 1
  residual = rng.standard_normal((cout, ho, ho)).astype(np.float32)
  for i, (relu, post_relu, after_block, pool, softmax) in enumerate(OPTIONS):
    res = residual if i else None
    ref, ref_logits = reference(x, w, b, head, res, stride, relu, post_relu, after_block,
                                pool, softmax)
    assert 0 < float(jnp.mean(ref_logits > 0)) < 1
    for sparse in (True, False):
      y, logits, mask = layer(
          x, w, b, head, res, stride=stride, relu=relu, post_relu=post_relu,
          after_block=after_block, pool=pool, softmax=softmax, sparse=sparse)
      np.testing.assert_allclose(y, ref, atol=2e-4, rtol=1e-4, err_msg=f'{i} {sparse}')
      np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
      np.testing.assert_array_equal(mask, np.asarray(ref_logits) > 0)
  y, logits, mask = layer(x, w, b, None, None, stride=stride, relu=False)  # plain
  np.testing.assert_allclose(y, reference(x, w, b, None, None, stride, False, 0, 0, 0, 0)[0],
                             atol=2e-4, rtol=1e-4)
  assert not np.any(logits) and np.all(mask == 1)


@pytest.mark.parametrize('c,h,stride', [(16, 8, 1), (12, 7, 2), (24, 32, 1)])
def test_depthwise_layer(c, h, stride):
  """Depthwise: mask = head mask * (input channel not all zero), SPEC 2.2."""
  rng = np.random.default_rng(c + h)
  x = np.abs(rng.standard_normal((c, h, h))).astype(np.float32)
  zero = rng.random(c) < 0.4
  x[zero] = 0
  w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
  b = rng.standard_normal(c).astype(np.float32)
  head = (rng.standard_normal((c, c)).astype(np.float32),
          (0.3 * rng.standard_normal(c)).astype(np.float32))
  z = lax.conv_general_dilated(x[None], w, (stride, stride), [(1, 1)] * 2,
                               dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
                               feature_group_count=c)[0] + b[:, None, None]
  logits = jax.nn.softmax(x.mean(axis=(1, 2))) @ head[0] + head[1]
  keep = (np.asarray(logits) > 0) & ~zero
  assert 0 < keep.sum() < (~zero).sum()          # the head switches off live channels too
  for sparse in (True, False):
    y, out_logits, mask = layer(x, w, b, head, stride=stride, depthwise=True,
                                            sparse=sparse)
    np.testing.assert_array_equal(mask, keep.astype(np.float32))
    np.testing.assert_allclose(out_logits, logits, atol=1e-5)
    np.testing.assert_allclose(y, jax.nn.relu(z) * keep[:, None, None], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('bias', [-1.0, 1.0])
def test_layer_all_off_and_all_on(bias):
  rng = np.random.default_rng(0)
  x = np.abs(rng.standard_normal((8, 16, 16))).astype(np.float32)
  w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
  b = rng.standard_normal(16).astype(np.float32)
  head = (np.zeros((8, 16), np.float32), np.full(16, bias, np.float32))
  residual = rng.standard_normal((16, 16, 16)).astype(np.float32)
  y, _, _ = layer(x, w, b, head, residual, relu=False)
  ref, _ = reference(x, w, b, head, residual, 1, False, True, False, 'avg', True)
  np.testing.assert_allclose(y, ref, atol=2e-4, rtol=1e-4)
  if bias < 0:    # every output switched off: the block passes relu(residual) through
    np.testing.assert_array_equal(y, np.maximum(residual, 0))


def check_equal(model, variables, x):
  nm = native.NativeSparseModel.from_variables(model, variables)
  gates, ref = assert_matches_apply(nm, model, variables, x)
  np.testing.assert_allclose(nm.predict(x), ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(nm.masked_dense(x)[0], ref, atol=1e-4, rtol=1e-4)
  return gates, nm


@pytest.mark.parametrize('name,width', [
    ('resnet20', 0.5), ('vgg16_bn', 0.25), ('resnet18', 0.25), ('mobilenet_v1', 0.25),
    pytest.param('mobilenet_v2', 0.25, marks=pytest.mark.slow),
    pytest.param('mobilenet_v1_imagenet', 0.25, marks=pytest.mark.slow),
    pytest.param('resnet56', 0.5, marks=pytest.mark.slow)])
def test_native_equals_masked_dense(name, width):
  model, variables, x = init_gated(name, batch=1, width=width)
  variables, off, on = set_heads(variables, seed=1)
  gates, nm = check_equal(model, variables, x)
  assert_off_and_on(gates, off, on)
  base = models.create_model(name, num_classes=10, width=width)
  base_vars = {'params': strip_heads(variables['params']),
               'batch_stats': variables['batch_stats']}
  np.testing.assert_allclose(nm.dense(x), jax.jit(base.apply)(base_vars, x)[0],
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('gate', [dict(gt_after_block=True), dict(pool='max', softmax=False),
                                  dict(head_norm='standardize')])
def test_gate_options(gate):
  model, variables, x = init_gated('resnet20', batch=1, width=0.5)
  check_equal(with_gate(model, **gate), set_heads(variables, seed=2)[0], x)


def test_layer_batch_splits_samples():
  """A batch (samples split across threads: 5 x 2.4M MACs, above the hand-off size)
  equals its samples run one by one, each with its own mask."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((5, 16, 32, 32)).astype(np.float32)
  x[rng.random((5, 16)) < 0.4] = 0                   # different zero channels per sample
  x *= np.arange(1, 6, dtype=np.float32)[:, None, None, None]
  w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
  b = rng.standard_normal(16).astype(np.float32)
  k = rng.standard_normal((16, 16))
  head = ((30 * (k - k.mean(axis=0))).astype(np.float32), np.zeros(16, np.float32))
  residual = rng.standard_normal((5, 16, 32, 32)).astype(np.float32)
  y, logits, mask = kernel.gated_conv(x, w, b, with_colsum(head), residual, relu=False)
  assert len({tuple(m) for m in np.asarray(mask)}) > 1          # the masks differ
  for i in range(5):
    ref, ref_logits = reference(x[i], w, b, head, residual[i], 1, False, True, False, 'avg',
                                True)
    np.testing.assert_allclose(y[i], ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(logits[i], ref_logits, atol=1e-5)
    for got, one in zip((y, logits, mask), layer(x[i], w, b, head, residual[i], relu=False)):
      np.testing.assert_array_equal(got[i], one)                 # bit for bit


def test_batches_equal_apply_per_sample():
  """Input-dependent masks at batch 8 (half-width resnet20: the stage-1 convs, 4.7M
  MACs a batch, are above the hand-off size, so the samples run on both threads)
  equal model.apply's."""
  model, variables, x = init_gated('resnet20', batch=8, width=0.5, seed=4)
  variables = set_heads(variables, seed=3)[0]
  rng = np.random.default_rng(0)
  for path in ('stem', 'layer1_0/conv1', 'layer2_1/conv2'):
    head = variables['params']
    for key in path.split('/'):
      head = head[key]
    head = head[models.gating.HEAD_NAME]
    k = rng.standard_normal(head['kernel'].shape)
    head['kernel'] = (1e3 * (k - k.mean(axis=0))).astype(np.float32)
    # Logits = (softmax - uniform) @ kernel + bias. A sample whose layer input is all
    # zero pools to the uniform softmax: the bias alone, clear of 0 (not rounding noise).
    head['bias'] = np.full_like(head['bias'], 1e-3)
  gates, nm = check_equal(model, variables, x)
  assert any(len({tuple(m) for m in np.asarray(g['mask'])}) > 1 for g in gates.values())
  for i in (0, 5):      # one sample alone gives its row of the batch
    np.testing.assert_allclose(nm.predict(x[i]), nm.predict(x)[i:i + 1], atol=1e-5)
  assert nm(x[0])[0].shape == (1, 10)                 # one (H, W, C) image


def test_errors():
  x, b = np.ones((4, 2, 2), np.float32), np.zeros(12, np.float32)
  with pytest.raises(Exception, match=r'w \(Cout,Cin,k,k\)'):    # checked by the kernel
    kernel.gated_conv(x[None], np.ones((12, 5, 3, 3), np.float32), b)
  with pytest.raises(Exception, match=r'x \(N,Cin,H,W\)'):
    kernel.gated_conv(x, np.ones((12, 4, 3, 3), np.float32), b)
  resnet, variables, _ = init_gated('resnet20', batch=1, width=0.5)
  with pytest.raises(ValueError, match='gated model'):
    native.NativeSparseModel.from_variables(resnet.clone(gate=None), variables)
  with pytest.raises(ValueError, match='does not support Dense'):
    walkers.check_supported(nn.Dense(3))


def test_build_cache_and_errors(tmp_path, monkeypatch):
  monkeypatch.setenv('FTTW_JAX_CACHE', str(tmp_path / 'cache'))
  path = kernel.build()
  mtime = path.stat().st_mtime_ns
  assert kernel.build() == path and path.stat().st_mtime_ns == mtime   # cached, not rebuilt
  assert [p.name for p in path.parent.iterdir()] == [path.name]        # no temp files left
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('FTTW_JAX_CACHE', str(tmp_path / 'other'))
  with pytest.raises(kernel.NativeUnavailable, match='no-such-compiler'):
    kernel.build()
  monkeypatch.delenv('CXX')
  (tmp_path / 'a_file').write_text('')
  monkeypatch.setenv('FTTW_JAX_CACHE', str(tmp_path / 'a_file' / 'cache'))
  with pytest.raises(kernel.NativeUnavailable, match='set .FTTW_JAX_CACHE'):
    kernel.build()
  monkeypatch.setenv('FTTW_JAX_CACHE', str(tmp_path / 'other'))
  bad = tmp_path / 'bad.cc'
  bad.write_text('this is not C++;\n')
  monkeypatch.setattr(kernel, 'SOURCE', bad)
  with pytest.raises(kernel.NativeUnavailable, match='bad.cc failed'):
    kernel.build()
  assert not any((tmp_path / 'other').iterdir())                      # nothing half-written
