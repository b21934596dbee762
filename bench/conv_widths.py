"""Does a narrower conv run faster? Time XLA's 3x3 conv at ResNet-56 / VGG shapes; print JSON.

  python bench/conv_widths.py
  python bench/conv_widths.py --shapes 32x16x16,32x8x8 --xla-flags=--xla_cpu_multi_thread_eigen=false

Each shape HxCinxCout is timed as a jitted chain of ``--chain`` convs (+ bias,
ReLU), as it runs inside a network, and reported per conv with its MACs and
GMAC/s. The sparse path only pays where halving the channels cuts the time
(see bench/RESULTS.md, ResNet-56).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference import NO_YNN_FUSION, machine, set_xla_flags  # noqa: E402

DEFAULT_SHAPES = ('32x16x16,32x16x8,32x8x8,16x32x32,16x32x16,16x16x16,8x64x64,8x64x32,8x32x32,'
                  '4x512x512,4x256x256')


def parse_shape(text):
  try:
    hw, cin, cout = (int(v) for v in text.split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'shape {text!r}: expected HxCinxCout, e.g. 32x16x16')
  if min(hw, cin, cout) < 1:
    raise argparse.ArgumentTypeError(f'shape {text!r}: sizes must be >= 1')
  return hw, cin, cout


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default=DEFAULT_SHAPES, help='comma list of HxCinxCout')
  p.add_argument('--chain', type=int, default=10)
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--warmup', type=int, default=10)
  p.add_argument('--xla-flags', default=None,
                 help=f'replace XLA_FLAGS (default: append {NO_YNN_FUSION})')
  args = p.parse_args(argv)
  try:
    shapes = [parse_shape(s) for s in args.shapes.split(',')]
  except argparse.ArgumentTypeError as e:
    p.error(str(e))
  set_xla_flags(args.xla_flags)
  import jax
  import numpy as np

  def chain(x, w, b):
    cin, cout = w.shape[2:]
    for _ in range(args.chain):
      y = jax.nn.relu(jax.lax.conv_general_dilated(
          x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b)
      # back to cin channels so that the next conv of the chain takes it
      x = y[..., :cin] if cout >= cin else jax.numpy.pad(y, ((0, 0),) * 3 + ((0, cin - cout),))
    return x

  rng = np.random.default_rng(0)
  rows = []
  for hw, cin, cout in shapes:
    x = jax.numpy.asarray(rng.standard_normal((1, hw, hw, cin)), 'float32')
    w = jax.numpy.asarray(0.1 * rng.standard_normal((3, 3, cin, cout)), 'float32')
    b = jax.numpy.zeros((cout,), 'float32')
    f = jax.jit(chain)
    for _ in range(args.warmup):
      jax.block_until_ready(f(x, w, b))
    ts = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, w, b))
      ts.append((time.perf_counter() - t0) / args.chain)
    us = float(np.median(ts)) * 1e6
    macs = hw * hw * 9 * cin * cout
    rows.append({'shape': f'{hw}x{cin}x{cout}', 'us_per_conv': round(us, 1), 'macs': macs,
                 'gmacs_per_s': round(macs / us / 1e3, 1)})
  print(json.dumps({'convs': rows, 'chain': args.chain, 'steps': args.steps, **machine()}))


if __name__ == '__main__':
  main()
