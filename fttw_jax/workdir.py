"""Which run a workdir belongs to, checked before a training run writes anything.

A workdir holds one run: ``W/run.json`` records its id and identity (model, width,
dataset, stage), written when the run starts. Every checkpoint's meta and every
``eval/<step>.json`` carry that id. Before its first write a training run checks
everything already in ``W`` against its config and that record; a workdir with
another run's artefacts (or artefacts of no recorded run: an older layout, a
``fttw_jax.convert`` output, a stale ``best/``) is refused, untouched, with what to
do. ``--overwrite`` discards a workdir's run artefacts and starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fttw_jax import checkpoint
from fttw_jax import config as config_lib
from fttw_jax.errors import CorruptCheckpointError, UserError

RUN_FILE = 'run.json'
EVENTS_GLOB = 'events.out.tfevents.*'
FIX = ('use a fresh --workdir, or pass --overwrite to discard its run artefacts '
       '(checkpoints, eval, event files, config.json, run.json, report, corrupt)')


@dataclasses.dataclass
class Plan:
  """What a training run found in its workdir; nothing has been written yet."""
  workdir: epath.Path
  run: dict                     # run.json's content (new or existing)
  new_run: bool                 # run.json is to be written
  steps: list[int]              # checkpoint steps, newest last
  discard: list[epath.Path]     # --overwrite: artefacts to remove first


def identity(config) -> dict:
  return {k: config.get(k) for k in config_lib.EXPERIMENT_KEYS}


def artefacts(workdir: epath.Path) -> list[epath.Path]:
  """The files and directories a training run writes (estimate.json is an input)."""
  if not workdir.exists():
    return []
  found = [workdir / n for n in (checkpoint.CHECKPOINTS, checkpoint.LEGACY_BEST, 'eval',
                                 'report', checkpoint.CORRUPT, 'config.json', RUN_FILE)
           if (workdir / n).exists()]
  return found + sorted(workdir.glob(EVENTS_GLOB))


def _read_json(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e}); {FIX}') from None


def _refuse(workdir, why: str):
  raise UserError(f'--workdir={workdir} {why}; it was left untouched. To train, {FIX}.')


def _check_unrecorded(workdir: epath.Path, found: list[epath.Path]) -> None:
  """Artefacts without run.json: say what they most likely are."""
  names = ', '.join(p.name for p in found)
  ckpt = workdir / checkpoint.CHECKPOINTS
  if checkpoint.steps(ckpt):
    try:
      _, meta, step = checkpoint.read_config(ckpt, 'latest')
    except UserError:
      meta, step = {}, None
    if 'source' in meta or not (ckpt / str(step) / 'opt_state').exists():
      source = meta.get('source', 'no optimizer state')
      raise UserError(
          f'--workdir={workdir} holds converted weights ({source}), not a training run; '
          f'start from them with --config.init_from={workdir} and a fresh --workdir (it '
          'was left untouched)')
    _refuse(workdir, f'was written without a run record ({RUN_FILE}: an older fttw_jax); '
            'evaluate, report and api.load still read it')
  _refuse(workdir, f'holds artefacts of a run it has no record of ({names})')


def _check_recorded(workdir: epath.Path, run: dict, config) -> list[int]:
  """Everything in the workdir belongs to ``run`` and ``run`` is this config's experiment."""
  mine = run.get('run_id')
  details = config_lib.describe_differences(run, config, stored_label=RUN_FILE)
  if details:
    _refuse(workdir, f'belongs to run {mine} of another experiment ({details})')
  if (workdir / checkpoint.LEGACY_BEST).exists():
    _refuse(workdir, f'holds a best/ directory that run {mine} never wrote (a stale copy)')
  config_json = workdir / 'config.json'
  if config_json.exists():
    details = config_lib.describe_differences(_read_json(config_json), config,
                                              stored_label='config.json')
    if details:
      _refuse(workdir, f'has a config.json of another experiment ({details})')
  steps = checkpoint.steps(workdir / checkpoint.CHECKPOINTS)
  for step in steps:
    try:
      _, meta, _ = checkpoint.read_config(workdir / checkpoint.CHECKPOINTS / str(step))
    except CorruptCheckpointError as e:
      logging.warning('%s', e)   # resuming falls back past it
      continue
    if meta.get('run_id') != mine:
      _refuse(workdir, f'holds checkpoint {step} of run {meta.get("run_id")}, not of its run '
              f'{mine}')
  for path in sorted((workdir / 'eval').glob('*.json')):
    if _read_json(path).get('run_id') != mine:
      _refuse(workdir, f'holds {path.relative_to(workdir)}, which is not an evaluation of its '
              f'run {mine}')
  return steps


def inspect(workdir, config: ml_collections.ConfigDict, overwrite: bool = False) -> Plan:
  """Check ``workdir`` against ``config`` (reads only); raise UserError to refuse."""
  workdir = checkpoint.as_path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f'--workdir={workdir} is a file, not a directory')
  found = artefacts(workdir)
  if overwrite or not found:
    return Plan(workdir, {'run_id': _new_run_id(), **identity(config)}, True, [], found)
  run_file = workdir / RUN_FILE
  if not run_file.exists():
    _check_unrecorded(workdir, found)
  run = _read_json(run_file)
  steps = _check_recorded(workdir, run, config)
  return Plan(workdir, run, False, steps, [])


def _new_run_id() -> str:
  """A fresh id, the same on every process."""
  run_id = uuid.uuid4().hex
  if jax.process_count() > 1:
    raw = np.frombuffer(bytes.fromhex(run_id), np.uint8)
    run_id = bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).hex()
  return run_id


def prepare(plan: Plan, config: ml_collections.ConfigDict, is_main: bool,
            corrupt=()) -> None:
  """The run's first writes: discard (--overwrite), clean unfinished saves, move the
  ``corrupt`` steps resuming passed over out of the manager's way, records."""
  if jax.process_count() > 1:   # every process has checked before anyone writes
    multihost_utils.sync_global_devices('fttw_jax:workdir_checked')
  if is_main:
    for p in plan.discard:
      logging.warning('--overwrite: removing %s', p)
      p.rmtree() if p.is_dir() else p.unlink()
    plan.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.clean_tmp_dirs(plan.workdir)
    for step in corrupt:
      checkpoint.set_aside(plan.workdir, step)
    if plan.new_run:
      (plan.workdir / RUN_FILE).write_text(json.dumps(plan.run, indent=2, sort_keys=True))
    (plan.workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('fttw_jax:workdir_prepared')
