"""Training recipes of SPEC 6, shared by the experiment files in ``configs/``.

Each ``configs/*.py`` file is one experiment (one row of SPEC 7) and calls one
of these with its model, r and mode, so that the recipe lives in one place.
Every recipe here uses ``fidelity='reference'`` (SPEC 9): the published numbers
were produced by the authors' code, so these runs reproduce its behaviour;
``--config.fidelity=spec`` (or any single field) switches back.
Config-string variants (``--config=configs/FILE.py:smoke``) shrink a run to a
few steps to check the plumbing on a new machine.
"""

from __future__ import annotations

import re

from fttw_jax.config import base_config
from fttw_jax.errors import UserError

CIFAR_DECAY_EPOCHS = (81, 122, 151)


def variants(arg: str, valid, pattern: str | None = None, hint: str = '') -> list[str]:
  """The comma-separated parts of a config-string variant, each one of ``valid`` or a
  full match of the regex ``pattern`` (a parametrised variant such as ``r0.75``, which
  ``hint`` describes in the error)."""
  parts = [p for p in (arg or '').split(',') if p]
  unknown = [p for p in parts
             if p not in valid and not (pattern and re.fullmatch(pattern, p))]
  if unknown:
    also = f' or {hint or pattern}' if pattern else ''
    raise UserError(f'unknown config variant(s) {unknown}; valid: {list(valid)}{also}')
  return parts


def _apply_variant(c, arg: str):
  if 'smoke' in variants(arg, ('smoke',)):
    c.max_steps, c.log_every_steps, c.eval_max_examples = 4, 1, 256
    c.batch_size = min(c.batch_size, 64)
  return c


def cifar_baseline(model: str, dataset: str = 'cifar10', arg: str = ''):
  """Dense baseline: 200 epochs, SGD 0.1, momentum 0.9, wd 5e-4, steps at 81/122/151."""
  c = base_config()
  c.model, c.dataset, c.stage = model, dataset, 'baseline'
  c.fidelity = 'reference'
  c.num_epochs, c.batch_size = 200, 128
  c.optimizer.learning_rate = 0.1
  if model == 'mobilenet_v2':
    c.optimizer.schedule = 'cosine'
  else:
    c.optimizer.schedule, c.optimizer.decay_epochs = 'step', CIFAR_DECAY_EPOCHS
  return _apply_variant(c, arg)


def cifar_ftwt(model: str, r: float, mode: str, dataset: str = 'cifar10', arg: str = ''):
  """FTWT from the dense checkpoint: backbone lr 0.01 (same schedule), heads SGD 0.1
  constant without decay, cooldown 0.5. ``init_from`` points at the workdir the
  matching dense config is documented to use (override with --config.init_from)."""
  c = cifar_baseline(model, dataset)
  c.stage = 'ftwt'
  c.gate.threshold, c.gate.mode = r, mode
  c.optimizer.learning_rate = 0.01
  c.init_from = f'workdirs/{dataset}_{model}_dense'
  return _apply_variant(c, arg)


def imagenet_baseline(model: str, arg: str = ''):
  """Dense ImageNet recipe (normally replaced by converted torchvision weights)."""
  c = base_config()
  c.model, c.dataset, c.stage = model, 'imagenet2012', 'baseline'
  c.fidelity = 'reference'
  c.num_epochs, c.batch_size = 90, 256
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.1, 1e-4
  c.optimizer.schedule, c.optimizer.decay_epochs = 'step', (30, 60, 80)
  c.log_every_steps = 100
  return _apply_variant(c, arg)


def imagenet_ftwt(model: str, r: float, mode: str = 'decoupled', arg: str = ''):
  """ImageNet FTWT (the paper publishes no schedule; these are our defaults):
  batch 256, backbone lr 0.01 x0.1 every 30 epochs, 90 epochs, wd 1e-4; heads as on
  CIFAR. Start from converted torchvision weights (see README, fttw_jax.convert)."""
  c = imagenet_baseline(model)
  c.stage = 'ftwt'
  c.gate.threshold, c.gate.mode = r, mode
  c.optimizer.learning_rate, c.optimizer.decay_epochs = 0.01, (30, 60)
  c.init_from = f'workdirs/imagenet2012_{model}_torchvision'
  return _apply_variant(c, arg)
