"""``conv_impl``: how the conv-BN graph of a train step is built and compiled.

* ``'xla'``: XLA's own convolutions, ``nn.BatchNorm`` differentiated by JAX, XLA's
  default passes. Accelerators (GPU/TPU) always get this.
* ``'cpu'``: for XLA:CPU, same convolutions and the same results to float32
  rounding (tests/test_train.py), faster (bench/RESULTS.md): BatchNorm with its own
  VJP (``batch_norm.py``); an optimization barrier on every gated conv's output,
  kept through XLA's pipeline, so that XLA stops fusing (and recomputing) chains of
  earlier BN/ReLU/add ops into the transposes of the weight-gradient convs; and
  YNNPACK for elementwise ops and reductions only (Eigen keeps the convs).
* ``'onednn'``: ``'cpu'`` with oneDNN's convolutions and their backward passes in
  place of Eigen's (``onednn_conv.py``; optional: without oneDNN, or when its build
  fails, ``resolve`` logs why and gives ``'cpu'``).
* ``'auto'``: ``'onednn'`` on the CPU backend (so ``'cpu'`` where oneDNN cannot be
  had), ``'xla'`` elsewhere.
"""

from __future__ import annotations

import jax
from jax import lax

from fttw_jax.choices import CONV_IMPLS, check_choice
from fttw_jax.errors import UserError
from fttw_jax.models import onednn_conv

CPU_IMPLS = ('cpu', 'onednn')   # the XLA:CPU conv-BN graph (custom-VJP BN, barriers, YNN)


def resolve(conv_impl: str, backend: str | None = None) -> str:
  """'xla', 'cpu' or 'onednn' for ``conv_impl`` on ``backend`` (default: JAX's)."""
  check_choice('conv_impl', conv_impl, CONV_IMPLS)
  backend = backend or jax.default_backend()
  if conv_impl == 'auto':
    conv_impl = 'onednn' if backend == 'cpu' else 'xla'
  if conv_impl in CPU_IMPLS and backend != 'cpu':
    raise UserError(f"conv_impl={conv_impl!r} is for the CPU backend; this one is "
                    f"{backend!r} (use 'auto' or 'xla')")
  if conv_impl == 'onednn' and onednn_conv.unavailable():
    return 'cpu'
  return conv_impl


def conv_general_dilated(conv_impl: str):
  """The convolution for ``nn.Conv(conv_general_dilated=...)`` under ``conv_impl``."""
  return onednn_conv.conv if conv_impl == 'onednn' else lax.conv_general_dilated


def layer_boundary(x, conv_impl: str):
  """An optimization barrier under the CPU impls (effective with ``compiler_options``)."""
  return jax.lax.optimization_barrier(x) if conv_impl in CPU_IMPLS else x


def compiler_options(conv_impl: str) -> dict | None:
  """Per-compile XLA options for a jit of a model built with ``conv_impl``."""
  if conv_impl not in CPU_IMPLS:
    return None
  return {
      # The pass that would drop the barriers of layer_boundary before fusion.
      'xla_disable_hlo_passes': 'cse_barrier_expander',
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE',
  }
