"""Where the time of a batch-1 forward goes, per XLA op kind; print one JSON object.

  python bench/profile_ops.py --model resnet56 --keep 0.5
  python bench/profile_ops.py --model vgg16_bn --which sparse --top 15

For each of ``dense`` / ``masked`` / ``sparse`` (``fttw_jax.sparse``, synthetic
masks as in ``bench/inference.py``) it traces ``--calls`` jitted calls with
``jax.profiler`` and reports the XLA thunks run per call (``ops_per_call``),
the wall time per call and, per op kind (``conv_general_dilated``, ``dot``,
``cond``, fusion kinds ...), the count and summed duration per call. The sum
of op durations falls short of the wall time by the thunk executor's dispatch
overhead; conditionals (``cond``) include the ops of their branch, which are
also listed on their own. Under the profiler, times are inflated: read the
shares and counts, and take timings from ``bench/inference.py``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference import machine, set_xla_flags, synthetic_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet56')
  p.add_argument('--dataset', default='cifar10')
  p.add_argument('--keep', type=float, default=0.5)
  p.add_argument('--mask-kind', default='exact', choices=('exact', 'bernoulli'))
  p.add_argument('--which', default='dense,masked,sparse')
  p.add_argument('--calls', type=int, default=20)
  p.add_argument('--warmup', type=int, default=20)
  p.add_argument('--top', type=int, default=10, help='op kinds listed per forward')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  bad = set(args.which.split(',')) - {'dense', 'masked', 'sparse'}
  if bad:
    p.error(f'--which: unknown {sorted(bad)}; choose from dense, masked, sparse')
  if not 0.0 <= args.keep <= 1.0:
    p.error(f'--keep must be in [0, 1], got {args.keep}')
  if args.calls < 1:
    p.error(f'--calls must be >= 1, got {args.calls}')
  return args


def op_kind(hlo_op: str) -> str:
  """'conv_general_dilated.35' -> 'conv_general_dilated', 'cond.581.clone' -> 'cond'."""
  return re.sub(r'(\.\d+)+(\.clone)?$', '', hlo_op)


def summarize(trace_dir: str, calls: int, top: int) -> dict:
  path = glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  ops = [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  kinds = collections.defaultdict(lambda: [0, 0.0])
  for e in ops:
    k = kinds[op_kind(e['args']['hlo_op'])]
    k[0] += 1
    k[1] += e['dur']
  ranked = sorted(kinds.items(), key=lambda kv: -kv[1][1])[:top]
  return {
      'ops_per_call': round(len(ops) / calls, 1),
      'op_us_per_call': round(sum(e['dur'] for e in ops
                                  if op_kind(e['args']['hlo_op']) != 'cond') / calls, 1),
      'by_kind': {k: {'count': round(c / calls, 1), 'us': round(t / calls, 1)}
                  for k, (c, t) in ranked},
  }


def main(argv=None):
  args = parse_args(argv)
  set_xla_flags()
  import jax
  import numpy as np
  from fttw_jax import data, sparse

  model, variables, masks = synthetic_model(args.model, args.dataset, 1.0, args.keep,
                                            args.seed, args.mask_kind)
  size = data.get_info(args.dataset).image_size
  shape = (1, size, size, 3)
  sm = sparse.SparseModel.from_variables(model, variables)
  fns = {'dense': sm.dense, 'masked': lambda x: sm.masked_dense(x)[0],
         'sparse': lambda x: sm(x)[0]}
  x = jax.numpy.asarray(np.random.default_rng(args.seed).normal(size=shape), 'float32')
  out = {'model': args.model, 'dataset': args.dataset,
         'masks': masks,
         'calls': args.calls}
  for which in args.which.split(','):
    f = fns[which]
    for _ in range(args.warmup):
      jax.block_until_ready(f(x))
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(args.calls):
          jax.block_until_ready(f(x))
        wall = (time.perf_counter() - t0) / args.calls
      out[which] = {'wall_ms_per_call_profiled': round(wall * 1e3, 3),
                    **summarize(d, args.calls, args.top)}
  out.update(machine())
  print(json.dumps(out))


if __name__ == '__main__':
  main()
