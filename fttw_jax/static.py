"""Static pruning at the dynamic model's cost: the control a dynamic method must beat (issue 19).

A dynamic model earns its heads only if it beats the network that keeps, in every
layer, one fixed set of channels for all inputs at the same mean cost. From the
dynamic model's own masks over a split (``ftwt.dynamism_sums``: how often each
channel is on), ``match_cost`` keeps per layer the channels most often on, with
per-layer widths proportional to the dynamic model's mean kept counts, scaled
(bisection) to the largest widths whose exact cost does not exceed the dynamic
model's. The static network has no heads, so its cost excludes them while the
dynamic one's includes them: the same budget.

Reusable pieces (no I/O): ``channel_frequency``, ``select_channels``,
``scaled_widths``, ``match_cost`` and ``fixed_mask_params``, which sets every
head to a constant (kernel 0, bias +-1) so the unchanged gated model applies the
fixed mask to every input. A narrower dense network can be built from the kept
channel indices instead (``Selection.kept_indices``). ``run`` evaluates a
checkpoint's static control and writes ``W/static.json``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Mapping

import flax
import jax
import numpy as np
from etils import epath

from fttw_jax import data, evaluate, evaluation, flops, ftwt, parallel
from fttw_jax.errors import UserError
from fttw_jax.models.gating import HEAD_NAME

BISECTION_STEPS = 20
COST_EXAMPLES = 512       # examples the cost search runs (the cost barely depends on inputs)


@dataclasses.dataclass(frozen=True)
class Selection:
  """Per masked layer, the fixed 0/1 mask (C,) a static network keeps."""
  keep: dict                # {layer: (C,) bool}
  macs: float               # mean exact MACs per sample, heads excluded
  scale: float              # widths = scale * the dynamic model's mean kept counts

  @property
  def widths(self) -> dict:
    return {k: int(v.sum()) for k, v in self.keep.items()}

  @property
  def kept_indices(self) -> dict:
    """{layer: sorted kept channel indices}: what a physically narrower conv keeps."""
    return {k: np.flatnonzero(v).tolist() for k, v in self.keep.items()}


def channel_frequency(mask_sums: Mapping[str, Mapping]) -> dict:
  """{layer: (C,) fraction of samples with the channel on} from the 'mask' (or
  'target') part of ``ftwt.dynamism_sums`` added over a split."""
  return {k: np.asarray(s['on'], np.float64) / max(float(s['count']), 1.0)
          for k, s in mask_sums.items()}


def mean_kept(mask_sums: Mapping[str, Mapping]) -> dict:
  """{layer: mean per-sample kept count} from the same sums."""
  return {k: float(s['kept']) / max(float(s['count']), 1.0) for k, s in mask_sums.items()}


def select_channels(frequency: Mapping[str, np.ndarray], widths: Mapping[str, int]) -> dict:
  """{layer: (C,) bool} keeping the ``widths[layer]`` channels most often on (ties:
  lower index first)."""
  keep = {}
  for name, f in frequency.items():
    f = np.asarray(f)
    order = np.argsort(-f, kind='stable')
    k = int(widths[name])
    if not 0 <= k <= f.size:
      raise ValueError(f'width {k} for layer {name!r} is outside [0, {f.size}]')
    mask = np.zeros(f.size, bool)
    mask[order[:k]] = True
    keep[name] = mask
  return keep


def scaled_widths(kept: Mapping[str, float], channels: Mapping[str, int], scale: float) -> dict:
  """round(scale * mean kept count) per layer, at least 1 where the dynamic model keeps
  anything, at most the layer's channels."""
  return {k: int(np.clip(max(round(scale * m), 1 if m > 0 else 0), 0, channels[k]))
          for k, m in kept.items()}


def match_cost(frequency: Mapping[str, np.ndarray], kept: Mapping[str, float],
               cost_fn: Callable[[dict], float], target_macs: float,
               steps: int = BISECTION_STEPS) -> Selection:
  """The largest scale of the dynamic model's per-layer widths whose static mask costs
  at most ``target_macs`` (``cost_fn(keep) -> mean MACs``, heads excluded).

  The kept sets are nested in the scale, so the cost grows with it (up to the rare
  channel whose input turns all-zero), and bisection over the scale in
  [0, max C / kept] finds it; ``steps`` halvings, ``cost_fn`` called once
  per distinct set of widths.
  """
  channels = {k: np.asarray(f).size for k, f in frequency.items()}
  hi = max([channels[k] / m for k, m in kept.items() if m > 0], default=1.0)
  costs = {}

  def at(scale):
    widths = scaled_widths(kept, channels, scale)
    keep = select_channels(frequency, widths)
    key = tuple(sorted(widths.items()))
    if key not in costs:
      costs[key] = float(cost_fn(keep))
    return Selection(keep, costs[key], scale)

  best = at(0.0)
  if best.macs > target_macs:
    return best  # even the narrowest static network costs more: report it as is
  if at(hi).macs <= target_macs:
    return at(hi)
  lo = 0.0
  for _ in range(steps):
    mid = 0.5 * (lo + hi)
    sel = at(mid)
    if sel.macs <= target_macs:
      lo, best = mid, sel
    else:
      hi = mid
  return best


def fixed_mask_params(params, keep: Mapping[str, np.ndarray]):
  """``params`` with every head of a layer in ``keep`` constant: kernel 0, bias +1 for a
  kept channel and -1 for a dropped one, so the gated model (mask = 1[logits > 0])
  applies ``keep`` to every input. Layers are '/'-joined module paths."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  out = dict(flat)
  for path, v in flat.items():
    if HEAD_NAME not in path:
      continue
    layer = '/'.join(path[:path.index(HEAD_NAME)])
    if layer not in keep:
      continue
    if path[-1] == 'kernel':
      out[path] = np.zeros_like(v)
    else:
      out[path] = np.where(keep[layer], 1.0, -1.0).astype(v.dtype)
  return flax.traverse_util.unflatten_dict(out)


def run(restored: evaluate.Restored, max_examples: int | None = None,
        cost_examples: int = COST_EXAMPLES) -> dict:
  """Dynamic model vs its static control on the test split (or its first
  ``max_examples``): top-1 and exact / paper FLOPs reduction of both.

  The channel frequencies and the target cost are the dynamic model's on that split
  (no labels are used to choose channels); the cost search runs its first
  ``cost_examples`` examples, the final evaluation the whole of it.
  """
  if not restored.gated:
    raise UserError('the static control needs an FTWT (gated) checkpoint; '
                     f'{restored.workdir} holds a {restored.config.stage!r} run')
  cfg, prof = restored.config, restored.profile
  mesh = parallel.make_mesh()
  eval_fn = evaluation.make_eval_step(mesh, model=restored.model, config=cfg, prof=prof)
  dense = flops.dense_macs(prof)

  def batches(limit):
    return data.create_eval_iterator(cfg.dataset, cfg.batch_size, data_dir=cfg.data_dir or None,
                                     max_examples=limit)

  def measure(variables, limit):
    return evaluation.accumulate(eval_fn, parallel.replicate(variables, mesh), batches(limit), mesh)

  dyn_means, dyn_sums, count = measure(restored.variables, max_examples)
  frequency = channel_frequency(dyn_sums['mask'])
  kept = mean_kept(dyn_sums['mask'])
  with_keep = lambda keep: {'params': fixed_mask_params(restored.variables['params'], keep),
                            'batch_stats': restored.variables['batch_stats']}
  search_limit = cost_examples if cost_examples < count else max_examples
  cost_fn = lambda keep: measure(with_keep(keep), search_limit)[0]['macs_exact'] - prof.head_macs
  selection = match_cost(frequency, kept, cost_fn, dyn_means['macs_exact'])
  st_means, _, _ = measure(with_keep(selection.keep), max_examples)
  static_macs = st_means['macs_exact'] - prof.head_macs
  layers = [l.name for l in prof.masked]
  return {
      'step': restored.step, 'checkpoint': str(restored.path), 'num_examples': count,
      'dense_macs': dense,
      'dynamic': {'top1': dyn_means['top1'], 'macs_exact': dyn_means['macs_exact'],
                  'flops_reduction_exact': flops.reduction(dyn_means['macs_exact'], dense),
                  'flops_reduction_paper': flops.reduction(dyn_means['macs_paper'], dense),
                  'dynamic_share': ftwt.dynamism(dyn_sums)['mask']['overall']['dynamic']},
      'static': {'top1': st_means['top1'], 'macs_exact': static_macs,
                 'flops_reduction_exact': flops.reduction(static_macs, dense),
                 'flops_reduction_paper': flops.reduction(st_means['macs_paper'], dense),
                 'scale': selection.scale,
                 'widths': {k: selection.widths[k] for k in layers},
                 'channels': {k: int(frequency[k].size) for k in layers},
                 'kept_indices': {k: selection.kept_indices[k] for k in layers}},
  }


def write(workdir, result: dict) -> epath.Path:
  path = epath.Path(workdir) / 'static.json'
  path.write_text(json.dumps(result, indent=2))
  return path


def read(workdir, step: int | None = None) -> dict | None:
  """``W/static.json`` when it exists (and is of ``step``, if given), else None."""
  path = epath.Path(workdir) / 'static.json'
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  return result if step is None or result.get('step') == step else None


def format_result(result: dict) -> str:
  pct = lambda v: f'{100 * v:.2f} %'
  d, s = result['dynamic'], result['static']
  rows = [('', 'top-1', 'reduction exact', 'reduction paper', 'mean MACs exact'),
          ('dynamic (FTWT heads)', pct(d['top1']), pct(d['flops_reduction_exact']),
           pct(d['flops_reduction_paper']), f"{d['macs_exact']:,.0f}"),
          ('static, same cost', pct(s['top1']), pct(s['flops_reduction_exact']),
           pct(s['flops_reduction_paper']), f"{s['macs_exact']:,.0f}")]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  lines += ['', f"{result['num_examples']} test examples, step {result['step']}; the dynamic "
            f"masks are input-dependent in {pct(d['dynamic_share'])} of the channels.",
            'static widths: ' + ', '.join(f'{k} {v}/{s["channels"][k]}'
                                          for k, v in s['widths'].items())]
  return '\n'.join(lines)


def run_checkpoint(config, workdir, which: str | int = 'best',
                   max_examples: int | None = None, quiet: bool = False) -> dict:
  """``--mode=static``: restore, run, write ``W/static.json``, print the comparison."""
  which = int(which) if str(which).isdigit() else which
  restored = evaluate.restore(workdir, which, config)
  result = run(restored, max_examples)
  if jax.process_index() == 0:
    path = write(restored.workdir, result)
    if not quiet:
      print(format_result(result))
      print(f'\nwritten: {path}')
  return result
