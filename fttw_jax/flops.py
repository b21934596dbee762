"""Multiply-accumulate (MAC) and parameter accounting (SPEC 5).

``profile(model, input_shape)`` traces a model once (shapes only) and lists its
MAC-bearing layers. From that static profile:

* ``dense_macs`` reproduces the reference's thop profile of the dense model
  (conv incl. bias term, dense without bias, counted average pools);
* ``exact_macs`` is the per-sample cost of a gated forward from its masks and
  the non-zero input channels of every masked conv, plus unmasked layers at full
  cost and the heads' dense layers, so that all masks on == dense + heads;
* ``paper_macs`` is the reference's own dynamic count, its flaws included
  (depthwise ``active_in // groups``, input = previous mask, no heads, masked
  convs only), so numbers are comparable with the paper.

CLI: ``python -m fttw_jax.flops --model resnet56 --dataset cifar10 [--json]``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fttw_jax.models.gating import HEAD_NAME, AvgPool, GatedConv


@dataclasses.dataclass(frozen=True)
class Layer:
  """One MAC-bearing layer of a profile (shapes are per sample)."""
  name: str            # module path, e.g. 'layer1_0/conv1' for a gated conv
  kind: str            # 'conv' | 'dense' | 'pool' | 'head'
  in_features: int
  out_features: int
  kernel: int = 1
  groups: int = 1
  bias: bool = False
  out_hw: tuple = (1, 1)
  masked: bool = False
  macs: int = 0
  params: int = 0      # weights and biases of this layer (BN not included)

  @property
  def depthwise(self) -> bool:
    return self.kind == 'conv' and self.groups > 1


@dataclasses.dataclass(frozen=True)
class Profile:
  layers: tuple
  params: int          # backbone: every weight and bias, BN scale/offset; no heads
  head_params: int

  @property
  def macs(self) -> int:
    return sum(l.macs for l in self.layers if l.kind != 'head')

  @property
  def head_macs(self) -> int:
    return sum(l.macs for l in self.layers if l.kind == 'head')

  @property
  def masked(self) -> tuple:
    """Masked convs in execution order."""
    return tuple(l for l in self.layers if l.masked)


def _conv_macs(cout, hw, cin, groups, k, bias):
  return cout * hw[0] * hw[1] * ((cin // groups) * k * k + int(bias))


def _path_str(path) -> str:
  return '/'.join(path)


def profile(model: nn.Module, input_shape: Sequence[int]) -> Profile:
  """Trace ``model`` on ``input_shape`` (N, H, W, C) and list its costed layers."""
  calls = []  # (module, path, inside a GatedConv), read while the module is bound

  def record(mdl, method_name):
    costed = isinstance(mdl, (nn.Conv, nn.Dense, AvgPool))
    if costed and method_name == '__call__':
      calls.append((mdl, tuple(mdl.scope.path), isinstance(mdl.parent, GatedConv)))
    return costed

  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)

  def init_and_capture(x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, capture_intermediates=record,
                           mutable=['intermediates'])
    return variables['params'], state['intermediates']

  params, inter = jax.eval_shape(init_and_capture, x)

  def lookup(tree, path):
    for k in path:
      tree = tree[k]
    return tree

  layers = []
  for m, path, masked in calls:
    out = lookup(inter, path)['__call__'][0]
    if isinstance(m, nn.Conv):
      kernel = lookup(params, path)['kernel'].shape
      cin = kernel[2] * m.feature_group_count
      hw = tuple(out.shape[1:3])
      name = _path_str(path[:-1]) if masked else _path_str(path)
      layers.append(Layer(
          name, 'conv', cin, kernel[3], kernel[0], m.feature_group_count, m.use_bias, hw,
          masked, _conv_macs(kernel[3], hw, cin, m.feature_group_count, kernel[0], m.use_bias),
          int(np.prod(kernel)) + (kernel[3] if m.use_bias else 0)))
    elif isinstance(m, nn.Dense):
      kernel = lookup(params, path)['kernel'].shape
      kind = 'head' if path[-1] == HEAD_NAME else 'dense'
      name = _path_str(path[:-1]) if kind == 'head' else _path_str(path)
      layers.append(Layer(name, kind, kernel[0], kernel[1], bias=m.use_bias,
                          macs=kernel[0] * kernel[1],
                          params=kernel[0] * kernel[1] + (kernel[1] if m.use_bias else 0)))
    elif m.counted:
      c = out.shape[-1]
      layers.append(Layer(_path_str(path), 'pool', c, c, out_hw=tuple(out.shape[1:3]),
                          macs=int(np.prod(out.shape[1:]))))

  leaves = jax.tree.leaves_with_path(params)
  is_head = lambda p: HEAD_NAME in tuple(k.key for k in p)
  backbone = sum(int(np.prod(v.shape)) for p, v in leaves if not is_head(p))
  heads = sum(int(np.prod(v.shape)) for p, v in leaves if is_head(p))
  return Profile(tuple(layers), backbone, heads)


def dense_macs(prof: Profile) -> int:
  """MACs per sample of the dense model (the reference profile)."""
  return prof.macs


def exact_macs(prof: Profile, gates: Mapping[str, Mapping[str, jax.Array]],
               include_heads: bool = True) -> jax.Array:
  """Per-sample (N,) MACs of a gated forward, counted exactly (SPEC 5).

  A masked conv costs ``active_out * H'W' * (active_in * k*k + b)`` where
  ``active_in`` counts the input channels that are not identically zero; a
  depthwise channel costs ``H'W' * (k*k + b)`` when its output is on and its
  input channel non-zero. Everything unmasked costs its dense MACs.
  """
  batch = _batch_size(gates)
  total = jnp.zeros((batch,), jnp.float32)
  for layer in prof.layers:
    if layer.kind == 'head':
      if include_heads and gates:
        total = total + layer.macs
    elif layer.masked and layer.name in gates:
      g = gates[layer.name]
      hw = layer.out_hw[0] * layer.out_hw[1]
      kk = layer.kernel * layer.kernel
      mask = g['mask'].astype(jnp.float32)
      in_nz = g['in_nz'].astype(jnp.float32)
      if layer.depthwise:
        cost = jnp.sum(mask * in_nz, axis=-1) * hw * (kk + int(layer.bias))
      else:
        active_out = jnp.sum(mask, axis=-1)
        active_in = jnp.sum(in_nz, axis=-1)
        cost = active_out * hw * (active_in * kk + int(layer.bias))
      total = total + cost
    else:
      total = total + layer.macs
  return total


def paper_macs(prof: Profile, gates: Mapping[str, Mapping[str, jax.Array]]) -> jax.Array:
  """Per-sample (N,) MACs as the reference counts them (flaws included, SPEC 5).

  Masked convs only; ``active_in`` is 3 for the first one and the previous
  masked layer's active count after that; depthwise convs use
  ``active_in // groups`` (0 as soon as one input channel is off).
  """
  batch = _batch_size(gates)
  total = jnp.zeros((batch,), jnp.float32)
  active_in = jnp.full((batch,), 3.0)
  for layer in prof.masked:
    active_out = jnp.sum(gates[layer.name]['mask'].astype(jnp.float32), axis=-1)
    hw = layer.out_hw[0] * layer.out_hw[1]
    total = total + active_out * hw * jnp.floor(active_in / layer.groups) * layer.kernel ** 2
    active_in = active_out
  return total


def reduction(macs, dense: int):
  """The FLOPs reduction 1 - mean cost / dense cost, of ``macs``: MACs per sample, a
  mean (a float, or a traced scalar) or per-sample values (their mean)."""
  mean = macs if jnp.ndim(macs) == 0 else jnp.mean(macs)
  return 1.0 - mean / dense


def _batch_size(gates) -> int:
  for g in gates.values():
    return g['mask'].shape[0]
  return 1


# --------------------------------------------------------------------------- CLI

def _format_table(prof: Profile) -> str:
  rows = [('layer', 'kind', 'shape', 'MACs', 'params', 'masked')]
  for l in prof.layers:
    if l.kind == 'conv':
      shape = f'{l.in_features}->{l.out_features} k{l.kernel} g{l.groups} @{l.out_hw[0]}x{l.out_hw[1]}'
    elif l.kind in ('dense', 'head'):
      shape = f'{l.in_features}->{l.out_features}'
    else:
      shape = f'avgpool ->{l.out_hw[0]}x{l.out_hw[1]}x{l.out_features}'
    rows.append((l.name, l.kind, shape, f'{l.macs:,}', f'{l.params:,}', 'yes' if l.masked else ''))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  lines += ['', f'dense MACs: {prof.macs:,}   params: {prof.params:,} (conv/dense weights and '
            'biases, BN scale/offset; params column excludes BN)',
            f'head MACs:  {prof.head_macs:,}   head params: {prof.head_params:,}',
            f'masked convs: {len(prof.masked)}']
  return '\n'.join(lines)


def main(argv=None) -> int:
  import argparse
  from fttw_jax import data, models

  parser = argparse.ArgumentParser(prog='python -m fttw_jax.flops', description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, help=f'one of {sorted(models.MODELS)}')
  parser.add_argument('--dataset', default='cifar10', help='cifar10|cifar100|imagenet2012|digits')
  parser.add_argument('--width', type=float, default=1.0, help='channel width multiplier')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  args = parser.parse_args(argv)
  try:
    info = data.get_info(args.dataset)
    gated = models.create_model(args.model, num_classes=info.num_classes, width=args.width,
                                gate=models.GateConfig())
  except ValueError as e:
    parser.error(str(e))
  prof = profile(gated, (1, info.image_size, info.image_size, 3))
  if args.json:
    print(json.dumps({'model': args.model, 'dataset': args.dataset, 'macs': prof.macs,
                      'params': prof.params, 'head_macs': prof.head_macs,
                      'head_params': prof.head_params, 'masked_layers': len(prof.masked)}))
  else:
    print(f'{args.model} on {args.dataset} ({info.image_size}x{info.image_size}x3, '
          f'{info.num_classes} classes)')
    print(_format_table(prof))
  return 0


if __name__ == '__main__':
  sys.exit(main())
