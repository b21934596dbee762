"""Using a trained workdir: evaluate, estimate, report and the research API (issue 5).

One module-scoped pair of tiny runs (ResNet-8 x0.25 on digits, a few steps):
a dense baseline and an FTWT run started from it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fttw_jax import api, checkpoint, data, estimate, evaluate, flops, paper_results, report
from fttw_jax import static
from fttw_jax import config as config_lib
from fttw_jax import train
from fttw_jax.errors import UserError
from helpers import skip_without_compiler
from test_train import loop_config

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def run_config(data_dir, **overrides):
  defaults = {'max_steps': 3, 'num_epochs': 2, 'batch_size': 64, 'eval_max_examples': 64,
              'log_every_steps': 1}
  return loop_config(data_dir, **{**defaults, **overrides})


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('usage')
  data_dir = str(root / 'tfds')
  dense, ftwt = root / 'dense', root / 'ftwt'
  train.train_and_evaluate(run_config(data_dir, stage='baseline', max_steps=66, num_epochs=3,
                                      **{'optimizer.learning_rate': 0.1}), dense)
  # head_init='ones' and a small backbone lr: masks and accuracy are not degenerate.
  train.train_and_evaluate(run_config(data_dir, init_from=str(dense), head_init='ones',
                                      batch_size=128, **{'optimizer.learning_rate': 0.005}),
                           ftwt)
  return {'root': root, 'data_dir': data_dir, 'dense': dense, 'ftwt': ftwt}


def api_pass(m):
  """Full test split through the research API: (labels, logits, exact MACs, masks)."""
  labels, logits, macs, masks = [], [], [], []
  cfg = m.config
  for batch in data.create_eval_iterator(cfg.dataset, 120, data_dir=cfg.data_dir):
    keep = batch['mask'] > 0
    out, aux = m(batch['image'])
    labels.append(batch['label'][keep])
    logits.append(np.asarray(out)[keep])
    macs.append(np.asarray(m.flops(batch['image']))[keep])
    masks.append({k: np.asarray(v)[keep] for k, v in m.masks(batch['image']).items()})
  cat = lambda xs: np.concatenate(xs)
  return (cat(labels), cat(logits), cat(macs),
          {k: cat([b[k] for b in masks]) for k in masks[0]})


# ------------------------------------------------------------------ evaluate

def test_evaluate_json_matches_a_direct_computation(runs, capsys):
  result = evaluate.evaluate_checkpoint(None, runs['ftwt'], 'latest')
  printed = capsys.readouterr().out
  step = result['step']
  stored = json.loads((runs['ftwt'] / 'eval' / f'{step}.json').read_text())
  assert stored == json.loads(json.dumps(result))
  assert result['num_examples'] == data.get_info('digits').num_eval  # the whole test split
  for key in ('top1', 'top5', 'loss', 'mask_accuracy', 'active_ratio', 'macs_exact',
              'macs_paper', 'flops_reduction_exact', 'flops_reduction_paper', 'params',
              'head_macs', 'head_params'):
    assert key in result, key

  m = api.load(runs['ftwt'], 'latest')
  labels, logits, macs, masks = api_pass(m)
  assert result['top1'] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
  assert result['macs_exact'] == pytest.approx(macs.mean(), rel=1e-6)
  dense = flops.dense_macs(m.profile)
  assert result['flops_reduction_exact'] == pytest.approx(1 - macs.mean() / dense, rel=1e-6)
  assert list(result['active_ratio']) == [l.name for l in m.profile.masked]
  for name, ratio in result['active_ratio'].items():
    assert ratio == pytest.approx(masks[name].mean(), abs=1e-6)
  assert result['head_macs'] == m.profile.head_macs > 0
  # Dynamism (issue 19): the eval step's on-device sums == the masks gathered here.
  for name, mk in masks.items():
    got = result['dynamism']['mask']['layers'][name]
    assert got['static_on'] == pytest.approx(np.mean(mk.all(axis=0)))
    assert got['static_off'] == pytest.approx(np.mean((mk == 0).all(axis=0)))
    assert got['kept_std'] == pytest.approx(np.std(mk.sum(axis=-1)), abs=1e-6)
    n = len(mk)
    pair_sum = sum(np.sum(mk[i] != mk[i + 1:]) for i in range(n))
    assert got['hamming'] == pytest.approx(pair_sum / (n * (n - 1) / 2), rel=1e-9)
  all_masks = np.concatenate(list(masks.values()), axis=1)
  dynamic = np.mean(all_masks.any(axis=0) & ~all_masks.all(axis=0))
  assert result['dynamic_share'] == pytest.approx(dynamic)
  assert 0 <= result['target_dynamic_share'] <= 1
  # The table: overall numbers, then layers in execution order.
  assert 'top-1' in printed and 'FLOPs reduction exact' in printed
  assert 'masks: dynamic / on / off' in printed and 'targets: dynamic / on / off' in printed
  names = [l.name for l in m.profile.masked]
  positions = [printed.index(f'\n{n} ') for n in names]
  assert positions == sorted(positions)


def test_static_control_at_the_dynamic_cost(runs, capsys):
  result = static.run_checkpoint(None, runs['ftwt'], 'latest')
  printed = capsys.readouterr().out
  assert json.loads((runs['ftwt'] / 'static.json').read_text()) == json.loads(json.dumps(result))
  d, s = result['dynamic'], result['static']
  assert result['num_examples'] == data.get_info('digits').num_eval
  # The same budget: the static network (no heads) costs at most the dynamic one (heads
  # included), and not much less.
  assert s['macs_exact'] <= d['macs_exact']
  assert d['flops_reduction_exact'] <= s['flops_reduction_exact'] < d['flops_reduction_exact'] + 0.1
  # Its fixed mask, run through the research API's model, is the same for every sample.
  m = api.load(runs['ftwt'], 'latest')
  keep = {k: np.isin(np.arange(s['channels'][k]), v) for k, v in s['kept_indices'].items()}
  m.variables = {'params': static.fixed_mask_params(m.variables['params'], keep),
                 'batch_stats': m.variables['batch_stats']}
  labels, logits, macs, masks = api_pass(m)
  for name, mk in masks.items():
    assert (mk == keep[name]).all(), name
  assert s['top1'] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
  assert s['macs_exact'] == pytest.approx(macs.mean() - m.profile.head_macs, rel=1e-6)
  assert 'static, same cost' in printed
  with pytest.raises(ValueError, match='needs an FTWT'):
    static.run_checkpoint(None, runs['dense'], 'latest')


def test_evaluate_baseline_has_no_reduction(runs, capsys):
  result = evaluate.evaluate_checkpoint(None, runs['dense'], 'best', max_examples=64,
                                        quiet=True)
  assert result['flops_reduction_exact'] == 0.0 and 'mask_accuracy' not in result
  assert result['macs_exact'] == result['dense_macs'] and result['head_macs'] == 0


def test_evaluate_refuses_a_config_of_another_network(runs):
  stored, _, _ = checkpoint.read_config(runs['ftwt'])
  other = config_lib.base_config()
  other.update_from_flattened_dict({k: v for k, v in stored.items() if not isinstance(v, dict)})
  other.width = 0.5
  with pytest.raises(ValueError, match=r'width: checkpoint 0.25 vs --config 0.5'):
    evaluate.evaluate_checkpoint(other, runs['ftwt'], 'latest')


def test_evaluate_warns_on_forward_options_resolved_by_fidelity(caplog):
  """Fidelity fields that change the forward pass compare as the profile resolves them;
  those that change training only (shortcut_grad, bn_running_var) and conv_impl do not warn."""
  stored = config_lib.base_config()
  stored.fidelity = 'reference'        # shortcut_pad 'end', depthwise_rule 'head', ...
  config = config_lib.base_config()    # 'spec': 'both', 'follow_input'
  config.conv_impl = 'cpu'
  with caplog.at_level('WARNING'):
    evaluate.check_same_experiment(stored, config, 'W')
  warned = [r.getMessage() for r in caplog.records if 'trained with' in r.getMessage()]
  assert len(warned) == 2
  assert "shortcut_pad='both'; the checkpoint was trained with 'end'" in warned[0]
  assert "gate.depthwise_rule='follow_input'; the checkpoint was trained with 'head'" in warned[1]
  caplog.clear()
  config.fidelity = 'reference'
  config.shortcut_pad = 'end'          # set explicitly: the same value as the profile's
  with caplog.at_level('WARNING'):
    evaluate.check_same_experiment(stored, config, 'W')
  assert not [r for r in caplog.records if 'trained with' in r.getMessage()]


def test_evaluate_refuses_other_head_inputs_than_the_trained_heads_saw():
  """A trained head under another pool/softmax/head_norm is another model: an error,
  not a warning (a run trained with head_norm='standardize' evaluated with the plain
  config gave 62 % top-1 at another cost, with only a warning, before)."""
  stored = config_lib.base_config()
  stored.stage = 'ftwt'
  stored.gate.head_norm = 'standardize'
  config = config_lib.base_config()
  config.stage = 'ftwt'
  with pytest.raises(UserError, match=r"gate.head_norm: checkpoint 'standardize' vs "
                                      r"--config 'none'.*saved in W/config.json"):
    evaluate.check_same_experiment(stored, config, 'W')
  config.gate.head_norm, config.gate.softmax = 'standardize', False
  with pytest.raises(UserError, match=r"gate.softmax: checkpoint True vs --config False"):
    evaluate.check_same_experiment(stored, config, 'W')
  config.gate.softmax = True
  config.gate.threshold = 0.5                          # measured differently: a warning
  evaluate.check_same_experiment(stored, config, 'W')
  stored.stage = config.stage = 'baseline'             # no heads: nothing to disagree on
  config.gate.pool = 'max'
  evaluate.check_same_experiment(stored, config, 'W')


# ------------------------------------------------------------------ estimate

@pytest.fixture(scope='module')
def estimated(runs):
  config = run_config(runs['data_dir'], init_from=str(runs['dense']))
  workdir = runs['root'] / 'estimate'
  result = estimate.run(config, workdir, target_reduction=0.3, num_examples=96)
  return config, workdir, result


def test_estimate_is_monotone_in_r(estimated):
  _, workdir, result = estimated
  assert json.loads((workdir / 'estimate.json').read_text()) == json.loads(json.dumps(result))
  points = {p['threshold']: p for p in result['sweep']}
  rs = sorted(r for r in points if 0 <= r < 1)
  for key in ('flops_reduction_exact', 'flops_reduction_paper'):
    values = [points[r][key] for r in rs]
    assert values == sorted(values, reverse=True), (key, values)
  assert points[0.5]['flops_reduction_exact'] > points[0.97]['flops_reduction_exact'] + 0.1
  assert result['num_examples'] == 96


def test_estimate_keeping_every_channel_costs_the_heads(estimated):
  _, _, result = estimated
  keep_all = next(p for p in result['sweep'] if p['threshold'] < 0)
  assert all(v == 1.0 for v in keep_all['active_ratio'].values())
  # Convs: ~0 (only channels dead after ReLU are free); exact adds the heads: negative.
  assert 0.0 <= keep_all['flops_reduction_exact_no_heads'] < 0.05
  head_share = result['head_macs'] / result['dense_macs']
  assert keep_all['flops_reduction_exact'] == pytest.approx(
      keep_all['flops_reduction_exact_no_heads'] - head_share, abs=1e-6)
  assert result['head_macs'] > 0


def test_estimate_bisection_meets_the_budget(estimated):
  _, _, result = estimated
  search = result['search']
  achieved = search['achieved']['flops_reduction_exact']
  assert search['reachable'] and 0.3 <= achieved < 0.3 + 0.04
  assert 0 < search['threshold'] < 1
  assert len(search['evaluations']) <= 2 + estimate.BISECTION_STEPS


def test_estimate_traced_threshold_equals_a_static_model(estimated, runs):
  """The one-compile path (traced r) against a model built with a concrete r."""
  config, workdir, result = estimated
  info = data.get_info('digits')
  model = config_lib.model_from_config(config, 10, mask_source='target', threshold=0.7)
  variables, _, _ = estimate.restore_for_targets(str(runs['dense']), model, (32, 32, 3))
  batch = next(data.create_eval_iterator('digits', 96, data_dir=runs['data_dir'],
                                         split=info.train_split, max_examples=96))
  _, aux = jax.jit(lambda v, x: model.apply(v, data.normalize(x, 'digits')))(
      variables, batch['image'])
  prof = flops.profile(model, (1, 32, 32, 3))
  direct = 1 - float(jnp.mean(flops.exact_macs(prof, aux['gates']))) / flops.dense_macs(prof)
  assert result['configured']['threshold'] == pytest.approx(0.7)
  assert result['configured']['flops_reduction_exact'] == pytest.approx(direct, abs=1e-6)


# ------------------------------------------------------------------ report

def _check_png(path):
  blob = path.read_bytes()
  assert blob[:8] == PNG_SIGNATURE and len(blob) > 10_000, path


def test_report_ftwt_writes_plots_and_markdown(runs):
  md = report.write_report(runs['ftwt'])
  pngs = sorted(md.parent.glob('*.png'))
  assert {p.name for p in pngs} >= {'curves.png', 'active_ratio.png', 'accuracy_vs_flops.png',
                                     'mask_heatmap.png', 'dynamism.png'}
  text = md.read_text()
  run = json.loads((runs['ftwt'] / 'static.json').read_text())   # the static control, drawn
  assert run['step'] == checkpoint.resolve(runs['ftwt'], 'latest')[1]
  assert 'Static control' in text and 'input-dependent channels, masks / targets' in text
  assert ('effectively static' in text) == (run['dynamic']['dynamic_share'] < 0.05)
  for p in pngs:
    _check_png(p)
    assert f']({p.name})' in text
  assert 'top-1' in text and 'FLOPs reduction, exact' in text
  series = report.read_events(runs['ftwt'])
  steps, _ = series['train/loss']
  assert list(steps) == [1, 2, 3]


def test_report_baseline_skips_mask_plots(runs):
  md = report.write_report(runs['dense'], max_examples=64)
  names = {p.name for p in md.parent.glob('*.png')}
  assert names == {'curves.png', 'accuracy_vs_flops.png'}
  for p in md.parent.glob('*.png'):
    _check_png(p)
  assert 'no masks' in md.read_text()


def test_paper_results_cover_spec_section_7():
  assert len(paper_results.RESULTS) == 20
  assert paper_results.lookup('resnet56', 'cifar10', 0.80).flops_reduction == 66.0
  assert paper_results.lookup('resnet34', 'imagenet2012', 0.93).top1 == 72.17
  assert paper_results.matching('resnet56', 'cifar10', width=0.5) == ()


# ------------------------------------------------------------------ research API

def test_api_forward_masks_and_flops(runs):
  m = api.load(runs['ftwt'], 'latest')
  x = next(data.create_eval_iterator('digits', 8, data_dir=runs['data_dir']))['image']
  logits, aux = m(x)
  apply = jax.jit(lambda v, x: m.model.apply(v, data.normalize(x, 'digits'), train=False))
  ref_logits, ref_aux = apply(m.variables, x)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m.predict(x), ref_logits, rtol=1e-5, atol=1e-5)
  # predict's jitted forward returns logits only, so XLA drops the training targets
  # (a sort per layer) that __call__'s aux carries
  assert 'sort' in m._fns[('logits', 'aux')].lower(m.variables, x).compile().as_text()
  assert 'sort' not in m._fns[('logits',)].lower(m.variables, x).compile().as_text()
  masks = m.masks(x)
  assert list(masks) == [l.name for l in m.profile.masked]
  for name, mask in masks.items():
    np.testing.assert_array_equal(mask, ref_aux['gates'][name]['mask'])
  macs = m.flops(x)
  assert macs.shape == (8,)
  np.testing.assert_allclose(macs, flops.exact_macs(m.profile, ref_aux['gates']), rtol=1e-6)
  np.testing.assert_allclose(m.flops(x, 'paper'), flops.paper_macs(m.profile, ref_aux['gates']),
                             rtol=1e-6)
  assert m.config.model == 'resnet8' and m.config.stage == 'ftwt'


def test_api_baseline_flops_are_dense(runs):
  m = api.load(runs['dense'])
  x = np.zeros((3, 32, 32, 3), np.uint8)
  assert m.masks(x) == {}
  np.testing.assert_array_equal(m.flops(x), np.full(3, flops.dense_macs(m.profile)))


def test_api_errors(runs, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint found'):
    api.load(tmp_path)
  # A checkpoint whose stored config describes another width than its arrays.
  variables, config, meta, _ = checkpoint.restore_variables(runs['dense'])
  config.width = 0.5
  manager = checkpoint.create_manager(tmp_path / 'bad')
  checkpoint.save(manager, 1, variables, {'unused': np.zeros(1)}, config, meta)
  manager.wait_until_finished()
  with pytest.raises(ValueError, match='does not match the model built from the config'):
    api.load(tmp_path / 'bad')


@pytest.mark.parametrize('kind', ['xla', 'native'])
def test_api_sparse_batch_of_one_matches_dense(runs, kind):
  if kind == 'native':
    skip_without_compiler()
  m = api.load(runs['ftwt'], 'latest', sparse=kind)
  x = next(data.create_eval_iterator('digits', 4, data_dir=runs['data_dir']))['image']
  dense_logits, dense_aux, _ = m.forward(x[:1])
  logits, aux = m(x[:1])
  np.testing.assert_allclose(logits, dense_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(m.predict(x[:1]), dense_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(m.predict(x), m.forward(x)[0], rtol=1e-5, atol=1e-5)  # batch > 1
  for name, g in aux['gates'].items():
    np.testing.assert_array_equal(g['mask'], dense_aux['gates'][name]['mask'])
  with pytest.raises(ValueError, match='gated model'):
    api.load(runs['dense'], sparse=kind)
  with pytest.raises(ValueError, match="sparse='fast' is invalid"):
    api.load(runs['ftwt'], sparse='fast')
  if kind == 'native':   # True picks the native runner on CPU where it builds
    from fttw_jax.sparse import native
    assert isinstance(api.load(runs['ftwt'], 'latest', sparse=True)._sparse,
                      native.NativeSparseModel)


# ------------------------------------------------------------------ installed package

def test_installed_package_runs_the_research_api_from_elsewhere(runs, tmp_path):
  """`pip install .` (here: into a target dir, offline, from a copy of the tree) gives a
  package that research code outside the repo imports; the README's snippet runs on a
  trained workdir, and the native kernel builds from the installed C++ source."""
  import os
  import shutil
  import subprocess
  import sys
  skip_without_compiler()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'requirements.txt', 'README.md'):
    shutil.copy(os.path.join(root, name), src / name)
  shutil.copytree(os.path.join(root, 'fttw_jax'), src / 'fttw_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  site = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
                  '--no-build-isolation', '--no-index', '--target', str(site), str(src)],
                 check=True, capture_output=True)
  shutil.rmtree(src)  # nothing may be read from the source tree afterwards
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  script = elsewhere / 'use_it.py'
  script.write_text(
      'import numpy as np\n'
      'import fttw_jax\n'
      'from fttw_jax import api\n'
      f'm = api.load({str(runs["ftwt"])!r}, sparse="native")\n'
      'images = np.zeros((1, 32, 32, 3), np.uint8)\n'
      'logits, aux = m(images)\n'
      'masks = m.masks(images)\n'
      'print(fttw_jax.__file__, logits.shape, len(masks))\n')
  env = dict(os.environ, PYTHONPATH=str(site), FTTW_JAX_CACHE=str(tmp_path / 'cache'))
  proc = subprocess.run([sys.executable, str(script)], cwd=elsewhere, env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path, *rest = proc.stdout.strip().splitlines()[-1].split(' ', 1)
  assert path.startswith(str(site)), path
  assert rest == [f'(1, 10) {len(api.load(runs["ftwt"]).profile.masked)}']
  assert list((tmp_path / 'cache').iterdir()), 'the native kernel was not built'
