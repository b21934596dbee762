"""Dynamism metrics (issue 19) on hand-made masks, and their sums over batches."""

import itertools

import jax
import numpy as np
import pytest

from fttw_jax import ftwt


def gates_of(masks, targets=None):
  """{layer: {'mask', 'target'}} from {layer: (N, C) 0/1 lists}."""
  targets = targets or masks
  return {k: {'mask': np.asarray(m, np.float32), 'target': np.asarray(targets[k], np.float32)}
          for k, m in masks.items()}


def metrics_of(masks, targets=None, weight=None, field='mask'):
  sums = jax.tree.map(np.asarray, ftwt.dynamism_sums(gates_of(masks, targets), weight))
  return ftwt.dynamism(sums)[field]


def brute_force_hamming(m):
  m = np.asarray(m)
  pairs = list(itertools.combinations(range(len(m)), 2))
  return np.mean([np.sum(m[i] != m[j]) for i, j in pairs])


def test_all_static_masks():
  # every sample gets the same mask: 2 channels always on, 1 always off
  d = metrics_of({'a': [[1, 1, 0]] * 5})
  layer = d['layers']['a']
  assert layer['static_on'] == pytest.approx(2 / 3)
  assert layer['static_off'] == pytest.approx(1 / 3)
  assert layer['dynamic'] == 0.0
  assert layer['kept_std'] == 0.0 and layer['kept_mean'] == pytest.approx(2.0)
  assert layer['hamming'] == 0.0
  assert d['overall']['dynamic'] == 0.0


def test_all_dynamic_masks():
  m = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]]
  layer = metrics_of({'a': m})['layers']['a']
  assert layer['dynamic'] == 1.0 and layer['static_on'] == 0.0 and layer['static_off'] == 0.0
  assert layer['kept_std'] == 0.0   # each sample keeps 2: the spread is in *which* channels
  assert layer['hamming'] == pytest.approx(brute_force_hamming(m))  # 8/3


def test_mixed_layers_and_overall_shares():
  a = [[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]   # ch0 on, ch3 off, ch1/ch2 dynamic
  b = [[1, 1], [1, 1], [1, 1]]                     # static
  d = metrics_of({'a': a, 'b': b})
  la = d['layers']['a']
  assert (la['static_on'], la['static_off'], la['dynamic']) == (0.25, 0.25, 0.5)
  assert la['kept_mean'] == pytest.approx(5 / 3)
  assert la['kept_std'] == pytest.approx(np.std([2, 2, 1]))
  assert la['hamming'] == pytest.approx(brute_force_hamming(a))
  # over all 6 (layer, channel) pairs: 3 static on, 1 static off, 2 dynamic
  assert d['overall']['static_on'] == pytest.approx(3 / 6)
  assert d['overall']['static_off'] == pytest.approx(1 / 6)
  assert d['overall']['dynamic'] == pytest.approx(2 / 6)
  whole = np.concatenate([a, b], axis=1)
  assert d['overall']['hamming'] == pytest.approx(brute_force_hamming(whole) / 6)
  assert d['overall']['kept_std'] == pytest.approx(np.std([2, 2, 1]) / 2)


def test_targets_measured_separately_from_masks():
  masks = {'a': [[1, 0]] * 4}
  targets = {'a': [[1, 0], [0, 1], [1, 1], [1, 0]]}
  assert metrics_of(masks, targets, field='mask')['overall']['dynamic'] == 0.0
  assert metrics_of(masks, targets, field='target')['overall']['dynamic'] == 1.0


def test_padding_weight_and_batch_sums_equal_one_pass():
  """Sums of two batches (with padded rows weighted 0) == one pass over the real rows."""
  rng = np.random.default_rng(0)
  m = (rng.random((7, 5)) < 0.5).astype(np.float32)
  m[:, 0] = 1  # a static-on channel that padding rows must not break
  pad = np.zeros((1, 5), np.float32)
  first = ftwt.dynamism_sums(gates_of({'a': m[:4]}))
  second = ftwt.dynamism_sums(gates_of({'a': np.concatenate([m[4:], pad])}),
                              np.asarray([1, 1, 1, 0], np.float32))
  added = jax.tree.map(lambda x, y: np.asarray(x) + np.asarray(y), first, second)
  whole = jax.tree.map(np.asarray, ftwt.dynamism_sums(gates_of({'a': m})))
  assert ftwt.dynamism(added) == ftwt.dynamism(whole)
  assert ftwt.dynamism(whole)['mask']['layers']['a']['static_on'] >= 0.2
