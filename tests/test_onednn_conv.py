"""conv_impl='onednn': oneDNN's convs (C++ FFI calls) equal XLA's, and fall back cleanly.

Training with it (same params as XLA after 4 steps, 1 vs 4 devices) is in test_train.py.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fttw_jax.models import conv_impl, onednn_conv

needs_onednn = pytest.mark.skipif(
    onednn_conv.unavailable() is not None,
    reason=f'oneDNN unavailable: {onednn_conv.unavailable()}')

# (batch, size, cin, cout, kernel, stride, padding): the convs of our CIFAR models
# (3x3 pad 1 at stride 1 and 2, 1x1 'VALID' / 'SAME' shortcuts), an odd size at
# stride 2 (an input row that no output reads) and an asymmetric explicit padding.
SHAPES = [
    (4, 8, 3, 16, 3, 1, ((1, 1), (1, 1))),
    (4, 8, 16, 32, 3, 2, ((1, 1), (1, 1))),
    (4, 8, 16, 32, 1, 2, 'VALID'),
    (2, 8, 8, 8, 1, 1, 'SAME'),
    (2, 7, 5, 6, 3, 2, ((1, 1), (1, 1))),
    (2, 6, 4, 4, 3, 1, ((0, 2), (1, 0))),
]


def _conv(fn, stride, padding):
  dn = ('NHWC', 'HWIO', 'NHWC')
  return lambda x, w: fn(x, w, (stride, stride), padding,
                         dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, dn))


@needs_onednn
@pytest.mark.parametrize('n,size,cin,cout,k,stride,padding', SHAPES)
def test_forward_and_gradients_equal_xla(n, size, cin, cout, k, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
  ref, ours = _conv(lax.conv_general_dilated, stride, padding), _conv(onednn_conv.conv, stride,
                                                                       padding)
  assert 'fttw_onednn_conv_fwd' in str(jax.make_jaxpr(ours)(x, w))
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  # A non-linear loss, so that the cotangent differs per output element.
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  gx, gw = jax.jit(jax.grad(loss(ours), (0, 1)))(x, w)
  rx, rw = jax.grad(loss(ref), (0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * np.abs(rx).max())
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5 * np.abs(rw).max())


@needs_onednn
def test_unsupported_convs_stay_with_xla():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)       # depthwise
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  depthwise = lambda fn: fn(x, w, (1, 1), 'SAME', dimension_numbers=dn, feature_group_count=4)
  assert 'fttw_onednn' not in str(jax.make_jaxpr(lambda: depthwise(onednn_conv.conv))())
  np.testing.assert_array_equal(depthwise(onednn_conv.conv), depthwise(lax.conv_general_dilated))


def test_without_onednn_resolve_falls_back_to_cpu_and_says_why(tmp_path, monkeypatch, caplog):
  """A Python prefix without oneDNN (injected): 'onednn' resolves to 'cpu', logged."""
  monkeypatch.setattr(sys, 'prefix', str(tmp_path))
  onednn_conv.unavailable.cache_clear()
  try:
    with caplog.at_level('WARNING'):
      assert conv_impl.resolve('onednn', 'cpu') == 'cpu'
    assert 'oneDNN is not installed in' in onednn_conv.unavailable()
    assert sum("conv_impl='onednn' unavailable" in r.getMessage() for r in caplog.records) == 1
  finally:
    onednn_conv.unavailable.cache_clear()
