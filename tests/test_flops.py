"""MAC and parameter accounting (SPEC 5): dense profile, exact vs paper dynamic counts."""

import json

import jax
import numpy as np
import pytest

from fttw_jax import flops, models


def gated_profile(name, size=32, num_classes=10):
  model = models.create_model(name, num_classes=num_classes, gate=models.GateConfig())
  return flops.profile(model, (1, size, size, 3))


def all_on(prof, batch=1):
  """Hand-built gates: every mask on, every input channel non-zero."""
  return {l.name: {'mask': np.ones((batch, l.out_features), np.float32),
                   'in_nz': np.ones((batch, l.in_features), np.float32)}
          for l in prof.masked}


def test_resnet20_dense_macs_by_hand():
  prof = gated_profile('resnet20')
  stem = 16 * 32 * 32 * 27
  stage1 = 6 * 16 * 32 * 32 * 16 * 9
  stage2 = 32 * 16 * 16 * 16 * 9 + 5 * 32 * 16 * 16 * 32 * 9
  stage3 = 64 * 8 * 8 * 32 * 9 + 5 * 64 * 8 * 8 * 64 * 9
  assert flops.dense_macs(prof) == stem + stage1 + stage2 + stage3 + 64 + 64 * 10
  assert prof.params == 269_722
  assert prof.head_macs == sum(l.in_features * l.out_features for l in prof.masked)


def test_vgg_conv_bias_counts_and_mobilenet_v2_pool_does_not():
  vgg = gated_profile('vgg16_bn')
  first = vgg.layers[0]
  assert first.bias and first.macs == 64 * 32 * 32 * (3 * 9 + 1)
  assert not any(l.kind == 'pool' for l in vgg.layers)
  v2 = gated_profile('mobilenet_v2')
  assert not any(l.kind == 'pool' for l in v2.layers)
  v1 = gated_profile('mobilenet_v1')
  assert [l.macs for l in v1.layers if l.kind == 'pool'] == [1024]


@pytest.mark.parametrize('name, params', [('resnet56', 853_018), ('resnet18', 11_689_512),
                                          ('resnet34', 21_797_672)])
def test_param_counts(name, params):
  size, classes = (224, 1000) if name in models.IMAGENET_MODELS else (32, 10)
  assert gated_profile(name, size, classes).params == params


@pytest.mark.parametrize('name', ['resnet20', 'mobilenet_v1', 'mobilenet_v2', 'vgg16_bn'])
def test_all_on_exact_equals_dense_plus_heads(name):
  prof = gated_profile(name)
  gates = all_on(prof, batch=3)
  np.testing.assert_array_equal(flops.exact_macs(prof, gates), prof.macs + prof.head_macs)
  np.testing.assert_array_equal(flops.exact_macs(prof, gates, include_heads=False), prof.macs)
  assert float(flops.reduction(flops.exact_macs(prof, gates, False), prof.macs)) == 0.0


def test_depthwise_exact_vs_paper_on_mobilenet_v1():
  prof = gated_profile('mobilenet_v1')
  layer = {l.name: l for l in prof.masked}
  gates = all_on(prof)
  base_exact = float(flops.exact_macs(prof, gates)[0])
  base_paper = float(flops.paper_macs(prof, gates)[0])
  # Switch off stem channel 0: the next depthwise conv sees 31 of 32 input channels.
  gates['stem']['mask'][0, 0] = 0
  gates['block0_dw']['in_nz'][0, 0] = 0
  gates['block0_dw']['mask'][0, 0] = 0
  gates['block0_pw']['in_nz'][0, 0] = 0
  stem, dw, pw = layer['stem'], layer['block0_dw'], layer['block0_pw']
  hw_stem = stem.out_hw[0] * stem.out_hw[1]
  hw_dw = dw.out_hw[0] * dw.out_hw[1]
  one_pw_input = pw.out_features * pw.out_hw[0] * pw.out_hw[1]
  # one stem channel, one depthwise channel, one input channel of the pointwise conv
  exact_saving = hw_stem * 27 + hw_dw * 9 + one_pw_input
  assert base_exact - float(flops.exact_macs(prof, gates)[0]) == exact_saving
  # Paper: active_in // groups = 31 // 32 = 0, the whole depthwise layer counts as free.
  paper_saving = hw_stem * 27 + hw_dw * 9 * 32 + one_pw_input
  assert base_paper - float(flops.paper_macs(prof, gates)[0]) == paper_saving


def test_resnet_identity_refill_exact_vs_paper():
  prof = gated_profile('resnet20')
  layer = {l.name: l for l in prof.masked}
  gates = all_on(prof)
  base_exact = float(flops.exact_macs(prof, gates)[0])
  base_paper = float(flops.paper_macs(prof, gates)[0])
  gates['layer1_0/conv2']['mask'][:] = 0  # whole branch off; identity still refills
  conv2, nxt = layer['layer1_0/conv2'], layer['layer1_1/conv1']
  full = 16 * 32 * 32 * 16 * 9
  assert conv2.macs == nxt.macs == full
  assert base_exact - float(flops.exact_macs(prof, gates)[0]) == full
  # Paper: the next conv's active_in is taken from the (empty) previous mask.
  assert base_paper - float(flops.paper_macs(prof, gates)[0]) == 2 * full


def test_paper_count_leaves_out_classifier_pool_bias_and_heads():
  prof = gated_profile('vgg16_bn')
  paper = float(flops.paper_macs(prof, all_on(prof))[0])
  bias_terms = sum(l.out_features * l.out_hw[0] * l.out_hw[1] for l in prof.masked)
  classifier = 512 * 10
  # First conv's active_in is 3, as in the reference.
  assert paper == prof.macs - bias_terms - classifier


def test_exact_macs_from_a_real_forward_are_consistent():
  model = models.create_model('resnet20', num_classes=10, width=0.5,
                              gate=models.GateConfig(threshold=0.7, mask_source='target'))
  prof = flops.profile(model, (1, 32, 32, 3))
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  _, aux = jax.jit(model.apply)(variables, x)
  exact = np.asarray(flops.exact_macs(prof, aux['gates'], include_heads=False))
  assert exact.shape == (4,)
  assert np.all(exact < prof.macs) and np.all(exact > 0)
  red = float(flops.reduction(exact, prof.macs))
  np.testing.assert_allclose(red, 1 - exact.mean() / prof.macs, rtol=1e-6)


def test_cli_json_and_table(capsys):
  assert flops.main(['--model', 'resnet56', '--dataset', 'cifar10', '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out['macs'] == 125_485_760 and out['params'] == 853_018
  assert out['head_macs'] > 0 and out['head_params'] > out['head_macs']
  assert flops.main(['--model', 'resnet20', '--dataset', 'digits']) == 0
  table = capsys.readouterr().out
  assert 'layer1_0/conv1' in table and 'yes' in table and 'classifier' in table


def test_cli_rejects_unknown_model(capsys):
  with pytest.raises(SystemExit) as e:
    flops.main(['--model', 'resnet57'])
  assert e.value.code == 2
  assert "'resnet57'" in capsys.readouterr().err
