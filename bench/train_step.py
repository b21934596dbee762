"""Time the jitted baseline and gated (FTWT) train steps side by side; print JSON.

  python bench/train_step.py --model resnet56 --batch 128 --steps 10 --warmup 2

Both steps are the project's own ``train.train_step`` over the same mesh and
batch; they are timed in alternation (A B A B ...) so that drift on a shared
machine hits both alike. ``gated_over_baseline_ratio`` = median gated / median
baseline.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet56')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--dataset', default='cifar10', help='sets input size and classes only')
  p.add_argument('--device', default=None, help="'cpu' or 'gpu' (default: JAX's default)")
  p.add_argument('--threshold', type=float, default=0.9, help='mass r of the gated step')
  return p.parse_args(argv)


def build_step(config, stage, mesh, info):
  import jax
  from fttw_jax import flops, train
  from fttw_jax import config as config_lib
  config = config.copy_and_resolve_references()
  config.stage = stage
  model = config_lib.model_from_config(config, info.num_classes, bn_axis_name=train.AXIS)
  eval_model = config_lib.model_from_config(config, info.num_classes)
  prof = flops.profile(eval_model, (1, info.image_size, info.image_size, 3))
  tx = train.create_optimizer(config, 100, 10_000)
  state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx,
                                   (info.image_size, info.image_size, 3), mesh)
  step = train.make_train_step(mesh, model=model, tx=tx, config=config, prof=prof,
                               steps_per_epoch=100)
  return step, state


def main(argv=None):
  args = parse_args(argv)
  if args.device:
    os.environ['JAX_PLATFORMS'] = args.device
  import jax
  import numpy as np
  from fttw_jax import data, train
  from fttw_jax import config as config_lib

  info = data.get_info(args.dataset)
  config = config_lib.base_config()
  config.model, config.width, config.dataset = args.model, args.width, args.dataset
  config.batch_size, config.gate.threshold = args.batch, args.threshold
  mesh = train.make_mesh()
  rng = np.random.default_rng(0)
  batch = data.shard_batch({
      'image': rng.integers(0, 256, (args.batch, info.image_size, info.image_size, 3),
                            dtype=np.uint8),
      'label': rng.integers(0, info.num_classes, (args.batch,), dtype=np.int32)}, mesh)

  runners, times = {}, {'baseline': [], 'gated': []}
  for stage, key in (('baseline', 'baseline'), ('ftwt', 'gated')):
    step, state = build_step(config, stage, mesh, info)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    runners[key] = [step, state, time.perf_counter() - start]

  def run_once(key):
    step, state, _ = runners[key]
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    runners[key][1] = state
    return time.perf_counter() - start

  for i in range(args.warmup + args.steps):
    for key in ('baseline', 'gated'):
      t = run_once(key)
      if i >= args.warmup:
        times[key].append(t * 1e3)

  med = {k: statistics.median(v) for k, v in times.items()}
  print(json.dumps({
      'model': args.model, 'width': args.width, 'batch': args.batch, 'steps': args.steps,
      'device': f'{jax.default_backend()}:{jax.devices()[0].device_kind} x{jax.device_count()}',
      'baseline_ms_median': round(med['baseline'], 3),
      'baseline_ms_min_max': [round(min(times['baseline']), 3), round(max(times['baseline']), 3)],
      'gated_ms_median': round(med['gated'], 3),
      'gated_ms_min_max': [round(min(times['gated']), 3), round(max(times['gated']), 3)],
      'first_call_s': {k: round(v[2], 2) for k, v in runners.items()},
      'gated_over_baseline_ratio': round(med['gated'] / med['baseline'], 4),
  }))


if __name__ == '__main__':
  main()
