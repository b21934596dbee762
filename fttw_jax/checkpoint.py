"""Orbax checkpoints of a workdir: layout, save, restore, integrity, and the config check.

Layout (``W`` a local path or ``gs://...``)::

  W/checkpoints/<step>/   items variables, opt_state, config, meta (+ metrics: eval top-1)

One ``CheckpointManager`` owns the directory. Its preservation policy keeps the
latest N steps and the best step by top-1 (the manager's ``best_step``), so there
is one record of which checkpoint is best. Workdirs written before this layout
also hold ``W/best/<step>/``; reading (evaluate, api, report) still finds it.

``variables`` is ``{'params', 'batch_stats'}``; ``opt_state`` is only needed to
resume training, so evaluation, ``init_from`` and the research API restore
``variables`` (plus the JSON ``config`` and ``meta``) alone.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from fttw_jax.errors import CorruptCheckpointError, NotFoundError, UserError

CHECKPOINTS = 'checkpoints'
LEGACY_BEST = 'best'          # the best-by-top-1 copy of workdirs of the older layout
CHECKPOINT_DIRS = (CHECKPOINTS, LEGACY_BEST)
TMP_MARKER = '.orbax-checkpoint-tmp'
CORRUPT = 'corrupt'            # unreadable steps a resumed run moved out of the way
WHICH = ('best', 'latest')


def _top1(metrics) -> float:
  return metrics['top1']


def _handlers():
  """Item handlers, so that metadata can be read before any restore."""
  return {'variables': ocp.StandardCheckpointHandler(),
          'opt_state': ocp.StandardCheckpointHandler(),
          'config': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


def _reader(root) -> ocp.CheckpointManager:
  """A manager that only reads: it is never asked to save or delete, and ``create=False``
  makes no directory. Not ``read_only=True``: orbax logs a WARNING per manager in that
  mode (up to three), and every load opens several."""
  return ocp.CheckpointManager(
      root, options=ocp.CheckpointManagerOptions(create=False, best_fn=_top1,
                                                 best_mode='max'),
      item_handlers=_handlers())


def as_path(path) -> epath.Path:
  """epath.Path; local paths made absolute (orbax requires it), gs://... kept."""
  path = str(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def create_manager(workdir, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """The manager of ``workdir/checkpoints``: keeps the latest ``max_to_keep`` steps
  and the best one by eval top-1 (steps saved without metrics never count as best)."""
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=max_to_keep),
      checkpoint_managers.BestN(get_metric_fn=_top1, n=1,
                                keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManager(
      as_path(workdir) / CHECKPOINTS,
      options=ocp.CheckpointManagerOptions(
          create=True, best_fn=_top1, best_mode='max', preservation_policy=policy),
      item_handlers=_handlers())


def save(manager: ocp.CheckpointManager, step: int, variables, opt_state,
         config: ml_collections.ConfigDict, meta: dict, metrics: dict | None = None) -> None:
  """Save ``step``; orbax skipping it (a step at or below its latest) is an error."""
  saved = manager.save(
      step,
      args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables),
          opt_state=ocp.args.StandardSave(opt_state),
          config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
          meta=ocp.args.JsonSave(meta)),
      metrics=metrics)
  if not saved:
    raise RuntimeError(f'orbax skipped saving step {step} in {manager.directory} (its latest '
                       f'step is {manager.latest_step()}); nothing was written')


# ------------------------------------------------------------------ integrity

def _json_files(step_dir: epath.Path):
  """The small JSON files of a step: its own metadata, each item's metadata, and the
  JSON items (config, meta, metrics). Two levels only: no recursive glob on GCS."""
  for p in sorted(step_dir.iterdir()) if step_dir.exists() else ():
    if p.name == '_CHECKPOINT_METADATA':
      yield p
    elif p.is_dir():
      for q in sorted(p.iterdir()):
        if q.name in ('_METADATA', 'metadata', 'metrics'):
          yield q


def check_json(step_dir) -> None:
  """Every JSON file of a step parses; else CorruptCheckpointError naming the file."""
  step_dir = epath.Path(step_dir)
  for p in _json_files(step_dir):
    try:
      json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise CorruptCheckpointError(
          f'corrupt checkpoint {step_dir}: file {p.relative_to(step_dir)} is not valid JSON '
          f'({e})') from None


def describe_failure(step_dir, error: BaseException) -> str:
  """One line naming the step directory and, where the error says, the file."""
  step_dir = epath.Path(step_dir)
  files = re.findall(r'file "([^"]+)"', str(error)) or re.findall(r"'(/[^']+)'", str(error))
  where = f': file {files[-1]}' if files else ''
  reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''
  return f'corrupt checkpoint {step_dir}{where} ({type(error).__name__}: {reason})'


def _read(mgr: ocp.CheckpointManager, step: int, read):
  """``read(mgr)`` (a restore or a metadata read), any failure to read the files
  raised as one CorruptCheckpointError line naming the step and the file."""
  step_dir = epath.Path(mgr.directory) / str(step)
  check_json(step_dir)
  try:
    return read(mgr)
  except Exception as e:  # orbax/tensorstore raise many types for unreadable files
    _drop_closed_loop_reports()
    raise CorruptCheckpointError(describe_failure(step_dir, e)) from None


def _drop_closed_loop_reports() -> None:
  """After a failed read, tensorstore's pending callbacks fire into orbax's closed event
  loop and each reports 'Event loop is closed' as an unraisable error (dozens of
  tracebacks after the one-line error). Drop those reports only; others pass through."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _restore(mgr: ocp.CheckpointManager, step: int, args):
  return _read(mgr, step, lambda m: m.restore(step, args=args))


def clean_tmp_dirs(workdir) -> list[epath.Path]:
  """Remove unfinished saves (``*.orbax-checkpoint-tmp*``) left by a killed run."""
  root = as_path(workdir) / CHECKPOINTS
  removed = [p for p in (root.iterdir() if root.exists() else ()) if TMP_MARKER in p.name]
  for p in removed:
    logging.warning('removing %s: an unfinished checkpoint save of an earlier run', p)
    p.rmtree() if p.is_dir() else p.unlink()
  return removed


def set_aside(workdir, step: int) -> epath.Path:
  """Move an unreadable step out of the manager's way to ``W/corrupt/`` (kept, not
  deleted), so that resuming past it can save that step number again."""
  workdir = as_path(workdir)
  src, folder = workdir / CHECKPOINTS / str(step), workdir / CORRUPT
  folder.mkdir(parents=True, exist_ok=True)
  dst, n = folder / str(step), 1
  while dst.exists():
    dst, n = folder / f'{step}.{n}', n + 1
  src.rename(dst)
  logging.warning('moved the unreadable checkpoint %s to %s (kept for inspection)', src, dst)
  return dst


def restore_train(workdir, step: int, variables, opt_state):
  """(variables, optimizer state, config, meta) of ``step`` for resuming, onto the targets."""
  with _reader(as_path(workdir) / CHECKPOINTS) as mgr:
    out = _restore(mgr, step, ocp.args.Composite(
        variables=ocp.args.StandardRestore(variables),
        opt_state=ocp.args.StandardRestore(opt_state),
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return (out['variables'], out['opt_state'], ml_collections.ConfigDict(out['config']),
          dict(out['meta']))


def has_metrics(workdir, step: int) -> bool:
  with _reader(as_path(workdir) / CHECKPOINTS) as mgr:
    return mgr.metrics(step) is not None


# ------------------------------------------------------------------ finding a checkpoint

def parse_which(which) -> str | int:
  """'best', 'latest' or a step (an int or a string of digits); else a UserError."""
  if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
    return int(which)
  if str(which).isdigit():
    return int(which)
  if which in WHICH:
    return which
  raise UserError(f'--checkpoint={which!r} is invalid; valid: {list(WHICH)} or a step number')


def steps(root) -> list[int]:
  root = epath.Path(root)
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _best_step(root: epath.Path) -> int | None:
  with _reader(root) as mgr:
    return mgr.best_step() if mgr.all_steps() else None


def resolve(path, which: str | int = 'latest') -> tuple[epath.Path, int]:
  """Find (checkpoint directory, step) from a workdir or checkpoint path.

  ``path`` may be a workdir, its ``checkpoints`` (or older ``best``) directory, or
  one step directory in it. ``which`` is 'latest', 'best' (by eval top-1; the
  latest when no step has been evaluated) or a step number.
  """
  which = parse_which(which)
  path = as_path(path)
  if not path.exists():
    raise NotFoundError(f'no such workdir or checkpoint: {path}')
  if path.name.isdigit() and path.parent.name in CHECKPOINT_DIRS:
    return path.parent, int(path.name)
  root = path if path.name in CHECKPOINT_DIRS else path / CHECKPOINTS
  available = steps(root)
  if which == 'best' and root.name == CHECKPOINTS:
    best = _best_step(root) if available else None
    legacy = steps(root.parent / LEGACY_BEST)
    if best is None and legacy:  # an older workdir: its best/ holds the best step
      return root.parent / LEGACY_BEST, max(legacy)
    if best is not None:
      return root, best
  if not available:
    raise NotFoundError(f'no checkpoint found under {path} (looked in {root})')
  if which in WHICH:
    return root, max(available)
  if which not in available:
    raise NotFoundError(f'no checkpoint for step {which} in {root}; available: {available}')
  return root, which


def read_config(path, which: str | int = 'latest') -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, meta, step) stored with a checkpoint, without reading any array."""
  root, step = resolve(path, which)
  with _reader(root) as mgr:
    out = _restore(mgr, step, ocp.args.Composite(config=ocp.args.JsonRestore(),
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
    raise UserError('\n'.join(lines))


def restore_variables(path, which: str | int = 'latest', target: Any = None):
  """(variables, config, meta, step) of a checkpoint, without optimizer state.

  ``target`` (a tree of arrays or ShapeDtypeStructs, e.g. from ``jax.eval_shape``
  of the model's init) is checked against the stored tree first: a checkpoint
  of another model or class count is a clear error, never a silent partial load.
  """
  root, step = resolve(path, which)
  with _reader(root) as mgr:
    stored = _read(mgr, step, lambda m: m.item_metadata(step)['variables'])
    if target is not None:
      check_compatible(target, stored, f'checkpoint {root / str(step)}')
      target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target)
    out = _restore(mgr, step, ocp.args.Composite(
        variables=ocp.args.StandardRestore(target),
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return (out['variables'], ml_collections.ConfigDict(out['config']), dict(out['meta']), step)
