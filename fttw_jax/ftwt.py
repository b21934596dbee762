"""FTWT target masks, mask loss and mask metrics (SPEC sections 3 and 4).

Pure functions over arrays: nothing here knows about models. Per-layer inputs
are dicts ``{layer_name: {'logits', 'target', 'mask', ...}}`` as returned in a
gated model's ``aux['gates']``.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fttw_jax import choices

EPS = 1e-5
INT32_MAX = np.iinfo(np.int32).max


def _check_activation(y):
  if y.ndim != 4:
    raise ValueError(
        f'expected an NHWC activation tensor of rank 4, got shape {tuple(y.shape)}')


def channel_scores(y: jax.Array) -> jax.Array:
  """Per-sample channel score s_c = max_{h,w} |y| -> (N, C) float32."""
  _check_activation(y)
  return jnp.max(jnp.abs(jnp.asarray(y, jnp.float32)), axis=(1, 2))


def _sorted_descending(v: jax.Array) -> jax.Array:
  """(N, C) rows of the non-negative ``v`` sorted from the largest down, NaN last.

  Sorted as int32 keys (a non-negative float's bits order like the float): XLA:CPU sorts
  one int32 operand ~10x faster than floats or (key, index) pairs (an argsort).
  """
  key = jnp.where(jnp.isnan(v), INT32_MAX, -jax.lax.bitcast_convert_type(v, jnp.int32))
  key = jnp.sort(key, axis=-1)
  return jnp.where(key == INT32_MAX, jnp.nan, jax.lax.bitcast_convert_type(-key, jnp.float32))


def _top_ranked(v: jax.Array, v_sorted: jax.Array, k: jax.Array) -> jax.Array:
  """(N, C) bool: the ``k`` (N, 1) channels ranked first by ``v`` (largest first; ties:
  lower index first, as a stable descending argsort ranks them), without the ranks: the
  k-th largest value splits the row, and ties at it are taken in channel order."""
  kth = jnp.take_along_axis(v_sorted, jnp.maximum(k - 1, 0), axis=-1)
  above = v > kth
  tie = v == kth
  room = k - jnp.sum(above, axis=-1, keepdims=True)
  return (above | (tie & (jnp.cumsum(tie.astype(jnp.int32), axis=-1) <= room))) & (k > 0)


def mass_targets(y: jax.Array, r) -> jax.Array:
  """Binary (N, C) target: the longest prefix of the ranking holding <= r of the mass.

  r < 0 keeps all channels, r == 1 drops only dead channels (p <= 1e-5). A sample
  whose scores are all zero keeps every channel. Works with a traced ``r``.
  """
  choices.check_mass_threshold(r)
  s = channel_scores(y)
  total = jnp.sum(s, axis=-1, keepdims=True)
  p = s / jnp.where(total > 0, total, 1.0)
  p_sorted = _sorted_descending(p)
  q = jnp.cumsum(p_sorted, axis=-1)
  # q is non-decreasing, so the positions with q - r <= EPS are a prefix: its length.
  kept = jnp.sum((q - r) <= EPS, axis=-1, keepdims=True)
  keep_prefix = _top_ranked(p, p_sorted, kept)
  keep = jnp.where(r == 1.0, p > EPS, keep_prefix)
  keep = jnp.where(r < 0, True, keep)
  keep = jnp.where(total > 0, keep, True)
  return keep.astype(jnp.float32)


def uniform_targets(y: jax.Array, q) -> jax.Array:
  """Binary (N, C) target dropping the int(q*C) weakest channels and dead ones."""
  choices.check_prune_ratio(q)
  s = channel_scores(y)
  num_channels = s.shape[-1]
  num_drop = jnp.floor(jnp.asarray(q, jnp.float32) * num_channels).astype(jnp.int32)
  kept = jnp.broadcast_to(num_channels - num_drop, s.shape[:-1] + (1,))
  keep = _top_ranked(s, _sorted_descending(s), kept) & (s > EPS)
  return keep.astype(jnp.float32)


def targets(y: jax.Array, criterion: str, threshold) -> jax.Array:
  """Dispatch on the configured criterion ('mass' with r, 'uniform' with q)."""
  if criterion == 'mass':
    return mass_targets(y, threshold)
  if criterion == 'uniform':
    return uniform_targets(y, threshold)
  choices.check_choice('criterion', criterion, choices.CRITERIA)


def per_sample_mask_loss(gates: Mapping[str, Mapping[str, jax.Array]]) -> jax.Array:
  """(N,): (1/L) sum_l sum_c BCEwithlogits(logits, target); its batch mean is the loss."""
  per_layer = [
      jnp.sum(optax.sigmoid_binary_cross_entropy(
          g['logits'].astype(jnp.float32), g['target'].astype(jnp.float32)), axis=-1)
      for g in gates.values()]
  return sum(per_layer) / len(per_layer)


def mask_loss(gates: Mapping[str, Mapping[str, jax.Array]]) -> jax.Array:
  """(1/L) sum_l sum_c mean_n BCEwithlogits(logits, target) (SPEC 4)."""
  if not gates:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(per_sample_mask_loss(gates))


def per_sample_mask_stats(gates: Mapping[str, Mapping[str, jax.Array]]) -> dict:
  """Per sample (N,): mask accuracy (m == g averaged per layer, then over layers)
  and each layer's active-channel ratio."""
  agree = [jnp.mean((g['mask'] == g['target']).astype(jnp.float32), axis=-1)
           for g in gates.values()]
  active = {name: jnp.mean(g['mask'].astype(jnp.float32), axis=-1)
            for name, g in gates.items()}
  return {'mask_accuracy': sum(agree) / len(agree), 'active_ratio': active}


def mask_loss_weight(epoch, epochs: int, cooldown: float = 0.5):
  """w(epoch) = 1 while epoch < int(cooldown * epochs), else 0 (heads then frozen)."""
  return jnp.where(epoch < int(cooldown * epochs), 1.0, 0.0)


# ------------------------------------------------------------------ dynamism (issue 19)
# How input-dependent the masks are over a split, from sums alone: per channel the
# number of samples it is on in, per layer the sum and sum of squares of the kept
# counts, and the sample count. Sums add over batches and devices, so an eval step
# returns them (psum over the mesh) and nothing per sample leaves the device.

DYNAMISM_FIELDS = ('mask', 'target')


def dynamism_sums(gates: Mapping[str, Mapping[str, jax.Array]],
                  sample_weight: jax.Array | None = None) -> dict:
  """{field: {layer: {'on': (C,), 'kept': (), 'kept_sq': (), 'count': ()}}} for the
  applied masks and the targets of one batch; ``sample_weight`` (N,) zeroes padding."""
  out = {}
  for field in DYNAMISM_FIELDS:
    out[field] = {}
    for name, g in gates.items():
      m = g[field].astype(jnp.float32)
      w = jnp.ones(m.shape[:1], jnp.float32) if sample_weight is None else sample_weight
      w = w.astype(jnp.float32)
      kept = jnp.sum(m, axis=-1)
      out[field][name] = {'on': jnp.sum(m * w[:, None], axis=0), 'kept': jnp.sum(kept * w),
                          'kept_sq': jnp.sum(kept * kept * w), 'count': jnp.sum(w)}
  return out


def _layer_dynamism(on, kept, kept_sq, count) -> dict:
  """Fractions of static-on / static-off / input-dependent channels, the kept-count
  std and the mean pairwise Hamming distance (in channels) of one layer."""
  on = np.asarray(on, np.float64)
  n = float(count)
  static_on = np.sum(on >= n)
  static_off = np.sum(on <= 0)
  channels = on.size
  mean = kept / max(n, 1.0)
  # A pair (i, j) of distinct samples differs in channel c iff exactly one has it on:
  # on_c * (n - on_c) of the n (n - 1) / 2 pairs.
  hamming = float(np.sum(on * (n - on)) / (n * (n - 1) / 2)) if n > 1 else 0.0
  return {'static_on': float(static_on / channels), 'static_off': float(static_off / channels),
          'dynamic': float(1.0 - (static_on + static_off) / channels),
          'kept_mean': float(mean),
          'kept_std': float(np.sqrt(max(kept_sq / max(n, 1.0) - mean * mean, 0.0))),
          'hamming': hamming, 'channels': int(channels)}


def dynamism(sums: Mapping[str, Mapping[str, Mapping]]) -> dict:
  """From ``dynamism_sums`` added over a split: per field ('mask', 'target')
  ``{'overall': {...}, 'layers': {layer: {...}}}``.

  Per layer: ``static_on`` / ``static_off`` / ``dynamic`` fractions of channels
  that are on for every sample, off for every sample, or input-dependent;
  ``kept_mean`` / ``kept_std`` of the per-sample kept count; ``hamming``: the
  mean Hamming distance (channels) between the masks of two distinct samples.
  Overall: the fractions over all (layer, channel) pairs, ``kept_std`` the mean
  of the layers' and ``hamming`` the whole-network distance as a fraction of
  all channels.
  """
  out = {}
  for field, layers in sums.items():
    per_layer = {name: _layer_dynamism(s['on'], float(s['kept']), float(s['kept_sq']),
                                       float(s['count'])) for name, s in layers.items()}
    if not per_layer:
      out[field] = {'overall': {}, 'layers': {}}
      continue
    total = sum(v['channels'] for v in per_layer.values())
    share = lambda k: sum(v[k] * v['channels'] for v in per_layer.values()) / total
    overall = {k: share(k) for k in ('static_on', 'static_off', 'dynamic')}
    overall['kept_std'] = float(np.mean([v['kept_std'] for v in per_layer.values()]))
    overall['hamming'] = sum(v['hamming'] for v in per_layer.values()) / total
    out[field] = {'overall': overall, 'layers': per_layer}
  return out
