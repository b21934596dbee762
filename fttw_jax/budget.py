"""Budget-exact FTWT: ask for a FLOPs reduction, get a trained model at that cost (issue 15).

Driven by ``config.budget`` (``target_reduction`` unset = off, today's behaviour):

1. **Plan** (host, before training): the starting threshold is the estimate's bisection
   for the target on the dense ``init_from`` model (SPEC 8); the estimate's ends give the
   reachable range (a target outside it is refused before anything is written) and its
   slope the controller's gain.
2. **Controller** (inside the jitted train step): during the mask-learning phase, after a
   warm-up, an integral controller moves the threshold on the realized reduction of the
   heads' predicted masks (an EMA over steps). The threshold is a value of the train state
   (traced: no recompile); it is frozen at the cooldown.
3. **Calibration** (host, at the cooldown and after the last step; also
   ``--mode=calibrate``): a global head-logit offset found by bisection on training
   examples. ``mask = logits + offset > 0`` is ``(bias + offset)`` in the head's dense
   layer, so the offset is folded into every head's bias: evaluation, the API, the sparse
   paths and the FLOPs count honour it with no change of their own.

The controller's state (``BudgetState``) is part of the TrainState and is checkpointed in
the checkpoint's ``meta`` (JSON floats round-trip float32 exactly): resuming is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fttw_jax import checkpoint, convert, data, estimate, evaluate, evaluation, flops, models
from fttw_jax import parallel
from fttw_jax import config as config_lib
from fttw_jax.errors import UserError

EMA_DECAY = 0.9           # realized reduction filtered over ~10 steps (batch noise)
MIN_SLOPE = 0.1           # reduction per unit threshold, floor for the gain
SLOPE_STEP = 0.05         # threshold step of the estimate's finite difference
OFFSET_BISECTION_STEPS = 24
OFFSET_TOLERANCE = 1e-4   # stop once the sample reduction is this close to the target
FAR = 1e6                 # a head-logit offset that turns every head on (+) or off (-)


@flax.struct.dataclass
class BudgetState:
  """The controller's state, replicated on every device."""
  threshold: jax.Array     # r (mass) or q (uniform) the targets use now
  offset: jax.Array        # head-logit offset folded into the head biases so far
  ema: jax.Array           # filtered realized reduction of the predicted masks
  gain: jax.Array          # threshold change per step per unit of reduction error
  calibrations: jax.Array  # int32: calibrations done (1 at the cooldown, 2 at the end)


def new_state(threshold: float, gain: float) -> BudgetState:
  f = lambda v: jnp.asarray(v, jnp.float32)
  return BudgetState(f(threshold), f(0.0), f(0.0), f(gain), jnp.zeros((), jnp.int32))


def to_meta(bs: BudgetState | None, config=None) -> dict | None:
  """JSON-safe host values (floats round-trip float32 exactly), with the config's target."""
  if bs is None:
    return None
  host = jax.device_get(bs)
  out = {'threshold': float(host.threshold), 'offset': float(host.offset),
         'ema': float(host.ema), 'gain': float(host.gain),
         'calibrations': int(host.calibrations)}
  if config is not None:
    out.update(target_reduction=float(config.budget.target_reduction),
               accounting=config.budget.accounting)
  return out


def from_meta(m: dict) -> BudgetState:
  f = lambda k: jnp.asarray(np.float32(m[k]))
  return BudgetState(f('threshold'), f('offset'), f('ema'), f('gain'),
                     jnp.asarray(m['calibrations'], jnp.int32))


def resumed_state(config, stored_meta: dict) -> BudgetState | None:
  """The budget state a resumed run continues with; a budget cannot be added or dropped
  mid-run (the workdir holds one experiment)."""
  target = config_lib.budget_target(config)
  stored = stored_meta.get('budget')
  if (target is None) != (stored is None):
    raise UserError(
        f'config.budget.target_reduction={target!r} but the checkpoint to resume was '
        f'trained {"with a budget" if stored else "without one"}; use a new --workdir '
        '(the existing checkpoint was left untouched)')
  return None if stored is None else from_meta(stored)


# ------------------------------------------------------------------ controller

@dataclasses.dataclass(frozen=True)
class Controller:
  """Static part of the controller (from the config): what it steers, and when."""
  target: float
  key: str          # per-step metric it reads: 'macs_exact' | 'macs_paper'
  start: int        # first step it acts (after the warm-up)
  stop: int         # the cooldown step: the threshold is frozen from here
  sign: float       # +1 for r (larger keeps more), -1 for q (larger prunes more)

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> 'Controller':
    stop = mask_phase_steps(config, steps_per_epoch)
    return cls(float(config.budget.target_reduction), f'macs_{config.budget.accounting}',
               int(round(config.budget.warmup * stop)), stop,
               1.0 if config.gate.criterion == 'mass' else -1.0)

  def update(self, bs: BudgetState, step, realized) -> BudgetState:
    """One step: EMA of the batch's realized reduction, then (between start and stop) an
    integral step of the threshold toward the target, clipped to [0, 1]."""
    ema = jnp.where(step == 0, realized, EMA_DECAY * bs.ema + (1 - EMA_DECAY) * realized)
    acting = (step >= self.start) & (step < self.stop)
    moved = bs.threshold + self.sign * bs.gain * (ema - self.target)
    threshold = jnp.where(acting, jnp.clip(moved, 0.0, 1.0), bs.threshold)
    return bs.replace(threshold=threshold.astype(jnp.float32), ema=ema.astype(jnp.float32))


def mask_phase_steps(config, steps_per_epoch: int) -> int:
  """Steps with mask loss weight 1 (SPEC 4): the heads learn the targets of the threshold."""
  return int(config.cooldown * config.num_epochs) * steps_per_epoch


def with_threshold(model, bs: BudgetState | None):
  """``model`` whose targets use the state's (traced) threshold; unchanged without a budget."""
  if bs is None:
    return model
  return estimate.with_threshold(model, None, bs.threshold)[0]


def train_step_update(bs: BudgetState, step, metrics: dict, config, steps_per_epoch: int,
                      dense_macs: int) -> tuple[BudgetState, dict]:
  """The controller's step inside ``train.train_step``, and what it logs."""
  ctrl = Controller.from_config(config, steps_per_epoch)
  realized = flops.reduction(metrics[ctrl.key], dense_macs)
  new = ctrl.update(bs, step, realized)
  return new, {'threshold': new.threshold, 'realized_ema': new.ema, 'offset': new.offset}


# ------------------------------------------------------------------ plan (before training)

def _ends(criterion: str) -> tuple[float, float]:
  """(threshold keeping most, threshold pruning most)."""
  return (1.0, 0.0) if criterion == 'mass' else (0.0, 1.0)


def check_reachable(target: float, least: float, most: float, what: str, how: str) -> None:
  if not least <= target <= most:
    raise UserError(
        f'budget target_reduction={target!r} is out of reach: {what} reaches reductions '
        f'from {least:.4f} ({how}) to {most:.4f} (every head off); choose a target in '
        'that range')


def plan(config, steps_per_epoch: int) -> dict:
  """Starting threshold, reachable range and gain for a budget run (reads ``init_from``)."""
  target = float(config.budget.target_reduction)
  if not config.init_from:
    raise UserError(
        f'config.budget.target_reduction={target!r} needs config.init_from: the starting '
        'threshold is estimated from the dense checkpoint (SPEC 8)')
  est = estimate.build(config, config.init_from, num_examples=config.budget.examples)
  key = f'flops_reduction_{config.budget.accounting}'
  keep, prune = _ends(est.criterion)
  least, most = est(keep)[key], est(prune)[key]
  name = 'r' if est.criterion == 'mass' else 'q'
  check_reachable(target, least, most, f'the dense model {config.init_from} (estimate)',
                  f'{name}={keep:g}')
  found = estimate.search(est, target, key)
  t0 = found['threshold']
  a, b = max(0.0, t0 - SLOPE_STEP), min(1.0, t0 + SLOPE_STEP)
  slope = abs(est(a)[key] - est(b)[key]) / (b - a)
  stop = mask_phase_steps(config, steps_per_epoch)
  start = int(round(config.budget.warmup * stop))
  response = max(1.0, (stop - start) / 4)   # steps for the loop to close most of an error
  gain = 1.0 / (max(slope, MIN_SLOPE) * response)
  result = {'target_reduction': target, 'accounting': config.budget.accounting,
            'initial_threshold': t0, 'estimated_reduction': found['achieved'][key],
            'reachable': [least, most], 'slope': slope, 'gain': gain,
            'controller_steps': [start, stop], 'estimate_evaluations':
                len(found['evaluations']) + 4}
  logging.info('budget plan: %s', result)
  return result


# ------------------------------------------------------------------ calibration

def shift_heads(variables: dict, delta) -> dict:
  """``variables`` with ``delta`` added to every head's bias: logits + delta."""
  def shift(path, v):
    last = getattr(path[-1], 'key', None)
    return v + delta if models.is_head_path(path) and last == 'bias' else v
  return dict(variables, params=jax.tree.map_with_path(shift, variables['params']))


def _with_offset(model, variables, offset):
  return model, shift_heads(variables, offset)


def calibration_sample(config, mesh, num_examples: int) -> list:
  """Training examples (eval preprocessing, a fixed prefix), sharded: never the test split."""
  return [data.shard_batch(b, mesh) for b in estimate.training_sample(config, num_examples)]


def search_offset(reduction_at, target: float) -> tuple[float, float, int]:
  """(offset, its reduction, evaluations): the offset whose reduction is nearest ``target``.

  Reduction falls as the offset grows (more heads on). Bracket by doubling from [-1, 1],
  then bisect; the answer is the evaluated point nearest the target.
  """
  points = {}

  def at(o):
    if o not in points:
      points[o] = reduction_at(o)
    return points[o]

  lo, hi = -1.0, 1.0      # at(lo) >= target >= at(hi) once bracketed
  while at(lo) < target and lo > -FAR:
    lo *= 2
  while at(hi) > target and hi < FAR:
    hi *= 2
  for _ in range(OFFSET_BISECTION_STEPS):
    if min(abs(v - target) for v in points.values()) < OFFSET_TOLERANCE:
      break
    mid = 0.5 * (lo + hi)
    if at(mid) >= target:
      lo = mid
    else:
      hi = mid
  best = min(points, key=lambda o: abs(points[o] - target))
  return best, points[best], len(points)


def calibrate(model, variables, prof: flops.Profile, config, batches: list, mesh,
              target: float, accounting: str) -> dict:
  """The global head-logit offset giving ``target`` on ``batches`` (training examples).

  ``model``: the eval-mode gated model (predicted masks). Returns the offset (to fold with
  ``shift_heads``), the sample's reductions before and after, and the reachable range.
  Raises ValueError, naming the range, when the target cannot be met.
  """
  cost = estimate.make_cost_fn(model, prof, config.dataset, knob=_with_offset)
  means, count = estimate.sample_means(cost, variables, batches, mesh)
  dense = flops.dense_macs(prof)

  passes = {}   # offset -> reductions: each is one pass over the sample

  def reductions(offset):
    if offset not in passes:
      m = means(offset)
      passes[offset] = {acc: flops.reduction(m[f'macs_{acc}'], dense)
                        for acc in config_lib.ACCOUNTINGS}
    return passes[offset]

  reduction_at = lambda o: reductions(o)[accounting]
  least, most = reduction_at(FAR), reduction_at(-FAR)
  check_reachable(target, least, most, 'this model (on training examples)', 'every head on')
  offset, _, _ = search_offset(reduction_at, target)
  return {'offset': float(offset), 'target_reduction': target, 'accounting': accounting,
          'sample_examples': count, 'sample_reduction_before': reductions(0.0),
          'sample_reduction_after': reductions(offset), 'reachable': [least, most],
          'evaluations': len(passes)}


# ------------------------------------------------------------------ in the training loop

class Calibrator:
  """Calibrations of a budget run: at the cooldown (so the backbone fine-tunes with masks at
  the budget) and after the last step. The host knows which are done from the state once,
  at start-up, so no step waits on the device."""

  def __init__(self, config, model, prof, mesh, state, total_steps: int,
               steps_per_epoch: int):
    self.config, self.model, self.prof, self.mesh = config, model, prof, mesh
    self.done = int(jax.device_get(state.budget.calibrations))
    self.cooldown = mask_phase_steps(config, steps_per_epoch)
    self.total = total_steps
    self._batches = None

  def due(self, step: int) -> bool:
    at_cooldown = self.done == 0 and self.cooldown <= step < self.total
    return at_cooldown or (self.done < 2 and step == self.total)

  def __call__(self, state, step: int):
    if self._batches is None:
      self._batches = calibration_sample(self.config, self.mesh, self.config.budget.examples)
    record = calibrate(self.model, state.variables, self.prof, self.config, self._batches,
                       self.mesh, float(self.config.budget.target_reduction),
                       self.config.budget.accounting)
    self.done = 1 if step < self.total else 2
    delta = record['offset']
    bs = state.budget
    state = parallel.replicate(state.replace(
        params=shift_heads(state.variables, delta)['params'],
        budget=bs.replace(offset=bs.offset + delta,
                          calibrations=jnp.full_like(bs.calibrations, self.done))), self.mesh)
    logging.info('budget calibration at step %d: head-logit offset %+.5f (total %+.5f, %d '
                 'evaluations); training-sample reduction %s -> %s', step, delta,
                 float(jax.device_get(state.budget.offset)), record['evaluations'],
                 record['sample_reduction_before'], record['sample_reduction_after'])
    return state


# ------------------------------------------------------------------ --mode=calibrate

def run_calibrate(config, workdir, out, target_reduction, which='latest') -> dict:
  """Calibrate a trained FTWT checkpoint to ``target_reduction``; write it to ``out``.

  The source is read only. ``out`` gets the checkpoint (heads' biases shifted, same step),
  its config (with the budget fields set), ``calibration.json`` (accuracy and reductions
  before/after) and ``eval/<step>.json``.
  """
  config_lib.check_target_reduction(target_reduction, '--target_reduction')
  if out is None:
    raise UserError('--mode=calibrate needs --out: the new workdir to write (the source '
                     'checkpoint is never overwritten)')
  src, out = checkpoint.as_path(workdir), checkpoint.as_path(out)
  if out == src or src in out.parents:
    raise UserError(f'--out={out} must be a new directory outside --workdir={src}')
  if convert.has_checkpoint(out):
    raise UserError(f'--out={out} already holds a checkpoint; choose a new directory')
  restored = evaluate.restore(src, which, config)
  if not restored.gated:
    raise UserError(f'{restored.path} is a {restored.config.stage!r} checkpoint: '
                     'calibration needs an FTWT model with mask heads (stage ftwt)')
  budget_cfg = restored.config.get('budget') or config_lib.base_config().budget
  accounting, n = budget_cfg.accounting, budget_cfg.examples
  mesh = parallel.make_mesh()
  batches = calibration_sample(restored.config, mesh, n)
  record = calibrate(restored.model, parallel.replicate(restored.variables, mesh),
                     restored.profile, restored.config, batches, mesh,
                     float(target_reduction), accounting)  # raises before any write
  before = evaluate.evaluate_restored(restored)
  variables = jax.device_get(shift_heads(restored.variables, record['offset']))
  old = restored.meta.get('budget') or {'threshold': float(restored.config.gate.threshold),
                                        'offset': 0.0, 'ema': 0.0, 'gain': 0.0,
                                        'calibrations': 0}
  meta = dict(restored.meta, calibrated_from=str(restored.path),
              budget=dict(old, offset=old['offset'] + record['offset'],
                          target_reduction=float(target_reduction), accounting=accounting))
  cfg = ml_collections.ConfigDict(restored.config.to_dict())
  if 'budget' not in cfg:  # saved before budgets existed
    cfg.budget = config_lib.base_config().budget
  cfg.budget.target_reduction = float(target_reduction)
  convert.write_checkpoint(out, variables, cfg, meta, step=restored.step)
  after = evaluate.evaluate_restored(evaluate.restore(out, 'latest'))
  keys = ('top1', 'top5', 'flops_reduction_exact', 'flops_reduction_paper')
  record.update(source=str(restored.path), step=restored.step,
                test_before={k: before[k] for k in keys}, test_after={k: after[k] for k in keys})
  if jax.process_index() == 0:
    (out / 'config.json').write_text(cfg.to_json_best_effort(indent=2))
    (out / 'calibration.json').write_text(json.dumps(record, indent=2))
    evaluation.write_eval_json(out, restored.step, after)
    print(format_calibration(record))
    print(f'\nwritten: {out}')
  return record


def format_calibration(r: dict) -> str:
  pct = lambda v: f'{100 * v:6.2f} %'
  b, a = r['test_before'], r['test_after']
  lines = [f"calibrated {r['source']} (step {r['step']}) to {r['accounting']} reduction "
           f"{pct(r['target_reduction'])}: head-logit offset {r['offset']:+.5f} "
           f"({r['evaluations']} evaluations on {r['sample_examples']} training examples)", '',
           f"{'test split':<24}{'before':>10}{'after':>10}"]
  for k, name in (('top1', 'top-1'), ('top5', 'top-5'),
                  ('flops_reduction_exact', 'FLOPs reduction exact'),
                  ('flops_reduction_paper', 'FLOPs reduction paper')):
    lines.append(f'{name:<24}{pct(b[k]):>10}{pct(a[k]):>10}')
  return '\n'.join(lines)
