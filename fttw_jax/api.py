"""Research API: a trained checkpoint as a callable model (issue 5).

  from fttw_jax import api
  m = api.load('workdirs/digits_ftwt')        # or a checkpoints/<step> directory
  logits, aux = m(images)                     # uint8 NHWC; normalised inside
  logits = m.predict(images)                  # logits only: the lean inference forward
  masks = m.masks(images)                     # {layer: (N, C) 0/1}, execution order
  macs = m.flops(images)                      # (N,) exact MACs per sample

The config comes from the checkpoint itself, so nothing has to be repeated;
restoring checks every parameter shape against the model that config builds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fttw_jax import data, evaluate, flops


def _forward(model, dataset, prof, outputs, variables, images):
  """Normalise, run in eval mode, count per-sample MACs both ways; return ``outputs``.

  Jitted per ``outputs``: what is not returned is not computed (XLA drops it), so
  asking for logits or masks alone skips the training targets, which cost a
  gated ResNet-56 more than its heads at batch 1 on CPU.
  """
  logits, aux = model.apply(variables, data.normalize(images, dataset), train=False)
  gates = aux['gates']
  n = logits.shape[0]
  if gates:
    macs = {'exact': flops.exact_macs(prof, gates), 'paper': flops.paper_macs(prof, gates)}
  else:
    dense = jnp.full((n,), float(flops.dense_macs(prof)), jnp.float32)
    macs = {'exact': dense, 'paper': dense}
  masks = {name: g['mask'] for name, g in gates.items()}
  everything = {'logits': logits, 'aux': aux, 'macs': macs, 'masks': masks}
  return tuple(everything[k] for k in outputs)


class Model:
  """A restored checkpoint: ``m(x)``, ``m.predict(x)``, ``m.masks(x)``, ``m.flops(x)``,
  ``m.forward(x)``.

  Attributes: ``config`` (stored with the checkpoint), ``variables``, ``model``
  (the Flax module, eval mode), ``profile`` (flops.Profile), ``step``, ``path``
  (the step directory), ``meta``.
  """

  def __init__(self, restored: evaluate.Restored, sparse: bool | str = False):
    self.config = restored.config
    self.variables = restored.variables
    self.model = restored.model
    self.profile = restored.profile
    self.step = restored.step
    self.path = restored.path
    self.meta = restored.meta
    self._fns = {}
    self._sparse = _sparse_model(self.model, self.variables, sparse) if sparse else None

  def _run(self, outputs: tuple, images):
    if outputs not in self._fns:
      self._fns[outputs] = jax.jit(functools.partial(
          _forward, self.model, self.config.dataset, self.profile, outputs))
    return self._fns[outputs](self.variables, jnp.asarray(images))

  def forward(self, images):
    """(logits, aux, {"exact", "paper"}: (N,) MACs) in one jitted call."""
    return self._run(('logits', 'aux', 'macs'), images)

  def predict(self, images) -> jax.Array:
    """(N, classes) logits: the lean jitted forward for inference (no training
    targets, no MACs); batches of one take the sparse kernels with ``sparse`` set."""
    if self._sparse is not None and jnp.shape(images)[0] == 1:
      return self._sparse.predict(data.normalize(images, self.config.dataset))
    return self._run(('logits',), images)[0]

  def __call__(self, images):
    """(logits (N, classes), aux) for raw uint8 (N, H, W, 3) images.

    With ``sparse`` set, a batch of one runs the sparse kernels; its
    ``aux['gates']`` then holds 'logits' and 'mask' (see ``load``).
    """
    if self._sparse is not None and jnp.shape(images)[0] == 1:
      logits, gates = self._sparse(data.normalize(images, self.config.dataset))
      return logits, {'gates': gates}
    return self._run(('logits', 'aux'), images)

  def masks(self, images) -> dict:
    """{layer: (N, C) applied mask}, layers in execution order; {} for a baseline."""
    masks = self._run(('masks',), images)[0]     # jit returns dicts in sorted key order
    return {l.name: masks[l.name] for l in self.profile.masked if l.name in masks}

  def flops(self, images, accounting: str = 'exact') -> jax.Array:
    """(N,) MACs per sample: 'exact' (SPEC 5, heads included) or 'paper'."""
    if accounting not in ('exact', 'paper'):
      raise ValueError(f"accounting={accounting!r} is invalid; valid: 'exact', 'paper'")
    return self._run(('macs',), images)[0][accounting]

  def __repr__(self):
    c = self.config
    return (f'Model({c.model} x{c.width} on {c.dataset}, stage {c.stage}, step {self.step}, '
            f'{self.path})')


SPARSE_KINDS = (True, 'native', 'xla')


def _sparse_model(model, variables, kind):
  """The batch-1 sparse runner ``kind`` names, or a clear error when it cannot be had.

  True picks the C++ custom call (``fttw_jax.sparse.native``) on CPU where a
  compiler is at hand, else the XLA path (``fttw_jax.sparse.xla``).
  """
  from fttw_jax.sparse import kernel, native, xla
  if kind not in SPARSE_KINDS:
    raise ValueError(f'sparse={kind!r} is invalid; valid values: False, {SPARSE_KINDS}')
  if kind is True:
    kind = 'native' if jax.default_backend() == 'cpu' and kernel.available() else 'xla'
  if kind == 'native':
    return native.NativeSparseModel.from_variables(model, variables)
  return xla.SparseModel.from_variables(model, variables)


def load(path, which: str | int = 'best', sparse: bool | str = False) -> Model:
  """Restore a workdir's (or a checkpoint directory's) variables as a ``Model``.

  ``which``: 'best' (by eval top-1; the latest if no eval has run), 'latest',
  or a step. A path without a checkpoint raises FileNotFoundError; a
  checkpoint whose arrays do not fit its config raises ValueError.

  ``sparse``: batches of one run only the channels their masks keep. 'native':
  one C++ custom call per conv on CPU (``fttw_jax.sparse.native``, built on first
  use with the machine's compiler); 'xla': pure XLA (``fttw_jax.sparse.xla``, any
  backend); True: 'native' where it can be had, else 'xla'. Measured speedups
  over dense: bench/RESULTS.md.
  """
  return Model(evaluate.restore(path, which), sparse=sparse)
