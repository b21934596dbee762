"""Sparse batch-1 inference in XLA: compute only the channels a sample's masks keep.

This is the portable path (any backend, every architecture). On CPU the C++
custom call of ``fttw_jax.sparse_native`` runs the same contract faster (ResNet-56
1.9x dense where this path is slower than dense: XLA:CPU dispatches every op of a
batch-1 forward separately; bench/RESULTS.md).

The masked dense forward (``model.apply``) computes every channel and then
multiplies the switched-off ones by zero. Here each gated conv first runs its
head on the layer input (SPEC 2: the head sees the input, so the mask is known
before the conv), then runs a narrow conv on the active channels only and
keeps the activation *compact* for the next layer. What this follows
(shared/DESIGN.md, "Sparse execution", and measurements on XLA:CPU):

* per-layer static capacity buckets (widths C*k/levels rounded up to multiples
  of 8) chosen with ``lax.switch`` inside one jit: only the chosen branch runs
  (under ``vmap`` all would, so batches go through ``lax.map``); a conv whose
  input is compact too needs an (input, output) width pair per branch, so
  only pairs within ``band`` levels of each other get one;
* the full-width bucket computes densely in original channel order (a full
  gather is slower than dense), ``jnp.take(..., mode='clip')`` for gathers,
  BN folded into the convs at load time;
* weight gathers are the price: an element-wise gather costs ~1 ns a weight
  in-model, ~20-50 MACs. Input channels are therefore gathered as contiguous
  rows of an input-major copy of each kernel (``w_in``, made at load time:
  twice the weight memory), which the im2col matmul consumes without a
  transpose. A layer runs in one of three modes (``_Runner.mode``): 'both'
  (large outputs: gather active inputs x active outputs, narrow conv), 'rows'
  (outputs of <= ``rows_max_pixels`` pixels: gather only the active input
  rows, compute every output, then mask and compact them), 'dense' (fewer
  than ``min_channels`` channels: narrow convs run no faster there);
* the same conv kernels for the dense baselines (``dense``, ``masked_dense``)
  as for the sparse path: ``conv2d`` is an im2col matmul at small outputs
  (XLA:CPU's conv is pathological at 2x2: ~10x slow) and ``depthwise2d`` shifted
  multiply-adds (XLA:CPU's grouped conv is slow), so timings compare like
  with like.

Compact activation (``Act``): ``x`` is (1, H, W, C) in *slot* order; slot ``j <
count`` holds channel ``idx[j]`` (``idx[:count]`` strictly increasing), slots
``j >= count`` are zero and ``idx[j] == C``. Channels not listed are zero in
the dense forward; listed ones may be zero too. ``count == C`` therefore means
original channel order. A *dense* ``Act`` is statically in original order.

Residual streams (ResNet blocks, MobileNetV2 shortcuts) stay in full width and
original channel order: the residual add refills channels the branch masked
off, so the sum's channel set is the union of the branch's mask and the
stream's, which after a few blocks is nearly every channel. The branch (the
gated convs of a block) is where the sparsity is: its last conv's narrow
output is scatter-added into the stream.

Usage::

  sparse = SparseModel.from_variables(model, variables)
  logits, aux = sparse(x)        # x: (H, W, 3) or (N, H, W, 3); aux[layer]['mask']
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fttw_jax.models.gating import HEAD_NAME, GateConfig
from fttw_jax.models.mobilenet import (MOBILENET_V1_CFG, MOBILENET_V2_CFG, MobileNetV1,
                                       MobileNetV2)
from fttw_jax.models.resnet import ResNet, pad_shortcut
from fttw_jax.models.vgg import VGG

BN_EPS = 1e-5
SUPPORTED = ('resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'vgg16_bn',
             'mobilenet_v1', 'mobilenet_v2', 'resnet18', 'resnet34', 'mobilenet_v1_imagenet')
# Outputs of at most this many pixels run as an im2col matmul: XLA:CPU's conv is ~10x
# slow at 2x2, and at 4x4 the matmul reads a gathered input-major kernel as is, where
# the conv needs it transposed (VGG16's 4x4 layers; dense time unchanged).
IM2COL_MAX_PIXELS = 16


# ----------------------------------------------------------------- conv kernels

def conv2d(x, w, stride: int = 1, input_major: bool = False):
  """NHWC conv with symmetric padding k//2: matmul for 1x1 and tiny outputs.

  ``w`` is HWIO, or with ``input_major`` (Cin, k, k, Cout) as gathered by
  ``take_inputs``: the matmul forms then read it as is (patches ordered (Cin, k, k))."""
  k = w.shape[1 if input_major else 0]
  cout = w.shape[-1]
  if k == 1:
    x = x[:, ::stride, ::stride, :]
    return jnp.einsum('nhwc,cd->nhwd', x, w.reshape(-1, cout))
  pad = k // 2
  h, wd = x.shape[1:3]
  ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
  if ho * wo > IM2COL_MAX_PIXELS:
    if input_major:
      w = jnp.transpose(w, (1, 2, 0, 3))
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if input_major:      # patches (n, cin * k * k, pixels), channels-first: contiguous rows
    n, cin = x.shape[0], x.shape[-1]
    cols = _shifted_windows(jnp.transpose(x, (0, 3, 1, 2)), k, stride, ho, wo, axes=(2, 3))
    patches = jnp.stack(cols, axis=2).reshape(n, cin * k * k, ho * wo)
    return jnp.einsum('nkp,kd->npd', patches, w.reshape(-1, cout)).reshape(n, ho, wo, cout)
  cols = _shifted_windows(x, k, stride, ho, wo)
  patches = jnp.concatenate(cols, axis=-1)               # ordered (kh, kw, cin)
  return jnp.einsum('nhwp,pd->nhwd', patches, w.reshape(-1, cout))


def depthwise2d(x, w, stride: int = 1):
  """Depthwise conv (w: (k, k, 1, C)) as k*k shifted multiply-adds (XLA:CPU's grouped
  conv is slow; this fuses into one loop)."""
  k = w.shape[0]
  pad = k // 2
  h, wd = x.shape[1:3]
  ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
  cols = _shifted_windows(x, k, stride, ho, wo)
  return sum(c * w[i // k, i % k, 0] for i, c in enumerate(cols))


def _shifted_windows(x, k, stride, ho, wo, axes=(1, 2)):
  """The k*k strided windows of ``x`` zero-padded by k//2 on its spatial ``axes``."""
  pad = k // 2
  widths = [(pad, pad) if a in axes else (0, 0) for a in range(x.ndim)]
  xp = jnp.pad(x, widths)
  def window(i, j):
    index = [slice(None)] * x.ndim
    index[axes[0]] = slice(i, i + stride * (ho - 1) + 1, stride)
    index[axes[1]] = slice(j, j + stride * (wo - 1) + 1, stride)
    return xp[tuple(index)]
  return [window(i, j) for i in range(k) for j in range(k)]


def channel_mean(x):
  """Mean over (N, H, W) per channel, as a matrix-vector product: XLA:CPU runs a
  reduce over a long axis as one serial add chain, and fuses it with (and
  recomputes) its producers; a dot does neither (~5-10x faster in-model)."""
  y = x.reshape(-1, x.shape[-1])
  return jnp.dot(jnp.full((1, y.shape[0]), 1.0 / y.shape[0], y.dtype), y)[0]


def max_pool(x, window: int, stride: int, pad: int = 0):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool(x, window: int):
  if window == 0:
    return channel_mean(x).reshape(1, 1, 1, -1)
  s = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, window, window, 1), 'VALID')
  return s / (window * window)


# ----------------------------------------------------------- compact activations

@flax.struct.dataclass
class Act:
  """An activation in slot order (see module docstring); ``dense``: original order."""
  x: jax.Array
  idx: jax.Array | None = None
  count: jax.Array | None = None
  dense: bool = flax.struct.field(pytree_node=False, default=True)


def to_dense(act: Act) -> jax.Array:
  """Scatter slots back to original channel order (fill slots are dropped)."""
  if act.dense:
    return act.x
  return jnp.zeros_like(act.x).at[..., act.idx].set(act.x, mode='drop')


def capacities(channels: int, levels: int) -> tuple[int, ...]:
  """Static widths a layer may run at: ``levels`` steps of C/levels, rounded up to a
  multiple of 8 (narrow convs of other widths run poorly on CPU), capped at C."""
  return tuple(sorted(set(level_caps(channels, levels))))


def level_caps(channels: int, levels: int) -> tuple[int, ...]:
  """Capacity of each level k = 1..levels (repeats where C is small)."""
  return tuple(min(channels, -(-math.ceil(channels * k / levels) // 8) * 8)
               for k in range(1, levels + 1))


def _bucket(count, caps):
  """Index of the smallest capacity >= count (one fused compare-sum, no search loop)."""
  return jnp.sum(count > jnp.asarray(caps[:-1], jnp.int32), dtype=jnp.int32)


def _slots_of(mask, size):
  """(sorted indices of the ones in ``mask`` padded with ``size``, their count).

  One sort of unique keys: cheaper on CPU than ``nonzero``'s cumsum + scatter."""
  on = mask > 0
  ar = jnp.arange(size, dtype=jnp.int32)
  keys = lax.sort(jnp.where(on, ar, size + ar))
  return jnp.where(keys < size, keys, size), jnp.sum(on, dtype=jnp.int32)


# --------------------------------------------------------------- parameters

def fold_bn(kernel, bias, bn_params, bn_stats):
  """Fold inference BatchNorm into the preceding conv: (kernel', bias'), in numpy."""
  f = lambda a: np.asarray(a, np.float64)
  scale = f(bn_params['scale']) / np.sqrt(f(bn_stats['var']) + BN_EPS)
  b = f(bias) if bias is not None else 0.0
  return f(kernel) * scale, (b - f(bn_stats['mean'])) * scale + f(bn_params['bias'])


def _get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _fold_conv(params, stats, path, conv='conv', bn='bn'):
  p, s = _get(params, path), _get(stats, path)
  w, b = fold_bn(np.asarray(p[conv]['kernel']), p[conv].get('bias'), p[bn], s[bn])
  return {'w': jnp.asarray(w, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}


# ------------------------------------------------------------------- executor

@dataclasses.dataclass
class _Runner:
  """Runs one sample through the layer ops; ``levels=1`` is the masked dense forward
  (full-width bucket only), ``gated=False`` the plain dense network (no heads)."""
  params: dict
  gate: GateConfig | None
  levels: int
  gated: bool = True
  rows_max_pixels: int = 16
  min_channels: int = 32
  band: int = 2
  aux: dict = dataclasses.field(default_factory=dict)

  def head(self, name, act: Act):
    """Mask (Cout,) predicted from the layer input, exactly as GatedConv's head."""
    p = self.params[name]
    if self.gate.pool == 'avg':
      pooled = channel_mean(act.x)
    else:
      pooled = jnp.max(act.x, axis=(0, 1, 2))
    if not act.dense:
      pooled = jnp.zeros_like(pooled).at[act.idx].set(pooled, mode='drop')
    if self.gate.softmax:
      pooled = jax.nn.softmax(pooled)
    logits = pooled @ p['head_w'] + p['head_b']
    return logits, (logits > 0).astype(jnp.float32)

  def conv(self, name, act: Act, stride=1, act_fn='relu', residual=None, post='relu',
           after_block=False):
    """Gated conv -> Act; with ``residual`` (original order, full width) returns the
    block output ``post(mask * conv(x) + residual)`` as a dense Act (or
    ``mask * relu(conv(x) + residual)`` with ``after_block``)."""
    p = self.params[name]
    w, b = p['w'], p['b']
    cin, cout = w.shape[2], w.shape[3]
    fn, post_fn = _ACT[act_fn], _ACT[post]
    if not self.gated:
      y = fn(conv2d(act.x, w, stride) + b)
      return Act(post_fn(y + residual) if residual is not None else y)
    logits, mask = self.head(name, act)
    self.aux[name] = {'logits': logits, 'mask': mask}
    mode = self.mode(cout, _out_pixels(act.x.shape, w.shape[0], stride))

    def finish(y):
      """Full-width output in original order -> masked output (or block output)."""
      if residual is None:
        return y * mask
      if after_block:
        return jax.nn.relu(y + residual) * mask
      return post_fn(y * mask + residual)

    if mode == 'dense':
      return Act(finish(fn(conv2d(to_dense(act), w, stride) + b)))
    if mode == 'rows':
      y = finish(fn(self._rows_conv(act, w, p['w_in'], stride) + b))
      if residual is not None:
        return Act(y)
      out_idx, n_out = _slots_of(mask, cout)
      valid = jnp.arange(cout) < n_out
      return Act(jnp.take(y, out_idx, axis=-1, mode='clip') * valid, out_idx, n_out, dense=False)
    return self._both_conv(act, w, p['w_in'], b, mask, stride, fn, post_fn, residual,
                           after_block, finish)

  def mode(self, channels, pixels):
    """How a layer runs. 'dense': masked dense (few channels: narrow convs run no faster
    on CPU). 'rows' (small outputs, pixels <= rows_max_pixels): only the active input
    channels' weight rows are gathered, as contiguous rows; all outputs are computed,
    then masked and compacted -- an element-wise gather of output columns costs ~1 ns
    a weight, more than the MACs it saves there. 'both': gather inputs and outputs."""
    if self.levels == 1 or channels < self.min_channels:
      return 'dense'
    return 'rows' if pixels <= self.rows_max_pixels else 'both'

  def _rows_conv(self, act: Act, w, w_in, stride):
    """conv over the active input channels only (bucketed), all output channels."""
    if act.dense:
      return conv2d(act.x, w, stride)
    cin = w.shape[2]
    caps = capacities(cin, self.levels)

    def branch(ci):
      def run(x, idx, w, w_in):
        if ci is None:                   # count == C: slots are in original order
          return conv2d(x, w, stride)
        return conv2d(x[..., :ci], take_inputs(w_in, idx[:ci]), stride, input_major=True)
      return run
    index = jnp.where(act.count == cin, len(caps), _bucket(act.count, caps))
    return _switch(index, [branch(ci) for ci in caps] + [branch(None)], act.x, act.idx, w,
                   w_in)

  def _both_conv(self, act, w, w_in, b, mask, stride, fn, post_fn, residual, after_block,
                 finish):
    """Narrow conv on gathered active inputs x outputs, one branch per (input, output)
    capacity pair; pairs more than ``band`` levels apart run at the nearest pair
    above (``levels**2`` branches would take minutes to compile); the full output
    capacity computes in original channel order."""
    cin, cout = w.shape[2], w.shape[3]
    out_idx, n_out = _slots_of(mask, cout)

    def branch(ci, co, gather_in):
      def run(x, in_idx, w, w_in, b, out_idx, n_out, residual):
        if ci < cin:
          x = x[..., :ci]
        if gather_in:
          w = take_inputs(w_in, in_idx[:ci])
        conv = functools.partial(conv2d, stride=stride, input_major=gather_in)
        if co == cout:
          return finish(fn(conv(x, w) + b))
        w = jnp.take(w, out_idx[:co], axis=3, mode='clip')
        b = jnp.take(b, out_idx[:co], mode='clip')
        valid = jnp.arange(co) < n_out
        y = fn(conv(x, w) + b) * valid
        if residual is None:
          return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, cout - co)))
        if after_block:
          r = jnp.take(residual, out_idx[:co], axis=-1, mode='clip')
          y = jax.nn.relu(y + r) * valid
          return jnp.zeros_like(residual).at[..., out_idx[:co]].set(y, mode='drop')
        return post_fn(residual.at[..., out_idx[:co]].add(y, mode='drop'))
      return run

    lout = level_caps(cout, self.levels)
    k_out = _bucket(n_out, lout)
    if act.dense:
      caps = sorted(set(lout))
      branches = [branch(cin, co, False) for co in caps]
      index = jnp.asarray([caps.index(c) for c in lout], jnp.int32)[k_out]
    else:
      lin = level_caps(cin, self.levels)
      k_in = _bucket(act.count, lin)
      # Only (input, output) level pairs within ``band`` of each other get a branch;
      # others run at the nearest allowed pair above (wider, still exact).
      k_out = jnp.maximum(k_out, k_in - self.band)
      k_in = jnp.maximum(k_in, k_out - self.band)
      levels = range(self.levels)
      pairs = sorted({(lin[i], lout[o]) for i in levels for o in levels
                      if abs(i - o) <= self.band})
      caps = sorted(set(lout))
      branches = ([branch(ci, co, True) for ci, co in pairs] +
                  [branch(cin, co, False) for co in caps])  # count == C: original order
      table = np.zeros((self.levels, self.levels), np.int32)
      for i in levels:
        for o in levels:
          if abs(i - o) <= self.band:
            table[i, o] = pairs.index((lin[i], lout[o]))
      dense_row = np.asarray([len(pairs) + caps.index(c) for c in lout], np.int32)
      index = jnp.where(act.count == cin, jnp.asarray(dense_row)[k_out],
                        jnp.asarray(table)[k_in, k_out])
    y = _switch(index, branches, act.x, act.idx, w, w_in, b, out_idx, n_out, residual)
    if residual is not None:
      return Act(y)
    full = jnp.asarray(lout, jnp.int32)[k_out] == cout   # computed in original order
    idx = jnp.where(full, jnp.arange(cout, dtype=jnp.int32), out_idx)
    return Act(y, idx, jnp.where(full, jnp.int32(cout), n_out), dense=False)

  def depthwise(self, name, act: Act, stride=1):
    """Gated depthwise conv, per slot, masked by ``mask * in_nz`` (SPEC 2.2); then
    re-compacted so that the next pointwise conv sees only channels that are on."""
    p = self.params[name]
    w, b = p['w'], p['b']
    c = w.shape[-1]
    if not self.gated:
      return Act(jax.nn.relu(depthwise2d(act.x, w, stride) + b))
    logits, mask = self.head(name, act)
    mode = self.mode(c, _out_pixels(act.x.shape, w.shape[0], stride))
    if act.dense or mode == 'dense':
      x = to_dense(act)
      keep = mask * jnp.any(x[0] != 0, axis=(0, 1))
      self.aux[name] = {'logits': logits, 'mask': keep}
      y = jax.nn.relu(depthwise2d(x, w, stride) + b) * keep
      if mode == 'dense':
        return Act(y)
      return _compact(y, keep, jnp.arange(c, dtype=jnp.int32))
    w = jnp.take(w, act.idx, axis=3, mode='clip')
    b = jnp.take(b, act.idx, mode='clip')
    keep = jnp.take(mask, act.idx, mode='clip') * jnp.any(act.x[0] != 0, axis=(0, 1))
    self.aux[name] = {'logits': logits,
                      'mask': jnp.zeros_like(mask).at[act.idx].set(keep, mode='drop')}
    y = jax.nn.relu(depthwise2d(act.x, w, stride) + b) * keep
    return _compact(y, keep, act.idx)

  def plain_conv(self, name, x, stride=1):
    """Unmasked conv + folded BN (shortcut projections), dense."""
    p = self.params[name]
    return conv2d(x, p['w'], stride) + p['b']

  def classifier(self, x):
    p = self.params['classifier']
    return x.reshape(1, -1) @ p['w'] + p['b']


_ACT = {'relu': jax.nn.relu, 'none': lambda t: t}


def _out_pixels(shape, k, stride):
  pad = k // 2
  return (((shape[1] + 2 * pad - k) // stride + 1) * ((shape[2] + 2 * pad - k) // stride + 1))


def _compact(y, keep, idx):
  """Move the slots with ``keep`` to the front (an activation gather: cheap next to
  the pointwise conv it narrows)."""
  c = y.shape[-1]
  slots, n_new = _slots_of(keep, c)
  valid = jnp.arange(c) < n_new
  new_idx = jnp.where(valid, jnp.take(idx, slots, mode='clip'), c)
  return Act(jnp.take(y, slots, axis=-1, mode='clip') * valid, new_idx, n_new, dense=False)


def take_inputs(w_in, idx):
  """Input-major kernel (len(idx), k, k, Cout) of the input channels ``idx``, from
  the input-major copy ``w_in`` of the kernel: a gather of contiguous rows, which
  ``conv2d(..., input_major=True)`` consumes without a transpose where it runs a
  matmul. Gathering axis 2 of the HWIO kernel is a strided element gather, ~2x
  slower on the memory-bound layers (VGG16's 512-channel ones)."""
  return jnp.take(w_in, idx, axis=0, mode='clip')


def _switch(index, branches, *ops):
  if len(branches) == 1:
    return branches[0](*ops)
  return lax.switch(index, branches, *ops)




# -------------------------------------------------------------- architectures

def _resnet(run: _Runner, model: ResNet, x):
  act = run.conv('stem', Act(x), stride=2 if model.imagenet else 1)
  if model.imagenet:                        # max pool is per channel: fine on slots
    act = act.replace(x=max_pool(act.x, 3, 2, 1))
  x = to_dense(act)
  after_block = run.gate is not None and run.gate.gt_after_block
  for stage, size in enumerate(model.stage_sizes):
    for b in range(size):
      name = f'layer{stage + 1}_{b}'
      stride = 2 if stage > 0 and b == 0 else 1
      features = run.params[f'{name}/conv1']['w'].shape[-1]
      residual = x
      if stride != 1 or x.shape[-1] != features:
        if model.imagenet:
          residual = run.plain_conv(f'{name}/downsample', x, stride)
        else:
          residual = pad_shortcut(x, features, stride, model.options.shortcut_pad)
      y = run.conv(f'{name}/conv1', Act(x), stride)
      x = run.conv(f'{name}/conv2', y, act_fn='none', residual=residual, post='relu',
                   after_block=after_block).x
  return run.classifier(avg_pool(x, 0))


def _vgg(run: _Runner, model: VGG, x):
  act, index = Act(x), 0
  for v in model.cfg:
    if v == 'M':
      act = act.replace(x=max_pool(act.x, 2, 2))
    else:
      act = run.conv(f'conv{index}', act)
      index += 1
  return run.classifier(to_dense(act))


def _mobilenet_v1(run: _Runner, model: MobileNetV1, x):
  act = run.conv('stem', Act(x), stride=2 if model.imagenet else 1)
  for i, (_, s) in enumerate(MOBILENET_V1_CFG):
    act = run.depthwise(f'block{i}_dw', act, s)
    act = run.conv(f'block{i}_pw', act)
  act = act.replace(x=avg_pool(act.x, 0 if model.imagenet else 2))
  return run.classifier(to_dense(act))


def _mobilenet_v2(run: _Runner, model: MobileNetV2, x):
  act, index = run.conv('stem', Act(x)), 0
  for _, _, n, s in MOBILENET_V2_CFG:
    for b in range(n):
      name, stride = f'block{index}', (s if b == 0 else 1)
      y = run.conv(f'{name}/expand', act)
      y = run.depthwise(f'{name}/dw', y, stride)
      if stride == 1:
        shortcut = to_dense(act)
        if f'{name}/shortcut' in run.params:
          shortcut = run.plain_conv(f'{name}/shortcut', shortcut)
        act = run.conv(f'{name}/project', y, act_fn='none', residual=shortcut, post='none')
      else:
        act = run.conv(f'{name}/project', y, act_fn='none')
      index += 1
  act = run.conv('final_conv', act)
  act = act.replace(x=avg_pool(act.x, 4))
  return run.classifier(to_dense(act))


_ARCHS: dict[type, Callable] = {ResNet: _resnet, VGG: _vgg, MobileNetV1: _mobilenet_v1,
                                MobileNetV2: _mobilenet_v2}


_PROJECTIONS = ('downsample_conv', 'downsample_bn', 'shortcut_conv', 'shortcut_bn')


def fold_variables(variables, input_major: bool = True) -> dict:
  """{layer path: {'w', 'b'[, 'head_w', 'head_b', 'w_in']}} with BN folded into every
  conv; ``input_major``: also the input-major kernel copies (see ``take_inputs``)."""
  params, stats = variables['params'], variables['batch_stats']
  out = {}

  def walk(tree, path):
    if 'conv' in tree and 'bn' in tree:
      entry = _fold_conv(params, stats, path)
      if HEAD_NAME in tree:
        entry['head_w'] = jnp.asarray(tree[HEAD_NAME]['kernel'], jnp.float32)
        entry['head_b'] = jnp.asarray(tree[HEAD_NAME]['bias'], jnp.float32)
        if input_major and entry['w'].shape[2] > 1:  # not depthwise
          entry['w_in'] = jnp.transpose(entry['w'], (2, 0, 1, 3))
      out[path] = entry
      return
    for proj in ('downsample', 'shortcut'):
      if f'{proj}_conv' in tree:
        out[f'{path}/{proj}'] = _fold_conv(params, stats, path, f'{proj}_conv', f'{proj}_bn')
    for key, sub in tree.items():
      if isinstance(sub, dict) and key not in _PROJECTIONS:
        walk(sub, f'{path}/{key}' if path else key)

  walk(params, '')
  cls = params['classifier']
  out['classifier'] = {'w': jnp.asarray(cls['kernel'], jnp.float32),
                       'b': jnp.asarray(cls['bias'], jnp.float32)}
  return out


# ------------------------------------------------------------------ public API

def check_supported(model) -> Callable:
  """The architecture walker for ``model``, or a ValueError naming what is supported."""
  walker = _ARCHS.get(type(model))
  if walker is None:
    raise ValueError(
        f'sparse execution does not support {type(model).__name__}; supported '
        f'architectures: {[t.__name__ for t in _ARCHS]} (registry models {list(SUPPORTED)})')
  if model.gate is None:
    raise ValueError('sparse execution needs a gated model (gate=GateConfig(...)); '
                     'a baseline model has no heads to predict masks')
  if model.gate.mask_source != 'predicted':
    raise ValueError(f"sparse execution runs the heads' predicted masks; got "
                     f'gate.mask_source={model.gate.mask_source!r} (valid: \'predicted\')')
  # The depthwise kernels implement SPEC 2.2's rule.
  if model.gate.depthwise_rule != 'follow_input' and isinstance(model, (MobileNetV1,
                                                                        MobileNetV2)):
    raise ValueError(f'sparse execution implements gate.depthwise_rule=\'follow_input\'; '
                     f'got {model.gate.depthwise_rule!r} (fidelity=\'reference\')')
  if model.gate.head_norm != 'none':
    raise ValueError(f'sparse execution computes the heads as the paper does; got '
                     f"gate.head_norm={model.gate.head_norm!r} (valid: 'none')")
  return walker


class Executor:
  """The calls both sparse runners share (this one and ``sparse_native``'s).

  ``__call__(x)`` is the sparse path, ``predict(x)`` its logits alone;
  ``masked_dense`` and ``dense`` run the same kernels at full width with and
  without masks: the fair baselines for timing. Subclasses set ``params`` and
  define ``_forward_fn(mode)`` -> ``f(params, xs) -> (logits, aux)``.
  """

  def __call__(self, x):
    """Sparse forward: (logits (N, classes), {layer: {'logits', 'mask'}} each (N, C))."""
    return self._run('sparse', x)

  def predict(self, x):
    """Sparse forward, logits only (N, classes): the masks are not materialised."""
    return self._run('sparse', x, logits_only=True)

  def masked_dense(self, x):
    """Masked dense forward with the same kernels (every layer at full width)."""
    return self._run('masked', x)

  def dense(self, x):
    """The plain network (no heads, no masks) with the same kernels: (N, classes)."""
    return self._run('dense', x, logits_only=True)

  def _run(self, mode, x, logits_only=False):
    fns = self.__dict__.setdefault('_fns', {})
    key = (mode, logits_only)
    if key not in fns:
      fn = self._forward_fn(mode)
      fns[key] = jax.jit((lambda p, x: fn(p, x)[0]) if logits_only else fn)
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      x = x[None]
    if x.ndim != 4:
      raise ValueError(f'expected images (N, H, W, C) or (H, W, C), got shape {x.shape}')
    return fns[key](self.params, x)


def map_samples(one, xs):
  """``one(x) -> (logits (classes,), aux)`` over the batch: directly for one sample,
  else ``lax.map`` (a ``vmap`` would run every ``lax.switch`` branch)."""
  if xs.shape[0] == 1:
    logits, aux = one(xs[0])
    return logits[None], jax.tree.map(lambda a: a[None], aux)
  return lax.map(one, xs)


class SparseModel(Executor):
  """Batch-1 sparse inference of a gated model in XLA; equal to ``model.apply`` (eval
  mode). Batches run sample by sample. See ``Executor`` for the calls.
  """

  def __init__(self, model, params: dict, levels: int = 16, band: int = 2,
               rows_max_pixels: int = 16, min_channels: int = 32):
    self.walker = check_supported(model)
    if levels < 1:
      raise ValueError(f'levels must be >= 1, got {levels!r}')
    self.model, self.params = model, params
    if band < 0:
      raise ValueError(f'band must be >= 0, got {band!r}')
    self.policy = dict(levels=levels, band=band, rows_max_pixels=rows_max_pixels,
                       min_channels=min_channels)

  @classmethod
  def from_variables(cls, model, variables, **policy) -> 'SparseModel':
    """Fold BN into the convs once (at load time) and wrap ``model``.

    ``policy``: ``levels`` (capacity buckets per layer: C/levels steps, rounded up to
    multiples of 8), ``band`` (input/output level pairs that get a branch),
    ``rows_max_pixels`` and ``min_channels`` (see ``_Runner.mode``).
    """
    check_supported(model)
    return cls(model, fold_variables(variables), **policy)

  def _forward_fn(self, mode):
    return functools.partial(_forward, self.walker, self.model, mode,
                             tuple(sorted(self.policy.items())))


def _forward(walker, model, mode, policy, params, xs):
  policy = dict(policy)
  if mode == 'masked':
    policy['levels'] = 1
  def one(x):
    run = _Runner(params, model.gate, gated=mode != 'dense', **policy)
    logits = walker(run, model, x[None])[0]
    return logits, run.aux
  return map_samples(one, xs)
