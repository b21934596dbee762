"""config.dtype='bfloat16': bfloat16 compute, float32 parameters, for every architecture.

The gated forward is compared with float32 on the same random weights. A mask is a
step function of its head's logits: random heads put many logits within bfloat16
rounding of 0, and in a deep network one such flip changes every later layer
(ResNet-110 with plain random heads: 78% relative logit error with masks 91% equal,
while its unmasked forward agrees to 0.5%). So the heads here get biases of at
least 0.5 in magnitude: the comparison is about numerics, not about mask ties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fttw_jax import models
from helpers import random_variables, small_input_size
from test_train import run_steps, synthetic_batches, tiny_config

# Each case compiles two full forwards (10-40 s on a 2-core CPU). The default run
# keeps one per module: resnet20 (CIFAR ResNets), vgg16_bn, mobilenet_v1 (both
# MobileNetV1s), resnet18 (ImageNet ResNets); `make test-all` runs every one.
FAST = {'resnet20', 'vgg16_bn', 'mobilenet_v1', 'resnet18'}
CASES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
         for name in models.MODELS]


def heads_with_margin(variables):
  """Head biases pushed to |b| >= 0.5 (sign kept), so no mask sits on a tie."""
  def push(path, leaf):
    if models.is_head_path(path) and path[-1].key == 'bias':
      return np.sign(leaf) * (0.5 + np.abs(leaf))
    return leaf
  return jax.tree.map_with_path(push, variables)


def forward(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def gate_values(aux, key):
  return np.concatenate([np.asarray(g[key]).ravel() for g in aux['gates'].values()])


@pytest.mark.parametrize('name', CASES)
def test_bfloat16_gated_forward_matches_float32(name):
  gate = models.GateConfig(threshold=0.8)
  f32 = models.create_model(name, num_classes=10, gate=gate)
  bf16 = models.create_model(name, num_classes=10, gate=gate, dtype='bfloat16')
  size = small_input_size(name)
  x = jax.random.normal(jax.random.key(1), (8, size, size, 3))
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype('float32')}
  variables = heads_with_margin(random_variables(shapes))

  (want, want_aux), (got, got_aux) = forward(f32, variables, x), forward(bf16, variables, x)
  want, got = np.asarray(want), np.asarray(got)
  for leaf in jax.tree.leaves((got, got_aux)):  # logits, head logits, targets, masks
    assert leaf.dtype == np.float32 and np.isfinite(leaf).all()
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 0.03, f'{name}: relative logit error {rel:.4f}'
  assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 7 / 8
  assert np.mean(gate_values(got_aux, 'mask') == gate_values(want_aux, 'mask')) >= 0.99
  # Targets rank bfloat16-rounded activations: a few near-equal channels may swap.
  assert np.mean(gate_values(got_aux, 'target') == gate_values(want_aux, 'target')) >= 0.98


@pytest.mark.slow  # two sharded train-step compiles, ~33 s; the forward cases stay fast
def test_bfloat16_train_step_resnet8():
  """One sharded step (4 devices): finite loss close to float32's, state stays float32."""
  batches = synthetic_batches(1)
  _, state, metrics = run_steps(tiny_config(dtype='bfloat16'), jax.devices(), batches)
  _, _, want = run_steps(tiny_config(), jax.devices(), batches)
  assert np.isfinite(metrics['loss']) and metrics['mask_loss'] > 0
  np.testing.assert_allclose(metrics['loss'], want['loss'], rtol=0.02)
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == np.float32 and np.isfinite(leaf).all()
