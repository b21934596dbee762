"""Target masks, mask loss and mask metrics against hand-derived answers (SPEC 3, 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fttw_jax import ftwt


def act(*scores):
  """(N, 2, 2, C) activation whose channel max-|.| per sample are the given scores."""
  s = np.asarray(scores, np.float32)
  s = s[None] if s.ndim == 1 else s
  y = np.zeros((s.shape[0], 2, 2, s.shape[1]), np.float32)
  y[:, 1, 0, :] = -s  # negative values count through |.|
  y[:, 0, 1, :] = s / 2
  return y


@pytest.mark.parametrize('r, expected', [
    (0.7, [1, 1, 0, 0]),      # q = .4 .7 .9 1: q - r <= 1e-5 keeps the first two
    (0.69, [1, 0, 0, 0]),     # the channel crossing r is dropped
    (0.35, [0, 0, 0, 0]),     # top channel alone exceeds r: nothing kept
    (0.95, [1, 1, 1, 0]),
    (1.0, [1, 1, 1, 1]),      # r == 1: drop only dead channels (none here)
    (-1.0, [1, 1, 1, 1]),     # r < 0: keep all
])
def test_mass_targets_hand_derived(r, expected):
  # scores 1, 4, 2, 3 -> p = .1 .4 .2 .3; `expected` is in rank order (ch 1, 3, 2, 0)
  got = ftwt.mass_targets(act(1, 4, 2, 3), r)
  reorder = np.asarray(expected)[[3, 0, 2, 1]]  # rank of channels 0..3
  np.testing.assert_array_equal(got[0], reorder)


def test_mass_targets_edge_cases():
  np.testing.assert_array_equal(ftwt.mass_targets(act(0, 5, 0, 5), 1.0)[0], [0, 1, 0, 1])
  np.testing.assert_array_equal(ftwt.mass_targets(act(0, 0, 0), 0.5)[0], [1, 1, 1])
  np.testing.assert_array_equal(ftwt.mass_targets(act(0, 0, 0), 1.0)[0], [1, 1, 1])
  # Ties broken by channel index: equal mass, r = 0.5 keeps the two lowest indices.
  np.testing.assert_array_equal(ftwt.mass_targets(act(2, 2, 2, 2), 0.5)[0], [1, 1, 0, 0])
  # A dead channel with r == 1 and an almost-dead one below the 1e-5 margin.
  np.testing.assert_array_equal(
      ftwt.mass_targets(act(1e-7, 1.0, 1.0), 1.0)[0], [0, 1, 1])
  assert not np.isnan(np.asarray(ftwt.mass_targets(act(0, 0), 0.9))).any()


@pytest.mark.parametrize('q, expected', [
    (0.5, [0, 1, 1, 0]),     # drop the int(2) weakest: channels 3 (0) and 0 (1)
    (0.1, [1, 1, 1, 0]),     # int(0.4) == 0 drops nothing but the dead channel
    (0.0, [1, 1, 1, 0]),
    (0.75, [0, 1, 0, 0]),
    (1.0, [0, 0, 0, 0]),
])
def test_uniform_targets_hand_derived(q, expected):
  np.testing.assert_array_equal(ftwt.uniform_targets(act(1, 3, 2, 0), q)[0], expected)


def test_uniform_ties_are_deterministic():
  np.testing.assert_array_equal(ftwt.uniform_targets(act(2, 2, 2, 2), 0.5)[0], [1, 1, 0, 0])


def test_targets_per_sample_and_jit_equals_eager():
  y = jax.random.normal(jax.random.key(0), (8, 5, 5, 37))
  y = y * (jax.random.uniform(jax.random.key(1), (1, 1, 1, 37)) * 3)
  for fn, t in ((ftwt.mass_targets, 0.8), (ftwt.uniform_targets, 0.4)):
    eager = fn(y, t)
    jitted = jax.jit(fn, static_argnums=1)(y, t)
    traced = jax.jit(fn)(y, t)  # threshold traced too
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, traced)
    assert eager.shape == (8, 37)
  # per sample: different samples get different masks
  m = ftwt.mass_targets(y, 0.5)
  assert len({tuple(np.asarray(row)) for row in m}) > 1


def _ranked(row):
  """Channel indices by a stable descending sort (ties: lower index first)."""
  return sorted(range(len(row)), key=lambda c: (-row[c], c))


def test_mass_targets_match_numpy_reference():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(16, 3, 3, 24)).astype(np.float32)
  r = 0.85
  s = np.abs(y).max(axis=(1, 2))
  p = s / s.sum(-1, keepdims=True)
  expected = np.zeros_like(p)
  for n in range(len(p)):
    order = _ranked(p[n])
    q = np.cumsum(p[n, order])
    for pos, c in enumerate(order):
      expected[n, c] = float(q[pos] - r <= 1e-5)
  np.testing.assert_array_equal(ftwt.mass_targets(y, r), expected)


@pytest.mark.parametrize('channels', [1, 5, 64, 512])
def test_targets_with_ties_and_dead_channels_match_numpy_reference(channels):
  """Many equal scores (so the cut often falls inside a tie) and all-zero channels: the
  k channels kept are the first k of the stable ranking, for both criteria."""
  rng = np.random.default_rng(channels)
  s = np.round(rng.random((12, channels)) * 4).astype(np.float32) / 4
  s[:, ::3] = 0.0
  s[0] = 0.0                               # a sample with every channel dead
  y = np.zeros((12, 2, 2, channels), np.float32)
  y[:, 0, 1] = s
  p = s / np.where(s.sum(-1, keepdims=True) > 0, s.sum(-1, keepdims=True), 1.0)
  for r in (0.0, 0.3, 0.55, 0.8, 0.97):
    expected = np.ones_like(p)
    for n in range(1, len(p)):
      order = _ranked(p[n])
      q = np.cumsum(p[n, order])
      expected[n, order] = (q - r <= 1e-5)
    np.testing.assert_array_equal(ftwt.mass_targets(y, r), expected, err_msg=f'r={r}')
  for q in (0.0, 0.25, 0.5, 0.9):
    expected = np.zeros_like(s)
    for n in range(len(s)):
      kept = _ranked(s[n])[:channels - int(np.floor(np.float32(q) * channels))]
      expected[n, kept] = 1.0
    expected *= s > 1e-5
    np.testing.assert_array_equal(ftwt.uniform_targets(y, q), expected, err_msg=f'q={q}')


@pytest.mark.parametrize('bad', [1.5, float('nan'), float('inf')])
def test_bad_mass_threshold(bad):
  with pytest.raises(ValueError, match=r'r=.*valid'):
    ftwt.mass_targets(act(1, 2), bad)


@pytest.mark.parametrize('bad', [-0.1, 1.01, float('nan')])
def test_bad_prune_ratio(bad):
  with pytest.raises(ValueError, match=r'q=.*valid'):
    ftwt.uniform_targets(act(1, 2), bad)


def test_wrong_rank_and_unknown_criterion():
  with pytest.raises(ValueError, match=r'rank 4.*\(2, 3\)'):
    ftwt.mass_targets(np.zeros((2, 3)), 0.5)
  with pytest.raises(ValueError, match="'topk'.*mass"):
    ftwt.targets(act(1, 2), 'topk', 0.5)


def _gates(rng, layers):
  return {
      f'l{i}': {'logits': rng.normal(size=(n, c)).astype(np.float32),
                'target': (rng.random((n, c)) > 0.5).astype(np.float32),
                'mask': (rng.random((n, c)) > 0.5).astype(np.float32)}
      for i, (n, c) in enumerate(layers)}


def test_mask_loss_sums_channels_means_samples_averages_layers():
  rng = np.random.default_rng(0)
  gates = _gates(rng, [(4, 3), (4, 7)])
  per_layer = []
  for g in gates.values():
    x, z = g['logits'], g['target']
    bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    per_layer.append(bce.sum(-1).mean())
  np.testing.assert_allclose(ftwt.mask_loss(gates), np.mean(per_layer), rtol=1e-5)
  # per sample (what evaluation weights by the padding mask): sample i alone gives its value
  per_sample = ftwt.per_sample_mask_loss(gates)
  for i in range(4):
    alone = {k: {kk: vv[i:i + 1] for kk, vv in g.items()} for k, g in gates.items()}
    np.testing.assert_allclose(per_sample[i], ftwt.mask_loss(alone), rtol=1e-5)
  assert float(ftwt.mask_loss({})) == 0.0


def test_per_sample_mask_stats():
  gates = {
      'a': {'target': np.array([[1, 0], [1, 1]], np.float32),
            'mask': np.array([[1, 1], [1, 1]], np.float32)},
      'b': {'target': np.array([[0, 0, 0, 0]] * 2, np.float32),
            'mask': np.array([[0, 0, 0, 0]] * 2, np.float32)},
  }
  m = ftwt.per_sample_mask_stats(gates)
  np.testing.assert_allclose(m['mask_accuracy'], [(0.5 + 1.0) / 2, 1.0])
  np.testing.assert_allclose(m['active_ratio']['a'], [1.0, 1.0])
  np.testing.assert_allclose(m['active_ratio']['b'], [0.0, 0.0])


def test_mask_loss_weight_cooldown():
  w = [float(ftwt.mask_loss_weight(e, 10, 0.5)) for e in range(10)]
  assert w == [1.0] * 5 + [0.0] * 5
  assert float(ftwt.mask_loss_weight(3, 10, 0.0)) == 0.0
