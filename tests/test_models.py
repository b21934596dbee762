"""Gated backbones: masks forced on == baseline, gradients in decoupled/joint mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fttw_jax import ftwt, models
from helpers import init_gated, strip_heads, with_gate


# One model per code path in the default run (CIFAR ResNets share one block and differ in
# depth only; the ImageNet MobileNetV1 is the CIFAR one with another stem); `make test-all`
# runs every registered model.
FAST = {'resnet8', 'resnet20', 'vgg16_bn', 'mobilenet_v1', 'mobilenet_v2', 'resnet18'}


@pytest.mark.parametrize('name', [
    n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(models.MODELS)])
def test_all_masks_on_equals_baseline(name):
  gated, variables, x = init_gated(name, num_classes=7)
  ones = with_gate(gated, mask_source='ones')
  logits, aux = jax.jit(ones.apply)(variables, x)
  baseline = models.create_model(name, num_classes=7)
  base_vars = {'params': strip_heads(variables['params']),
               'batch_stats': variables['batch_stats']}
  base_logits, base_aux = jax.jit(baseline.apply)(base_vars, x)
  assert base_aux == {'gates': {}}
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, base_logits, atol=1e-5, rtol=1e-5)
  # aux holds one entry per masked conv, with per-layer shapes.
  gates = aux['gates']
  assert len(gates) > 0
  for g in gates.values():
    assert g['logits'].shape == g['target'].shape == g['mask'].shape
    assert g['logits'].shape[0] == 2 and g['in_nz'].shape[0] == 2
    assert set(np.unique(np.asarray(g['target']))) <= {0.0, 1.0}
  # predicted masks change the output: masking is really applied.
  pred_logits, pred_aux = jax.jit(gated.apply)(variables, x)
  assert any(float(jnp.mean(g['mask'])) < 1 for g in pred_aux['gates'].values())
  assert not np.allclose(pred_logits, base_logits, atol=1e-4)


def test_masked_layer_sets_match_spec():
  counts = {}
  for name in ('vgg16_bn', 'resnet20', 'resnet56', 'mobilenet_v1', 'mobilenet_v2', 'resnet18'):
    gated, variables, x = init_gated(name)
    counts[name] = len(jax.eval_shape(gated.apply, variables, x)[1]['gates'])
  assert counts == {
      'vgg16_bn': 13, 'resnet20': 1 + 2 * 9, 'resnet56': 1 + 2 * 27,
      'mobilenet_v1': 1 + 2 * 13, 'mobilenet_v2': 1 + 3 * 17 + 1, 'resnet18': 1 + 2 * 8}


def test_predicted_mask_is_heads_sign_and_depthwise_respects_inputs():
  gated, variables, x = init_gated('mobilenet_v1', width=0.25)
  _, aux = gated.apply(variables, x)
  gates = aux['gates']
  for name, g in gates.items():
    predicted = (np.asarray(g['logits']) > 0).astype(np.float32)
    if name.endswith('_dw'):
      np.testing.assert_array_equal(g['mask'], predicted * np.asarray(g['in_nz']))
    else:
      np.testing.assert_array_equal(g['mask'], predicted)
  # A channel the previous pw layer switched off reaches the next depthwise conv as zero.
  prev_mask, in_nz = np.asarray(gates['block0_pw']['mask']), np.asarray(gates['block1_dw']['in_nz'])
  assert (prev_mask == 0).any() and np.all(in_nz[prev_mask == 0] == 0)


def test_target_mask_source_applies_targets():
  gated, variables, x = init_gated('resnet20', width=0.5)
  _, aux = with_gate(gated, mask_source='target').apply(variables, x)
  for name, g in aux['gates'].items():
    np.testing.assert_array_equal(g['mask'], g['target'])


def test_gt_after_block_changes_targets_of_second_convs_only():
  gated, variables, x = init_gated('resnet20', width=0.5)
  _, before = gated.apply(variables, x)
  _, after = with_gate(gated, gt_after_block=True).apply(variables, x)
  b, a = before['gates'], after['gates']
  np.testing.assert_array_equal(a['stem']['target'], b['stem']['target'])
  np.testing.assert_array_equal(a['layer1_0/conv1']['target'], b['layer1_0/conv1']['target'])
  assert not np.array_equal(a['layer1_0/conv2']['target'], b['layer1_0/conv2']['target'])


def _mask_loss_grads(mode):
  gated, variables, x = init_gated('resnet20', models.GateConfig(mode=mode, threshold=0.8),
                                   width=0.5)

  def loss(params):
    _, aux = gated.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                         train=False)
    return ftwt.mask_loss(aux['gates'])

  grads = jax.grad(loss)(variables['params'])
  head = sum(float(jnp.sum(jnp.abs(g))) for p, g in jax.tree.leaves_with_path(grads)
             if models.is_head_path(p))
  backbone = sum(float(jnp.sum(jnp.abs(g))) for p, g in jax.tree.leaves_with_path(grads)
                 if not models.is_head_path(p))
  return head, backbone


def test_decoupled_mask_loss_trains_heads_only():
  head, backbone = _mask_loss_grads('decoupled')
  assert head > 0
  assert backbone == 0.0


def test_joint_mask_loss_reaches_backbone():
  head, backbone = _mask_loss_grads('joint')
  assert head > 0
  assert backbone > 0


def test_cross_entropy_does_not_train_heads():
  gated, variables, x = init_gated('resnet20', width=0.5)

  def ce(params):
    logits, _ = gated.apply({'params': params, 'batch_stats': variables['batch_stats']}, x)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.grad(ce)(variables['params'])
  for p, g in jax.tree.leaves_with_path(grads):
    if models.is_head_path(p):
      assert float(jnp.max(jnp.abs(g))) == 0.0


def test_bad_inputs_give_clear_errors():
  with pytest.raises(ValueError, match=r"'resnet57'.*resnet56"):
    models.create_model('resnet57', num_classes=10)
  with pytest.raises(ValueError, match=r"gate.mode='both'.*decoupled"):
    models.GateConfig(mode='both')
  with pytest.raises(ValueError, match=r"gate.pool='sum'"):
    models.GateConfig(pool='sum')
  with pytest.raises(ValueError, match=r'r=1.2'):
    models.GateConfig(threshold=1.2)
  with pytest.raises(ValueError, match=r'q=-0.5'):
    models.GateConfig(criterion='uniform', threshold=-0.5)
  with pytest.raises(ValueError, match=r"dtype 'float16'"):
    models.create_model('resnet20', num_classes=10, dtype='float16')
  model = models.create_model('resnet20', num_classes=10)
  with pytest.raises(ValueError, match=r'rank 4.*\(32, 32, 3\)'):
    model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_max_pool_and_no_softmax_heads_differ_from_default():
  gated, variables, x = init_gated('resnet20', width=0.5)
  base = gated.apply(variables, x)[1]['gates']['layer1_0/conv1']['logits']
  for change in ({'pool': 'max'}, {'softmax': False}):
    other = with_gate(gated, **change).apply(variables, x)[1]['gates']['layer1_0/conv1']['logits']
    assert not np.allclose(base, other)


def test_head_norm_standardize_feeds_the_head_a_standardized_input():
  """gate.head_norm='standardize' (issue 19): the head's dense layer sees, per sample,
  the softmax output with mean 0 and std 1 over channels: its logits equal the head
  applied by hand to that input, and differ from the default's."""
  gated, variables, x = init_gated('resnet20', width=0.5)
  name = 'layer2_0/conv1'
  norm = with_gate(gated, head_norm='standardize')
  _, inter = norm.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  block_in = inter['intermediates']['layer1_2']['__call__'][0][0]   # layer2_0's input
  pooled = jax.nn.softmax(jnp.mean(block_in, axis=(1, 2)), axis=-1)
  standardized = models.gating.normalize_head_input(pooled, 'standardize')
  np.testing.assert_allclose(jnp.mean(standardized, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(standardized, -1), 1.0, atol=1e-3)
  head = variables['params']['layer2_0']['conv1']['head']
  got = norm.apply(variables, x)[1]['gates'][name]['logits']
  np.testing.assert_allclose(got, standardized @ head['kernel'] + head['bias'], rtol=1e-4,
                             atol=1e-5)
  base = gated.apply(variables, x)[1]['gates'][name]['logits']
  assert not np.allclose(base, got)
  with pytest.raises(ValueError, match=r"gate.head_norm='layer'.*standardize"):
    models.GateConfig(head_norm='layer')
