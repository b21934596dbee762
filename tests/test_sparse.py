"""Sparse batch-1 execution == the masked dense gated forward (issue 6).

Masks come from the heads, so the tests set head biases: random per channel with
a margin (the heads' kernels are small), one layer all off and one all on, so
that the sparse path's every bucket kind runs. The policy is loosened
(``min_channels=8``) so that the narrow models used here still take the
gather paths ('both' for large outputs, 'rows' for small ones).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fttw_jax import models
from fttw_jax.sparse import static, walkers, xla
from helpers import (assert_matches_apply, assert_off_and_on, init_gated, set_heads,
                     strip_heads, with_gate)

POLICY = dict(levels=2, min_channels=8, rows_max_pixels=64)  # few branches: fast compiles
ARCHS = [  # (name, width)
    ('resnet20', 0.5),
    ('vgg16_bn', 0.25),
    ('mobilenet_v1', 0.25),
    pytest.param('mobilenet_v2', 0.25, marks=pytest.mark.slow),
    ('resnet18', 0.25),
    pytest.param('mobilenet_v1_imagenet', 0.25, marks=pytest.mark.slow),
    pytest.param('resnet56', 0.5, marks=pytest.mark.slow),
]


def check_equal(model, variables, x, **policy):
  sm = xla.SparseModel.from_variables(model, variables, **{**POLICY, **policy})
  return assert_matches_apply(sm, model, variables, x)[0], sm


@pytest.mark.parametrize('name,width', ARCHS)
def test_sparse_equals_masked_dense(name, width):
  model, variables, x = init_gated(name, batch=1, width=width)
  variables, off, on = set_heads(variables, seed=1)
  assert_off_and_on(check_equal(model, variables, x)[0], off, on)


def test_input_dependent_heads_and_batches():
  """Heads whose masks depend on the sample; a batch runs sample by sample."""
  model, variables, x = init_gated('mobilenet_v1', batch=2, width=0.25, seed=3)
  variables = set_heads(variables, seed=5)[0]
  rng = np.random.default_rng(0)
  for layer in ('stem', 'block3_dw', 'block4_pw'):
    # Zero-mean kernel columns, no bias: logits = (softmax - uniform) @ kernel.
    head = variables['params'][layer][models.gating.HEAD_NAME]
    k = rng.standard_normal(head['kernel'].shape)
    head['kernel'] = (1e3 * (k - k.mean(axis=0))).astype(np.float32)
    head['bias'] = np.zeros_like(head['bias'])
  apply = jax.jit(model.apply)
  for seed in range(20):  # two inputs with different masks, logits 1e-4 clear of 0
    x = jax.random.normal(jax.random.key(seed), x.shape)
    ref, aux = apply(variables, x)
    margin = min(float(jnp.min(jnp.abs(g['logits']))) for g in aux['gates'].values())
    differ = any(not np.array_equal(g['mask'][0], g['mask'][1]) for g in aux['gates'].values())
    if margin > 1e-4 and differ:
      break
  else:
    pytest.fail('no input pair found')
  sm = xla.SparseModel.from_variables(model, variables, **POLICY)
  out, saux = sm(x)
  assert out.shape == (2, 10)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  for name, g in aux['gates'].items():
    np.testing.assert_array_equal(saux[name]['mask'], g['mask'], err_msg=name)


@pytest.mark.parametrize('gate', [dict(gt_after_block=True), dict(pool='max', softmax=False),
                                  dict(head_norm='standardize')])
def test_gate_options(gate):
  model, variables, x = init_gated('resnet20', batch=1, width=0.5)
  model = with_gate(model, **gate)
  check_equal(model, set_heads(variables, seed=2)[0], x)


def test_policies_and_dense_baselines():
  """Default policy, 4 levels, and the same kernels at full width: masked dense
  (``levels=1``) and the plain network without heads."""
  model, variables, x = init_gated('resnet20', batch=1, width=0.5)
  variables = set_heads(variables, seed=4)[0]
  _, sm = check_equal(model, variables, x, levels=8, min_channels=32)
  check_equal(model, variables, x, levels=4, band=0, rows_max_pixels=16)  # escalations
  ref = jax.jit(model.apply)(variables, x)[0]
  np.testing.assert_allclose(sm(x[0])[0], ref, atol=1e-4, rtol=1e-4)  # one (H, W, C) image
  np.testing.assert_allclose(sm.masked_dense(x)[0], ref, atol=1e-4, rtol=1e-4)
  base = models.create_model('resnet20', num_classes=10, width=0.5)
  base_vars = {'params': strip_heads(variables['params']),
               'batch_stats': variables['batch_stats']}
  np.testing.assert_allclose(sm.dense(x), jax.jit(base.apply)(base_vars, x)[0],
                             atol=1e-4, rtol=1e-4)
  check_equal(model, variables, x, levels=1)


def test_errors_name_what_is_supported():
  model, variables, _ = init_gated('resnet20', batch=1, width=0.5)
  with pytest.raises(ValueError, match='gated model'):
    xla.SparseModel.from_variables(model.clone(gate=None), variables)
  with pytest.raises(ValueError, match="mask_source='target'"):
    xla.SparseModel.from_variables(with_gate(model, mask_source='target'), variables)
  with pytest.raises(ValueError, match=r'does not support Dense.*ResNet'):
    walkers.check_supported(nn.Dense(3))
  with pytest.raises(ValueError, match='levels'):
    xla.SparseModel.from_variables(model, variables, levels=0)
  with pytest.raises(ValueError, match='band'):
    xla.SparseModel.from_variables(model, variables, band=-1)


def test_capacities_and_slots():
  assert xla.capacities(512, 8) == (64, 128, 192, 256, 320, 384, 448, 512)
  assert xla.capacities(16, 8) == (8, 16)
  assert xla.capacities(20, 4) == (8, 16, 20)
  assert xla.capacities(4, 8) == (4,)
  assert xla.level_caps(16, 4) == (8, 8, 16, 16)
  idx, n = xla._slots_of(jnp.array([0., 1., 0., 1., 1.]), 5)
  np.testing.assert_array_equal(idx, [1, 3, 4, 5, 5])
  assert int(n) == 3
  assert int(xla._bucket(jnp.int32(0), (8, 16))) == 0
  assert int(xla._bucket(jnp.int32(9), (8, 16, 24))) == 1
  assert int(xla._bucket(jnp.int32(24), (8, 16, 24))) == 2


def test_conv_kernels_match_lax_conv():
  rng = np.random.default_rng(0)
  # im2col at <= IM2COL_MAX_PIXELS outputs (2x2, 4x4 incl. strided, 1x1), XLA's conv above
  for hw, k, stride in [(2, 3, 1), (4, 3, 1), (8, 3, 2), (5, 1, 2), (4, 7, 2), (6, 3, 1),
                        (9, 3, 2)]:
    x = jnp.asarray(rng.standard_normal((1, hw, hw, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 6, 5)), jnp.float32)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), [(k // 2, k // 2)] * 2,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(xla.conv2d(x, w, stride), ref, atol=1e-4, rtol=1e-4)
    # the input-major layout the sparse path gathers from (rows = input channels)
    idx = jnp.asarray([4, 1, 3], jnp.int32)
    w_in = xla.take_inputs(jnp.transpose(w, (2, 0, 1, 3)), idx)
    ref = jax.lax.conv_general_dilated(x[..., idx], w[:, :, idx], (stride, stride),
                                       [(k // 2, k // 2)] * 2,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(xla.conv2d(x[..., idx], w_in, stride, input_major=True),
                               ref, atol=1e-4, rtol=1e-4)
    wd = jnp.asarray(rng.standard_normal((k, k, 1, 6)), jnp.float32)
    ref = jax.lax.conv_general_dilated(x, wd, (stride, stride), [(k // 2, k // 2)] * 2,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                       feature_group_count=6)
    np.testing.assert_allclose(xla.depthwise2d(x, wd, stride), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name,width', [
    ('resnet20', 0.5), ('vgg16_bn', 0.25), ('mobilenet_v1', 0.25), ('resnet18', 0.25),
    pytest.param('mobilenet_v2', 0.25, marks=pytest.mark.slow)])
def test_static_network_equals_apply_with_those_channels(name, width):
  """Input-independent masks make the gated network a static one: the narrow network
  of the channels they keep (weights sliced at load, no heads) gives apply's logits."""
  model, variables, x = init_gated(name, batch=2, width=width)
  variables, off, _ = set_heads(variables, seed=1, off=-1)   # no layer entirely off
  ref, aux = jax.jit(model.apply)(variables, x)
  keep = {k: np.flatnonzero(g['mask'][0]) for k, g in aux['gates'].items()}
  for k, g in aux['gates'].items():
    np.testing.assert_array_equal(g['mask'][0], g['mask'][1])   # the same for each sample
  sm = static.StaticModel.from_variables(model, variables, keep)
  np.testing.assert_allclose(sm.predict(x), ref, atol=1e-4, rtol=1e-4)
  gated = [k for k in sm.keep]
  narrow = sum(sm.weights[k]['w'].size for k in gated)
  assert narrow < 0.9 * sum(sm.params[k]['w'].size for k in gated)   # physically narrower
  with pytest.raises(ValueError, match='every gated layer'):
    static.StaticModel.from_variables(model, variables, {k: keep[k] for k in gated[1:]})
  with pytest.raises(ValueError, match=f'keep.{gated[0]!r}.: channels must be'):
    static.StaticModel.from_variables(model, variables, {**keep, gated[0]: [10**6]})
