"""Time dense, gated (masked dense), sparse and static inference; print one JSON object.

  python bench/inference.py --model vgg16_bn --batch 1 --steps 100 --warmup 10 --keep 0.5
  python bench/inference.py --model resnet56 --batch 32 --steps 10 --skip sparse,masked
  python bench/inference.py --checkpoint workdirs/digits_ftwt --batch 8 --steps 50

Timed forwards, all jitted, called in alternation (A B C ... A B C ...) so that
drift on a shared machine hits each alike; each call runs one batch of ``--batch``
distinct images (``images_per_s`` per column):

* ``dense_flax``: the baseline network (no heads) through Flax ``apply``;
* ``gated_flax``: the gated network through Flax ``apply`` (masked dense),
  jitted to return the logits only, as ``api.Model.predict``: XLA then drops the
  training targets that ``apply`` also computes (a sort per layer);
* ``dense``: the baseline network with BN folded into the convs and the same
  conv kernels (``fttw_jax.sparse.xla.conv2d``) as the XLA sparse path, the
  batch through each conv at once;
* ``masked``: heads + masks at full width with those same kernels;
* ``sparse``: ``fttw_jax.sparse.xla.SparseModel.predict`` (narrow convs on active
  channels, in XLA; batches sample by sample);
* ``native_dense``, ``native_masked``, ``native_sparse``: the same three with one
  C++ custom call per conv (``fttw_jax.sparse.native``; a batch's samples split
  across the threads; on CPU where a C++ compiler is at hand; ``native`` in the
  JSON says why when they are absent);
* ``static``: the statically pruned network (``fttw_jax.sparse.static``): per
  gated layer the k channels most often on over the checked images, k = the
  rounded mean kept count, as physically narrower dense convs (no heads).

``sparse_speedup`` (XLA), ``native_sparse_speedup`` and ``static_speedup`` = the
fastest median of all the dense columns (``dense_flax``, ``dense``, ``masked``,
``native_dense``, ``native_masked``; named in ``fastest_dense``) / that column's
median: the masked forward does all the dense work plus the heads, so when it is
the faster one the dense timings hit a compiler pathology, and a slow dense
implementation must not flatter the sparse path. ``flops_bound_speedup`` =
1 / (1 - exact FLOPs reduction). Every run first checks each sparse column
against ``model.apply`` on every batch (per-sample logits and masks).

Masks: by default synthetic and seeded: every head's bias is set to +-0.1 with
probability ``--keep`` of +, its kernel to 1e-3 noise, so each layer keeps ~keep
of its channels (input-independent). ``--checkpoint`` instead restores a trained
run (its stored config gives model, width and gate) and times its own masks on
eval images when the dataset is prepared (random images otherwise). The exact
FLOPs reduction of the masks timed comes from ``fttw_jax.flops``.

XLA flags apply to every timed function alike. By default
``--xla_cpu_experimental_ynn_fusion_type=`` is appended to XLA_FLAGS: it turns
off XLA:CPU's YNNPACK fusions, which on jax 0.10.2 fuse a VGG's whole dense conv
chain into one graph that runs ~2-4x slower than the convs one by one (so the
dense baseline would be slow for the compiler's sake). ``--xla-flags`` replaces
XLA_FLAGS instead (``--xla-flags=`` for XLA's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NO_YNN_FUSION = '--xla_cpu_experimental_ynn_fusion_type='


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet56')
  p.add_argument('--batch', type=int, default=1, help='images per call')
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--warmup', type=int, default=10)
  p.add_argument('--keep', type=float, default=0.5,
                 help='synthetic masks: fraction of channels each head keeps')
  p.add_argument('--mask-kind', default='exact', choices=('exact', 'bernoulli'),
                 help="synthetic masks: exactly round(keep*C) channels on, or each w.p. keep")
  p.add_argument('--checkpoint', default=None, help='workdir or checkpoint directory')
  p.add_argument('--which', default='best', help="checkpoint: 'best', 'latest' or a step")
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--dataset', default='cifar10', help='synthetic: sets input size and classes')
  p.add_argument('--device', default=None, choices=('cpu', 'gpu'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--samples', type=int, default=8,
                 help='distinct inputs cycled through (at least one batch)')
  p.add_argument('--levels', type=int, default=16, help='sparse: capacity buckets per layer')
  p.add_argument('--band', type=int, default=2, help='sparse: in/out level pairs with a branch')
  p.add_argument('--rows-max-pixels', type=int, default=16)
  p.add_argument('--min-channels', type=int, default=32)
  p.add_argument('--skip', default='', help='comma list of timings to skip, e.g. gated_flax,'
                 'sparse,masked (slow at large batches); native_sparse: every native column')
  p.add_argument('--xla-flags', default=None,
                 help=f'replace XLA_FLAGS (default: append {NO_YNN_FUSION})')
  args = p.parse_args(argv)
  if not 0.0 <= args.keep <= 1.0:
    p.error(f'--keep must be in [0, 1], got {args.keep}')
  if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.samples < 1:
    p.error('--batch, --steps and --samples must be >= 1 and --warmup >= 0')
  return args


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def set_xla_flags(replace: str | None = None) -> str:
  """Set XLA_FLAGS before jax is imported: ``replace`` if given, else the environment's
  flags plus NO_YNN_FUSION (see the module docstring). Returns the flags set."""
  flags = replace if replace is not None else (
      os.environ.get('XLA_FLAGS', '') + ' ' + NO_YNN_FUSION).strip()
  os.environ['XLA_FLAGS'] = flags
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return flags


def machine() -> dict:
  """Where a bench ran, for its JSON: device, CPU, load, jax version, XLA flags."""
  import jax
  return {'device': str(jax.devices()[0]), 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
          'load_avg_1m': round(os.getloadavg()[0], 2), 'jax': jax.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def synthetic_model(name, dataset, width, keep, seed, kind):
  """(gated model, random variables with synthetic masks, a line describing the masks)."""
  from fttw_jax import data, models
  info = data.get_info(dataset)
  model = models.create_model(name, num_classes=info.num_classes, width=width,
                              gate=models.GateConfig())
  variables = random_variables(model, (1, info.image_size, info.image_size, 3), seed)
  variables = synthetic_heads(variables, keep, seed, kind)
  return model, variables, f'synthetic {kind} keep={keep} seed={seed}'


def synthetic_heads(variables, keep: float, seed: int, kind: str = 'exact'):
  """Head biases +-0.1 and 1e-3 kernels, so each layer's mask is fixed whatever the
  input, with a margin far from the 0 threshold: 'exact' switches on a random
  round(keep * C) channels, 'bernoulli' each channel with probability ``keep``."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    keys = [getattr(k, 'key', k) for k in path]
    if 'head' not in keys:
      return leaf
    if keys[-1] == 'bias':
      c = leaf.shape[-1]
      if kind == 'exact':
        on = np.zeros(c, bool)
        on[rng.permutation(c)[:int(round(keep * c))]] = True
      else:
        on = rng.random(c) < keep
      return np.where(on, 0.1, -0.1).astype(np.float32)
    return (1e-3 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree.map_with_path(fill, variables)


def random_variables(model, shape, seed):
  """Fan-in scaled random weights and BN statistics, without compiling an init."""
  import jax
  import numpy as np
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, 'float32'))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    n = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == 'kernel':
      return n / np.sqrt(np.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return 1.0 + 0.1 * np.abs(n)
    return 0.1 * n
  return jax.tree.map_with_path(fill, shapes)


def load_checkpoint(args):
  """(gated model, variables, dataset name, config) of a trained run."""
  import jax
  from fttw_jax import checkpoint, data
  from fttw_jax import config as config_lib
  config, meta, _ = checkpoint.read_config(args.checkpoint, args.which)
  if config.stage != 'ftwt':
    raise SystemExit(f'{args.checkpoint}: stage {config.stage!r} has no heads; '
                     'sparse execution needs an FTWT (gated) checkpoint')
  info = data.get_info(config.dataset)
  num_classes = int(meta.get('num_classes') or info.num_classes)
  model = config_lib.model_from_config(config, num_classes)
  x = jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), 'float32')
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  target = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  variables, config, _, _ = checkpoint.restore_variables(args.checkpoint, args.which,
                                                         target=target)
  return model, variables, config.dataset, config


def inputs(args, dataset, size, from_data: bool):
  """(batches, batch, H, W, 3) float32, all images distinct: max(--samples, --batch)
  of them (whole batches); eval images when asked and available, else N(0, 1)."""
  import numpy as np
  batches = max(1, args.samples // args.batch)
  n = batches * args.batch
  shape = (batches, args.batch, size, size, 3)
  if from_data:
    try:
      from fttw_jax import data
      batch = next(iter(data.create_eval_iterator(dataset, n)))
      images = np.asarray(data.normalize(batch['image'], dataset), np.float32)
      if len(images) == n:
        return images.reshape(shape), 'eval images'
      print(f'note: {len(images)} eval images, fewer than {n}; using N(0,1)', file=sys.stderr)
    except Exception as e:  # pylint: disable=broad-except
      print(f'note: eval images unavailable ({type(e).__name__}: {e}); using N(0,1)',
            file=sys.stderr)
  rng = np.random.default_rng(args.seed + 1)
  return rng.standard_normal(shape).astype(np.float32), 'N(0,1)'


def stats(times_s):
  import numpy as np
  t = np.asarray(times_s) * 1e3
  return {'median_ms': round(float(np.median(t)), 4),
          'p10_ms': round(float(np.percentile(t, 10)), 4),
          'p90_ms': round(float(np.percentile(t, 90)), 4),
          'min_ms': round(float(np.min(t)), 4),
          'iqr_ms': round(float(np.percentile(t, 75) - np.percentile(t, 25)), 4)}


DENSE_COLUMNS = ('dense_flax', 'dense', 'masked', 'native_dense', 'native_masked')


def native_unavailable():
  """Why the native columns cannot run here, or None when they can."""
  import jax
  from fttw_jax.sparse import kernel
  if jax.default_backend() != 'cpu':
    return f'CPU only (default backend: {jax.default_backend()})'
  try:
    kernel.ensure()
  except kernel.NativeUnavailable as e:
    return f'unavailable: {str(e).splitlines()[0]}'
  return None


def main(argv=None):
  args = parse_args(argv)
  set_xla_flags(args.xla_flags)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fttw_jax import data, flops
  from fttw_jax.sparse import native, static, xla

  if args.device:
    try:
      jax.config.update('jax_default_device', jax.devices(args.device)[0])
    except RuntimeError as e:
      raise SystemExit(f'--device {args.device}: {e}') from None

  if args.checkpoint:
    model, variables, dataset, config = load_checkpoint(args)
    width, mask_source = config.width, f'checkpoint {args.checkpoint}'
  else:
    dataset, width = args.dataset, args.width
    model, variables, mask_source = synthetic_model(args.model, dataset, width, args.keep,
                                                    args.seed, args.mask_kind)
  name = type(model).__name__ if args.checkpoint else args.model
  size = data.get_info(dataset).image_size
  xs, input_kind = inputs(args, dataset, size, from_data=bool(args.checkpoint))
  xs = jnp.asarray(xs)    # (batches, B, H, W, 3)

  baseline = model.clone(gate=None)
  base_vars = {'params': _strip_heads(variables['params']),
               'batch_stats': variables['batch_stats']}
  sm = xla.SparseModel.from_variables(model, variables, levels=args.levels, band=args.band,
                                         rows_max_pixels=args.rows_max_pixels,
                                         min_channels=args.min_channels)
  dense_apply = jax.jit(lambda v, x: baseline.apply(v, x, train=False)[0])
  gated_apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  gated_logits = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])  # as api.predict
  fns = {
      'dense_flax': lambda x: dense_apply(base_vars, x),
      'gated_flax': lambda x: gated_logits(variables, x),
      'dense': sm.dense,
      'masked': lambda x: sm.masked_dense(x)[0],
      'sparse': sm.predict,
  }
  skip = set(filter(None, args.skip.split(',')))
  native_status = 'skipped' if 'native_sparse' in skip else native_unavailable()
  nm = None
  if native_status is None:
    native_status = 'ok'
    nm = native.NativeSparseModel.from_variables(model, variables)
    fns.update({'native_dense': nm.dense, 'native_masked': lambda x: nm.masked_dense(x)[0],
                'native_sparse': nm.predict})
  if 'dense' in skip:
    raise SystemExit('--skip dense: the speedups need it')
  for k in skip:
    fns.pop(k, None)
  if 'sparse' not in fns and 'native_sparse' not in fns:
    raise SystemExit('--skip: nothing sparse left to time')

  compile_s = {}
  for k, f in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(f(xs[0]))
    compile_s[k] = round(time.perf_counter() - t0, 2)
  # Correctness (per sample) and exact FLOPs of the masks actually timed.
  prof = flops.profile(model, (1, size, size, 3))
  runners = {k: r for k, r in (('sparse', sm), ('native_sparse', nm)) if k in fns}
  errs, mask_ok = {k: [] for k in runners}, {k: True for k in runners}
  reds, keeps, masks = [], [], {}
  for x in xs:
    ref, aux = gated_apply(variables, x)
    gates = aux['gates']
    for k, runner in runners.items():
      out, saux = runner(x)
      errs[k].append(float(jnp.max(jnp.abs(out - ref))))
      mask_ok[k] &= all(np.array_equal(gates[g]['mask'], saux[g]['mask']) for g in gates)
    reds.append(float(flops.reduction(flops.exact_macs(prof, gates), flops.dense_macs(prof))))
    keeps.append(float(np.mean([np.mean(g['mask']) for g in gates.values()])))
    for g, v in gates.items():
      masks.setdefault(g, []).append(np.asarray(v['mask']))
  if 'static' not in skip:
    keep = static_channels({g: np.concatenate(m) for g, m in masks.items()})
    st = static.StaticModel.from_variables(model, variables, keep)
    t0 = time.perf_counter()
    jax.block_until_ready(st.predict(xs[0]))
    compile_s['static'] = round(time.perf_counter() - t0, 2)
    fns['static'] = st.predict

  times = {k: [] for k in fns}
  for step in range(args.warmup + args.steps):
    x = xs[step % len(xs)]
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(x))
      if step >= args.warmup:
        times[k].append(time.perf_counter() - t0)

  result = {k: {**stats(v), 'images_per_s': round(args.batch / float(np.median(v)), 1)}
            for k, v in times.items()}
  med = {k: v['median_ms'] for k, v in result.items()}
  dense_best = min(med[k] for k in DENSE_COLUMNS if k in med)
  out = {
      'model': name, 'width': width, 'dataset': dataset, 'batch': args.batch,
      'steps': args.steps, 'warmup': args.warmup, 'samples': int(xs.shape[0] * xs.shape[1]),
      'inputs': input_kind, 'masks': mask_source, 'mean_keep': round(float(np.mean(keeps)), 4),
      'exact_flops_reduction': round(float(np.mean(reds)), 4),
      'flops_bound_speedup': round(1 / (1 - float(np.mean(reds))), 3),
      'dense_macs': int(flops.dense_macs(prof)),
      'fastest_dense': min((k for k in DENSE_COLUMNS if k in med), key=med.get),
      'times': result,
      'native': native_status,
      'compile_s': compile_s,
      'policy': {'levels': args.levels, 'band': args.band, 'rows_max_pixels': args.rows_max_pixels,
                 'min_channels': args.min_channels},
      **machine(),
  }
  for k, prefix in (('sparse', ''), ('native_sparse', 'native_')):
    if k in runners:
      out.update({f'{k}_speedup': round(dense_best / med[k], 3),
                  f'{prefix}max_abs_logit_err': float(max(errs[k])),
                  f'{prefix}masks_equal': mask_ok[k]})
  if 'sparse' in runners:
    ratios = np.asarray(times['dense']) / np.asarray(times['sparse'])
    out['sparse_speedup_vs'] = {k: round(med[k] / med['sparse'], 3) for k in med if k != 'sparse'}
    out['sparse_speedup_median_of_ratios_vs_dense'] = round(float(np.median(ratios)), 3)
  if 'static' in med:
    out['static_speedup'] = round(dense_best / med['static'], 3)
    out['static_kept'] = {g: len(v) for g, v in keep.items()}
  print(json.dumps(out))


def static_channels(masks: dict) -> dict:
  """Per layer, the channels most often on over the (S, C) masks, as many as the mean
  kept count (``fttw_jax.static``'s selection at the dynamic network's widths): the
  static network of the same cost, as kept channel indices."""
  import numpy as np
  from fttw_jax import static as static_selection
  frequency = {g: m.mean(axis=0) for g, m in masks.items()}
  kept = {g: float(m.sum(axis=1).mean()) for g, m in masks.items()}
  widths = static_selection.scaled_widths(kept, {g: m.shape[1] for g, m in masks.items()}, 1.0)
  keep = static_selection.select_channels(frequency, widths)
  return {g: np.flatnonzero(v) for g, v in keep.items()}


def _strip_heads(params):
  if isinstance(params, dict):
    return {k: _strip_heads(v) for k, v in params.items() if k != 'head'}
  return params


if __name__ == '__main__':
  main()
