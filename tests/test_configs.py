"""Every experiment config loads, validates, and matches its SPEC 7 row."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from etils import epath

from fttw_jax import config as config_lib
from fttw_jax.errors import UserError

CONFIGS = sorted((epath.Path(__file__).parent.parent / 'configs').glob('*.py'))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
  c = load(path)
  config_lib.validate(c)
  smoke = load(path, 'smoke' if path.name != 'default.py' else 'ftwt,smoke')
  config_lib.validate(smoke)
  assert 0 < smoke.max_steps <= 4


def test_paper_rows_have_configs():
  rows = {  # SPEC 7: (dataset, model, r, mode)
      ('cifar10', 'vgg16_bn', 0.92, 'joint'), ('cifar10', 'vgg16_bn', 0.92, 'decoupled'),
      ('cifar10', 'vgg16_bn', 0.85, 'decoupled'), ('cifar10', 'vgg16_bn', 0.88, 'joint'),
      ('cifar10', 'resnet56', 0.80, 'decoupled'), ('cifar10', 'resnet56', 0.88, 'joint'),
      ('cifar10', 'mobilenet_v1', 1.0, 'decoupled'), ('cifar10', 'mobilenet_v1', 1.0, 'joint'),
      ('imagenet2012', 'resnet34', 0.97, 'decoupled'),
      ('imagenet2012', 'resnet34', 0.95, 'decoupled'),
      ('imagenet2012', 'resnet34', 0.93, 'decoupled'),
      ('imagenet2012', 'resnet34', 0.92, 'decoupled'),
      ('imagenet2012', 'resnet18', 0.91, 'decoupled'),
      ('imagenet2012', 'mobilenet_v1_imagenet', 1.0, 'decoupled')}
  dense = {('cifar10', m) for m in ('vgg16_bn', 'resnet56', 'mobilenet_v1')} | {
      ('imagenet2012', m) for m in ('resnet34', 'resnet18', 'mobilenet_v1_imagenet')}
  found_rows, found_dense = set(), set()
  for path in CONFIGS:
    c = load(path)
    if c.stage == 'ftwt':
      found_rows.add((c.dataset, c.model, c.gate.threshold, c.gate.mode))
    else:
      found_dense.add((c.dataset, c.model))
  assert rows <= found_rows
  assert dense <= found_dense


def test_cifar_ftwt_recipe_matches_spec():
  c = load(epath.Path(__file__).parent.parent / 'configs' / 'cifar10_resnet56_r0.80_decoupled.py')
  assert (c.stage, c.num_epochs, c.batch_size, c.cooldown) == ('ftwt', 200, 128, 0.5)
  assert (c.optimizer.learning_rate, c.optimizer.momentum, c.optimizer.weight_decay) == (
      0.01, 0.9, 5e-4)
  assert tuple(c.optimizer.decay_epochs) == (81, 122, 151)
  assert (c.head_optimizer.learning_rate, c.head_optimizer.weight_decay,
          c.head_optimizer.schedule) == (0.1, 0.0, 'constant')
  assert c.init_from == 'workdirs/cifar10_resnet56_dense'


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_unknown_variant_is_an_error_in_every_config(path):
  with pytest.raises(UserError, match=r"variant.*'bogus'.*valid: \[.*'smoke'"):
    load(path, 'bogus')
  with pytest.raises(UserError, match=r"'basline'"):   # a typo is not the default variant
    load(path, 'smoke,basline')


def test_default_config_variants():
  default = CONFIGS[[p.name for p in CONFIGS].index('default.py')]
  assert load(default, 'baseline').stage == 'baseline'
  assert load(default).stage == load(default, 'ftwt').stage == 'ftwt'
  with pytest.raises(UserError, match="both 'baseline' and 'ftwt'"):
    load(default, 'baseline,ftwt')


def test_paper_rows_keep_the_authors_head_input():
  """gate.head_norm (issue 19) is the demo's choice; every paper-row config keeps 'none'."""
  for path in CONFIGS:
    if path.name != 'default.py':
      assert load(path).gate.head_norm == 'none', path.name


def test_paper_rows_use_the_reference_profile():
  """SPEC 7 rows reproduce the authors' numbers, so they run the authors' behaviour (SPEC 9);
  the digits demo is no paper row and stays on SPEC's."""
  for path in CONFIGS:
    want = 'spec' if path.name == 'default.py' else 'reference'
    assert load(path).fidelity == want, path.name
    assert config_lib.fidelity_option(load(path), 'shortcut_pad') == (
        'both' if want == 'spec' else 'end')


def test_a_config_parses_without_jax_or_flax():
  """configs/*.py -> recipes -> config import ml_collections only: parsing a config on a
  login node or in a launcher costs no JAX/Flax/TF import."""
  repo = epath.Path(__file__).parent.parent
  code = '\n'.join([
      'import importlib.util, sys',
      'names = ("default.py", "cifar10_resnet56_r0.80_decoupled.py", "imagenet_resnet18_dense.py")',
      'for name in names:',
      '  spec = importlib.util.spec_from_file_location("c", f"configs/{name}")',
      '  module = importlib.util.module_from_spec(spec)',
      '  spec.loader.exec_module(module)',
      '  module.get_config()',
      'heavy = sorted(m for m in ("flax", "jax", "tensorflow", "optax") if m in sys.modules)',
      'assert not heavy, heavy',
  ])
  subprocess.run([sys.executable, '-c', code], cwd=str(repo), check=True,
                 env=dict(os.environ, PYTHONPATH=str(repo)))


@pytest.mark.parametrize('field, value, match', [
    ('gate.pool', 'mx', r"config\.gate\.pool='mx' is invalid; valid values: \['avg', 'max'\]"),
    ('gate.threshold', 1.5, r'config\.gate\.threshold: mass threshold r=1\.5 is invalid'),
    ('dtype', 'float16', r"config\.dtype='float16' is invalid; valid values: \['float32'"),
])
def test_validate_names_the_bad_field(field, value, match):
  c = config_lib.base_config()
  c.stage = 'ftwt'
  *parents, leaf = field.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError, match=match):
    config_lib.validate(c)
