"""Time the jitted baseline and gated (FTWT) train steps side by side; print JSON.

  python bench/train_step.py --model resnet56 --batch 128 --steps 10 --warmup 2
  python bench/train_step.py --model resnet56 --compare-torch --compare-xla

Both steps are the project's own ``train.train_step`` over the same mesh and
batch; runners are timed in alternation (A B C A B C ...) so that drift on a
shared machine hits all alike. ``gated_over_baseline_ratio`` = median gated /
median baseline, from a round of our steps alone. ``--compare-xla`` adds the
baseline step built with ``conv_impl='xla'`` (XLA's own ops and passes) as
``baseline_xla``.
``--compare-torch`` adds the same dense network in PyTorch (``torch_models.py``,
NCHW and channels_last, ``--torch-threads`` threads) doing the same SGD step:
``ours_over_torch_dense`` = baseline / torch NCHW, ``ours_gated_over_torch_dense`` =
gated / torch NCHW, from a second round where all runners alternate (our steps'
medians there: ``*_beside_torch_ms_median``, ``gated_over_baseline_ratio_beside_torch``).
Two rounds because torch steps in the alternation slow our gated step more than our
baseline (ResNet-56 batch 128, one process: gated / baseline 1.11 alone, 1.36-1.38
beside torch; bench/RESULTS.md). Without torch installed it says so and skips it.
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
  p.add_argument('--conv-impl', default='auto', help="config.conv_impl of both steps")
  p.add_argument('--compare-xla', action='store_true',
                 help="also time the baseline step with conv_impl='xla'")
  p.add_argument('--compare-torch', action='store_true',
                 help='also time the same dense step in PyTorch (CPU)')
  p.add_argument('--torch-threads', type=int, default=2)
  return p.parse_args(argv)


def build_step(config, stage, mesh, info):
  import jax
  from fttw_jax import flops, parallel, train
  from fttw_jax import config as config_lib
  config = config.copy_and_resolve_references()
  config.stage = stage
  model = config_lib.model_from_config(config, info.num_classes, bn_axis_name=parallel.AXIS)
  prof = flops.profile(model, (1, info.image_size, info.image_size, 3))
  tx = train.create_optimizer(config, 100, 10_000)
  state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx,
                                   (info.image_size, info.image_size, 3), mesh)
  step = train.make_train_step(mesh, model=model, tx=tx, config=config, prof=prof,
                               steps_per_epoch=100)
  return step, state


def jax_runner(step, state, batch):
  """A callable running one step (state carried over), and its first call's seconds."""
  import jax
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready((holder[0], metrics))
  start = time.perf_counter()
  run()
  return run, time.perf_counter() - start


def alternate(runners: dict, warmup: int, steps: int) -> dict:
  """{name: [ms per timed call]}: the runners called in turn (A B C A B C ...), so that
  drift on a shared machine hits all alike; the first ``warmup`` rounds are not kept."""
  times = {k: [] for k in runners}
  for i in range(warmup + steps):
    for key, run in runners.items():
      start = time.perf_counter()
      run()
      if i >= warmup:
        times[key].append((time.perf_counter() - start) * 1e3)
  return times


def torch_runners(args, images, labels, num_classes):
  """{name: callable} for the torch dense step in NCHW and channels_last, or a reason."""
  try:
    import torch
  except ImportError:
    return {}, 'skipped: torch is not installed (pip install -r requirements-test.txt)'
  import torch_models
  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype('int64'))
  runners = {}
  for name, fmt in (('torch_dense', torch.contiguous_format),
                    ('torch_dense_channels_last', torch.channels_last)):
    model = torch_models.create(args.model, num_classes).to(memory_format=fmt)
    step, xf = torch_models.make_step(model), x.contiguous(memory_format=fmt)
    runners[name] = (lambda step=step, xf=xf: step(xf, y))
  return runners, f'torch {torch.__version__}, {torch.get_num_threads()} threads'


def main(argv=None):
  args = parse_args(argv)
  if args.compare_torch and args.width != 1.0:
    raise SystemExit(f'--compare-torch builds full-width networks; got --width={args.width}')
  if args.device:
    os.environ['JAX_PLATFORMS'] = args.device
  import jax
  import numpy as np
  from fttw_jax import data, models, parallel
  from fttw_jax import config as config_lib

  info = data.get_info(args.dataset)
  config = config_lib.base_config()
  config.model, config.width, config.dataset = args.model, args.width, args.dataset
  config.batch_size, config.gate.threshold = args.batch, args.threshold
  config.conv_impl = args.conv_impl
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, info.image_size, info.image_size, 3),
                        dtype=np.uint8)
  labels = rng.integers(0, info.num_classes, (args.batch,), dtype=np.int32)
  batch = data.shard_batch({'image': images, 'label': labels}, mesh)

  builds = [('baseline', 'baseline', config), ('gated', 'ftwt', config)]
  if args.compare_xla:
    xla = config.copy_and_resolve_references()
    xla.conv_impl = 'xla'
    builds.append(('baseline_xla', 'baseline', xla))
  runners, first_call = {}, {}
  for key, stage, cfg in builds:
    runners[key], first_call[key] = jax_runner(*build_step(cfg, stage, mesh, info), batch)
  torch_note = None
  if args.compare_torch:
    normalized = np.asarray(data.normalize(images, args.dataset))
    more, torch_note = torch_runners(args, normalized, labels, info.num_classes)
    for key, run in more.items():
      start = time.perf_counter()
      run()
      runners[key], first_call[key] = run, time.perf_counter() - start

  jax_keys = [key for key, _, _ in builds]
  times = alternate({k: runners[k] for k in jax_keys}, args.warmup, args.steps)
  med_beside = None
  if len(runners) > len(jax_keys):  # torch: a second round, every runner alternating
    beside = alternate(runners, args.warmup, args.steps)
    times.update({k: v for k, v in beside.items() if k not in jax_keys})
    med_beside = {k: statistics.median(v) for k, v in beside.items()}
  med = {k: statistics.median(v) for k, v in times.items()}
  out = {
      'model': args.model, 'width': args.width, 'batch': args.batch, 'steps': args.steps,
      'device': f'{jax.default_backend()}:{jax.devices()[0].device_kind} x{jax.device_count()}',
      'conv_impl': models.conv_impl.resolve(args.conv_impl),
      'load_avg_1min': round(os.getloadavg()[0], 2),
  }
  for k, v in times.items():
    out[f'{k}_ms_median'] = round(med[k], 3)
    out[f'{k}_ms_min_max'] = [round(min(v), 3), round(max(v), 3)]
  out['first_call_s'] = {k: round(v, 2) for k, v in first_call.items()}
  out['gated_over_baseline_ratio'] = round(med['gated'] / med['baseline'], 4)
  if 'baseline_xla' in med:
    out['baseline_over_baseline_xla'] = round(med['baseline'] / med['baseline_xla'], 4)
  if args.compare_torch:
    out['torch'] = torch_note
    if med_beside is not None:
      for k in jax_keys:
        out[f'{k}_beside_torch_ms_median'] = round(med_beside[k], 3)
      out['gated_over_baseline_ratio_beside_torch'] = round(
          med_beside['gated'] / med_beside['baseline'], 4)
      out['ours_over_torch_dense'] = round(med_beside['baseline'] / med['torch_dense'], 4)
      out['ours_gated_over_torch_dense'] = round(med_beside['gated'] / med['torch_dense'], 4)
      out['ours_over_torch_channels_last'] = round(
          med_beside['baseline'] / med['torch_dense_channels_last'], 4)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
