"""Budget-exact FTWT (issue 15): controller, offset search, calibration, resume, logging, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from fttw_jax import api, budget, checkpoint, report, train
from test_train import tiny_config


# ---------------------------------------------------------------- controller (synthetic)

def synthetic_run(ctrl, cost, threshold0, gain, steps, lag=0.2):
  """Closed loop on a synthetic cost curve: the realized reduction follows the curve's
  value at the current threshold with a first-order lag (heads learning new targets)."""
  def body(carry, step):
    bs, realized = carry
    realized = realized + lag * (cost(bs.threshold) - realized)
    bs = ctrl.update(bs, step, realized)
    return (bs, realized), bs.threshold
  bs0 = budget.new_state(threshold0, gain)
  (bs, realized), trace = jax.lax.scan(body, (bs0, jnp.zeros(())), jnp.arange(steps))
  return bs, float(realized), np.asarray(trace)


@pytest.mark.parametrize('criterion', ['mass', 'uniform'])
def test_controller_converges_on_a_synthetic_cost_curve(criterion):
  target = 0.6
  if criterion == 'mass':   # reduction falls as r grows; answer r* = sqrt(0.4)
    cost, sign, answer = (lambda r: 1.0 - r ** 2), 1.0, np.sqrt(0.4)
  else:                     # reduction grows with q; answer q* = 0.6 ** 0.5
    cost, sign, answer = (lambda q: q ** 2), -1.0, np.sqrt(0.6)
  ctrl = budget.Controller(target, 'macs_exact', start=30, stop=400, sign=sign)
  bs, realized, trace = synthetic_run(ctrl, cost, 0.9 if criterion == 'mass' else 0.3,
                                      gain=1.0 / (1.3 * 60), steps=500)
  assert np.all(trace[:30] == trace[0])               # warm-up: the threshold waits
  assert abs(float(bs.threshold) - answer) < 0.01
  assert abs(realized - target) < 0.01
  assert abs(float(bs.ema) - target) < 0.01
  np.testing.assert_array_equal(trace[400:], trace[399])   # frozen from the cooldown on


def test_offset_search_finds_nearest_point_of_a_step_curve():
  curve = lambda o: float(np.clip(0.5 - 0.1 * np.floor(4 * o) / 4, -0.1, 0.9))
  offset, value, n = budget.search_offset(curve, 0.62)
  assert value == pytest.approx(0.625) and curve(offset) == value and n < 40
  offset, value, _ = budget.search_offset(lambda o: 0.5 - 0.01 * o, 0.123)
  assert value == pytest.approx(0.123, abs=1e-4)


def test_shift_heads_moves_only_head_biases():
  variables = {'params': {'a': {'head': {'bias': jnp.zeros(3), 'kernel': jnp.ones((2, 3))},
                                'conv': {'bias': jnp.zeros(3)}}}, 'batch_stats': {}}
  shifted = budget.shift_heads(variables, 0.25)
  np.testing.assert_array_equal(shifted['params']['a']['head']['bias'], 0.25)
  np.testing.assert_array_equal(shifted['params']['a']['head']['kernel'], 1.0)
  np.testing.assert_array_equal(shifted['params']['a']['conv']['bias'], 0.0)


# ---------------------------------------------------------------- a small budget run

TARGET = 0.5


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('budget')
  data_dir = str(root / 'tfds')
  common = dict(batch_size=128, num_epochs=2, log_every_steps=2, eval_max_examples=128,
                data_dir=data_dir)
  dense = root / 'dense'
  train.train_and_evaluate(tiny_config('baseline', max_steps=4, **common), dense)

  def config(**overrides):
    c = tiny_config('ftwt', **{'init_from': str(dense), **common, **overrides})
    c.budget.target_reduction, c.budget.examples = TARGET, 128
    return c

  run = root / 'run'
  result = train.train_and_evaluate(config(), run)
  return {'root': root, 'dense': dense, 'run': run, 'result': result, 'config': config,
          'data_dir': data_dir}


def test_budget_run_logs_fields_and_calibrates_to_target(runs):
  result, run = runs['result'], runs['run']
  assert result['target_reduction'] == TARGET and result['budget_accounting'] == 'exact'
  for k in ('threshold', 'logit_offset', 'flops_reduction_exact', 'flops_reduction_paper'):
    assert isinstance(result[k], float), k
  every = report.read_eval_jsons(run)
  assert sorted(every) == [11, 22]
  assert all('threshold' in e and 'logit_offset' in e and e['target_reduction'] == TARGET
             for e in every.values())
  events = report.read_events(run)
  for tag in ('eval/threshold', 'eval/logit_offset', 'eval/target_reduction',
              'eval/flops_reduction_exact', 'eval/flops_reduction_paper',
              'train/budget/threshold', 'train/budget/realized_ema'):
    assert tag in events, tag
  # Calibrated twice (cooldown and end); the head biases hold the offset.
  _, _, meta, step = checkpoint.restore_variables(run, 'latest')
  assert step == 22 and meta['budget']['calibrations'] == 2
  assert meta['budget']['offset'] == pytest.approx(result['logit_offset'])
  assert meta['budget_plan']['reachable'][0] < TARGET < meta['budget_plan']['reachable'][1]
  # The realized reduction of the eval prefix is the target within the 1 point.
  assert abs(result['flops_reduction_exact'] - TARGET) < 0.01
  # Only the calibrated last step is the 'best' checkpoint.
  assert checkpoint.resolve(run, 'best')[1] == 22


def test_resume_mid_controller_is_bit_exact(runs, monkeypatch):
  workdir = runs['root'] / 'interrupted'
  stop_at = 7            # controller acting: warm-up ends at step 3, cooldown at 11
  monkeypatch.setattr(train._Preemption, 'should_stop',
                      lambda self, step, every: step == stop_at)
  out = train.train_and_evaluate(runs['config'](), workdir)
  assert out == {'preempted_at_step': stop_at}
  _, _, meta, step = checkpoint.restore_variables(workdir, 'latest')
  assert step == stop_at and meta['budget']['calibrations'] == 0
  monkeypatch.undo()
  train.train_and_evaluate(runs['config'](), workdir)
  a, _, meta_a, _ = checkpoint.restore_variables(workdir, 'latest')
  b, _, meta_b, _ = checkpoint.restore_variables(runs['run'], 'latest')
  assert meta_a['budget'] == meta_b['budget']
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_calibrate_mode_writes_a_new_checkpoint_at_the_target(runs):
  src = runs['run']
  before = {p: p.read_bytes() for p in src.rglob('*') if p.is_file()}
  out = runs['root'] / 'calibrated'
  record = budget.run_calibrate(None, src, out, 0.4)
  assert abs(record['sample_reduction_after']['exact'] - 0.4) < 2e-3
  assert record['test_before']['flops_reduction_exact'] == pytest.approx(
      runs['result']['flops_reduction_exact'], abs=0.02)
  assert {p: p.read_bytes() for p in src.rglob('*') if p.is_file()} == before
  stored = json.loads((out / 'calibration.json').read_text())
  assert stored['test_after'] == record['test_after']
  # Everywhere the model runs honours the offset: the API's masks give the after numbers.
  m = api.load(out, 'latest')
  a = api.load(src, 'latest')
  heads = lambda v: [x for p, x in jax.tree.leaves_with_path(v['params'])
                     if 'head' in jax.tree_util.keystr(p) and 'bias' in jax.tree_util.keystr(p)]
  for x, y in zip(heads(m.variables), heads(a.variables)):
    np.testing.assert_allclose(x - y, record['offset'], atol=1e-5)
  assert m.meta['budget']['target_reduction'] == 0.4
  with pytest.raises(ValueError, match='already holds a checkpoint'):
    budget.run_calibrate(None, src, out, 0.45)


@pytest.mark.parametrize('target, message', [
    (0.0, r'target_reduction=0.0 is invalid'), (1.0, r'target_reduction=1.0 is invalid'),
    (-0.2, r'target_reduction=-0.2 is invalid'), (0.9999, r'0.9999 is out of reach: .* from '
                                                          r'-?\d\.\d{4} .* to 0\.\d{4}')])
def test_bad_budget_targets_fail_before_anything_is_written(runs, target, message):
  workdir = runs['root'] / f'bad_{target}'
  config = runs['config']()
  config.budget.target_reduction = target
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, workdir)
  assert not workdir.exists()
  with pytest.raises(ValueError, match=message):
    budget.run_calibrate(None, runs['run'], runs['root'] / f'bad_cal_{target}', target)
  assert not (runs['root'] / f'bad_cal_{target}').exists()


def test_budget_needs_ftwt_stage_and_a_dense_start(runs, tmp_path):
  config = runs['config']()
  config.stage = 'baseline'
  with pytest.raises(ValueError, match=r"target_reduction=0.5 needs config.stage='ftwt'"):
    train.train_and_evaluate(config, tmp_path / 'a')
  config = runs['config'](init_from='')
  with pytest.raises(ValueError, match=r'target_reduction=0.5 needs config.init_from'):
    train.train_and_evaluate(config, tmp_path / 'b')
  with pytest.raises(ValueError, match=r"'baseline' checkpoint: calibration needs an FTWT"):
    budget.run_calibrate(None, runs['dense'], tmp_path / 'c', 0.5)
  with pytest.raises(ValueError, match=r'must be a new directory outside'):
    budget.run_calibrate(None, runs['run'], runs['run'] / 'x', 0.5)
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
  assert not (tmp_path / 'c').exists()


def test_report_states_target_vs_realized(runs):
  md = report.write_report(runs['run'], max_examples=128).read_text()
  realized = 100 * runs['result']['flops_reduction_exact']
  assert f'| FLOPs budget (exact count): target vs realized | 50.00 % vs {realized:.2f} %' in md
  for png in ('accuracy_vs_flops.png', 'active_ratio.png'):
    assert (runs['run'] / 'report' / png).stat().st_size > 0
