"""The bench scripts run end to end and print the JSON they document (no timing asserts)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import profile_ops  # noqa: E402


def run_bench(script, *args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', script), *args],
                        capture_output=True, text=True, env=env, timeout=600)
  return proc


def bench_json(script, *args):
  proc = run_bench(script, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


def test_inference_bench_checks_sparse_against_apply():
  out = bench_json('inference.py', '--model', 'resnet8', '--steps', '2', '--warmup', '1',
                   '--samples', '2', '--keep', '0.5', '--min-channels', '8', '--levels', '2')
  assert out['masks_equal'] and out['max_abs_logit_err'] < 1e-4
  assert 0.3 < out['exact_flops_reduction'] < 0.9 and out['mean_keep'] == pytest.approx(0.5, 0.1)
  assert out['flops_bound_speedup'] == pytest.approx(1 / (1 - out['exact_flops_reduction']), 1e-2)
  columns = {'dense_flax', 'gated_flax', 'dense', 'masked', 'sparse', 'static'}
  assert out['sparse_speedup'] > 0 and out['static_speedup'] > 0
  if out['native'] == 'ok':
    assert out['native_masks_equal'] and out['native_max_abs_logit_err'] < 1e-4
    assert out['native_sparse_speedup'] > 0
    columns |= {'native_dense', 'native_masked', 'native_sparse'}
  else:
    assert out['native'].startswith('unavailable') and not shutil.which(os.environ.get('CXX', 'c++'))
  assert set(out['times']) == columns and out['fastest_dense'] in columns
  # exact synthetic masks keep round(0.5 * C) per layer: the static network the same
  assert out['static_kept']['stem'] == 8 and out['static_kept']['layer3_0/conv2'] == 32


@pytest.mark.slow  # the bench's subprocess, ~40 s; the batch path is also in test_sparse
def test_inference_bench_batches():
  """--batch N: distinct images per call, images/s per column, checked per sample."""
  out = bench_json('inference.py', '--model', 'resnet8', '--steps', '2', '--warmup', '1',
                   '--batch', '3', '--keep', '0.5', '--skip', 'sparse,masked,gated_flax')
  assert out['batch'] == 3 and out['samples'] == 6        # two batches of 3 (--samples 8)
  assert 'sparse' not in out['times'] and 'native_sparse_speedup' in out or out['native'] != 'ok'
  for col in out['times'].values():
    assert col['images_per_s'] == pytest.approx(3e3 / col['median_ms'], rel=0.05)
  if out['native'] == 'ok':
    assert out['native_masks_equal'] and out['native_max_abs_logit_err'] < 1e-4
  proc = run_bench('inference.py', '--model', 'resnet8', '--skip', 'sparse,native_sparse')
  assert proc.returncode != 0 and 'nothing sparse' in proc.stderr


@pytest.mark.slow  # three compiled forwards in a subprocess, ~22 s
def test_profile_ops_counts_ops_per_forward():
  out = bench_json('profile_ops.py', '--model', 'resnet8', '--calls', '2', '--warmup', '1')
  ops = {w: out[w]['ops_per_call'] for w in ('dense', 'masked', 'sparse')}
  # the heads add ops to the masked forward, and gathers / conditionals to the sparse one
  assert 0 < ops['dense'] < ops['masked'] < ops['sparse']
  # resnet8: stem + 3 blocks x 2 convs (CIFAR shortcuts are pad + pool, no conv)
  assert out['dense']['by_kind']['conv_general_dilated']['count'] == 7
  assert profile_ops.op_kind('cond.581.clone') == 'cond'
  assert profile_ops.op_kind('conv_general_dilated.35') == 'conv_general_dilated'


def test_conv_widths_reports_macs_and_rejects_bad_shapes():
  out = bench_json('conv_widths.py', '--shapes', '4x8x8,4x16x8', '--chain', '2', '--steps', '2',
                   '--warmup', '1')
  assert [r['macs'] for r in out['convs']] == [4 * 4 * 9 * 8 * 8, 4 * 4 * 9 * 16 * 8]
  proc = run_bench('conv_widths.py', '--shapes', '4x8')
  assert proc.returncode == 2 and "'4x8'" in proc.stderr


@pytest.mark.parametrize('name', ['resnet20', 'vgg16_bn'])
def test_torch_reference_models_have_our_shapes(name):
  """train_step.py --compare-torch times the same network: same parameter shapes."""
  torch = pytest.importorskip('torch')
  import jax
  import torch_models
  from fttw_jax import models
  model = models.create_model(name, num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3))))
  ours = sorted(tuple(v.shape) for v in jax.tree.leaves(variables['params']))
  # torch: OIHW convs -> HWIO, (out, in) linear -> (in, out)
  theirs = sorted(tuple(p.shape[2:] + p.shape[1::-1]) if p.ndim == 4 else tuple(p.shape[::-1])
                  for p in torch_models.create(name).parameters())
  assert ours == theirs
  x = torch.zeros(2, 3, 32, 32)
  assert tuple(torch_models.create(name)(x).shape) == (2, 10)
  with pytest.raises(ValueError, match='resnet57'):
    torch_models.create('resnet57')


@pytest.mark.slow  # three resnet8 train steps compile
def test_train_step_bench_compares_torch_and_xla():
  out = bench_json('train_step.py', '--model', 'resnet8', '--batch', '8', '--steps', '2',
                   '--warmup', '0', '--compare-torch', '--compare-xla')
  assert out['conv_impl'] in ('cpu', 'onednn') and out['gated_over_baseline_ratio'] > 0
  assert out['baseline_over_baseline_xla'] > 0
  try:
    import torch  # noqa: F401
  except ImportError:
    assert out['torch'].startswith('skipped')
  else:
    assert out['torch'].endswith('2 threads')
    assert out['ours_over_torch_dense'] > 0 and out['ours_gated_over_torch_dense'] > 0
    # the torch round times our steps again beside torch's
    assert out['gated_over_baseline_ratio_beside_torch'] > 0
    assert out['ours_over_torch_dense'] == pytest.approx(
        out['baseline_beside_torch_ms_median'] / out['torch_dense_ms_median'], rel=1e-3)
