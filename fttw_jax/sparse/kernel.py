"""The C++ gated-conv custom call (``csrc/gated_conv.cc`` here): built on first use.

XLA:CPU dispatches every op of a batch-1 forward separately, and a CIFAR ResNet's
layers are so small that dispatch, not MACs, sets the time; the XLA sparse path
(``fttw_jax.sparse.xla``) therefore cannot beat dense there. One custom call per
layer runs the head, the narrow conv, BN, the activation and the residual.

The library is built by ``fttw_jax.native_build`` (the machine's C++ compiler, a
cache directory keyed by source, jaxlib and CPU). Nothing is downloaded.
``available()`` says whether it can be had here, and ``NativeUnavailable`` carries
the compiler's message when it cannot.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fttw_jax import native_build
from fttw_jax.native_build import NativeUnavailable

SOURCE = Path(__file__).parent / 'csrc' / 'gated_conv.cc'
TARGET = 'fttw_gated_conv'


def library_path() -> Path:
  return native_build.library_path(SOURCE)


def build() -> Path:
  """Compile the library unless the cache has it; return its path."""
  return native_build.build(SOURCE)


def ensure() -> None:
  """Build (if needed) and register the custom call; NativeUnavailable if it cannot be."""
  error = native_build.register(SOURCE, ((TARGET, 'FttwGatedConv'),))
  if error is not None:
    raise NativeUnavailable(error)


def available() -> bool:
  try:
    ensure()
  except NativeUnavailable:
    return False
  return True


_EMPTY = np.zeros((0,), np.float32)


def gated_conv(x, w, b, head=None, residual=None, *, stride: int = 1, relu: bool = True,
               post_relu: bool = True, after_block: bool = False, pool: str = 'avg',
               softmax: bool = True, head_norm: str = 'none', sparse: bool = True,
               depthwise: bool = False):
  """One layer, NCHW: ``(y (N, Cout, Ho, Wo), head logits (N, Cout), mask (N, Cout))``.

  ``w`` is OIHW ((C, 1, k, k) when ``depthwise``) with BN folded in, ``b`` its bias;
  ``head`` = (head_w (Cin, Cout), head_b (Cout,), head_w.sum(0)) or None (a plain
  conv: logits zeros, mask ones), its input pooled as ``pool``, then ``softmax`` and
  ``head_norm`` (GateConfig's), the column sums computed once at load time (so that
  no call reads all of head_w for them). ``residual`` (N, Cout, Ho, Wo) or None.
  The mask is the one applied (depthwise: also off where the input channel is all
  zero, SPEC 2.2). ``sparse=False`` computes every channel and then masks. The
  samples of a batch are split across XLA's intra-op threads.
  """
  ensure()
  if jnp.ndim(x) != 4:
    raise ValueError(f'gated_conv: expected x (N,Cin,H,W), got shape {jnp.shape(x)}')
  cout, _, k, _ = w.shape
  n = x.shape[0]
  pad = k // 2
  ho = (x.shape[2] + 2 * pad - k) // stride + 1
  wo = (x.shape[3] + 2 * pad - k) // stride + 1
  head_w, head_b, head_colsum = (_EMPTY, _EMPTY, _EMPTY) if head is None else head
  call = jax.ffi.ffi_call(
      TARGET, (jax.ShapeDtypeStruct((n, cout, ho, wo), jnp.float32),
               jax.ShapeDtypeStruct((n, cout), jnp.float32),
               jax.ShapeDtypeStruct((n, cout), jnp.float32)),
      vmap_method='sequential')
  return call(x, w, b, head_w, head_b, head_colsum, _EMPTY if residual is None else residual,
              stride=stride, pad=pad, relu=relu, post_relu=post_relu,
              after_block=after_block, pool_max=pool == 'max', softmax=softmax,
              sparse=sparse, depthwise=depthwise, standardize=head_norm == 'standardize')
