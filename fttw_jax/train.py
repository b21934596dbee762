"""Training: dense baseline and FTWT dynamic training (SPEC 4, 6).

Shaped after flax examples/imagenet: ``create_train_state``, ``train_step``,
``train_and_evaluate``. The steps are jitted ``jax.shard_map`` functions over the
1-D ``data`` mesh (``fttw_jax.parallel``): every device runs the per-device step on
its slice of the global batch; ``lax.pmean`` over ``data`` makes the loss (hence
the gradients), BatchNorm statistics and metrics global means, so results do not
depend on the device count. Evaluation during training is ``fttw_jax.evaluation``'s.
"""

from __future__ import annotations

import functools
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from fttw_jax import budget, checkpoint, data, evaluation, flops, ftwt, models
from fttw_jax import workdir as workdir_lib
from fttw_jax import config as config_lib
from fttw_jax.errors import CorruptCheckpointError, NonFiniteError, UserError
from fttw_jax.parallel import AXIS, make_mesh, replicate


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  budget: Any = None    # budget.BudgetState of a budget run (issue 15), else None

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ------------------------------------------------------------------ setup

def param_labels(params):
  """'heads' for every mask predictor head parameter, 'backbone' for the rest."""
  return jax.tree.map_with_path(
      lambda path, _: 'heads' if models.is_head_path(path) else 'backbone', params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  if opt.schedule == 'constant':
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == 'cosine':
    return optax.cosine_decay_schedule(opt.learning_rate, max(total_steps, 1))
  # PyTorch MultiStepLR: multiply by decay_factor at the start of each listed epoch.
  return optax.piecewise_constant_schedule(
      opt.learning_rate, {int(e) * steps_per_epoch: opt.decay_factor for e in opt.decay_epochs})


def sgd(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  """PyTorch SGD: coupled L2 (g + wd * p), then momentum, then -lr."""
  return optax.chain(
      optax.add_decayed_weights(opt.weight_decay) if opt.weight_decay else optax.identity(),
      optax.sgd(learning_rate_schedule(opt, steps_per_epoch, total_steps),
                momentum=opt.momentum or None))


def create_optimizer(config, steps_per_epoch: int, total_steps: int):
  """Separate optax transforms for the backbone and the heads (SPEC 6)."""
  return optax.partition(
      {'backbone': sgd(config.optimizer, steps_per_epoch, total_steps),
       'heads': sgd(config.head_optimizer, steps_per_epoch, total_steps)},
      param_labels)


def create_train_state(rng, model, tx, image_shape, mesh) -> TrainState:
  """Initialise params and batch_stats (jitted: eager init is slow) and the optimizer."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}),
                     opt_state=tx.init(params))
  return replicate(state, mesh)


# ------------------------------------------------------------------ steps

def train_step(state: TrainState, batch, *, model, tx, config, prof, steps_per_epoch: int):
  """One SGD step on one device's slice (wrapped in shard_map by ``make_train_step``).

  Loss = CE + w(epoch) * mask loss; after the cooldown w = 0 and the heads get a
  zero gradient: ``cooldown_heads='freeze'`` zeroes their updates,
  ``'momentum'`` lets their SGD keep stepping on it (momentum coasts, as in the
  reference, SPEC 9.3).
  """
  images = data.normalize(batch['image'], config.dataset)
  labels = batch['label']
  model = budget.with_threshold(model, state.budget)  # budget run: r from the state
  epoch = state.step // steps_per_epoch
  w = ftwt.mask_loss_weight(epoch, config.num_epochs, config.cooldown)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (logits, aux), new_model_state = model.apply(variables, images, train=True,
                                                 mutable=['batch_stats'])
    gates = aux['gates']
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    loss = ce + w * ftwt.mask_loss(gates)
    # Mean over the global batch. Params enter shard_map replicated, so their
    # gradient is the (device-invariant) gradient of this global mean.
    return jax.lax.pmean(loss, AXIS), (logits, gates, new_model_state)

  (loss, (logits, gates, new_model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if config_lib.fidelity_option(config, 'cooldown_heads') == 'freeze':
    head_scale = jnp.where(w > 0, 1.0, 0.0)
    updates = jax.tree.map_with_path(
        lambda p, u: u * head_scale if models.is_head_path(p) else u, updates)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      opt_state=opt_state, batch_stats=new_model_state['batch_stats'])
  stats = evaluation.per_example_stats(logits, labels, gates, prof)
  metrics = jax.lax.pmean(jax.tree.map(jnp.mean, stats), AXIS)
  metrics['loss'] = loss
  metrics['mask_loss_weight'] = w
  if state.budget is not None:  # issue 15: the controller's step
    bs, metrics['budget'] = budget.train_step_update(
        state.budget, state.step, metrics, config, steps_per_epoch, flops.dense_macs(prof))
    new_state = new_state.replace(budget=bs)
  return new_state, metrics


def head_fit_step(state: TrainState, batch, *, model, tx, config):
  """One step of the head_init='ones' pass (SPEC 4) on one device's slice: the mask
  loss alone (no CE, weight 1; ``tx`` trains only the heads), the step counter kept.
  BN in eval mode, or in train mode (batch statistics updated) for
  ``head_init_pass='train_bn_501_batches'`` (SPEC 9.5)."""
  images = data.normalize(batch['image'], config.dataset)
  bn_train = config_lib.fidelity_option(config, 'head_init_pass') == 'train_bn_501_batches'

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    if bn_train:
      (_, aux), new_model_state = model.apply(variables, images, train=True,
                                              mutable=['batch_stats'])
    else:
      (_, aux), new_model_state = model.apply(variables, images, train=False), {}
    return jax.lax.pmean(ftwt.mask_loss(aux['gates']), AXIS), new_model_state

  (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      params=optax.apply_updates(state.params, updates), opt_state=opt_state,
      batch_stats=new_model_state.get('batch_stats', state.batch_stats))
  return new_state, {'mask_loss': loss}


def all_finite(tree) -> jax.Array:
  """One boolean: every floating-point leaf of ``tree`` is finite (cheap, on device)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def _checked_step(state, batch, **kwargs):
  """``train_step`` plus metrics['finite']: its loss and the whole new state are finite,
  so that a state is known finite before it can be saved."""
  new_state, metrics = train_step(state, batch, **kwargs)
  metrics['finite'] = jnp.logical_and(jnp.isfinite(metrics['loss']), all_finite(new_state))
  return new_state, metrics


def _sharded(step, mesh, model):
  """jit(shard_map(step)): the state replicated, the batch split over the mesh."""
  donate = (0,) if jax.default_backend() != 'cpu' else ()  # CPU cannot donate: no warning
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                               out_specs=(P(), P())), donate_argnums=donate,
                 compiler_options=models.compiler_options(model.conv_impl))


def make_train_step(mesh, **kwargs):
  return _sharded(functools.partial(_checked_step, **kwargs), mesh, kwargs['model'])


def make_head_fit_step(mesh, **kwargs):
  return _sharded(functools.partial(head_fit_step, **kwargs), mesh, kwargs['model'])



# ------------------------------------------------------------------ loop helpers

class _Preemption:
  """SIGTERM sets a flag; the loop checks it after every step (each step is waited
  for, so the stop comes within one step of the signal), checkpoints and returns.
  Installed for the whole run: start-up and the head-init pass included."""

  def __init__(self):
    self.requested = False
    self.signal_time = None
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: stopping after the current step.')
    self.requested, self.signal_time = True, time.time()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int, every: int) -> bool:
    """Single process: at once. Several: all agree, at steps that are multiples of
    ``every``, so that every process enters the checkpoint save at the same step."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def preempted(step: int | None, why: str, preemption: _Preemption) -> dict:
  delay = '' if preemption.signal_time is None else (
      f' {time.time() - preemption.signal_time:.1f}s after the signal')
  logging.warning('preempted: %s%s; exiting (rerun the same command to resume).', why, delay)
  return {'preempted_at_step': step}


def check_resumable(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                    where) -> None:
  """A workdir holds one experiment: refuse to continue it with another model."""
  details = config_lib.describe_differences(stored, config)
  if details:
    raise UserError(
        f'{where} holds a checkpoint of another experiment ({details}). Use a new '
        '--workdir; the existing checkpoint was left untouched.')


def load_backbone(init_from: str, state: TrainState, mesh) -> TrainState:
  """Backbone params and BN stats from a baseline checkpoint; heads stay fresh."""
  backbone, heads = models.split_heads(jax.device_get(state.params))
  target = {'params': backbone, 'batch_stats': jax.device_get(state.batch_stats)}
  try:
    variables, _, meta, step = checkpoint.restore_variables(init_from, 'latest', target=target)
  except UserError as e:
    raise type(e)(f'config.init_from={init_from!r}: {e}') from None
  logging.info('init_from %s: backbone of step %d (%s)', init_from, step, meta.get('stage'))
  return replicate(state.replace(params=models.merge_heads(variables['params'], heads),
                                 batch_stats=variables['batch_stats']), mesh)


def _log_label_tree(params):
  labels = param_labels(params)
  counts = {}
  for path, label in jax.tree.leaves_with_path(labels):
    counts.setdefault(label, []).append(jax.tree_util.keystr(path))
  for label, paths in sorted(counts.items()):
    shown = ', '.join(paths[:4]) + (', ...' if len(paths) > 4 else '')
    logging.info('optimizer %r trains %d parameter arrays: %s', label, len(paths), shown)


class MetricsWriter:
  """clu writers: every series to TensorBoard; the console gets the scalars that a
  person follows (per-layer active ratios would flood it). Only process 0 writes."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.console = metric_writers.LoggingWriter() if enabled else metric_writers.MultiWriter([])
    self.tensorboard = (metric_writers.SummaryWriter(str(workdir)) if enabled
                        else metric_writers.MultiWriter([]))

  def write(self, step: int, metrics: dict, prefix: str) -> None:
    if not self.enabled:
      return
    flat, brief = {}, {}
    for k, v in metrics.items():
      if isinstance(v, dict):  # nested (dynamism: field/overall|layers/...): one tag per leaf
        flat.update({f'{prefix}{k}/' + '/'.join(kk): vv for kk, vv in
                     flax.traverse_util.flatten_dict(v).items()})
      else:
        flat[f'{prefix}{k}'] = brief[f'{prefix}{k}'] = v
    self.tensorboard.write_scalars(step, flat)
    self.console.write_scalars(step, brief)

  def flush(self):
    if self.enabled:
      self.tensorboard.flush()


def every_or_last(step: int, every: int, total: int) -> bool:
  """True at every ``every``-th step and at the last one, ``total``."""
  return step == total or step % every == 0


# ------------------------------------------------------------------ main loop

def restore_newest_intact(workdir, steps, state: TrainState, config, mesh):
  """(state, step, corrupt steps, meta) from the newest checkpoint that restores; a
  corrupt newer one is reported (one line each) and passed over, never deleted here."""
  corrupt = []
  for step in reversed(steps):
    try:
      variables, opt_state, stored, meta = checkpoint.restore_train(
          workdir, step, jax.device_get(state.variables), jax.device_get(state.opt_state))
    except CorruptCheckpointError as e:
      logging.warning('%s; falling back to the previous checkpoint', e)
      corrupt.append(step)
      continue
    check_resumable(stored, config, workdir)
    restored = state.replace(step=jnp.asarray(step, jnp.int32), params=variables['params'],
                             batch_stats=variables['batch_stats'], opt_state=opt_state,
                             budget=budget.resumed_state(config, meta))
    return replicate(restored, mesh), step, corrupt, meta
  if corrupt:
    raise CorruptCheckpointError(
        f'no checkpoint in {workdir / checkpoint.CHECKPOINTS} can be read (steps {corrupt}, '
        'see above); fix or move them, or pass --overwrite to start over')
  return state, None, corrupt, {}


def resume_or_init(workdir, plan, state: TrainState, config, model, mesh,
                   steps_per_epoch: int, should_stop):
  """(state, start step or None, corrupt steps, budget plan) that training starts from.

  The newest intact checkpoint of ``plan``; else a fresh start from ``state``: a
  budget run's planned controller state (its target checked reachable), the
  ``init_from`` backbone, the head_init='ones' pass. Reads only. The state is None
  when ``should_stop`` (SIGTERM) ends that pass early.
  """
  state, start_step, corrupt, stored_meta = restore_newest_intact(workdir, plan.steps, state,
                                                                  config, mesh)
  if start_step is not None:
    return state, start_step, corrupt, stored_meta.get('budget_plan')
  budget_plan = None
  if config_lib.budget_target(config) is not None:
    budget_plan = budget.plan(config, steps_per_epoch)
    state = replicate(state.replace(budget=budget.new_state(
        budget_plan['initial_threshold'], budget_plan['gain'])), mesh)
  if config.init_from:
    state = load_backbone(config.init_from, state, mesh)
  if config.stage == 'ftwt' and config.head_init == 'ones':
    state = fit_heads_to_ones(state, config, model, mesh, config.data_dir or None,
                              steps_per_epoch, should_stop)
  return state, None, corrupt, budget_plan


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict:
  """Train (resuming from ``workdir`` if it holds a checkpoint) and evaluate each epoch.

  Everything is checked (config, workdir, dataset, ``init_from``, the checkpoint to
  resume) before the first write. Returns the last evaluation result, or
  ``{'preempted_at_step': step}`` when SIGTERM stopped the run first. ``overwrite``
  discards the workdir's artefacts of another run instead of refusing it.
  """
  with _Preemption() as preemption:
    return _train(config, checkpoint.as_path(workdir), overwrite, preemption)


def _train(config, workdir, overwrite: bool, preemption: _Preemption) -> dict:
  config_lib.validate(config)
  info = data.get_info(config.dataset)
  data_dir = config.data_dir or None
  mesh = make_mesh()
  gated = config.stage == 'ftwt'

  # Before any directory is created: the global batch must split over devices and processes.
  try:
    data.pipeline.local_batch_size(config.batch_size, jax.process_count())
  except ValueError as e:
    raise UserError(str(e)) from None
  steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size)
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size={config.batch_size} exceeds the {info.num_train} '
                    f'training examples of {config.dataset}')
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  plan = workdir_lib.inspect(workdir, config, overwrite)

  # One model for training and evaluation: BatchNorm uses its axis only in train mode.
  model = config_lib.model_from_config(config, info.num_classes, bn_axis_name=AXIS)
  image_shape = (info.image_size, info.image_size, 3)
  prof = flops.profile(model, (1, *image_shape))
  tx = create_optimizer(config, steps_per_epoch, config.num_epochs * steps_per_epoch)
  # An 'rbg' key: threefry-based init takes ~10x longer to compile on CPU.
  state = create_train_state(jax.random.key(config.seed, impl='rbg'), model, tx, image_shape,
                             mesh)
  every = config.log_every_steps
  state, start_step, corrupt, budget_plan = resume_or_init(
      workdir, plan, state, config, model, mesh, steps_per_epoch,
      should_stop=lambda i: preemption.should_stop(i, every))
  if state is None:
    return preempted(None, 'during the head_init pass, before anything was written',
                     preemption)
  # A missing dataset fails here, before any write.
  train_iter = data.create_train_iterator(
      config.dataset, config.batch_size, seed=config.seed,
      start_step=start_step or 0, data_dir=data_dir)
  if preemption.should_stop(0, 1):
    return preempted(start_step, 'during start-up, before anything was written', preemption)

  # ---- the first write: everything above has been checked.
  is_main = jax.process_index() == 0
  workdir_lib.prepare(plan, config, is_main, corrupt)
  manager = checkpoint.create_manager(workdir, config.max_checkpoints)
  writer = MetricsWriter(workdir, enabled=is_main)
  _log_label_tree(state.params)
  logging.info('%s: %d steps/epoch, %d steps, %d devices, dense MACs %s, heads %s',
               config.model, steps_per_epoch, total_steps, jax.device_count(),
               f'{prof.macs:,}', f'{prof.head_macs:,}' if gated else 0)
  if start_step is not None:
    logging.info('resumed from %s at step %d', workdir / checkpoint.CHECKPOINTS, start_step)

  step_fn = make_train_step(mesh, model=model, tx=tx, config=config, prof=prof,
                            steps_per_epoch=steps_per_epoch)
  eval_fn = evaluation.make_eval_step(mesh, model=model, config=config, prof=prof)
  calibrator = (budget.Calibrator(config, model, prof, mesh, state, total_steps,
                                  steps_per_epoch) if state.budget is not None else None)
  meta = {'model': config.model, 'dataset': config.dataset, 'num_classes': info.num_classes,
          'stage': config.stage, 'run_id': plan.run['run_id']}

  def run_eval(step):
    batches = data.create_eval_iterator(
        config.dataset, config.batch_size, data_dir=data_dir,
        max_examples=config.eval_max_examples if config.eval_max_examples > 0 else None)
    result = evaluation.eval_pass(eval_fn, state.variables, batches, mesh, prof, gated)
    result.update(step=step, epoch=step / steps_per_epoch, width=config.width, **meta)
    if gated:
      result.update(evaluation.budget_fields(config, budget.to_meta(state.budget, config)))
    if is_main:
      evaluation.write_eval_json(workdir, step, result)
    writer.write(step, {k: v for k, v in result.items() if not isinstance(v, str)}, 'eval/')
    logging.info('step %d epoch %d: top1 %.4f loss %.4f exact FLOPs reduction %.4f', step,
                 step // steps_per_epoch, result['top1'], result['loss'],
                 result['flops_reduction_exact'])
    return result

  def save(step, result):
    """Only a state whose every step passed the finite check gets here."""
    m = dict(meta, step=step, epoch=step // steps_per_epoch)
    if state.budget is not None:
      m.update(budget=budget.to_meta(state.budget, config), budget_plan=budget_plan)
    host_vars, host_opt = jax.device_get(state.variables), jax.device_get(state.opt_state)
    # A budget run's only best candidate is its calibrated last step.
    best = result is not None and (state.budget is None or step == total_steps)
    checkpoint.save(manager, step, host_vars, host_opt, config, m,
                    metrics={'top1': result['top1']} if best else None)

  is_eval_step = functools.partial(
      every_or_last, every=steps_per_epoch * config.eval_every_epochs, total=total_steps)
  is_checkpoint_step = functools.partial(
      every_or_last, every=steps_per_epoch * config.checkpoint_every_epochs, total=total_steps)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer.console)
  step = start_step or 0
  pending, result = [], None
  if (start_step is not None and is_eval_step(step) and not checkpoint.has_metrics(workdir, step)
      and not (workdir / 'eval' / f'{step}.json').exists()):
    result = run_eval(step)  # saved by a stop before its evaluation: evaluate it now
  try:
    while step < total_steps:
      if calibrator is not None and calibrator.due(step):  # the cooldown calibration
        state = calibrator(state, step)
      batch = data.shard_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append((step, metrics))
      if not bool(metrics.pop('finite')):  # waits for this step: one step in flight at most
        raise NonFiniteError(non_finite_message(step, float(metrics['loss']), manager))
      report(step)
      stop = preemption.should_stop(step, every)
      if (every_or_last(step, every, total_steps) or is_eval_step(step)
          or is_checkpoint_step(step) or stop):
        _flush(writer, pending)
        pending = []
      if calibrator is not None and step == total_steps and calibrator.due(step):
        state = calibrator(state, step)  # the final calibration, before the last eval
      result = run_eval(step) if is_eval_step(step) else None
      if is_checkpoint_step(step) or stop:
        save(step, result)   # an epoch boundary's evaluation first, even when stopping
      if stop and step < total_steps:
        manager.wait_until_finished()   # the checkpoint is complete before we say so
        return preempted(step, f'checkpoint written at step {step}', preemption)
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.flush()
  return result


def non_finite_message(step: int, loss: float, manager) -> str:
  """Names the step and the checkpoints that stay latest and best (none of it is saved)."""
  latest, best = manager.latest_step(), manager.best_step()
  kept = ('no checkpoint was written' if latest is None else
          f'the last finite checkpoint, step {latest} in {manager.directory}, stays the latest'
          + (f' (best: step {best})' if best is not None else ''))
  return (f'non-finite training loss {loss} or state at step {step}; stopping, nothing of '
          f'it saved; {kept}. Fix the config (e.g. a lower learning rate) and rerun: it '
          'resumes from there.')


def _flush(writer, pending):
  """Fetch queued step metrics and log their means."""
  host = jax.device_get([m for _, m in pending])
  means = jax.tree.map(lambda *v: float(np.mean(v)), *host)
  writer.write(pending[-1][0], means, 'train/')


HEAD_INIT_MAX_BATCHES = 501  # the reference stops its pass after batch index 500


def fit_heads_to_ones(state, config, model, mesh, data_dir, steps_per_epoch,
                      should_stop=lambda step: False):
  """SPEC 4 head_init='ones': one pass fitting only the heads to all-on masks.

  ``head_init_pass='eval_bn_one_epoch'``: one epoch, BN in eval mode, the pass's
  optimizer state dropped. ``'train_bn_501_batches'`` (the reference, SPEC 9.5):
  at most 501 batches with BN in train mode (the backbone's running statistics
  move), and the heads' optimizer state (momentum) carries on into training, as
  the reference's single heads optimizer does.

  Returns None when ``should_stop(step)`` (SIGTERM) ends the pass early.
  """
  reference = config_lib.fidelity_option(config, 'head_init_pass') == 'train_bn_501_batches'
  steps = min(steps_per_epoch, HEAD_INIT_MAX_BATCHES) if reference else steps_per_epoch
  ones_model = model.clone(gate=config_lib.gate_config(config, criterion='mass',
                                                       threshold=-1.0))
  heads_only = optax.partition(
      {'backbone': optax.set_to_zero(),
       'heads': sgd(config.head_optimizer, steps_per_epoch, steps_per_epoch)}, param_labels)
  init_state = replicate(state.replace(opt_state=heads_only.init(state.params)), mesh)
  step_fn = make_head_fit_step(mesh, model=ones_model, tx=heads_only, config=config)
  it = data.create_train_iterator(config.dataset, config.batch_size, seed=config.seed + 1,
                                  data_dir=data_dir)
  start = time.time()
  logging.info('head_init=ones: fitting the heads to all-on masks for %d steps', steps)
  for i in range(steps):
    init_state, metrics = step_fn(init_state, data.shard_batch(next(it), mesh))
    jax.block_until_ready(metrics)  # one step in flight: a stop is seen within one step
    if should_stop(i + 1):
      return None
  logging.info('head_init=ones: %d steps in %.1fs, mask loss %.4f', steps,
               time.time() - start, float(metrics['mask_loss']))
  if not reference:
    return state.replace(params=init_state.params)
  inner = dict(state.opt_state.inner_states, heads=init_state.opt_state.inner_states['heads'])
  return state.replace(params=init_state.params, batch_stats=init_state.batch_stats,
                       opt_state=state.opt_state._replace(inner_states=inner))
