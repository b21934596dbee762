"""oneDNN convolutions on XLA:CPU (``conv_impl='onednn'``): C++ FFI calls, own VJP.

XLA:CPU's own (Eigen) convolutions and their backward passes set the CPU train
step's time (bench/RESULTS.md, issue 18). ``csrc/onednn_conv.cc`` runs the forward,
backward-data and backward-weights convolutions of oneDNN instead; ``conv`` here is
a drop-in ``lax.conv_general_dilated`` for ``nn.Conv(conv_general_dilated=...)``
that takes that path for the 2-D float32 NHWC/HWIO, groups=1, undilated convs our
models use and hands every other conv to XLA.

oneDNN is optional: the ``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` packages
(library and headers, in this Python's prefix). ``unavailable()`` says why the path
cannot be had here (no oneDNN, build error), and ``conv_impl.resolve`` falls back.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

from fttw_jax import native_build
from fttw_jax.models.batch_norm import vary_like

SOURCE = Path(__file__).parent / 'csrc' / 'onednn_conv.cc'
KINDS = ('Fwd', 'BwdData', 'BwdWeights')
TARGETS = tuple((f'fttw_onednn_conv_{k.lower()}', f'FttwOnednnConv{k}') for k in KINDS)
NHWC = ('NHWC', 'HWIO', 'NHWC')


def _flags() -> tuple[str, ...]:
  """Compiler and linker flags for the oneDNN in this Python's prefix."""
  prefix = Path(sys.prefix)
  version_h = prefix / 'include' / 'oneapi' / 'dnnl' / 'dnnl_version.h'
  if not version_h.exists() or not list((prefix / 'lib').glob('libdnnl.so*')):
    raise native_build.NativeUnavailable(
        f'oneDNN is not installed in {prefix} (pip install onednn-cpu-gomp '
        'onednn-devel-cpu-gomp)')
  version = '.'.join(re.findall(r'#define DNNL_VERSION_(?:MAJOR|MINOR|PATCH) (\d+)',
                                version_h.read_text()))
  lib = prefix / 'lib'
  return (f'-I{prefix / "include"}', f'-DFTTW_ONEDNN_VERSION="{version}"', f'-L{lib}',
          '-ldnnl', f'-Wl,-rpath,{lib}')


@functools.cache
def unavailable() -> str | None:
  """None when the oneDNN calls are registered, else why not (logged once)."""
  try:
    error = native_build.register(SOURCE, TARGETS, _flags())
  except native_build.NativeUnavailable as e:
    error = str(e)
  if error is not None:
    logging.warning("conv_impl='onednn' unavailable, using conv_impl='cpu': %s",
                    error.splitlines()[0])
  return error


def _call(kind: str, a, b, shape, strides, pads):
  (pt, pb), (pl, pr) = pads
  # Under shard_map the result varies over the operands' axes (both the same).
  aval = jax.typeof(a)
  out = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=aval.sharding,
                             manual_axis_type=aval.manual_axis_type)
  call = jax.ffi.ffi_call(TARGETS[KINDS.index(kind)][0], out, vmap_method='sequential')
  return call(a, b, sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
  n, h, wd, _ = x.shape
  kh, kw, _, co = w.shape
  ho = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
  wo = (wd + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
  return _call('Fwd', x, w, (n, ho, wo, co), strides, pads)


def _conv_fwd(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, res, g):
  x, w = res
  return (_call('BwdData', g, w, x.shape, strides, pads),
          _call('BwdWeights', x, g, w.shape, strides, pads))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
         preferred_element_type=None):
  """``lax.conv_general_dilated``, through oneDNN where it supports the conv."""
  args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count, precision=precision,
              preferred_element_type=preferred_element_type)
  supported = (
      jnp.ndim(lhs) == 4 and jnp.ndim(rhs) == 4
      and lhs.dtype == rhs.dtype == jnp.float32
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type in (None, jnp.float32)
      and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
      and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
  if not supported:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
  error = unavailable()
  if error is not None:
    raise native_build.NativeUnavailable(error)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple(tuple(int(p) for p in pair) for pair in padding)
  # A replicated kernel is cast to the activations' shard_map axes (its gradient is
  # then summed over them, as for any replicated parameter).
  rhs, lhs = vary_like(rhs, lhs), vary_like(lhs, rhs)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
