"""Building and loading this package's C++ XLA FFI libraries (``*/csrc/*.cc``).

A library is compiled with the machine's C++ compiler (``$CXX``, else ``c++``) for
the machine's CPU (``-march=native``) into a cache directory (``$FTTW_JAX_CACHE``,
default ``~/.cache/fttw_jax``), keyed by the source, the flags, the jaxlib version
and the CPU, so a shared home directory serves several machines; the file appears
atomically (renamed when built). Nothing is downloaded. ``NativeUnavailable``
carries the compiler's or loader's message when a library cannot be had.
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
import jaxlib
from absl import logging

CXXFLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


class NativeUnavailable(RuntimeError):
  """A custom call cannot be built or loaded here (no compiler, build error)."""


def _cpu_id() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(('flags', 'Features')):
        return line
  except OSError:
    pass
  return platform.processor()


def library_path(source: Path, flags: tuple[str, ...] = ()) -> Path:
  key = hashlib.sha256(b'\0'.join([
      source.read_bytes(), jaxlib.__version__.encode(), platform.machine().encode(),
      _cpu_id().encode(), ' '.join(CXXFLAGS + flags).encode()])).hexdigest()[:16]
  cache = Path(os.environ.get('FTTW_JAX_CACHE', Path.home() / '.cache' / 'fttw_jax'))
  return cache / f'{source.stem}-{key}.so'


def build(source: Path, flags: tuple[str, ...] = ()) -> Path:
  """Compile ``source`` (extra compiler/linker ``flags``) unless the cache has it."""
  out = library_path(source, flags)
  if out.exists():
    return out
  cxx = os.environ.get('CXX', 'c++')
  if shutil.which(cxx) is None:
    raise NativeUnavailable(f'no C++ compiler {cxx!r} on PATH (set $CXX) to build {source.name}')
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)     # atomic: rename when built
  except OSError as e:
    raise NativeUnavailable(f'cannot write the build cache {out.parent} ({e}); '
                            'set $FTTW_JAX_CACHE to a writable directory') from e
  os.close(fd)
  cmd = [cxx, *CXXFLAGS, f'-I{jax.ffi.include_dir()}', str(source), '-o', tmp, *flags]
  logging.info('building %s into %s (once per machine and version)', source.name, out)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise NativeUnavailable(
          f'building {source.name} failed ({" ".join(cmd)}):\n{proc.stderr[-4000:]}')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.cache
def register(source: Path, targets: tuple[tuple[str, str], ...],
             flags: tuple[str, ...] = ()) -> str | None:
  """Build, load and register ``targets`` ((FFI target name, C symbol), ...) once per
  process: None, or why it cannot be had (kept, so that a failing build is not
  retried on every call)."""
  try:
    lib = ctypes.CDLL(str(build(source, flags)))
    for target, symbol in targets:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except NativeUnavailable as e:
    return str(e)
  except (OSError, AttributeError) as e:
    return f'loading {library_path(source, flags)} failed: {e}'
  return None
