"""The valid values of the string options, and the checks that name a bad value.

Imports neither JAX nor Flax, so that parsing a config (``configs/*.py`` ->
``fttw_jax.recipes`` -> ``fttw_jax.config``) stays light: ``config.validate`` checks
a config with these before anything is built, and the modules that take the options
(``models.gating``, ``models.conv_impl``, ``ftwt``) check direct callers with the same
functions, so every bad value gets the same one-line error.
"""

from __future__ import annotations

import math

from fttw_jax.errors import UserError

POOLS = ('avg', 'max')
MODES = ('decoupled', 'joint')
CRITERIA = ('mass', 'uniform')
MASK_SOURCES = ('predicted', 'target', 'ones')
DEPTHWISE_RULES = ('follow_input', 'head')
HEAD_WEIGHT_INITS = ('lecun_normal', 'torch_uniform')
HEAD_NORMS = ('none', 'standardize')
SHORTCUT_PADS = ('both', 'end')
SHORTCUT_GRADS = ('flow', 'detached')
BN_RUNNING_VARS = ('biased', 'unbiased')
CONV_IMPLS = ('auto', 'xla', 'cpu', 'onednn')
DTYPES = ('float32', 'bfloat16')


def check_choice(name: str, value, valid) -> None:
  """UserError (a ValueError) ``name=value is invalid; valid values: [...]``."""
  if value not in valid:
    raise UserError(f'{name}={value!r} is invalid; valid values: {list(valid)}')


def _concrete_float(v):
  """float(v), or None for a traced value (checked only when concrete): a JAX tracer
  raises a TypeError subclass (ConcretizationTypeError)."""
  try:
    return float(v)
  except TypeError:
    return None


def check_mass_threshold(r) -> None:
  """r < 0 keeps everything, 0 <= r <= 1 is a mass fraction; anything else is an error."""
  v = _concrete_float(r)
  if v is not None and not (math.isfinite(v) and v <= 1.0):
    raise UserError(
        f'mass threshold r={r!r} is invalid: valid values are r < 0 (keep all '
        'channels) or 0 <= r <= 1 (fraction of activation mass to keep).')


def check_prune_ratio(q) -> None:
  v = _concrete_float(q)
  if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
    raise UserError(
        f'uniform prune ratio q={q!r} is invalid: valid values are 0 <= q <= 1 '
        '(fraction of channels to drop).')


def check_threshold(criterion: str, threshold) -> None:
  (check_mass_threshold if criterion == 'mass' else check_prune_ratio)(threshold)


def check_gate(fields: dict, prefix: str = 'gate.') -> None:
  """Every option of a gate (``models.GateConfig``'s fields, or config.gate's)."""
  for key, valid in (('pool', POOLS), ('mode', MODES), ('criterion', CRITERIA),
                     ('mask_source', MASK_SOURCES), ('depthwise_rule', DEPTHWISE_RULES),
                     ('head_weight_init', HEAD_WEIGHT_INITS), ('head_norm', HEAD_NORMS)):
    if key in fields:
      check_choice(prefix + key, fields[key], valid)
  try:
    check_threshold(fields['criterion'], fields['threshold'])
  except UserError as e:
    raise UserError(f'{prefix}threshold: {e}') from None
