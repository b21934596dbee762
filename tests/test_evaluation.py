"""The eval pass (fttw_jax.evaluation): on-device sums over the mesh, the same means on
any device count, padding weighted out, and nothing per example returned to the host."""

import jax
import numpy as np
import pytest

from fttw_jax import config as config_lib
from fttw_jax import data, evaluate, evaluation, flops, parallel
from helpers import random_variables


def _setup():
  cfg = config_lib.base_config()
  cfg.model, cfg.width, cfg.dataset, cfg.stage = 'resnet8', 0.25, 'digits', 'ftwt'
  model = config_lib.model_from_config(cfg, 10)
  variables = jax.device_get(random_variables(evaluate.variable_shapes(model, (32, 32, 3))))
  rng = np.random.default_rng(0)
  batches = []
  for real in (8, 8, 5):   # the last batch padded with 3 examples of weight 0
    batches.append({'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                    'label': rng.integers(0, 10, (8,), dtype=np.int32),
                    'mask': (np.arange(8) < real).astype(np.float32)})
  return cfg, model, variables, batches


@pytest.mark.parametrize('devices', [1, 4])
def test_accumulate_equals_the_mean_over_real_examples(devices):
  cfg, model, variables, batches = _setup()
  prof = flops.profile(model, (1, 32, 32, 3))
  mesh = parallel.make_mesh(jax.devices()[:devices])
  eval_fn = evaluation.make_eval_step(mesh, model=model, config=cfg, prof=prof)
  out = eval_fn(parallel.replicate(variables, mesh), data.shard_batch(batches[0], mesh))
  assert all(np.ndim(v) <= 1 and v.sharding.is_fully_replicated for v in jax.tree.leaves(out))
  means, dyn, count = evaluation.accumulate(eval_fn, parallel.replicate(variables, mesh),
                                            batches, mesh)
  # direct: per-example statistics of the real examples only, averaged in float64
  rows = []
  for b in batches:
    logits, aux = model.apply(variables, data.normalize(b['image'], cfg.dataset), train=False)
    stats = jax.device_get(evaluation.per_example_stats(logits, b['label'], aux['gates'], prof))
    keep = b['mask'] > 0
    rows.append(jax.tree.map(lambda v: np.asarray(v, np.float64)[keep], stats))
  expected = jax.tree.map(lambda *v: float(np.mean(np.concatenate(v))), *rows)
  assert count == 21
  for (path, got), want in zip(jax.tree.leaves_with_path(means), jax.tree.leaves(expected)):
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7), jax.tree_util.keystr(path)
  first = next(iter(dyn['mask'].values()))
  assert float(first['count']) == 21.0
