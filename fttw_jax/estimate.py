"""FLOPs estimation before dynamic training, and r for a FLOPs budget (SPEC 8).

The paper's second claim: the cost a threshold ``r`` will give can be read off
the *dense* model before any dynamic training. Run the baseline network over a
sample of the training data with the target masks of ``r`` applied as the
masks (``mask_source='target'``: the masks the heads are trained to predict),
and count the MACs those masks give. The threshold is a traced argument of one
jitted function, so a sweep or a bisection compiles once.

Heads absent from a baseline checkpoint are set to zero: with target masks they
change no activation, and only their (shape-determined) MACs are counted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fttw_jax import checkpoint, data, evaluate, flops, models, parallel
from fttw_jax import config as config_lib

MASS_SWEEP = (-1.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 1.0)
UNIFORM_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BISECTION_STEPS = 14      # [0, 1] narrowed to 6e-5
SAME_NETWORK = ('model', 'width', 'dataset')


@dataclasses.dataclass(frozen=True)
class Estimator:
  """``estimator(threshold)`` -> mean cost over a fixed training sample."""
  means: Callable           # threshold -> {'macs_exact', 'macs_no_heads', 'macs_paper', ...}
  profile: flops.Profile
  criterion: str
  num_examples: int
  source: str
  step: int

  def __call__(self, threshold: float) -> dict:
    m = self.means(float(threshold))
    dense = flops.dense_macs(self.profile)
    return {'threshold': float(threshold),
            'flops_reduction_exact': flops.reduction(m['macs_exact'], dense),
            'flops_reduction_paper': flops.reduction(m['macs_paper'], dense),
            'flops_reduction_exact_no_heads': flops.reduction(m['macs_no_heads'], dense),
            'macs_exact': m['macs_exact'], 'macs_paper': m['macs_paper'],
            'active_ratio': evaluate.ordered_ratios(m['active_ratio'], self.profile)}


def dense_source(config, workdir) -> str:
  """The checkpoint to estimate from: ``config.init_from`` if set, else the workdir."""
  return str(config.init_from or workdir)


def restore_for_targets(source: str, model, image_shape):
  """Variables for the gated ``model`` from ``source``; heads zero if it has none."""
  stored, _, _ = checkpoint.read_config(source, 'latest')
  shapes = evaluate.variable_shapes(model, image_shape)
  backbone, heads = models.split_heads(shapes['params'])
  with_heads = stored.get('stage') == 'ftwt'
  target = {'params': shapes['params'] if with_heads else backbone,
            'batch_stats': shapes['batch_stats']}
  variables, _, _, step = checkpoint.restore_variables(source, 'latest', target=target)
  if not with_heads:
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), heads)
    variables = {'params': models.merge_heads(variables['params'], zeros),
                 'batch_stats': variables['batch_stats']}
  return variables, stored, step


def training_sample(config, num_examples: int) -> list:
  """A fixed prefix of the training split with eval preprocessing (no augmentation)."""
  n = jax.device_count()
  batch = min(config.batch_size, -(-num_examples // n) * n)
  return list(data.create_eval_iterator(
      config.dataset, batch, data_dir=config.data_dir or None,
      split=data.get_info(config.dataset).train_split, max_examples=num_examples))


def with_threshold(model, variables, threshold):
  """The knob of the estimate: the targets' threshold (r or q), applied as the masks."""
  return model.clone(gate=dataclasses.replace(model.gate, threshold=threshold)), variables


def make_cost_fn(model, prof: flops.Profile, dataset: str, knob: Callable = with_threshold):
  """jit(variables, images, weight, value) -> weighted per-sample cost sums.

  ``knob(model, variables, value) -> (model, variables)`` sets what is varied:
  by default the target threshold (the criteria accept a traced r or q); the
  budget's calibration varies a head-logit offset instead. The value is traced,
  so every value reuses one compiled function.
  """

  def cost(variables, images, weight, value):
    gated, variables = knob(model, variables, value)
    _, aux = gated.apply(variables, data.normalize(images, dataset), train=False)
    gates = aux['gates']
    stats = {'macs_exact': flops.exact_macs(prof, gates),
             'macs_no_heads': flops.exact_macs(prof, gates, include_heads=False),
             'macs_paper': flops.paper_macs(prof, gates),
             'active_ratio': {k: jnp.mean(g['mask'], axis=-1) for k, g in gates.items()}}
    return jax.tree.map(lambda v: jnp.sum(v * weight), stats)

  return jax.jit(cost)


def sample_means(cost: Callable, variables, batches: list, mesh) -> tuple[Callable, int]:
  """(value -> mean cost over ``batches``, number of real examples) for a ``make_cost_fn``
  function; ``variables`` and ``batches`` already placed on ``mesh``."""
  count = float(sum(np.sum(jax.device_get(b['mask'])) for b in batches))
  scalar = NamedSharding(mesh, P())

  def means(value: float) -> dict:
    v = jax.device_put(jnp.asarray(value, jnp.float32), scalar)
    sums = None
    for b in batches:
      s = cost(variables, b['image'], b['mask'], v)
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    return jax.tree.map(lambda x: float(x) / count, jax.device_get(sums))

  return means, int(count)


def build(config, workdir, num_examples: int = 512) -> Estimator:
  """Restore the dense checkpoint and the sample once; return the estimator."""
  config_lib.validate(config)
  if num_examples < 1:
    raise ValueError(f'num_examples={num_examples} must be >= 1')
  info = data.get_info(config.dataset)
  image_shape = (info.image_size, info.image_size, 3)
  source = dense_source(config, workdir)
  model = config_lib.model_from_config(config, info.num_classes, mask_source='target')
  stored, _, _ = checkpoint.read_config(source, 'latest')
  evaluate.check_same_experiment(stored, config, source, keys=SAME_NETWORK, forward_keys=(),
                                head_keys=())
  variables, _, step = restore_for_targets(source, model, image_shape)
  prof = flops.profile(model, (1, *image_shape))
  mesh = parallel.make_mesh()
  variables = parallel.replicate(variables, mesh)
  batches = [data.shard_batch(b, mesh) for b in training_sample(config, num_examples)]
  means, count = sample_means(make_cost_fn(model, prof, config.dataset), variables, batches,
                              mesh)
  return Estimator(means, prof, config.gate.criterion, count, source, step)


def search(estimator: Estimator, target: float, key: str = 'flops_reduction_exact') -> dict:
  """The threshold whose reduction (``key``) meets ``target`` while pruning least.

  Mass r: larger r keeps more channels, so reduction falls as r grows; the
  answer is the largest r in [0, 1] with reduction >= target. Uniform q: the
  smallest such q. Bisection, as the cost is monotone in the threshold.
  """
  if not target < 1.0:
    raise ValueError(f'target_reduction={target} must be < 1')
  # `prune` end: most reduction; `keep` end: least.
  prune, keep = (0.0, 1.0) if estimator.criterion == 'mass' else (1.0, 0.0)
  trace = []

  def at(t):
    point = estimator(t)
    trace.append({'threshold': t, key: point[key]})
    return point

  best = at(keep)
  if best[key] < target:
    best = at(prune)
    if best[key] >= target:
      for _ in range(BISECTION_STEPS):
        mid = 0.5 * (prune + keep)
        point = at(mid)
        if point[key] >= target:
          prune, best = mid, point
        else:
          keep = mid
  return {'target_reduction': target, 'accounting': key, 'threshold': best['threshold'],
          'achieved': best, 'reachable': best[key] >= target, 'evaluations': trace}


def run(config, workdir, target_reduction: float | None = None,
        num_examples: int = 512) -> dict:
  """Estimate the FLOPs of the configured threshold (and a sweep); optionally find
  the threshold for ``target_reduction`` (default: the config's budget, in its
  accounting). Writes ``W/estimate.json`` and prints it."""
  est = build(config, workdir, num_examples)
  key = f'flops_reduction_{config.flops_accounting}'
  if target_reduction is None and config_lib.budget_target(config) is not None:
    target_reduction = config_lib.budget_target(config)
    key = f'flops_reduction_{config.budget.accounting}'
  sweep = MASS_SWEEP if est.criterion == 'mass' else UNIFORM_SWEEP
  thresholds = sorted(set(sweep) | {float(config.gate.threshold)})
  result = {
      'source': est.source, 'source_step': est.step, 'model': config.model,
      'width': config.width, 'dataset': config.dataset, 'criterion': est.criterion,
      'num_examples': est.num_examples, 'split': data.get_info(config.dataset).train_split,
      'dense_macs': flops.dense_macs(est.profile), 'head_macs': est.profile.head_macs,
      'accounting': key,
      'configured': est(config.gate.threshold),
      'sweep': [est(t) for t in thresholds],
  }
  if target_reduction is not None:
    result['search'] = search(est, float(target_reduction), key)
  if jax.process_index() == 0:
    path = epath.Path(checkpoint.as_path(workdir)) / 'estimate.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(format_result(result))
    print(f'\nwritten: {path}')
  return result


def _pct(v) -> str:
  return f'{100 * v:.2f} %'


def format_result(result: dict) -> str:
  """Sweep table and, if searched, the threshold meeting the budget."""
  name = 'r' if result['criterion'] == 'mass' else 'q'
  lines = [f"FLOPs estimated before training: {result['model']} x{result['width']} on "
           f"{result['dataset']}, {result['num_examples']} {result['split']} examples, "
           f"backbone of {result['source']} (step {result['source_step']})", '',
           f'{name:>6}  {"exact":>9}  {"paper":>9}  {"exact, no heads":>15}']
  for p in result['sweep']:
    cells = [_pct(p[f'flops_reduction_{k}']) for k in ('exact', 'paper', 'exact_no_heads')]
    lines.append(f"{p['threshold']:6.3f}  {cells[0]:>9}  {cells[1]:>9}  {cells[2]:>15}")
  c = result['configured']
  lines += ['', f"configured {name}={c['threshold']}: reduction exact "
                f"{_pct(c['flops_reduction_exact'])}, paper {_pct(c['flops_reduction_paper'])}"]
  if 'search' in result:
    s = result['search']
    a = s['achieved']
    verdict = 'meets' if s['reachable'] else 'CANNOT meet (most pruning shown)'
    lines.append(f"target {s['accounting']} >= {_pct(s['target_reduction'])}: "
                 f"{name}={s['threshold']:.5f} {verdict} it with exact "
                 f"{_pct(a['flops_reduction_exact'])}, paper {_pct(a['flops_reduction_paper'])} "
                 f"({len(s['evaluations'])} evaluations)")
  return '\n'.join(lines)
