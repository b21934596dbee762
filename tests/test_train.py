"""Training system: sharding invariance, separate optimizers, resume, SIGTERM, errors."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from fttw_jax import checkpoint, data, evaluation, flops, models, parallel, train
from fttw_jax import config as config_lib

REPO = epath.Path(__file__).parent.parent


def tiny_config(stage='ftwt', **overrides):
  c = config_lib.base_config()
  c.model, c.width, c.dataset, c.stage = 'resnet8', 0.25, 'digits', stage
  c.batch_size, c.num_epochs = 8, 4
  c.gate.threshold = 0.7
  c.optimizer.learning_rate = 0.05
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def synthetic_batches(n, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, (batch,), dtype=np.int32)} for _ in range(n)]


def run_steps(config, devices, batches, steps_per_epoch=100, tx=None):
  mesh = parallel.make_mesh(devices)
  model = config_lib.model_from_config(config, 10, bn_axis_name=parallel.AXIS)
  prof = flops.profile(config_lib.model_from_config(config, 10), (1, 32, 32, 3))
  tx = tx or train.create_optimizer(config, steps_per_epoch, 1000)
  state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx, (32, 32, 3), mesh)
  initial = jax.device_get(state)
  step = train.make_train_step(mesh, model=model, tx=tx, config=config, prof=prof,
                               steps_per_epoch=steps_per_epoch)
  metrics = None
  for b in batches:
    state, metrics = step(state, data.shard_batch(b, mesh))
  return initial, jax.device_get(state), jax.device_get(metrics)


def skip_without_onednn(conv_impl):
  if conv_impl == 'onednn' and models.onednn_conv.unavailable():
    pytest.skip(f'oneDNN unavailable: {models.onednn_conv.unavailable()}')


@pytest.mark.parametrize('stage', ['baseline', 'ftwt'])
@pytest.mark.parametrize('conv_impl', ['xla', 'cpu', 'onednn'])
def test_one_vs_four_devices_same_params(stage, conv_impl):
  assert jax.device_count() == 4, 'conftest forces 4 CPU devices'
  skip_without_onednn(conv_impl)
  config = tiny_config(stage, conv_impl=conv_impl)
  batches = synthetic_batches(3)
  _, one, m1 = run_steps(config, jax.devices()[:1], batches)
  _, four, m4 = run_steps(config, jax.devices(), batches)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  if stage == 'ftwt':
    assert m4['mask_loss'] > 0 and 0 < m4['mask_accuracy'] <= 1


@pytest.mark.parametrize('stage', ['baseline', 'ftwt'])
@pytest.mark.parametrize('conv_impl', ['cpu', 'onednn'])
def test_cpu_conv_impl_trains_like_xla(stage, conv_impl):
  """conv_impl='cpu' (own BN VJP, barriers, YNN fusions) and 'onednn' (also oneDNN's
  convs) = XLA's ops, after 4 steps."""
  skip_without_onednn(conv_impl)
  batches = synthetic_batches(4)
  initial, xla, mx = run_steps(tiny_config(stage, conv_impl='xla'), jax.devices(), batches)
  _, cpu, mc = run_steps(tiny_config(stage, conv_impl=conv_impl), jax.devices(), batches)
  moved = False
  for (path, a), b, c in zip(jax.tree.leaves_with_path(xla), jax.tree.leaves(cpu),
                             jax.tree.leaves(initial)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    moved |= not np.allclose(a, c)
  assert moved
  for (path, a), b in zip(jax.tree.leaves_with_path(mx), jax.tree.leaves(mc)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_cpu_conv_impl_keeps_layer_barriers_through_compilation():
  config = tiny_config('baseline', conv_impl='cpu')
  mesh = parallel.make_mesh(jax.devices()[:1])
  texts = {}
  for impl in ('xla', 'cpu'):
    config.conv_impl = impl
    model = config_lib.model_from_config(config, 10, bn_axis_name=parallel.AXIS)
    tx = train.create_optimizer(config, 100, 1000)
    state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx, (32, 32, 3),
                                     mesh)
    step = train.make_train_step(mesh, model=model, tx=tx, config=config, prof=None,
                                 steps_per_epoch=100)
    batch = data.shard_batch(synthetic_batches(1)[0], mesh)
    texts[impl] = step.lower(state, batch).compile().as_text()
  assert 'opt-barrier' not in texts['xla']
  # resnet8: stem + 6 block convs, each barriered forward and backward
  assert texts['cpu'].count('opt-barrier(') >= 14


def test_label_rank_equals_stable_argsort_with_ties():
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 4, (200, 10)).astype(np.float32)  # many ties
  labels = rng.integers(0, 10, (200,)).astype(np.int32)
  order = np.argsort(-logits, axis=-1, kind='stable')
  expected = np.argmax(order == labels[:, None], axis=-1)
  np.testing.assert_array_equal(evaluation.label_rank(jnp.asarray(logits), jnp.asarray(labels)),
                                expected)


def _changed(before, after):
  """{'heads': bool, 'backbone': bool}: did any parameter of that label move?"""
  moved = {'heads': False, 'backbone': False}
  for (path, a), b in zip(jax.tree.leaves_with_path(before.params),
                          jax.tree.leaves(after.params)):
    label = 'heads' if models.is_head_path(path) else 'backbone'
    moved[label] |= not np.array_equal(a, b)
  return moved


def test_label_tree_marks_exactly_the_heads():
  config = tiny_config()
  model = config_lib.model_from_config(config, 10)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  labels = jax.tree.leaves_with_path(train.param_labels(params))
  heads = [jax.tree_util.keystr(p) for p, l in labels if l == 'heads']
  assert len(heads) == 2 * 7 and all("['head']" in h for h in heads)
  assert all(l == 'backbone' for p, l in labels if "['head']" not in jax.tree_util.keystr(p))


def test_separate_optimizers_update_only_their_labels():
  batches = synthetic_batches(2)
  frozen_backbone = tiny_config(**{'optimizer.learning_rate': 0.0})
  before, after, _ = run_steps(frozen_backbone, jax.devices(), batches)
  assert _changed(before, after) == {'heads': True, 'backbone': False}
  frozen_heads = tiny_config(**{'head_optimizer.learning_rate': 0.0})
  before, after, _ = run_steps(frozen_heads, jax.devices(), batches)
  assert _changed(before, after) == {'heads': False, 'backbone': True}


def test_cooldown_freezes_heads_and_zeroes_mask_loss_weight():
  config = tiny_config(num_epochs=2, cooldown=0.5)
  # steps_per_epoch=1: the first step is epoch 0 (w = 1), the rest epoch >= 1 (w = 0).
  batches = synthetic_batches(1)
  before, after_one, m = run_steps(config, jax.devices(), batches, steps_per_epoch=1)
  assert m['mask_loss_weight'] == 1.0 and _changed(before, after_one)['heads']
  _, after_three, m = run_steps(config, jax.devices(), synthetic_batches(3), steps_per_epoch=1)
  assert m['mask_loss_weight'] == 0.0
  heads = lambda s: [v for p, v in jax.tree.leaves_with_path(s.params) if models.is_head_path(p)]
  for a, b in zip(heads(after_one), heads(after_three)):
    np.testing.assert_array_equal(a, b)


def test_step_decay_schedule_matches_pytorch_multistep():
  opt = tiny_config().optimizer
  opt.schedule, opt.learning_rate, opt.decay_epochs = 'step', 0.1, (2, 3)
  sched = train.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=50)
  np.testing.assert_allclose([sched(s) for s in (0, 19, 20, 29, 30, 49)],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_coupled_weight_decay_is_pytorch_sgd():
  opt = tiny_config().optimizer
  opt.schedule, opt.learning_rate, opt.momentum, opt.weight_decay = 'constant', 0.1, 0.9, 0.5
  tx = train.sgd(opt, 1, 1)
  p = {'w': jnp.array([2.0])}
  g = {'w': jnp.array([1.0])}
  state = tx.init(p)
  buf = 0.0
  w = 2.0
  for _ in range(3):  # torch: d = g + wd*w; buf = m*buf + d; w -= lr*buf
    u, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, b: a + b, p, u)
    buf = 0.9 * buf + (1.0 + 0.5 * w)
    w -= 0.1 * buf
    np.testing.assert_allclose(p['w'][0], w, rtol=1e-6)


# ---------------------------------------------------------------- full loop

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def loop_config(data_dir, **overrides):
  defaults = {'batch_size': 128, 'num_epochs': 3, 'log_every_steps': 2, 'data_dir': data_dir,
              'eval_max_examples': 128, 'optimizer.schedule': 'cosine'}
  return tiny_config(**{**defaults, **overrides})


def tree_snapshot(root) -> dict:
  """{relative path: bytes (files) or None (directories)} of everything under ``root``."""
  root = pathlib.Path(root)
  if not root.exists():
    return {}
  return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(root.rglob('*'))}


def final_params(workdir):
  variables, _, meta, step = checkpoint.restore_variables(workdir, 'latest')
  return variables, step


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path, data_dir):
  workdir = tmp_path / 'interrupted'
  cmd = [sys.executable, str(REPO / 'main.py'), f'--config={REPO}/configs/default.py:ftwt,r0.7',
         f'--workdir={workdir}', f'--config.data_dir={data_dir}', '--config.width=0.25',
         '--config.batch_size=128', '--config.num_epochs=3', '--config.model=resnet8', '--config.log_every_steps=2',
         '--config.eval_max_examples=128', '--config.seed=0']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=str(REPO), env=env)
  lines = []
  for line in proc.stdout:  # wait until training steps are running, then preempt
    lines.append(line)
    if '] [4] train/' in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = ''.join(lines) + proc.stdout.read()
  assert proc.wait(timeout=300) == 143, out[-3000:]   # preempted, not finished
  assert 'checkpoint written at step' in out, out[-3000:]
  _, stopped_at = final_params(workdir)
  assert stopped_at in (4, 5)  # within one step of the signal

  # Resume in-process to the end; compare with an uninterrupted run.
  from configs import default
  def cfg():
    c = default.get_config('ftwt,r0.7')
    c.data_dir, c.width, c.batch_size, c.num_epochs = data_dir, 0.25, 128, 3
    c.model = 'resnet8'
    c.log_every_steps, c.eval_max_examples = 2, 128
    return c
  resumed = train.train_and_evaluate(cfg(), workdir)
  straight = train.train_and_evaluate(cfg(), tmp_path / 'straight')
  (a, step_a), (b, step_b) = final_params(workdir), final_params(tmp_path / 'straight')
  assert step_a == step_b == 33
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert resumed['top1'] == pytest.approx(straight['top1'])
  assert (workdir / 'eval' / '33.json').exists()


def test_mismatched_checkpoint_is_refused_and_untouched(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  train.train_and_evaluate(loop_config(data_dir, max_steps=2, stage='baseline'), workdir)
  files = tree_snapshot(workdir)
  with pytest.raises(ValueError, match=r"model: run.json 'resnet8' vs config 'vgg16_bn'"):
    train.train_and_evaluate(loop_config(data_dir, model='vgg16_bn', stage='baseline'), workdir)
  assert tree_snapshot(workdir) == files


def test_init_from_loads_backbone_and_keeps_fresh_heads(tmp_path, data_dir):
  base_dir = tmp_path / 'base'
  train.train_and_evaluate(loop_config(data_dir, max_steps=2, stage='baseline'), base_dir)
  base_vars, _ = final_params(base_dir)
  config = loop_config(data_dir)
  mesh = parallel.make_mesh()
  model = config_lib.model_from_config(config, 10, bn_axis_name=parallel.AXIS)
  tx = train.create_optimizer(config, 10, 100)
  state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx, (32, 32, 3), mesh)
  fresh_heads = models.split_heads(jax.device_get(state.params))[1]
  loaded = jax.device_get(train.load_backbone(str(base_dir), state, mesh))
  backbone, heads = models.split_heads(loaded.params)
  for x, y in zip(jax.tree.leaves(backbone), jax.tree.leaves(base_vars['params'])):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(loaded.batch_stats), jax.tree.leaves(base_vars['batch_stats'])):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(heads), jax.tree.leaves(fresh_heads)):
    np.testing.assert_array_equal(x, y)
  # A gated checkpoint of another width is a clear error.
  bad = loop_config(data_dir, width=0.5)
  bad_model = config_lib.model_from_config(bad, 10, bn_axis_name=parallel.AXIS)
  bad_state = train.create_train_state(jax.random.key(0, impl='rbg'), bad_model, tx, (32, 32, 3),
                                         mesh)
  with pytest.raises(ValueError, match='wrong shape'):
    train.load_backbone(str(base_dir), bad_state, mesh)


def test_non_finite_loss_stops_with_step_number(tmp_path, data_dir):
  config = loop_config(data_dir, max_steps=6, stage='baseline')
  config.optimizer.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match=r'non-finite .* at step \d;.*no checkpoint'):
    train.train_and_evaluate(config, tmp_path / 'nan')
  assert checkpoint.steps(tmp_path / 'nan' / 'checkpoints') == []


@pytest.mark.parametrize('field, value, message', [
    ('model', 'resnet57', r"config.model='resnet57'.*resnet56"),
    ('gate.threshold', 1.3, r'r=1.3'),
    ('gate.mode', 'both', r"gate.mode='both'.*decoupled"),
    ('stage', 'prune', r"config.stage='prune'"),
    ('batch_size', 0, r'batch_size=0'),
    ('conv_impl', 'eigen', r"config.conv_impl='eigen'.*'onednn'"),
])
def test_bad_config_values(field, value, message, tmp_path):
  config = tiny_config(**{field: value})
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_not_divisible_by_devices(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r'\b6\b.*\b4\b|\b4\b.*\b6\b'):
    train.train_and_evaluate(loop_config(data_dir, batch_size=6), tmp_path)
