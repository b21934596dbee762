"""Evaluate a stored checkpoint: accuracy, FLOPs reduction, per-layer stats (issue 5).

``evaluate_checkpoint`` restores variables only (no optimizer state) onto the
shapes of the model its config describes, so a checkpoint of another model is
a clear error rather than a partial load, runs the sharded eval step
(``fttw_jax.evaluation``) over the whole test split, writes ``W/eval/<step>.json`` and prints
a table. ``restore`` is the shared loading step of evaluation, the research
API (``fttw_jax.api``) and the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from fttw_jax import checkpoint, data, evaluation, flops, parallel
from fttw_jax import config as config_lib
from fttw_jax.errors import UserError

EXPERIMENT_KEYS = config_lib.EXPERIMENT_KEYS
# Fields that change the forward pass without changing any parameter shape. The
# fidelity fields among them compare resolved (``config.fidelity_option``); the others
# (shortcut_grad, bn_running_var, ...) and conv_impl change training or rounding only.
FORWARD_KEYS = ('dtype', 'gate.mode', 'gate.criterion', 'gate.threshold',
                'gate.gt_after_block', 'shortcut_pad', 'gate.depthwise_rule')
# What a trained head sees: under another value its weights meet inputs they were never
# trained on and the masks are another model's, so a difference is an error, not a note.
HEAD_INPUT_KEYS = ('gate.pool', 'gate.softmax', 'gate.head_norm')


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint loaded onto the model its config builds (eval mode, no BN axis)."""
  model: Any
  variables: dict
  config: ml_collections.ConfigDict
  meta: dict
  step: int
  path: epath.Path          # the step directory
  workdir: epath.Path       # the run directory holding checkpoints/ and best/
  profile: flops.Profile
  stored_config: ml_collections.ConfigDict  # as saved with the checkpoint

  @property
  def gated(self) -> bool:
    return self.config.stage == 'ftwt'


def _forward_value(config, dotted: str):
  """The value a forward key has in ``config`` (a fidelity field resolved by its profile)."""
  if dotted in config_lib.FIDELITY_FIELDS:
    return config_lib.fidelity_option(config, dotted)
  return config_lib.lookup(config, dotted)


def _differences(stored, config, keys):
  """(key, stored value, --config value) for each of ``keys`` the two set differently;
  a key the stored config lacks (saved before it existed) is not a difference."""
  pairs = ((k, _forward_value(stored, k), _forward_value(config, k)) for k in keys)
  return [(k, a, b) for k, a, b in pairs if a is not None and a != b]


def check_same_experiment(stored, config, where, keys=EXPERIMENT_KEYS,
                          forward_keys=FORWARD_KEYS, head_keys=HEAD_INPUT_KEYS) -> None:
  """The user's --config must describe the network that was trained.

  Model, width, dataset and stage decide the parameter tree, and (for an FTWT run)
  the head input options decide what the trained heads compute, so a difference
  is an error; other forward options (threshold, dtype, ...) are honoured but
  logged, since they change what is measured.
  """
  details = config_lib.describe_differences(stored, config, keys, label='--config')
  if not details and stored.get('stage') == 'ftwt':
    details = ', '.join(f'{k}: checkpoint {a!r} vs --config {b!r}'
                        for k, a, b in _differences(stored, config, head_keys))
  if details:
    raise UserError(
        f'--config disagrees with the config stored with the checkpoint in {where} '
        f'({details}). Pass the config the run was trained with (it is saved in '
        f'{where}/config.json).')
  for key, a, b in _differences(stored, config, forward_keys):
    logging.warning('evaluating with --config %s=%r; the checkpoint was trained with %r',
                    key, b, a)


def variable_shapes(model, image_shape) -> dict:
  """{'params', 'batch_stats'} as ShapeDtypeStructs: restore targets, no compile."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False), x)
  return {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}


def restore(path, which: str | int = 'best', config=None) -> Restored:
  """Load a checkpoint of a workdir (or a checkpoint directory) for evaluation.

  ``config`` (optional) is checked against the stored one and then used to
  build the model; by default the stored config is used.
  """
  root, step = checkpoint.resolve(path, which)
  stored, meta, _ = checkpoint.read_config(root / str(step))
  workdir = root.parent
  if config is None:
    config = stored
  else:
    check_same_experiment(stored, config, workdir)
  config_lib.validate(config)
  num_classes = int(meta.get('num_classes') or data.get_info(config.dataset).num_classes)
  model = config_lib.model_from_config(config, num_classes)
  size = data.get_info(config.dataset).image_size
  target = variable_shapes(model, (size, size, 3))
  variables, _, meta, step = checkpoint.restore_variables(root / str(step), target=target)
  prof = flops.profile(model, (1, size, size, 3))
  return Restored(model, variables, config, meta, step, root / str(step), workdir, prof, stored)


def evaluate_restored(r: Restored, max_examples: int | None = None) -> dict:
  """The eval dict of ``evaluation.summarize`` over the test split (or its prefix)."""
  mesh = parallel.make_mesh()
  config = r.config
  eval_fn = evaluation.make_eval_step(mesh, model=r.model, config=config, prof=r.profile)
  batches = data.create_eval_iterator(config.dataset, config.batch_size,
                                      data_dir=config.data_dir or None,
                                      max_examples=max_examples)
  result = evaluation.eval_pass(eval_fn, parallel.replicate(r.variables, mesh), batches, mesh,
                               r.profile, r.gated)
  # Epochs as training counted them (its batch size, not the eval one).
  steps_per_epoch = data.steps_per_epoch(config.dataset, r.stored_config.batch_size)
  result.update(step=r.step, epoch=r.step / max(steps_per_epoch, 1), checkpoint=str(r.path),
                model=config.model, width=config.width, dataset=config.dataset,
                num_classes=int(r.meta.get('num_classes', 0)), stage=config.stage,
                run_id=r.meta.get('run_id'))
  if r.gated:
    result['active_ratio'] = ordered_ratios(result['active_ratio'], r.profile)
    result.update(evaluation.budget_fields(config, r.meta.get('budget')))
  return result


def ordered_ratios(ratios: dict, prof: flops.Profile) -> dict:
  """Per-layer values in execution order, as tables and plots show them."""
  order = [l.name for l in prof.masked if l.name in ratios]
  return {name: ratios[name] for name in order}


def evaluate_checkpoint(config, workdir, which: str | int = 'best', *,
                        max_examples: int | None = None, quiet: bool = False) -> dict:
  """Restore ``workdir``'s checkpoint, evaluate it, write ``eval/<step>.json``, print a table.

  ``config`` may be None (use the stored one); ``which`` is 'best', 'latest' or
  a step (an int or a string of digits, as the --checkpoint flag gives it).
  """
  r = restore(workdir, checkpoint.parse_which(which), config)
  result = evaluate_restored(r, max_examples)
  if jax.process_index() == 0:
    if not quiet:
      print(format_table(result, r.profile))
    try:
      path = evaluation.write_eval_json(r.workdir, r.step, result)
    except OSError as e:  # a read-only workdir: the table above is the result
      print(f'\nthe eval JSON could not be written ({e}); the table above is the result')
    else:
      if not quiet:
        print(f'\nwritten: {path}')
  return result


def _fmt_macs(v) -> str:
  return f'{v / 1e6:,.3f} M' if v >= 1e5 else f'{v:,.0f}'


def format_table(result: dict, prof: flops.Profile | None = None) -> str:
  """Overall numbers, then per-layer active ratio with a text bar."""
  pct = lambda v: f'{100 * v:.2f} %'
  rows = [
      ('checkpoint', f"{result.get('checkpoint', '?')} (step {result.get('step', '?')})"),
      ('model', f"{result.get('model')} x{result.get('width')} on {result.get('dataset')}, "
                f"stage {result.get('stage')}"),
      ('examples', f"{result['num_examples']:,}"),
      ('top-1', pct(result['top1'])),
      ('top-5', pct(result['top5'])),
      ('loss (CE)', f"{result['ce_loss']:.4f}"),
  ]
  if 'mask_accuracy' in result:
    rows += [('mask loss', f"{result['mask_loss']:.4f}"),
             ('mask accuracy', pct(result['mask_accuracy']))]
  dyn = result.get('dynamism')
  if dyn:
    for field, label in (('mask', 'masks'), ('target', 'targets')):
      o = dyn[field]['overall']
      rows.append((f'{label}: dynamic / on / off',
                   f"{pct(o['dynamic'])} / {pct(o['static_on'])} / {pct(o['static_off'])} "
                   f"of channels (Hamming {pct(o['hamming'])}, kept std {o['kept_std']:.2f})"))
  rows += [
      ('dense MACs', _fmt_macs(result['dense_macs'])),
      ('mean MACs exact', _fmt_macs(result['macs_exact'])),
      ('mean MACs paper', _fmt_macs(result['macs_paper'])),
      ('FLOPs reduction exact', pct(result['flops_reduction_exact'])),
      ('FLOPs reduction paper', pct(result['flops_reduction_paper'])),
      ('params', f"{result['params']:,}"),
      ('head MACs / params', f"{result['head_macs']:,} / {result['head_params']:,}"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = [f'{k.ljust(width)}  {v}' for k, v in rows]
  ratios = result.get('active_ratio') or {}
  if ratios:
    if prof is not None:
      ratios = ordered_ratios(ratios, prof)
    name_w = max(len(n) for n in ratios)
    layers = dyn['mask']['layers'] if dyn else {}
    targets = dyn['target']['layers'] if dyn else {}
    header = '  on    off   dyn   std  | target dyn' if layers else ''
    lines += ['', f"{'layer'.ljust(name_w)}  active  {' ' * 20}{header}",
              '-' * (name_w + 32 + len(header))]
    for name, v in ratios.items():
      line = f'{name.ljust(name_w)}  {v:6.3f}  ' + ('#' * int(round(20 * v))).ljust(20)
      if name in layers:
        d = layers[name]
        line += (f"  {d['static_on']:.2f}  {d['static_off']:.2f}  {d['dynamic']:.2f}  "
                 f"{d['kept_std']:4.2f} | {targets[name]['dynamic']:.2f}")
      lines.append(line.rstrip())
    if layers:
      lines.append('(on / off / dyn: fraction of the layer\'s channels on for every sample, '
                   'off for every sample, input-dependent; std: of the per-sample kept count)')
  return '\n'.join(lines)
