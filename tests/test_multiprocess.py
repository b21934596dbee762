"""Multi-host correctness on one machine: 2 JAX processes x 2 CPU devices, joined by
``jax.distributed`` over localhost (gloo collectives), must train exactly like
1 process x 4 devices, and the full loop must checkpoint and evaluate with every
process taking part while only process 0 writes logs."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from fttw_jax import checkpoint
from fttw_jax.data import pipeline
from multiprocess_worker import STAGE, STEPS
from test_train import run_steps, synthetic_batches, tiny_config

WORKER = epath.Path(__file__).parent / 'multiprocess_worker.py'
NUM_PROCESSES = 2
TIMEOUT_S = 240  # generous for a loaded 2-core machine; a hang fails instead of blocking CI


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def worker_env() -> dict:
  """2 CPU devices per process; no persistent compile cache shared between them."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return env


def run_workers(out_dir, *modes: str) -> list[str]:
  """Run every process to the end; the first failure or the deadline kills them all
  (a lone survivor would only wait at a barrier). Returns their outputs."""
  port = free_port()
  logs = [epath.Path(out_dir) / f'worker{i}.log' for i in range(NUM_PROCESSES)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as f:
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(NUM_PROCESSES),
             str(out_dir), *modes],
            stdout=f, stderr=subprocess.STDOUT, env=worker_env()))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [log.read_text() for log in logs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, (f'process {i} exited {p.returncode} (killed if < 0; '
                               f'limit {TIMEOUT_S}s):\n{out[-4000:]}')
  return outputs


def test_multiprocess_train_steps_equal_single_process(tmp_path):
  assert jax.device_count() == 4, 'conftest forces 4 CPU devices'
  run_workers(tmp_path, 'steps')
  got = np.load(tmp_path / 'steps.npz')
  state, metrics = run_steps(tiny_config(STAGE), jax.devices(), synthetic_batches(STEPS))[1:]
  want = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree.leaves_with_path((state, metrics))}
  assert sorted(got.files) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  # The manager saved the step from both processes; it is latest and best.
  for kind in ('latest', 'best'):
    variables, _, _, step = checkpoint.restore_variables(tmp_path / 'work_steps', kind)
    assert step == STEPS
    np.testing.assert_array_equal(variables['params']['classifier']['kernel'],
                                  got["[0].params['classifier']['kernel']"])


@pytest.mark.slow  # ~60-100 s on 2 shared cores
def test_multiprocess_loop_checkpoints_evaluates_and_logs_once(tmp_path):
  pipeline.prepared_builder('digits', str(tmp_path / 'tfds'))  # once, not raced by 2 workers
  outputs = run_workers(tmp_path, 'loop')
  work = tmp_path / 'work'
  # Evaluation is gathered over processes: both report the same global accuracy.
  top1 = [line for out in outputs for line in out.splitlines() if ' top1 ' in line]
  assert len(top1) == NUM_PROCESSES and len({line.split()[-1] for line in top1}) == 1, top1
  assert json.loads((work / 'eval' / '2.json').read_text())['step'] == 2
  assert len(list(work.glob('events.out.tfevents.*'))) == 1  # process 0 only
  for kind in ('latest', 'best'):
    variables, _, meta, step = checkpoint.restore_variables(work, kind)
    assert step == 2 and meta['stage'] == 'ftwt'
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(variables))


def test_multiprocess_batch_must_split_over_processes(tmp_path, monkeypatch):
  """Names the process count, before the workdir gets anything."""
  from fttw_jax import train
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  with pytest.raises(ValueError, match=r'global_batch_size=8 .*process_count=3'):
    train.train_and_evaluate(tiny_config(batch_size=8), tmp_path / 'w')
  assert not (tmp_path / 'w').exists()
