"""Sparse inference: compute only the channels each sample's masks keep.

  walkers.py   one walk per architecture over the runner interface (its docstring)
  base.py      BN folding at load time, the calls every model shares (``Executor``)
  xla.py       ``SparseModel``: the portable runner, pure XLA (any backend)
  native.py    ``NativeSparseModel``: one C++ custom call per conv (CPU)
  kernel.py    building, loading and calling that custom call (csrc/gated_conv.cc)
"""

from fttw_jax.sparse.walkers import check_supported
from fttw_jax.sparse.xla import SparseModel
from fttw_jax.sparse.native import NativeSparseModel
