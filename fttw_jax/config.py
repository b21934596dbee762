"""The experiment config schema: defaults, validation, and what is derived from it.

Every file in ``configs/`` starts from ``base_config()`` and overrides fields, so
one place lists every knob with its default. ``validate`` runs before any work
and names the bad value.

Fidelity: where the authors' code departs from SPEC (SPEC 9), each behaviour is
a field of its own (``FIDELITY_FIELDS``), and ``fidelity`` picks a profile,
``'spec'`` or ``'reference'`` (the authors' code; the paper rows use it). The
fields default to None, meaning "as the profile says"; a field set explicitly
wins over the profile. ``fidelity_option`` is the one place that resolves them.
"""

from __future__ import annotations

import ml_collections

from fttw_jax import choices
from fttw_jax.errors import UserError

STAGES = ('baseline', 'ftwt')
SCHEDULES = ('step', 'cosine', 'constant')
HEAD_INITS = ('random', 'ones')
ACCOUNTINGS = ('exact', 'paper')
FIDELITIES = ('spec', 'reference')
HEAD_INIT_PASSES = ('eval_bn_one_epoch', 'train_bn_501_batches')
COOLDOWN_HEADS = ('freeze', 'momentum')

# Each SPEC 9 departure: field -> (valid values, 'spec' profile value, 'reference' value).
FIDELITY_FIELDS = {
    'shortcut_pad': (choices.SHORTCUT_PADS, 'both', 'end'),                        # SPEC 9.1
    'shortcut_grad': (choices.SHORTCUT_GRADS, 'flow', 'detached'),                 # SPEC 9.1
    'gate.depthwise_rule': (choices.DEPTHWISE_RULES, 'follow_input', 'head'),      # SPEC 9.2
    'cooldown_heads': (COOLDOWN_HEADS, 'freeze', 'momentum'),                      # SPEC 9.3
    'bn_running_var': (choices.BN_RUNNING_VARS, 'biased', 'unbiased'),             # SPEC 9.4
    'gate.head_weight_init': (choices.HEAD_WEIGHT_INITS, 'lecun_normal',
                              'torch_uniform'),                                    # SPEC 9.5
    'head_init_pass': (HEAD_INIT_PASSES, 'eval_bn_one_epoch', 'train_bn_501_batches'),  # 9.5
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'resnet20'
  c.width = 1.0                 # channel width multiplier
  c.dtype = 'float32'           # compute dtype; params stay float32
  c.conv_impl = 'auto'          # 'auto' | 'xla' | 'cpu' | 'onednn': models/conv_impl.py
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
  c.gate.depthwise_rule = _unset()     # 'follow_input' (SPEC 2.2) | 'head' (reference)
  c.gate.head_weight_init = _unset()   # 'lecun_normal' | 'torch_uniform' (reference)

  # SPEC 9: 'spec' | 'reference' (the authors' code) sets every field marked
  # "profile" that is left at None; an explicitly set field wins.
  c.fidelity = 'spec'
  c.shortcut_pad = _unset()            # profile: CIFAR ResNet zero channels 'both' | 'end'
  c.shortcut_grad = _unset()           # profile: 'flow' | 'detached' downsampling shortcut
  c.bn_running_var = _unset()          # profile: 'biased' (Flax) | 'unbiased' (PyTorch)
  c.cooldown_heads = _unset()          # profile: after cooldown heads 'freeze' | 'momentum'
  c.head_init_pass = _unset()          # profile: 'eval_bn_one_epoch' | 'train_bn_501_batches'
  c.gate.head_norm = 'none'     # | 'standardize': head sees the softmax output standardized

  c.cooldown = 0.5              # mask loss weight 1 before int(cooldown * epochs), then 0
  c.head_init = 'random'        # | 'ones': one pass fitting heads to all-on masks first
  c.init_from = ''              # baseline workdir/checkpoint: backbone weights, fresh heads

  # Budget-exact FTWT (fttw_jax/budget.py): ask for a FLOPs reduction instead of an r.
  c.budget = ml_collections.ConfigDict()
  c.budget.target_reduction = ml_collections.config_dict.placeholder(float)  # None = off
  c.budget.accounting = 'exact'  # | 'paper': which count the target is in
  c.budget.warmup = 0.3         # fraction of the mask-learning phase r stays at the estimate
  c.budget.examples = 1024      # training examples for the estimate and the calibration

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


def _unset():
  """A str field left at None (= as the fidelity profile says), still overridable
  from the command line (``--config.shortcut_pad=end``)."""
  return ml_collections.config_dict.placeholder(str)


def lookup(config, dotted: str):
  """config[a][b] for 'a.b'; None where a part is missing (configs saved before it)."""
  node = config
  for part in dotted.split('.'):
    node = node.get(part) if node is not None else None
  return node


def fidelity_option(config, name: str) -> str:
  """The value of a ``FIDELITY_FIELDS`` field: set explicitly, else the profile's.

  A config stored before these fields existed (no ``fidelity``) is 'spec'.
  """
  valid, spec, reference = FIDELITY_FIELDS[name]
  value = lookup(config, name)
  if value is None:
    fidelity = config.get('fidelity') or 'spec'
    _choice('fidelity', fidelity, FIDELITIES)
    value = spec if fidelity == 'spec' else reference
  _choice(name, value, valid)
  return value


def fidelity_options(config) -> dict:
  """Every ``FIDELITY_FIELDS`` field, resolved (for logs and checks)."""
  return {name: fidelity_option(config, name) for name in FIDELITY_FIELDS}


def _models():
  """``fttw_jax.models``, imported where a model is built or the registry is read: the
  config files import this module and parse without JAX or Flax (tests/test_configs.py)."""
  from fttw_jax import models  # pylint: disable=import-outside-toplevel
  return models


def backbone_options(config):
  """The ``models.BackboneOptions`` of this config."""
  return _models().BackboneOptions(**{
      k: fidelity_option(config, k) for k in ('shortcut_pad', 'shortcut_grad',
                                              'bn_running_var')})


def _choice(name, value, valid):
  choices.check_choice(f'config.{name}', value, valid)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fail early, naming the bad value: every field, once, before anything is built."""
  _choice('model', config.model, sorted(_models().MODELS))
  _choice('stage', config.stage, STAGES)
  _choice('dtype', config.dtype, choices.DTYPES)
  _choice('conv_impl', config.get('conv_impl', 'auto'), choices.CONV_IMPLS)
  _choice('head_init', config.head_init, HEAD_INITS)
  _choice('flops_accounting', config.flops_accounting, ACCOUNTINGS)
  _choice('fidelity', config.fidelity, FIDELITIES)
  fidelity_options(config)
  for opt in ('optimizer', 'head_optimizer'):
    _choice(f'{opt}.schedule', config[opt].schedule, SCHEDULES)
    if not config[opt].learning_rate >= 0:
      raise UserError(f'config.{opt}.learning_rate={config[opt].learning_rate!r} must be >= 0')
  if not (isinstance(config.batch_size, int) and config.batch_size > 0):
    raise UserError(f'config.batch_size={config.batch_size!r} must be a positive int')
  if not (isinstance(config.num_epochs, int) and config.num_epochs > 0):
    raise UserError(f'config.num_epochs={config.num_epochs!r} must be a positive int')
  if not 0.0 <= config.cooldown <= 1.0:
    raise UserError(f'config.cooldown={config.cooldown!r} must be in [0, 1]')
  if not config.width > 0:
    raise UserError(f'config.width={config.width!r} must be > 0')
  for key in ('log_every_steps', 'eval_every_epochs', 'checkpoint_every_epochs',
              'max_checkpoints'):
    if not (isinstance(config[key], int) and config[key] >= 1):
      raise UserError(f'config.{key}={config[key]!r} must be an int >= 1')
  choices.check_gate(gate_fields(config), prefix='config.gate.')
  validate_budget(config)


def budget_target(config) -> float | None:
  """config.budget.target_reduction, or None when unset (also for configs saved before it)."""
  budget = config.get('budget')
  return None if budget is None else budget.get('target_reduction')


def check_target_reduction(target, name='config.budget.target_reduction') -> None:
  if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
    raise UserError(f'{name}={target!r} is invalid: a FLOPs reduction must lie strictly '
                     'between 0 and 1 (e.g. 0.6 for 60% fewer MACs than the dense model)')


def validate_budget(config) -> None:
  target = budget_target(config)
  if target is None:
    return
  check_target_reduction(target)
  b = config.budget
  _choice('budget.accounting', b.accounting, ACCOUNTINGS)
  if config.stage != 'ftwt':
    raise UserError(f'config.budget.target_reduction={target!r} needs config.stage=\'ftwt\' '
                     f'(got {config.stage!r}): a dense baseline has no masks to budget')
  if not 0.0 <= b.warmup < 1.0:
    raise UserError(f'config.budget.warmup={b.warmup!r} must be in [0, 1)')
  if not (isinstance(b.examples, int) and b.examples > 0):
    raise UserError(f'config.budget.examples={b.examples!r} must be a positive int')


def gate_fields(config, **overrides) -> dict:
  """config.gate with its fidelity fields resolved, and ``overrides``."""
  fields = dict(config.gate.to_dict())
  fields.update({name.split('.')[1]: fidelity_option(config, name)
                 for name in FIDELITY_FIELDS if name.startswith('gate.')})
  fields.update(overrides)
  return fields


def gate_config(config, **overrides):
  """The model's ``models.GateConfig`` for this config (None for the baseline stage)."""
  if config.stage == 'baseline' and not overrides:
    return None
  return _models().GateConfig(**gate_fields(config, **overrides))


def model_from_config(config, num_classes: int, bn_axis_name: str | None = None,
                      **gate_overrides):
  """The Flax module a config describes (gated iff stage == 'ftwt' or overrides given)."""
  models = _models()
  return models.create_model(
      config.model, num_classes=num_classes, gate=gate_config(config, **gate_overrides),
      width=config.width, dtype=config.dtype, bn_axis_name=bn_axis_name,
      options=backbone_options(config),
      conv_impl=models.conv_impl.resolve(config.get('conv_impl', 'auto')))


# The fields that decide a checkpoint's parameter tree: one workdir, one experiment.
EXPERIMENT_KEYS = ('model', 'width', 'dataset', 'stage')


def describe_differences(stored, config, keys=EXPERIMENT_KEYS, label='config',
                         stored_label='checkpoint') -> str:
  """'' when ``stored`` and ``config`` agree on ``keys``, else 'k: checkpoint a vs label b, ...'."""
  return ', '.join(f'{k}: {stored_label} {stored.get(k)!r} vs {label} {config.get(k)!r}'
                   for k in keys if stored.get(k) != config.get(k))
