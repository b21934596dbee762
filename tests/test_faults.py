"""Faults injected for real (issue 13): a NaN step, foreign and stale artefacts, corrupt
checkpoints, SIGTERM at chosen moments, a read-only workdir, user errors. Each test
asserts the outcome and that nothing already written was lost or changed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fttw_jax import checkpoint, convert, errors, evaluate, evaluation, train
from test_train import REPO, loop_config, tree_snapshot

EPOCH = 11   # steps per epoch of digits at batch 128


def fault_config(data_dir, **overrides):
  defaults = {'stage': 'baseline', 'num_epochs': 2, 'eval_max_examples': 64}
  return loop_config(data_dir, **{**defaults, **overrides})


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def run(tmp_path_factory, data_dir):
  """One finished 2-epoch baseline run (checkpoints 11 and 22); tests work on copies."""
  workdir = tmp_path_factory.mktemp('faults') / 'run'
  train.train_and_evaluate(fault_config(data_dir), workdir)
  return workdir


def copy_of(run, tmp_path, name='w'):
  dst = tmp_path / name
  shutil.copytree(run, dst)
  return dst


def eval_steps(workdir):
  return sorted(int(p.stem) for p in (workdir / 'eval').glob('*.json'))


def strict_load(path):
  def refuse(constant):
    raise ValueError(f'{path}: non-strict JSON constant {constant}')
  return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ NaN

def test_nan_step_saves_nothing_and_a_fixed_rerun_resumes(tmp_path, data_dir):
  workdir = tmp_path / 'nan'
  train.train_and_evaluate(fault_config(data_dir, max_steps=EPOCH), workdir)
  before = tree_snapshot(workdir / 'checkpoints')
  with pytest.raises(errors.NonFiniteError,
                     match=rf'at step (1[2-9]|2[0-2]);.*step {EPOCH} in .*checkpoints, stays the '
                           rf'latest \(best: step {EPOCH}\)'):
    train.train_and_evaluate(fault_config(data_dir, **{'optimizer.learning_rate': 1e30}),
                             workdir)
  assert tree_snapshot(workdir / 'checkpoints') == before   # nothing poisoned was saved
  assert eval_steps(workdir) == [EPOCH]
  _, step = checkpoint.resolve(workdir, 'best')
  assert step == EPOCH
  # The same workdir, a sane learning rate: resumes from the last finite checkpoint.
  result = train.train_and_evaluate(fault_config(data_dir, max_steps=EPOCH + 2), workdir)
  assert result['step'] == EPOCH + 2 and np.isfinite(result['loss'])
  variables, _, _, step = checkpoint.restore_variables(workdir, 'latest')
  assert step == EPOCH + 2 and all(np.isfinite(v).all() for v in jax.tree.leaves(variables))


def test_eval_json_is_strict_and_names_non_finite_values(tmp_path):
  path = evaluation.write_eval_json(tmp_path, 3, {'top1': 0.5, 'loss': float('nan'),
                                             'active_ratio': {'a': float('inf'), 'b': 1.0}})
  stored = strict_load(path)
  assert stored['loss'] is None and stored['active_ratio'] == {'a': None, 'b': 1.0}
  assert stored['non_finite'] == ['loss', 'active_ratio.a'] and stored['top1'] == 0.5


# ------------------------------------------------------------------ refusals

def test_stale_best_of_an_older_layout_is_refused_untouched(run, tmp_path, data_dir):
  """checkpoints/ deleted, an older run's best/33 kept: a new run must not start there."""
  workdir = tmp_path / 'stale'
  (workdir / 'best').mkdir(parents=True)
  shutil.copytree(run / 'checkpoints' / '22', workdir / 'best' / '33')
  before = tree_snapshot(workdir)
  with pytest.raises(errors.UserError, match=r'no record of \(best\).*--overwrite'):
    train.train_and_evaluate(fault_config(data_dir), workdir)
  assert tree_snapshot(workdir) == before
  # Reading the older layout still works: best/ is where 'best' is found.
  assert checkpoint.resolve(workdir, 'best') == (workdir / 'best', 33)
  # --overwrite discards it; the new run's best is its own.
  train.train_and_evaluate(fault_config(data_dir, max_steps=EPOCH), workdir, overwrite=True)
  assert not (workdir / 'best').exists()
  assert checkpoint.resolve(workdir, 'best') == (workdir / 'checkpoints', EPOCH)


@pytest.mark.parametrize('fault', ['other_model', 'foreign_eval', 'foreign_checkpoint',
                                   'converted', 'bad_init_from', 'unprepared_dataset'])
def test_refusals_leave_the_workdir_byte_identical(fault, run, tmp_path, data_dir):
  workdir = copy_of(run, tmp_path)
  config = fault_config(data_dir, num_epochs=3)
  match = None
  if fault == 'other_model':
    config.model, match = 'resnet20', r"model: run.json 'resnet8' vs config 'resnet20'"
  elif fault == 'foreign_eval':   # another run's evaluation dropped into eval/
    other = json.loads((workdir / 'eval' / '22.json').read_text())
    (workdir / 'eval' / '33.json').write_text(json.dumps({**other, 'run_id': 'someone'}))
    match = r'eval/33.json, which is not an evaluation of its run'
  elif fault == 'foreign_checkpoint':
    shutil.copytree(workdir / 'checkpoints' / '22', tmp_path / 'c22')
    shutil.rmtree(workdir)
    workdir.mkdir()
    shutil.copytree(tmp_path / 'c22', workdir / 'checkpoints' / '22')
    match = r'without a run record'
  elif fault == 'converted':
    shutil.rmtree(workdir)
    variables, cfg, meta, _ = checkpoint.restore_variables(run)
    convert.write_checkpoint(workdir, variables, cfg, {**meta, 'source': 'resnet8.pth'})
    match = r'converted weights \(resnet8.pth\).*--config.init_from='
  elif fault == 'bad_init_from':
    shutil.rmtree(workdir)
    config.init_from, config.stage = str(tmp_path / 'nowhere'), 'ftwt'
    match = r"config.init_from=.*nowhere.*no such workdir"
  elif fault == 'unprepared_dataset':
    shutil.rmtree(workdir)
    config.dataset, config.data_dir = 'cifar10', str(tmp_path / 'empty_tfds')
    match = 'cifar10'
  before = tree_snapshot(workdir)
  with pytest.raises((errors.UserError, FileNotFoundError), match=match):
    train.train_and_evaluate(config, workdir)
  assert tree_snapshot(workdir) == before


# ------------------------------------------------------------------ corrupt checkpoints

def _truncate_arrays(step_dir):
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  for p in files:
    p.write_bytes(p.read_bytes()[:10])
  return files


def test_corrupt_checkpoint_is_one_line_and_resume_falls_back(run, tmp_path, data_dir, caplog):
  workdir = copy_of(run, tmp_path)
  _truncate_arrays(workdir / 'checkpoints' / '22' / 'variables')
  with pytest.raises(errors.CorruptCheckpointError) as e:
    checkpoint.restore_variables(workdir, 'latest')
  message = str(e.value)
  assert '\n' not in message and 'checkpoints/22' in message and 'variables/d/' in message
  garbled = copy_of(run, tmp_path, 'garbled')
  (garbled / 'checkpoints' / '22' / 'variables' / '_METADATA').write_text('{garbled')
  with pytest.raises(errors.CorruptCheckpointError, match=r'checkpoints/22: file '
                     r'variables/_METADATA is not valid JSON'):
    evaluate.restore(garbled, 'latest')
  # An unfinished save left by a killed run.
  tmp = workdir / 'checkpoints' / '33.orbax-checkpoint-tmp-1700000000'
  (tmp / 'variables').mkdir(parents=True)
  kept_11 = tree_snapshot(workdir / 'checkpoints' / '11')
  result = train.train_and_evaluate(fault_config(data_dir), workdir)
  log = caplog.text
  assert 'checkpoints/22' in log and 'falling back' in log
  assert 'unfinished checkpoint save' in log and not tmp.exists()
  assert (workdir / 'corrupt' / '22').is_dir()          # kept, not deleted
  assert tree_snapshot(workdir / 'checkpoints' / '11') == kept_11
  assert result['step'] == 22 and checkpoint.resolve(workdir, 'latest')[1] == 22
  straight = strict_load(run / 'eval' / '22.json')
  assert result['top1'] == pytest.approx(straight['top1'])


# ------------------------------------------------------------------ SIGTERM

def _main(workdir, data_dir, *extra):
  return [sys.executable, str(REPO / 'main.py'),
          f'--config={REPO}/configs/default.py:ftwt,r0.7',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}', '--config.width=0.25',
          '--config.model=resnet8', '--config.num_epochs=2', '--config.log_every_steps=1',
          '--config.eval_max_examples=64', *extra]


def _signal_when(cmd, marker):
  """Run ``cmd``, SIGTERM it when a line contains ``marker``; (exit code, output)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=str(REPO), env=env)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if marker in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = ''.join(lines) + proc.stdout.read()
  return proc.wait(timeout=300), out


@pytest.mark.slow  # one subprocess start-up, ~30 s
def test_sigterm_during_head_init_exits_143_writing_nothing(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  rc, out = _signal_when(_main(workdir, data_dir), 'head_init=ones: fitting')
  assert rc == errors.EXIT_PREEMPTED, out[-3000:]
  assert 'preempted: during the head_init pass' in out
  assert not workdir.exists()


@pytest.mark.slow  # one subprocess, ~40 s
def test_sigterm_on_an_epoch_boundary_evaluates_it_once(tmp_path, data_dir):
  """The signal lands during the epoch's last step (or its evaluation): that step is
  evaluated and checkpointed with its top-1 before the exit, and the resumed run
  evaluates every later boundary exactly once."""
  workdir = tmp_path / 'w'
  rc, out = _signal_when(_main(workdir, data_dir, '--config.head_init=random'),
                         f'] [{EPOCH - 1}] train/')
  assert rc == errors.EXIT_PREEMPTED, out[-3000:]
  stopped = checkpoint.resolve(workdir, 'latest')[1]
  assert stopped in (EPOCH - 1, EPOCH), out[-3000:]   # within one step of the signal
  if stopped == EPOCH:
    assert eval_steps(workdir) == [EPOCH] and checkpoint.has_metrics(workdir, EPOCH)
  saved = tree_snapshot(workdir / 'checkpoints' / str(stopped))
  from configs import default
  config = default.get_config('ftwt,r0.7')
  config.data_dir, config.width, config.model, config.num_epochs = data_dir, 0.25, 'resnet8', 2
  config.log_every_steps, config.eval_max_examples, config.head_init = 1, 64, 'random'
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 2 * EPOCH
  assert eval_steps(workdir) == [EPOCH, 2 * EPOCH]
  evals = {s: strict_load(workdir / 'eval' / f'{s}.json') for s in eval_steps(workdir)}
  best = max(evals, key=lambda s: (evals[s]['top1'], s))
  assert checkpoint.resolve(workdir, 'best') == (workdir / 'checkpoints', best)
  if stopped == EPOCH:
    assert tree_snapshot(workdir / 'checkpoints' / str(stopped)) == saved


# ------------------------------------------------------------------ evaluate, user errors

def test_evaluate_read_only_workdir_prints_the_table(run, tmp_path, capsys):
  workdir = copy_of(run, tmp_path)
  shutil.rmtree(workdir / 'eval')
  if os.geteuid() == 0:   # root ignores permission bits: block eval/ with a file instead
    (workdir / 'eval').write_text('')
  before = tree_snapshot(workdir)
  os.chmod(workdir, 0o555)
  try:
    result = evaluate.evaluate_checkpoint(None, workdir, 'latest', max_examples=64)
  finally:
    os.chmod(workdir, 0o755)
  out = capsys.readouterr().out
  assert 'top-1' in out and 'the eval JSON could not be written' in out
  assert result['step'] == 22
  assert tree_snapshot(workdir) == before


@pytest.mark.slow  # five short subprocesses at once, ~40 s
def test_user_errors_are_one_line_and_exit_2(run, tmp_path):
  corrupt = copy_of(run, tmp_path)
  _truncate_arrays(corrupt / 'checkpoints' / '22' / 'variables')
  cases = {
      'corrupt': ([f'--config={REPO}/configs/default.py:baseline', '--mode=evaluate',
                   '--config.model=resnet8', '--config.width=0.25', '--checkpoint=latest',
                   f'--workdir={corrupt}'],
                  r'corrupt checkpoint .*checkpoints/22: file .*variables/d/'),
      'variant': ([f'--config={REPO}/configs/default.py:bogus'], r"'bogus'.*valid"),
      'typo': ([f'--config={REPO}/configs/default.py:basline'], r"'basline'.*'baseline'"),
      'value': ([f'--config={REPO}/configs/default.py', '--config.model=resnet57'],
                r"config.model='resnet57'.*resnet56"),
      'missing_file': ([f'--config={REPO}/configs/nope.py'], r'nope.py'),
      'checkpoint': ([f'--config={REPO}/configs/default.py', '--mode=evaluate',
                      '--checkpoint=lastest'], r"--checkpoint='lastest'.*'latest'"),
  }
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = {name: subprocess.Popen(
      [sys.executable, str(REPO / 'main.py'), f'--workdir={run}', *args],  # last one wins
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env)
      for name, (args, _) in cases.items()}
  before = tree_snapshot(run), tree_snapshot(corrupt)
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == errors.EXIT_USER_ERROR, (name, err[-2000:])
    assert 'Traceback' not in err and 'Event loop is closed' not in err, (name, err[-2000:])
    lines = [l for l in err.splitlines() if l.startswith('error: ')]
    assert len(lines) == 1 and re.search(cases[name][1], lines[0]), (name, err[-2000:])
  assert (tree_snapshot(run), tree_snapshot(corrupt)) == before


@pytest.mark.parametrize('bad', ['2.5', '0'])
def test_estimate_examples_must_be_a_positive_int(bad, capsys):
  import main
  with pytest.raises(SystemExit) as e:
    main.parse_flags(['main.py', f'--config={REPO}/configs/default.py', '--workdir=/nowhere',
                      f'--estimate_examples={bad}'])
  assert e.value.code == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.startswith('error: ') and len(err.splitlines()) == 1 and bad in err, err
