"""Static pruning at a requested cost (issue 19): selection, cost matching, fixed masks."""

import jax
import numpy as np
import pytest

from fttw_jax import flops, models, static
from helpers import init_gated


@pytest.fixture(scope='module')
def tiny():
  model, variables, x = init_gated('resnet8', width=0.5, batch=4)
  prof = flops.profile(model, (1, *x.shape[1:]))
  apply = jax.jit(lambda v, x: model.apply(v, x)[1]['gates'])
  layers = [l.name for l in prof.masked]
  rng = np.random.default_rng(0)
  channels = {n: apply(variables, x)[n]['mask'].shape[-1] for n in layers}
  frequency = {n: rng.random(c) for n, c in channels.items()}
  kept = {n: 0.5 * c for n, c in channels.items()}

  def cost_and_masks(keep):
    v = {'params': static.fixed_mask_params(variables['params'], keep),
         'batch_stats': variables['batch_stats']}
    gates = apply(v, x)
    macs = float(np.mean(flops.exact_macs(prof, gates, include_heads=False)))
    return macs, {n: np.asarray(g['mask']) for n, g in gates.items()}

  return {'prof': prof, 'frequency': frequency, 'kept': kept, 'channels': channels,
          'cost_and_masks': cost_and_masks}


def test_select_channels_keeps_the_most_frequent():
  keep = static.select_channels({'a': np.array([0.2, 0.9, 0.5, 0.9])}, {'a': 2})
  np.testing.assert_array_equal(keep['a'], [False, True, False, True])
  with pytest.raises(ValueError, match='width 5'):
    static.select_channels({'a': np.zeros(4)}, {'a': 5})


def test_fixed_mask_params_apply_the_mask_to_every_input(tiny):
  keep = static.select_channels(tiny['frequency'],
                                {n: 2 for n in tiny['frequency']})
  _, masks = tiny['cost_and_masks'](keep)
  for name, m in masks.items():
    np.testing.assert_array_equal(m, np.broadcast_to(keep[name], m.shape))


@pytest.mark.parametrize('fraction', [0.3, 0.6])
def test_match_cost_meets_a_requested_cost(tiny, fraction):
  dense = flops.dense_macs(tiny['prof'])
  target = fraction * dense
  calls = []

  def cost_fn(keep):
    calls.append(1)
    return tiny['cost_and_masks'](keep)[0]

  sel = static.match_cost(tiny['frequency'], tiny['kept'], cost_fn, target)
  assert sel.macs <= target
  assert sel.macs == pytest.approx(cost_fn(sel.keep))
  assert target - sel.macs < 0.04 * dense   # within a channel step or two of the request
  # The kept channels of every layer are its most frequent ones.
  for name, k in sel.keep.items():
    f = tiny['frequency'][name]
    if 0 < k.sum() < k.size:
      assert f[k].min() >= f[~k].max()
  # Maximal: one bisection step wider costs more than the request.
  wider = static.select_channels(tiny['frequency'], static.scaled_widths(
      tiny['kept'], tiny['channels'], sel.scale * 1.05 + 0.05))
  assert cost_fn(wider) > target
  assert len(calls) <= static.BISECTION_STEPS + 4
