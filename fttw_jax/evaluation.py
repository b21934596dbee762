"""The sharded evaluation pass and the eval JSON, shared by training and ``evaluate``.

``per_example_stats`` lists the per-example values every metric is a mean of (the
train step averages them too). The eval step (``make_eval_step``, jitted over the
mesh) returns their sums over the global batch, psum-reduced on device;
``accumulate`` adds those up over a split on device and reads them once at the end;
``summarize`` turns the means into the eval JSON that ``write_eval_json`` writes to
``W/eval/<step>.json``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import PartitionSpec as P

from fttw_jax import data, flops, ftwt, models
from fttw_jax import config as config_lib
from fttw_jax.parallel import AXIS


def label_rank(logits, labels):
  """Position of each label in a stable descending sort of its logits (0 = top-1),
  by counting instead of sorting: larger logits, plus equal ones at lower indices."""
  own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  ahead = (logits > own) | ((logits == own) & (jnp.arange(logits.shape[-1]) < labels[:, None]))
  return jnp.sum(ahead, axis=-1)


def per_example_stats(logits, labels, gates, prof):
  """Per-example values every metric is a (weighted) mean of."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  rank = label_rank(logits, labels)
  stats = {
      'ce_loss': ce,
      'top1': (rank == 0).astype(jnp.float32),
      'top5': (rank < 5).astype(jnp.float32),
  }
  if gates:
    stats['mask_loss'] = ftwt.per_sample_mask_loss(gates)
    stats.update(ftwt.per_sample_mask_stats(gates))
    stats['macs_exact'] = flops.exact_macs(prof, gates)
    stats['macs_paper'] = flops.paper_macs(prof, gates)
  return stats


def eval_step(variables, batch, *, model, config, prof):
  """Sums over the global batch (psum over the mesh), padding weighted out: of every
  per-example statistic, of the examples (``count``) and the mask dynamism sums
  (``ftwt.dynamism_sums``). Nothing per example leaves the devices."""
  images = data.normalize(batch['image'], config.dataset)
  logits, aux = model.apply(variables, images, train=False)
  gates = aux['gates']
  weight = batch['mask'].astype(jnp.float32)
  stats = per_example_stats(logits, batch['label'], gates, prof)
  return jax.lax.psum({'stats': jax.tree.map(lambda v: jnp.sum(v * weight), stats),
                       'count': jnp.sum(weight),
                       'dynamism': ftwt.dynamism_sums(gates, weight)}, AXIS)


def make_eval_step(mesh, **kwargs):
  step = functools.partial(eval_step, **kwargs)
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()),
                 compiler_options=models.compiler_options(kwargs['model'].conv_impl))


def eval_pass(eval_fn, variables, batches, mesh, prof, gated: bool) -> dict:
  """One pass over ``batches``: weighted means of every per-example statistic."""
  means, dyn_sums, count = accumulate(eval_fn, variables, batches, mesh)
  return summarize(means, prof, gated, count, ftwt.dynamism(dyn_sums) if gated else None)


@jax.jit
def _add(total, sums):
  """Compensated (Neumaier) addition of a tree of float32 sums into running (sum, error)
  pairs: over a whole split the totals stay within about one float32 rounding."""
  def add(acc, x):
    s, c = acc
    t = s + x
    return t, c + jnp.where(jnp.abs(s) >= jnp.abs(x), (s - t) + x, (x - t) + s)
  return jax.tree.map(add, total, sums, is_leaf=lambda v: isinstance(v, tuple))


def accumulate(eval_fn, variables, batches, mesh) -> tuple[dict, dict, int]:
  """(means of the per-example statistics, dynamism sums, example count) over ``batches``:
  the eval step's sums add up on device; the host reads them once, at the end."""
  total = None
  for batch in batches:
    sums = eval_fn(variables, data.shard_batch(batch, mesh))
    if total is None:
      total = jax.tree.map(lambda v: (v, jnp.zeros_like(v)), sums)
    else:
      total = _add(total, sums)
  if total is None:
    raise ValueError('the evaluation split yielded no batch')
  f64 = lambda v: np.asarray(v, np.float64)
  host = jax.tree.map(lambda pair: f64(pair[0]) + f64(pair[1]), jax.device_get(total),
                      is_leaf=lambda v: isinstance(v, tuple))
  count = float(host['count'])
  means = jax.tree.map(lambda v: float(v / max(count, 1.0)), host['stats'])
  return means, host['dynamism'], int(count)


def summarize(means: dict, prof: flops.Profile, gated: bool, num_examples: int,
              dynamism: dict | None = None) -> dict:
  """The eval JSON: accuracy, losses, FLOPs (exact and paper), per-layer stats, and
  (``ftwt.dynamism``) how input-dependent the masks and targets are."""
  dense = flops.dense_macs(prof)
  out = {'num_examples': num_examples, 'top1': means['top1'], 'top5': means['top5'],
         'ce_loss': means['ce_loss'], 'dense_macs': dense, 'params': prof.params,
         'head_macs': prof.head_macs if gated else 0,
         'head_params': prof.head_params if gated else 0}
  if gated:
    out.update(
        loss=means['ce_loss'] + means['mask_loss'], mask_loss=means['mask_loss'],
        mask_accuracy=means['mask_accuracy'], active_ratio=means['active_ratio'],
        macs_exact=means['macs_exact'], macs_paper=means['macs_paper'],
        flops_reduction_exact=flops.reduction(means['macs_exact'], dense),
        flops_reduction_paper=flops.reduction(means['macs_paper'], dense))
    if dynamism is not None:
      out.update(dynamism=dynamism, dynamic_share=dynamism['mask']['overall']['dynamic'],
                 target_dynamic_share=dynamism['target']['overall']['dynamic'])
  else:
    out.update(loss=means['ce_loss'], macs_exact=float(dense), macs_paper=float(dense),
               flops_reduction_exact=0.0, flops_reduction_paper=0.0)
  return out


def budget_fields(config, budget_meta: dict | None) -> dict:
  """Per-evaluation budget fields (eval JSON and TensorBoard) of a gated model
  (``fttw_jax.budget``: its threshold, head-logit offset and target)."""
  out = {'threshold': float(config.gate.threshold), 'logit_offset': 0.0}
  if budget_meta:
    out.update(threshold=budget_meta['threshold'], logit_offset=budget_meta['offset'])
  target = (budget_meta or {}).get('target_reduction', config_lib.budget_target(config))
  if target is not None:
    out.update(target_reduction=float(target),
               budget_accounting=(budget_meta or {}).get('accounting',
                                                         config.budget.accounting))
  return out


def strict_json(result: dict) -> dict:
  """``result`` with every non-finite number replaced by None (strict JSON has no
  NaN/Infinity) and, if any was, 'non_finite': the dotted keys that were."""
  bad = []

  def clean(value, key):
    if isinstance(value, dict):
      return {k: clean(v, f'{key}.{k}' if key else k) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
      bad.append(key)
      return None
    return value

  out = clean(result, '')
  if bad:
    out['non_finite'] = bad
  return out


def write_eval_json(workdir, step: int, result: dict) -> epath.Path:
  path = epath.Path(workdir) / 'eval' / f'{step}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(strict_json(result), indent=2, sort_keys=True, allow_nan=False))
  return path
