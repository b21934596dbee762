"""Quiet by default (issue 16): no orbax warnings from our own reads, and a console of our
progress lines and warnings rather than every library's INFO lines."""

import logging
import os

import jax

from fttw_jax import api, convert, evaluate
from fttw_jax import config as config_lib
from helpers import random_variables


def tiny_checkpoint(workdir):
  cfg = config_lib.base_config()
  cfg.model, cfg.width, cfg.dataset, cfg.stage = 'resnet8', 0.25, 'digits', 'ftwt'
  model = config_lib.model_from_config(cfg, 10)
  variables = jax.device_get(random_variables(evaluate.variable_shapes(model, (32, 32, 3))))
  convert.write_checkpoint(workdir, variables, cfg, {'num_classes': 10, 'stage': 'ftwt'})


def test_api_load_logs_no_orbax_warning(tmp_path, caplog):
  tiny_checkpoint(tmp_path / 'w')
  caplog.clear()
  with caplog.at_level(logging.INFO):
    for which in ('best', 'latest', 0):
      m = api.load(tmp_path / 'w', which)
      assert m.step == 0
  orbax = [r for r in caplog.records if f'{os.sep}orbax{os.sep}' in r.pathname]
  assert orbax, 'orbax logs nothing at INFO here: this test would not see a warning'
  assert not [r.getMessage() for r in orbax if r.levelno >= logging.WARNING]


def test_console_keeps_our_lines_and_warnings_only():
  import main
  own = os.path.join(os.path.dirname(os.path.abspath(api.__file__)), 'train.py')

  def shown(path, level=logging.INFO):
    return main.console_filter(logging.LogRecord('absl', level, path, 1, 'm', (), None))

  tfds = '/venv/lib/python3.12/site-packages/tensorflow_datasets/core/dataset_builder.py'
  orbax = '/venv/lib/python3.12/site-packages/orbax/checkpoint/checkpoint_manager.py'
  clu = '/venv/lib/python3.12/site-packages/clu/metric_writers/logging_writer.py'
  assert shown(own) and shown(os.path.abspath(main.__file__)) and shown(clu)
  assert not shown(tfds) and shown(tfds, logging.WARNING)
  assert not shown(orbax) and not shown(orbax, logging.WARNING)
