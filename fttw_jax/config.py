"""The experiment config schema: defaults, validation, and what is derived from it.

Every file in ``configs/`` starts from ``base_config()`` and overrides fields, so
one place lists every knob with its default. ``validate`` runs before any work
and names the bad value.
"""

from __future__ import annotations

import ml_collections

from fttw_jax import models

STAGES = ('baseline', 'ftwt')
SCHEDULES = ('step', 'cosine', 'constant')
HEAD_INITS = ('random', 'ones')
ACCOUNTINGS = ('exact', 'paper')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'resnet20'
  c.width = 1.0                 # channel width multiplier
  c.dtype = 'float32'           # compute dtype; params stay float32
  c.conv_impl = 'auto'          # 'auto' (per backend) | 'xla' | 'cpu': models/conv_impl.py
  c.dataset = 'digits'
  c.data_dir = ''               # '' = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.stage = 'baseline'          # 'baseline' (dense, no heads) or 'ftwt' (gated)

  c.gate = ml_collections.ConfigDict()
  c.gate.pool = 'avg'           # 'avg' (reference code) | 'max' (paper text)
  c.gate.softmax = True
  c.gate.mode = 'decoupled'     # | 'joint'
  c.gate.criterion = 'mass'     # 'mass' (threshold = r) | 'uniform' (threshold = prune ratio q)
  c.gate.threshold = 0.9
  c.gate.gt_after_block = False

  c.cooldown = 0.5              # mask loss weight 1 before int(cooldown * epochs), then 0
  c.head_init = 'random'        # | 'ones': one pass fitting heads to all-on masks first
  c.init_from = ''              # baseline workdir/checkpoint: backbone weights, fresh heads

  c.batch_size = 128            # global, over all processes and devices
  c.num_epochs = 200
  c.seed = 0

  c.optimizer = ml_collections.ConfigDict()   # backbone (SPEC 6)
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4           # coupled L2, as PyTorch SGD
  c.optimizer.schedule = 'step'
  c.optimizer.decay_epochs = (81, 122, 151)
  c.optimizer.decay_factor = 0.1

  c.head_optimizer = ml_collections.ConfigDict()  # separate, constant, no decay
  c.head_optimizer.learning_rate = 0.1
  c.head_optimizer.momentum = 0.9
  c.head_optimizer.weight_decay = 0.0
  c.head_optimizer.schedule = 'constant'
  c.head_optimizer.decay_epochs = ()
  c.head_optimizer.decay_factor = 0.1

  c.flops_accounting = 'exact'  # headline number; both are always logged
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_epochs = 1
  c.max_checkpoints = 3
  c.max_steps = -1              # > 0 stops early (smoke runs, tests)
  c.eval_max_examples = -1      # > 0 evaluates on a prefix of the eval split
  return c


def _choice(name, value, valid):
  if value not in valid:
    raise ValueError(f'config.{name}={value!r} is invalid; valid values: {list(valid)}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Fail early, naming the bad value."""
  _choice('model', config.model, sorted(models.MODELS))
  _choice('stage', config.stage, STAGES)
  _choice('dtype', config.dtype, sorted(models.DTYPES))
  _choice('conv_impl', config.get('conv_impl', 'auto'), models.CONV_IMPLS)
  _choice('head_init', config.head_init, HEAD_INITS)
  _choice('flops_accounting', config.flops_accounting, ACCOUNTINGS)
  for opt in ('optimizer', 'head_optimizer'):
    _choice(f'{opt}.schedule', config[opt].schedule, SCHEDULES)
    if not config[opt].learning_rate >= 0:
      raise ValueError(f'config.{opt}.learning_rate={config[opt].learning_rate!r} must be >= 0')
  if not (isinstance(config.batch_size, int) and config.batch_size > 0):
    raise ValueError(f'config.batch_size={config.batch_size!r} must be a positive int')
  if not (isinstance(config.num_epochs, int) and config.num_epochs > 0):
    raise ValueError(f'config.num_epochs={config.num_epochs!r} must be a positive int')
  if not 0.0 <= config.cooldown <= 1.0:
    raise ValueError(f'config.cooldown={config.cooldown!r} must be in [0, 1]')
  if not config.width > 0:
    raise ValueError(f'config.width={config.width!r} must be > 0')
  gate_config(config, mask_source='predicted')  # validates mode, pool, criterion, r / q


def gate_config(config, **overrides) -> models.GateConfig | None:
  """The model's GateConfig for this config (None for the dense baseline stage)."""
  if config.stage == 'baseline' and not overrides:
    return None
  fields = dict(config.gate.to_dict())
  fields.update(overrides)
  try:
    return models.GateConfig(**fields)
  except ValueError as e:
    raise ValueError(f'invalid config.gate: {e}') from None


def model_from_config(config, num_classes: int, bn_axis_name: str | None = None,
                      **gate_overrides):
  """The Flax module a config describes (gated iff stage == 'ftwt' or overrides given)."""
  return models.create_model(
      config.model, num_classes=num_classes, gate=gate_config(config, **gate_overrides),
      width=config.width, dtype=config.dtype, bn_axis_name=bn_axis_name,
      conv_impl=models.conv_impl.resolve(config.get('conv_impl', 'auto')))


# The fields that decide a checkpoint's parameter tree: one workdir, one experiment.
EXPERIMENT_KEYS = ('model', 'width', 'dataset', 'stage')


def describe_differences(stored, config, keys=EXPERIMENT_KEYS, label='config') -> str:
  """'' when ``stored`` and ``config`` agree on ``keys``, else 'k: checkpoint a vs label b, ...'."""
  return ', '.join(f'{k}: checkpoint {stored.get(k)!r} vs {label} {config.get(k)!r}'
                   for k in keys if stored.get(k) != config.get(k))
