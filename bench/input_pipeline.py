"""Images/s of the training input pipeline (``fttw_jax.data.create_train_iterator``).

  python bench/input_pipeline.py --batch 128 --steps 100 --warmup 10

Datasets: ``digits`` (the offline TFDS builder, prepared into a scratch
directory unless ``--data-dir`` has it) and ``cifar10`` mocked with
``fttw_jax.data.testing.mock_dataset`` (random examples; the pipeline's shuffle,
augmentation, batching and prefetch all run, only file reading is mocked).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--datasets', default='digits,cifar10',
                 help='comma list of digits, cifar10 (mocked)')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--warmup', type=int, default=10)
  p.add_argument('--mock-examples', type=int, default=4096, help='size of mock cifar10')
  p.add_argument('--data-dir', default=None, help='TFDS data_dir for digits')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.warmup < 0:
    p.error('--batch and --steps must be >= 1, --warmup >= 0')
  return args


def time_iterator(it, batch, steps, warmup):
  """First-batch latency, per-step times and images/s over the timed steps."""
  import numpy as np
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    next(it)
  times = []
  start = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    b = next(it)
    times.append(time.perf_counter() - t)
  total = time.perf_counter() - start
  assert b['image'].shape[0] == batch, b['image'].shape
  ms = np.asarray(times) * 1e3
  return {'images_per_s': round(batch * steps / total, 1),
          'first_batch_s': round(first, 3),
          'step_ms': {'median': round(float(np.median(ms)), 3),
                      'p10': round(float(np.percentile(ms, 10)), 3),
                      'p90': round(float(np.percentile(ms, 90)), 3)},
          'image_shape': list(b['image'].shape[1:]), 'dtype': str(b['image'].dtype)}


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from fttw_jax import data
  from fttw_jax.data import testing as data_testing
  from bench.inference import cpu_model  # pylint: disable=g-import-not-at-top

  results = {}
  # TFDS prints progress to stdout; keep stdout for the one JSON object.
  with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
    for name in filter(None, args.datasets.split(',')):
      if name == 'digits':
        data_dir = args.data_dir or os.path.join(scratch, 'digits')
        t0 = time.perf_counter()
        data.pipeline.prepared_builder('digits', data_dir)
        prepare_s = time.perf_counter() - t0
        it = data.create_train_iterator('digits', args.batch, seed=args.seed,
                                        data_dir=data_dir)
        results['digits'] = {**time_iterator(it, args.batch, args.steps, args.warmup),
                             'prepare_s': round(prepare_s, 2)}
      elif name == 'cifar10':
        mock_dir = os.path.join(scratch, 'mock')
        with data_testing.mock_dataset('cifar10', mock_dir, args.mock_examples):
          it = data.create_train_iterator('cifar10', args.batch, seed=args.seed,
                                          data_dir=mock_dir)
          results['cifar10_mock'] = {
              **time_iterator(it, args.batch, args.steps, args.warmup),
              'examples': args.mock_examples}
      else:
        raise SystemExit(f'unknown dataset {name!r}; valid: digits, cifar10')
  print(json.dumps({'batch': args.batch, 'steps': args.steps, 'warmup': args.warmup,
                    'results': results, 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
                    'load_avg_1m': round(os.getloadavg()[0], 2)}))


if __name__ == '__main__':
  main()
