"""Orbax checkpoints of a workdir: layout, save, restore, and the config check.

Layout (``W`` a local path or ``gs://...``)::

  W/checkpoints/<step>/   latest N, for resuming: items variables, opt_state, config, meta
  W/best/<step>/          the best by eval top-1 (same items)

``variables`` is ``{'params', 'batch_stats'}``; ``opt_state`` is only needed to
resume training, so evaluation, ``init_from`` and the research API restore
``variables`` (plus the JSON ``config`` and ``meta``) alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIRS = ('checkpoints', 'best')


def _handlers():
  """Item handlers, so that metadata can be read before any restore."""
  return {'variables': ocp.StandardCheckpointHandler(),
          'opt_state': ocp.StandardCheckpointHandler(),
          'config': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


def _reader(root) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers=_handlers())


def as_path(path) -> epath.Path:
  """epath.Path; local paths made absolute (orbax requires it), gs://... kept."""
  path = str(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def create_managers(workdir, max_to_keep: int = 3) -> tuple[ocp.CheckpointManager,
                                                             ocp.CheckpointManager]:
  """(latest-N manager, best-by-top-1 manager) under ``workdir``.

  Both save the same step at once; on several processes their barriers would
  share names (``async_commit_complete.<step>``) and fail, so each gets its own
  barrier key prefix.
  """
  workdir = as_path(workdir)
  latest = ocp.CheckpointManager(
      workdir / 'checkpoints',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True,
          multiprocessing_options=_barrier_prefix('checkpoints')),
      item_handlers=_handlers())
  best = ocp.CheckpointManager(
      workdir / 'best',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, best_fn=lambda m: m['top1'], best_mode='max',
          keep_checkpoints_without_metrics=False,
          multiprocessing_options=_barrier_prefix('best')),
      item_handlers=_handlers())
  return latest, best


def save(manager: ocp.CheckpointManager, step: int, variables, opt_state,
         config: ml_collections.ConfigDict, meta: dict, metrics: dict | None = None,
         force: bool = False) -> None:
  manager.save(
      step,
      args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables),
          opt_state=ocp.args.StandardSave(opt_state),
          config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
          meta=ocp.args.JsonSave(meta)),
      metrics=metrics, force=force)


def restore_train(manager: ocp.CheckpointManager, step: int, variables, opt_state):
  """Restore variables, optimizer state and meta for resuming, onto the given targets."""
  out = manager.restore(
      step,
      args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(variables),
          opt_state=ocp.args.StandardRestore(opt_state),
          meta=ocp.args.JsonRestore()))
  return out['variables'], out['opt_state'], out['meta']


def resolve(path, which: str | int = 'latest') -> tuple[epath.Path, int]:
  """Find (checkpoint manager directory, step) from a workdir or checkpoint path.

  ``path`` may be a workdir, a ``checkpoints``/``best`` directory, or one step
  directory in it. ``which`` is 'latest', 'best' or a step number.
  """
  path = as_path(path)
  if not path.exists():
    raise FileNotFoundError(f'no such workdir or checkpoint: {path}')
  if path.name.isdigit() and path.parent.name in CHECKPOINT_DIRS:
    return path.parent, int(path.name)
  if path.name in CHECKPOINT_DIRS:
    root, kind = path, path.name
  else:
    kind = 'best' if which == 'best' else 'checkpoints'
    root = path / kind
    if kind == 'best' and not _steps(root):
      root = path / 'checkpoints'  # no eval yet: fall back to the latest
  steps = _steps(root)
  if not steps:
    raise FileNotFoundError(f'no checkpoint found under {path} (looked in {root})')
  if which in ('latest', 'best'):
    return root, max(steps)
  step = int(which)
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {root}; available: {steps}')
  return root, step


def _steps(root: epath.Path) -> list[int]:
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def read_config(path, which: str | int = 'latest') -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, meta, step) stored with a checkpoint, without reading any array."""
  root, step = resolve(path, which)
  with _reader(root) as mgr:
    out = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                    meta=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(out['config']), dict(out['meta']), step


def check_compatible(expected, stored, what: str) -> None:
  """Raise a clear error when two variable trees differ in keys or shapes."""
  exp = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree.leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree.leaves_with_path(stored)}
  missing = sorted(set(exp) - set(got))
  unexpected = sorted(set(got) - set(exp))
  wrong = sorted(k for k in set(exp) & set(got) if exp[k] != got[k])
  if missing or unexpected or wrong:
    lines = [f'{what} does not match the model built from the config:']
    if missing:
      lines.append(f'  missing ({len(missing)}): {missing[:8]}')
    if unexpected:
      lines.append(f'  unexpected ({len(unexpected)}): {unexpected[:8]}')
    if wrong:
      lines.append('  wrong shape: ' + ', '.join(
          f'{k} {got[k]} != expected {exp[k]}' for k in wrong[:8]))
    raise ValueError('\n'.join(lines))


def restore_variables(path, which: str | int = 'latest', target: Any = None):
  """(variables, config, meta, step) of a checkpoint, without optimizer state.

  ``target`` (a tree of arrays or ShapeDtypeStructs, e.g. from ``jax.eval_shape``
  of the model's init) is checked against the stored tree first: a checkpoint
  of another model or class count is a clear error, never a silent partial load.
  """
  root, step = resolve(path, which)
  with _reader(root) as mgr:
    stored = mgr.item_metadata(step)['variables']
    if target is not None:
      check_compatible(target, stored, f'checkpoint {root / str(step)}')
      target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
    out = mgr.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(target),
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return (out['variables'], ml_collections.ConfigDict(out['config']), dict(out['meta']), step)
