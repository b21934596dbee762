"""Sparse batch-1 inference in XLA: compute only the channels a sample's masks keep.

This is the portable path (any backend, every architecture). On CPU the C++
custom call of ``fttw_jax.sparse.native`` runs the same contract faster (ResNet-56
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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fttw_jax.sparse import base, walkers
from fttw_jax.models.gating import normalize_head_input

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


# ------------------------------------------------------------------- runner

@dataclasses.dataclass(frozen=True)
class _Epilogue:
  """What follows a conv (z = conv + folded bias): the activation, the mask (None: the
  plain network) and the residual join of a block's last conv (see ``walkers``)."""
  relu: bool
  mask: jax.Array | None = None
  residual: jax.Array | None = None
  post_relu: bool = True
  after_block: bool = False

  def _act(self, z):
    return jax.nn.relu(z) if self.relu else z

  def full(self, z):
    """Full width, original channel order -> the layer output (original order)."""
    m = 1.0 if self.mask is None else self.mask
    if self.residual is None:
      return self._act(z) * m
    if self.after_block:
      return jax.nn.relu(self._act(z) + self.residual) * m
    y = self._act(z) * m + self.residual
    return jax.nn.relu(y) if self.post_relu else y

  def narrow(self, z, out_idx, n_out, cout):
    """``co`` computed slots (channels ``out_idx[:co]``, the first ``n_out`` real) ->
    the output: zero-padded slots, or the block output in original order."""
    co = z.shape[-1]
    idx = out_idx[:co]
    valid = jnp.arange(co) < n_out
    y = self._act(z) * valid
    if self.residual is None:
      return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, cout - co)))
    if self.after_block:
      r = jnp.take(self.residual, idx, axis=-1, mode='clip')
      y = jax.nn.relu(y + r) * valid
      return jnp.zeros_like(self.residual).at[..., idx].set(y, mode='drop')
    y = self.residual.at[..., idx].add(y, mode='drop')
    return jax.nn.relu(y) if self.post_relu else y


@dataclasses.dataclass
class _Runner:
  """The walkers' runner for one NHWC sample (``Act``); ``levels=1`` is the masked
  dense forward (full-width bucket only), ``gated=False`` the plain dense network."""
  params: dict
  gate: object
  levels: int
  gated: bool = True
  rows_max_pixels: int = 16
  min_channels: int = 32
  band: int = 2
  aux: dict = dataclasses.field(default_factory=dict)

  def out_channels(self, name):
    return self.params[name]['w'].shape[-1]

  def has(self, name):
    return name in self.params

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
    pooled = normalize_head_input(pooled, self.gate.head_norm)
    logits = pooled @ p['head_w'] + p['head_b']
    return logits, (logits > 0).astype(jnp.float32)

  def conv(self, name, act: Act, stride=1, relu=True, residual=None, post_relu=True,
           after_block=False):
    """Gated conv -> Act (compact), or with ``residual`` the block output (dense Act)."""
    p = self.params[name]
    w, b = p['w'], p['b']
    if not self.gated:
      return Act(_Epilogue(relu, None, residual, post_relu, after_block).full(
          conv2d(act.x, w, stride) + b))
    logits, mask = self.head(name, act)
    self.aux[name] = {'logits': logits, 'mask': mask}
    out = _Epilogue(relu, mask, residual, post_relu, after_block)
    mode = self.mode(w.shape[3], _out_pixels(act.x.shape, w.shape[0], stride))
    if mode == 'dense':
      return Act(out.full(conv2d(to_dense(act), w, stride) + b))
    if mode == 'rows':
      y = out.full(self._rows_conv(act, w, p['w_in'], stride) + b)
      if residual is not None:
        return Act(y)
      return _compact(y, mask, jnp.arange(w.shape[3], dtype=jnp.int32))
    return self._both_conv(act, p, stride, out)

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
      def run(x, idx):
        if ci is None:                   # count == C: slots are in original order
          return conv2d(x, w, stride)
        return conv2d(x[..., :ci], take_inputs(w_in, idx[:ci]), stride, input_major=True)
      return run
    index = jnp.where(act.count == cin, len(caps), _bucket(act.count, caps))
    return _switch(index, [branch(ci) for ci in caps] + [branch(None)], act.x, act.idx)

  def _both_conv(self, act: Act, p, stride, out: _Epilogue):
    """Narrow conv on gathered active inputs x outputs, one branch per (input, output)
    capacity pair; pairs more than ``band`` levels apart run at the nearest pair
    above (``levels**2`` branches would take minutes to compile); the full output
    capacity computes in original channel order."""
    w, w_in, b = p['w'], p['w_in'], p['b']
    cin, cout = w.shape[2], w.shape[3]
    out_idx, n_out = _slots_of(out.mask, cout)

    def branch(ci, co, gather_in):
      def run(x, in_idx):
        kernel = take_inputs(w_in, in_idx[:ci]) if gather_in else w
        conv = functools.partial(conv2d, x[..., :ci], stride=stride, input_major=gather_in)
        if co == cout:
          return out.full(conv(kernel) + b)
        kernel = jnp.take(kernel, out_idx[:co], axis=3, mode='clip')
        return out.narrow(conv(kernel) + jnp.take(b, out_idx[:co], mode='clip'), out_idx,
                          n_out, cout)
      return run

    lout = level_caps(cout, self.levels)
    caps = sorted(set(lout))
    k_out = _bucket(n_out, lout)
    if act.dense:
      branches = [branch(cin, co, False) for co in caps]
      index = jnp.asarray([caps.index(c) for c in lout], jnp.int32)[k_out]
    else:
      lin = level_caps(cin, self.levels)
      k_in = _bucket(act.count, lin)
      # Only (input, output) level pairs within ``band`` of each other get a branch;
      # others run at the nearest allowed pair above (wider, still exact).
      k_out = jnp.maximum(k_out, k_in - self.band)
      k_in = jnp.maximum(k_in, k_out - self.band)
      near = [(i, o) for i in range(self.levels) for o in range(self.levels)
              if abs(i - o) <= self.band]
      pairs = sorted({(lin[i], lout[o]) for i, o in near})
      branches = ([branch(ci, co, True) for ci, co in pairs] +
                  [branch(cin, co, False) for co in caps])  # count == C: original order
      table = np.zeros((self.levels, self.levels), np.int32)
      for i, o in near:
        table[i, o] = pairs.index((lin[i], lout[o]))
      dense_row = np.asarray([len(pairs) + caps.index(c) for c in lout], np.int32)
      index = jnp.where(act.count == cin, jnp.asarray(dense_row)[k_out],
                        jnp.asarray(table)[k_in, k_out])
    y = _switch(index, branches, act.x, act.idx)
    if out.residual is not None:
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

  def shortcut(self, act: Act, conv=None, stride=1, pad=None):
    """The residual stream (dense, original order): projection ``conv`` + folded BN,
    or ``pad`` (an NHWC function), or ``act`` itself."""
    x = to_dense(act)
    if conv is not None:
      return conv2d(x, self.params[conv]['w'], stride) + self.params[conv]['b']
    return pad(x) if pad is not None else x

  def pool(self, act: Act, kind, window, stride=None, pad=0):
    return act.replace(x=walkers.pool(act.x, kind, window, stride, pad))  # per slot

  def classify(self, act: Act):
    p = self.params['classifier']
    x = to_dense(act)
    return x.reshape(x.shape[0], -1) @ p['w'] + p['b']


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


# ------------------------------------------------------------------ public API

class SparseModel(base.Executor):
  """Batch-1 sparse inference of a gated model in XLA; equal to ``model.apply`` (eval
  mode). Batches run sample by sample (``dense``: the whole batch at once). See
  ``base.Executor`` for the calls.
  """

  def __init__(self, model, params: dict, levels: int = 16, band: int = 2,
               rows_max_pixels: int = 16, min_channels: int = 32):
    self.walker = walkers.check_supported(model)
    if levels < 1:
      raise ValueError(f'levels must be >= 1, got {levels!r}')
    if band < 0:
      raise ValueError(f'band must be >= 0, got {band!r}')
    self.model, self.params = model, params
    self.policy = dict(levels=levels, band=band, rows_max_pixels=rows_max_pixels,
                       min_channels=min_channels)

  @classmethod
  def from_variables(cls, model, variables, **policy) -> 'SparseModel':
    """Fold BN into the convs once (at load time), add the input-major kernel copies
    (see ``take_inputs``) and wrap ``model``.

    ``policy``: ``levels`` (capacity buckets per layer: C/levels steps, rounded up to
    multiples of 8), ``band`` (input/output level pairs that get a branch),
    ``rows_max_pixels`` and ``min_channels`` (see ``_Runner.mode``).
    """
    walkers.check_supported(model)
    params = base.fold_variables(variables)
    for entry in params.values():
      if 'head_w' in entry and entry['w'].shape[2] > 1:  # not depthwise
        entry['w_in'] = jnp.transpose(entry['w'], (2, 0, 1, 3))
    return cls(model, params, **policy)

  def _forward_fn(self, mode):
    return functools.partial(_forward, self.walker, self.model, mode,
                             tuple(sorted(self.policy.items())))


def _forward(walker, model, mode, policy, params, xs):
  policy = dict(policy)
  if mode == 'dense':    # no per-sample branches: the batch runs through each conv at once
    run = _Runner(params, model.gate, gated=False, **policy)
    return walker(run, model, Act(xs)), {}
  if mode == 'masked':
    policy['levels'] = 1
  def one(x):
    run = _Runner(params, model.gate, gated=mode != 'dense', **policy)
    logits = walker(run, model, Act(x[None]))[0]
    return logits, run.aux
  return base.map_samples(one, xs)
