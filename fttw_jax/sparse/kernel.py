"""The C++ gated-conv custom call (``csrc/gated_conv.cc`` here): built on first use.

XLA:CPU dispatches every op of a batch-1 forward separately, and a CIFAR ResNet's
layers are so small that dispatch, not MACs, sets the time; the XLA sparse path
(``fttw_jax.sparse.xla``) therefore cannot beat dense there. One custom call per
layer runs the head, the narrow conv, BN, the activation and the residual.

The library is compiled with the machine's C++ compiler (``$CXX``, else ``c++``)
for the machine's CPU (``-march=native``) into a cache directory
(``$FTTW_JAX_CACHE``, default ``~/.cache/fttw_jax``), keyed by the source, the
jaxlib version and the CPU, so a shared home directory serves several machines.
Nothing is downloaded. ``available()`` says whether it can be had here, and
``NativeUnavailable`` carries the compiler's message when it cannot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

SOURCE = Path(__file__).parent / 'csrc' / 'gated_conv.cc'
TARGET = 'fttw_gated_conv'
CXXFLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


class NativeUnavailable(RuntimeError):
  """The custom call cannot be built or loaded here (no compiler, build error)."""


def _cpu_id() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(('flags', 'Features')):
        return line
  except OSError:
    pass
  return platform.processor()


def library_path() -> Path:
  key = hashlib.sha256(b'\0'.join([
      SOURCE.read_bytes(), jaxlib.__version__.encode(), platform.machine().encode(),
      _cpu_id().encode(), ' '.join(CXXFLAGS).encode()])).hexdigest()[:16]
  cache = Path(os.environ.get('FTTW_JAX_CACHE', Path.home() / '.cache' / 'fttw_jax'))
  return cache / f'gated_conv-{key}.so'


def build() -> Path:
  """Compile the library unless the cache has it; return its path."""
  out = library_path()
  if out.exists():
    return out
  cxx = os.environ.get('CXX', 'c++')
  if shutil.which(cxx) is None:
    raise NativeUnavailable(f'no C++ compiler {cxx!r} on PATH (set $CXX) to build {SOURCE.name}')
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)     # atomic: rename when built
  except OSError as e:
    raise NativeUnavailable(f'cannot write the build cache {out.parent} ({e}); '
                            'set $FTTW_JAX_CACHE to a writable directory') from e
  os.close(fd)
  cmd = [cxx, *CXXFLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', tmp]
  logging.info('building %s into %s (once per machine and version)', SOURCE.name, out)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise NativeUnavailable(
          f'building {SOURCE.name} failed ({" ".join(cmd)}):\n{proc.stderr[-4000:]}')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.cache
def _register() -> str | None:
  """Build, load and register once per process: None, or why it cannot be had (kept,
  so that a failing build is not retried on every call)."""
  try:
    lib = ctypes.CDLL(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FttwGatedConv), platform='cpu')
  except NativeUnavailable as e:
    return str(e)
  except (OSError, AttributeError) as e:
    return f'loading {library_path()} failed: {e}'
  return None


def ensure() -> None:
  """Build (if needed) and register the custom call; NativeUnavailable if it cannot be."""
  error = _register()
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
               softmax: bool = True, sparse: bool = True, depthwise: bool = False):
  """One layer, NCHW: ``(y (N, Cout, Ho, Wo), head logits (N, Cout), mask (N, Cout))``.

  ``w`` is OIHW ((C, 1, k, k) when ``depthwise``) with BN folded in, ``b`` its bias;
  ``head`` = (head_w (Cin, Cout), head_b (Cout,), head_w.sum(0)) or None (a plain
  conv: logits zeros, mask ones), the column sums computed once at load time (so that
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
              sparse=sparse, depthwise=depthwise)
