"""SPEC 9: each departure of the authors' code, as a field, against a torch re-implementation.

The torch functions below re-implement the FTWT authors' semantics (their models/cifar/*.py,
utils/layers.py, utils/utils.py and cifar.py's train loop) from their own key layout:
shortcut zeros appended at the end of a detached pooled input, heads that alone decide a
depthwise channel, SGD momentum that keeps stepping the heads after the cooldown, PyTorch
BatchNorm (unbiased running variance) and the reference's FLOPs counter. Weights are random,
in the authors' gated layout, and enter fttw_jax through ``convert``; the ``reference``
profile must reproduce them, the ``spec`` profile must not (and must still do SPEC 2.2).
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fttw_jax import config as config_lib
from fttw_jax import choices, convert, data, flops, models, parallel, recipes, train
from fttw_jax.models.gating import BatchNorm, GateConfig

R = 0.8
WIDTHS = {'resnet8': 0.5, 'mobilenet_v1': 0.25, 'vgg16_bn': 0.125}


def torch():
  return pytest.importorskip('torch', reason='torch (test extras) is needed for the '
                             're-implementation of the authors\' code')


# ------------------------------------------------- the authors' semantics, in torch

def t_mass_target(out, r):
  """utils/layers.py get_gt_mask_ratio."""
  t = torch()
  s = out.detach().abs().amax(dim=(2, 3))
  mask = t.ones_like(s)
  if r < 0:
    return mask
  p = s / s.sum(1, keepdim=True)
  if r == 1:
    i, j = t.where(p <= 1e-5)
  else:
    sp, idx = t.sort(p, descending=True, dim=1)
    i, j = t.where(t.cumsum(sp, dim=1) - r > 1e-5)
    j = idx[i, j]
  mask[i, j] = 0
  return mask


class TorchFTWT:
  """The authors' gated forward on a state dict in their layout (one ConvWithMask per
  gated conv: conv -> BN -> act, head on the detached input, mask = sigmoid > 0.5)."""

  def __init__(self, name, sd, r=R):
    self.name, self.sd, self.r = name, sd, r

  def gated(self, x, conv, bn, head, stride=1, act='relu', train=False):
    t, F = torch(), torch().nn.functional
    sd, w = self.sd, self.sd[f'{conv}.weight']
    groups = x.shape[1] if w.shape[1] == 1 and x.shape[1] > 1 else 1
    out = F.conv2d(x, w, sd.get(f'{conv}.bias'), stride, w.shape[-1] // 2, 1, groups)
    out = F.batch_norm(out, sd[f'{bn}.running_mean'], sd[f'{bn}.running_var'],
                       sd[f'{bn}.weight'], sd[f'{bn}.bias'], train, 0.1, 1e-5)
    if act == 'relu':
      out = F.relu(out)
    z = F.softmax(x.detach().mean(dim=(2, 3)), dim=1)
    logit = z @ sd[f'{head}.weight'][:, :, 0, 0].T + sd[f'{head}.bias']
    with t.no_grad():
      mask = (t.sigmoid(logit) > 0.5).float()
      target = t_mass_target(out, self.r)
    self.heads.append(logit)
    self.targets.append(target)
    self.flops = self.flops + mask.sum(1) * out.shape[2] * out.shape[3] * (
        t.div(self.prev, groups, rounding_mode='floor')) * w.shape[-1] ** 2
    self.prev = mask.sum(1)
    return out * mask[:, :, None, None]

  def __call__(self, x, train=False):
    t, F = torch(), torch().nn.functional
    self.heads, self.targets = [], []
    self.flops, self.prev = t.zeros(x.shape[0]), t.full((x.shape[0],), 3.0)
    g = functools.partial(self.gated, train=train)
    if self.name == 'resnet8':
      x = g(x, 'conv1', 'bn1', f'masked_conv.{convert.HEAD_MODULE}')
      for s in (1, 2, 3):
        p = f'layer{s}.0'
        identity = x
        if s > 1:  # downsample_basic_block: pool, cat([x.data, zeros]) -> end, detached
          pooled = F.avg_pool2d(x, 2, 2).detach()
          identity = t.cat([pooled, t.zeros_like(pooled)], dim=1)
        y = g(x, f'{p}.conv1', f'{p}.bn1', f'{p}.masked_conv1.{convert.HEAD_MODULE}',
              stride=1 if s == 1 else 2)
        y = g(y, f'{p}.conv2', f'{p}.bn2', f'{p}.masked_conv2.{convert.HEAD_MODULE}',
              act='none')
        x = F.relu(y + identity)
      return F.linear(x.mean(dim=(2, 3)), self.sd['fc.weight'], self.sd['fc.bias'])
    if self.name == 'mobilenet_v1':
      for i in range(27):
        stride = 2 if i in (3, 7, 11, 23) else 1   # the dw convs of the stride-2 blocks
        x = g(x, f'model.{i}.conv', f'model.{i}.bn', f'model.{i}.{convert.HEAD_MODULE}',
              stride=stride)
      x = F.avg_pool2d(x, 2)
      return F.linear(x.flatten(1), self.sd['fc.weight'], self.sd['fc.bias'])
    for i, v in enumerate(models.vgg.VGG16_CFG):
      if v == 'M':
        x = F.max_pool2d(x, 2, 2)
      else:
        x = g(x, f'features.{i}.conv', f'features.{i}.bn',
              f'features.{i}.{convert.HEAD_MODULE}')
    return F.linear(x.flatten(1), self.sd['classifier.weight'], self.sd['classifier.bias'])


def authors_state_dict(name, seed=0):
  """Random torch tensors in the authors' gated layout (copies share one tensor),
  heads with a margin so that masks are mixed, BN statistics away from zero, and
  activations that stay O(1) through 27 masked layers."""
  t = torch()
  rng = np.random.default_rng(seed)
  keys = convert.expected_keys(name, 10, WIDTHS[name], 'ftwt', gated=True)
  sd = {}
  for k, e in keys.items():
    if e.copy_of:
      continue
    shape = convert.torch_shape(e.shape, e.head)
    n = rng.standard_normal(shape).astype(np.float32)
    leaf = e.names[-1]
    if e.head:
      v = 0.5 * n if leaf == 'kernel' else np.sign(n) * rng.uniform(0.05, 0.3, shape)
    elif leaf == 'kernel':  # x2: masks and ReLUs halve the variance twice per layer
      v = 2 * n / np.sqrt(np.prod(shape[1:]))
    elif leaf in ('scale', 'var'):
      v = 1.0 + 0.1 * np.abs(n)
    else:
      v = 0.1 * n
    sd[k] = t.tensor(v.astype(np.float32), requires_grad=e.names[0] == 'params')
  for k, e in keys.items():
    if e.copy_of:
      sd[k] = sd[e.copy_of]
  return sd


def numpy_sd(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def images(batch=8, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)


def to_torch_input(x):
  return torch().from_numpy(np.asarray(data.normalize(x, 'cifar10')).transpose(0, 3, 1, 2).copy())


def make_config(name, fidelity='reference', **fields):
  c = recipes.cifar_ftwt(name, R, 'decoupled')
  c.width, c.fidelity = WIDTHS[name], fidelity
  c.batch_size, c.num_epochs, c.cooldown = 8, 2, 0.5   # one step per epoch: step 2 has w = 0
  for k, v in fields.items():
    node, *path = [c, *k.split('.')]
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = v
  config_lib.validate(c)
  return c


# ------------------------------------------------------------- the profile itself

def test_profiles_resolve_in_one_place_and_explicit_fields_win():
  c = config_lib.base_config()
  assert c.fidelity == 'spec' and c.shortcut_pad is None
  spec = config_lib.fidelity_options(c)
  assert spec == {k: v[1] for k, v in config_lib.FIDELITY_FIELDS.items()}
  c.fidelity = 'reference'
  assert config_lib.fidelity_options(c) == {
      'shortcut_pad': 'end', 'shortcut_grad': 'detached', 'gate.depthwise_rule': 'head',
      'cooldown_heads': 'momentum', 'bn_running_var': 'unbiased',
      'gate.head_weight_init': 'torch_uniform', 'head_init_pass': 'train_bn_501_batches'}
  c.shortcut_pad, c.gate.depthwise_rule = 'both', 'follow_input'
  c.stage = 'ftwt'
  model = config_lib.model_from_config(c, 10)
  assert model.options == models.BackboneOptions('both', 'detached', 'unbiased')
  assert (model.gate.depthwise_rule, model.gate.head_weight_init) == ('follow_input',
                                                                      'torch_uniform')
  # A config stored before these fields existed resolves to SPEC's behaviour.
  old = config_lib.base_config()
  del old['fidelity'], old['shortcut_pad']
  assert config_lib.fidelity_option(old, 'shortcut_pad') == 'both'


@pytest.mark.parametrize('field,value', [('fidelity', 'paper'), ('shortcut_pad', 'left'),
                                         ('gate.depthwise_rule', 'off'),
                                         ('cooldown_heads', 'zero'),
                                         ('bn_running_var', 'torch'),
                                         ('gate.head_weight_init', 'torch'),
                                         ('head_init_pass', 'ones')])
def test_bad_values_are_named_with_their_choices(field, value):
  with pytest.raises(ValueError, match=rf"config\.{field}='{value}' is invalid; valid values"):
    make_config('resnet8', **{field: value})


FLAGS_PROBE = """
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)
app.run(lambda _: print('RESULT', flags.FLAGS.config.fidelity, flags.FLAGS.config.shortcut_pad,
                        flags.FLAGS.config.gate.depthwise_rule))
"""


def test_flag_override_of_a_profile_field():
  """``--config.shortcut_pad=both`` parses although the field defaults to None."""
  repo = pathlib.Path(__file__).parent.parent
  out = subprocess.run(
      [sys.executable, '-c', FLAGS_PROBE, f'--config={repo}/configs/cifar10_vgg16_bn_dense.py',
       '--config.shortcut_pad=both', '--config.gate.depthwise_rule=follow_input'],
      cwd=repo, capture_output=True, text=True, check=True, env={**os.environ, 'PYTHONPATH': str(repo)})
  assert 'RESULT reference both follow_input' in out.stdout


# ------------------------------------------------------------------ forward (eval)

@functools.cache
def converted(name):
  sd = authors_state_dict(name)
  return sd, convert.convert_state_dict(name, numpy_sd(sd), 10, WIDTHS[name])


def ours_eval(config, variables, x):
  model = config_lib.model_from_config(config, 10)
  logits, aux = jax.jit(lambda v, x: model.apply(v, data.normalize(x, 'cifar10')))(variables, x)
  prof = flops.profile(model, (1, 32, 32, 3))
  return np.asarray(logits), aux['gates'], prof


@pytest.mark.parametrize('name', ['resnet8', pytest.param('mobilenet_v1', marks=pytest.mark.slow),
                                  pytest.param('vgg16_bn', marks=pytest.mark.slow)])
def test_reference_forward_equals_the_authors(name):
  t = torch()
  sd, variables = converted(name)
  x = images()
  ref = TorchFTWT(name, sd)
  with t.no_grad():
    want = ref(to_torch_input(x)).numpy()
  logits, gates, prof = ours_eval(make_config(name), variables, x)
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
  assert np.abs(want[0] - want[1]).max() > 1e-3
  layers = [l.name for l in prof.masked]
  assert len(layers) == len(ref.heads)
  on = []
  for layer, head, target in zip(layers, ref.heads, ref.targets):
    g = gates[layer]
    np.testing.assert_allclose(g['logits'], head.numpy(), atol=1e-4, err_msg=layer)
    np.testing.assert_array_equal(g['mask'], (head.numpy() > 0).astype(np.float32), layer)
    np.testing.assert_array_equal(g['target'], target.numpy(), err_msg=layer)
    on.append(float(np.mean(g['mask'])))
  assert 0.2 < np.mean(on) < 0.8
  np.testing.assert_allclose(flops.paper_macs(prof, gates), ref.flops.numpy(), rtol=1e-6)


@pytest.mark.slow
def test_spec_profile_departs_where_spec_says():
  """D1 on a ResNet, D3 on MobileNetV1: the spec profile gives other logits, and its
  depthwise masks follow the input (SPEC 2.2), so its paper count is not the authors'."""
  t = torch()
  for name in ('resnet8', 'mobilenet_v1'):
    sd, variables = converted(name)
    x = images()
    ref = TorchFTWT(name, sd)
    with t.no_grad():
      want = ref(to_torch_input(x)).numpy()
    logits, gates, prof = ours_eval(make_config(name, 'spec'), variables, x)
    assert np.abs(logits - want).max() > 1e-2, name
    if name == 'mobilenet_v1':
      dw = [l.name for l in prof.masked if l.depthwise]
      for layer in dw:
        g = gates[layer]
        assert np.all(g['mask'] <= g['in_nz'])
      assert any(np.any(gates[l]['mask'] < (gates[l]['logits'] > 0)) for l in dw)
      assert np.abs(flops.paper_macs(prof, gates) - ref.flops.numpy()).max() > 0


# ------------------------------------------------------------------ training steps

def torch_steps(name, x, labels, steps=2, cooldown_epoch=1):
  """cifar.py train(): CE + lweight * mask loss; backbone SGD (lr 0.01, momentum 0.9,
  wd 5e-4), heads SGD (lr 0.1, momentum 0.9); lweight 0 from ``cooldown_epoch``."""
  t = torch()
  sd, _ = converted(name)
  sd = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in sd.items()}
  sd.update({k: sd[e.copy_of] for k, e in convert.expected_keys(
      name, 10, WIDTHS[name], 'ftwt', True).items() if e.copy_of})
  params = {id(v): (k, v) for k, v in sd.items() if v.requires_grad}
  heads = [v for k, v in params.values() if 'Mask' in k]
  backbone = [v for k, v in params.values() if 'Mask' not in k]
  opts = [t.optim.SGD(backbone, lr=0.01, momentum=0.9, weight_decay=5e-4),
          t.optim.SGD(heads, lr=0.1, momentum=0.9)]
  net, xin, y = TorchFTWT(name, sd), to_torch_input(x), t.from_numpy(labels.astype(np.int64))
  out = []
  for epoch in range(steps):
    w = 0.0 if epoch >= cooldown_epoch else 1.0
    logits = net(xin, train=True)
    ce = t.nn.functional.cross_entropy(logits, y)
    mask_loss = sum(t.nn.functional.binary_cross_entropy_with_logits(
        h, g, reduction='none').mean(0).sum() for h, g in zip(net.heads, net.targets))
    mask_loss = w * mask_loss / len(net.heads)
    for o in opts:
      o.zero_grad()
    (ce + mask_loss).backward()
    for o in opts:
      o.step()
    out.append((ce.item(), float(mask_loss.detach()), numpy_sd(sd)))
  return out


def ours_steps(config, name, x, labels, steps=2):
  _, variables = converted(name)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = config_lib.model_from_config(config, 10, bn_axis_name=parallel.AXIS)
  prof = flops.profile(config_lib.model_from_config(config, 10), (1, 32, 32, 3))
  tx = train.create_optimizer(config, 1, steps)
  params = variables['params']
  state = parallel.replicate(train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables['batch_stats'],
      opt_state=tx.init(params)), mesh)
  step = train.make_train_step(mesh, model=model, tx=tx, config=config, prof=prof,
                               steps_per_epoch=1)
  batch = data.shard_batch({'image': x, 'label': labels}, mesh)
  out = []
  for _ in range(steps):
    state, m = step(state, batch)
    m = jax.device_get(m)
    out.append((float(m['ce_loss']), float(m['mask_loss'] * m['mask_loss_weight']),
                jax.device_get(state.variables)))
  return out


def max_diff(a, b, only=None, relative=False):
  """Largest |a - b| (/ |b|) over the leaves whose path contains ``only`` (all if None)."""
  def diff(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float((np.abs(u - v) / (np.abs(v) if relative else 1.0)).max())
  leaves = jax.tree.leaves_with_path(jax.tree.map(diff, a, b))
  return max(v for p, v in leaves if only is None or only in jax.tree_util.keystr(p))


def head_movement(before, after):
  return max_diff(before['params'], after['params'], only="'head'")


@pytest.fixture(scope='module')
def resnet8_steps():
  x, labels = images(), np.random.default_rng(2).integers(0, 10, 8).astype(np.int32)
  want = torch_steps('resnet8', x, labels)
  as_flax = [(ce, ml, convert.convert_state_dict('resnet8', sd, 10, WIDTHS['resnet8']))
             for ce, ml, sd in want]
  return x, labels, as_flax


def test_reference_train_steps_equal_the_authors(resnet8_steps):
  """CE and mask loss of each step, parameters and BN running statistics after it, and
  the heads moving on momentum in the step after the cooldown (D2, D4, D5)."""
  x, labels, want = resnet8_steps
  got = ours_steps(make_config('resnet8'), 'resnet8', x, labels)
  _, initial = converted('resnet8')
  for (ce, ml, sd), (gce, gml, gv) in zip(want, got):
    assert abs(ce - gce) <= 1e-5 and abs(ml - gml) <= 1e-5 * max(1.0, ml)
    assert max_diff(sd, gv) <= 1e-4
    assert max_diff(gv['batch_stats'], sd['batch_stats'], only="'var'", relative=True) <= 2e-6
  assert want[1][1] == got[1][1] == 0.0  # mask loss off after the cooldown
  coast = head_movement(got[0][2], got[1][2])
  assert coast > 1e-3 and abs(coast - head_movement(want[0][2], want[1][2])) <= 1e-4
  assert max_diff(initial['batch_stats'], got[0][2]['batch_stats'], only="'var'") > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('field,value,where,relative,above', [
    ('shortcut_grad', 'flow', "'params'", False, 1e-4),  # D2: gradient through the shortcut
    ('bn_running_var', 'biased', "'var'", True, 1e-5),   # D5: Flax's running variance
])
def test_one_field_off_the_reference_departs(resnet8_steps, field, value, where, relative,
                                             above):
  """With one field set explicitly, that behaviour leaves the authors' (the forward and
  its CE stay theirs)."""
  x, labels, want = resnet8_steps
  got = ours_steps(make_config('resnet8', **{field: value}), 'resnet8', x, labels, steps=1)
  assert abs(want[0][0] - got[0][0]) <= 1e-5
  assert max_diff(got[0][2], want[0][2], only=where, relative=relative) > above


def test_spec_profile_freezes_heads_after_cooldown(resnet8_steps):
  x, labels, _ = resnet8_steps
  got = ours_steps(make_config('resnet8', cooldown_heads='freeze'), 'resnet8', x, labels)
  assert head_movement(got[0][2], got[1][2]) == 0.0
  assert max_diff(got[0][2]['params'], got[1][2]['params']) > 0  # the backbone trains on


# -------------------------------------------------------------------- BN and init

@pytest.mark.parametrize('running_var', ['biased', 'unbiased'])
def test_batch_norm_running_variance_over_devices(running_var):
  """n/(n-1) uses the global batch: 4 devices give what 1 device and torch give."""
  t = torch()
  x = np.random.default_rng(0).standard_normal((8, 3, 3, 5)).astype(np.float32) * 2 + 1
  bn = BatchNorm(use_running_average=False, axis_name=parallel.AXIS, running_var=running_var)
  variables = bn.init(jax.random.key(0), x[:1])

  def run(devices):
    mesh = parallel.make_mesh(devices)
    f = jax.jit(jax.shard_map(lambda v, x: bn.apply(v, x, mutable=['batch_stats']),
                              mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),
                                                   jax.sharding.PartitionSpec(parallel.AXIS)),
                              out_specs=(jax.sharding.PartitionSpec(parallel.AXIS),
                                         jax.sharding.PartitionSpec())))
    y, state = f(variables, x)
    return np.asarray(y), np.asarray(state['batch_stats']['var'])

  y1, v1 = run(jax.devices()[:1])
  y4, v4 = run(jax.devices())
  rm, rv = t.zeros(5), t.ones(5)
  ty = t.nn.functional.batch_norm(t.from_numpy(x.transpose(0, 3, 1, 2)), rm, rv, None, None,
                                  True, 0.1, 1e-5)
  np.testing.assert_allclose(y1, ty.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  np.testing.assert_allclose(v4, v1, rtol=1e-6)
  n = x.size // 5
  biased = 0.9 + 0.1 * x.reshape(-1, 5).var(0)
  if running_var == 'unbiased':
    np.testing.assert_allclose(v1, rv.numpy(), rtol=1e-6)
  else:
    np.testing.assert_allclose(v1, biased, rtol=1e-6)
    assert np.abs(v1 - rv.numpy()).max() > 0.1 * x.reshape(-1, 5).var(0).min() / n
    import flax.linen as nn  # the spec profile's BN is Flax's own, to float32 rounding
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    fy, fs = ref.apply(ref.init(jax.random.key(0), x), x, mutable=['batch_stats'])
    np.testing.assert_allclose(y1, fy, atol=1e-5)
    np.testing.assert_allclose(v1, fs['batch_stats']['var'], rtol=1e-6)


def test_head_weight_init_ranges():
  """'torch_uniform': kernel and bias uniform in +-1/sqrt(fan_in), like torch's own 1x1
  Conv2d; 'lecun_normal': Flax's default, zero bias."""
  t = torch()
  cin, cout = 64, 256
  bound = 1 / np.sqrt(cin)
  heads = {}
  for init in choices.HEAD_WEIGHT_INITS:
    model = models.create_model('resnet8', num_classes=10, gate=GateConfig(
        head_weight_init=init))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    heads[init] = jax.tree.map(np.asarray, params['layer3_0']['conv2']['head'])
  assert heads['lecun_normal']['kernel'].shape == (cin, 64)
  assert np.all(heads['lecun_normal']['bias'] == 0)
  assert np.abs(heads['lecun_normal']['kernel']).max() > 1.2 * bound  # normal tails
  torch_conv = t.nn.Conv2d(cin, cout, 1)
  for w, b in ((heads['torch_uniform']['kernel'], heads['torch_uniform']['bias']),
               (torch_conv.weight.detach().numpy(), torch_conv.bias.detach().numpy())):
    for v in (w, b):
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.1)


# ------------------------------------------------------------------ head_init pass

@pytest.mark.parametrize('mode', [pytest.param('eval_bn_one_epoch', marks=pytest.mark.slow),
                                  'train_bn_501_batches'])
def test_head_init_pass_modes(mode, monkeypatch):
  """'train_bn_501_batches': BN statistics move, the pass stops at the cap, and the heads'
  momentum carries into training; 'eval_bn_one_epoch': one epoch, BN and optimizer state
  untouched. Either way the backbone's parameters do not move."""
  c = make_config('resnet8', head_init_pass=mode)
  c.dataset, c.head_init, c.batch_size = 'digits', 'ones', 128
  monkeypatch.setattr(train, 'HEAD_INIT_MAX_BATCHES', 3)
  calls = []
  real = data.create_train_iterator

  def counting(*args, **kwargs):
    for batch in real(*args, **kwargs):
      calls.append(1)
      yield batch
  monkeypatch.setattr(data, 'create_train_iterator', counting)
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = config_lib.model_from_config(c, 10, bn_axis_name=parallel.AXIS)
  steps_per_epoch = data.steps_per_epoch('digits', 128)
  tx = train.create_optimizer(c, steps_per_epoch, steps_per_epoch)
  state = train.create_train_state(jax.random.key(0, impl='rbg'), model, tx, (8, 8, 3), mesh)
  before = jax.device_get(state)
  after = jax.device_get(train.fit_heads_to_ones(state, c, model, mesh, None,
                                                 steps_per_epoch))
  assert len(calls) == (3 if mode == 'train_bn_501_batches' else steps_per_epoch)
  assert max_diff(before.params, after.params, only="'head'") > 0
  backbone = jax.tree.map_with_path(
      lambda p, a, b: 0.0 if models.is_head_path(p) else float(np.abs(a - b).max()),
      before.params, after.params)
  assert max(jax.tree.leaves(backbone)) == 0.0
  stats_moved = max_diff(before.batch_stats, after.batch_stats)
  heads_momentum = max(float(np.abs(v).max()) for v in jax.tree.leaves(
      after.opt_state.inner_states['heads']) if np.ndim(v) > 0)
  if mode == 'train_bn_501_batches':
    assert stats_moved > 0 and heads_momentum > 0
  else:
    assert stats_moved == 0 and heads_momentum == 0


# ------------------------------------------------------- the authors' checkpoints

def test_authors_layouts_are_detected_and_checked():
  """Baseline and gated key sets of the authors' code for every family they share with
  this project; a gated ResNet's two copies of a conv must agree."""
  rng = np.random.default_rng(0)

  def fill(keys):
    sd = {k: rng.standard_normal(convert.torch_shape(e.shape, e.head)).astype(np.float32)
          for k, e in keys.items() if not e.copy_of}
    return {**sd, **{k: sd[e.copy_of] for k, e in keys.items() if e.copy_of}}

  base = convert.expected_keys('resnet56', 10, key_layout='ftwt')
  assert {'fc.weight', 'layer3.8.bn2.running_var'} <= set(base) and 'linear.weight' not in base
  mb = convert.expected_keys('mobilenet_v1', 10, key_layout='ftwt')
  assert {'model.0.0.weight', 'model.13.4.running_var', 'model.1.3.weight', 'fc.bias'} <= set(mb)
  assert len(mb) == 137  # the keys the issue counted
  gated = convert.expected_keys('mobilenet_v1', 10, key_layout='ftwt', gated=True)
  assert gated[f'model.24.{convert.HEAD_MODULE}.weight'].shape == (512, 1024)  # Flax (in, out)
  assert gated[f'model.1.{convert.HEAD_MODULE}.weight'].names[1] == 'block0_dw'
  vgg = convert.expected_keys('vgg16_bn', 10, key_layout='ftwt', gated=True)
  convs = (0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16)  # a masked triple takes one index
  assert {f'features.{i}.conv.bias' for i in convs} <= set(vgg)
  for name in ('resnet56', 'resnet110', 'vgg16_bn', 'mobilenet_v1'):
    for gated_ in (False, True):
      sd = fill(convert.expected_keys(name, 10, key_layout='ftwt', gated=gated_))
      found = convert.detect_layout(name, sd, 10)
      assert found == ('ftwt', gated_) or (name == 'vgg16_bn' and not gated_), (name, found)
  sd = fill(convert.expected_keys('resnet8', 10, key_layout='ftwt', gated=True))
  convert.convert_state_dict('resnet8', sd, 10)
  sd['masked_conv.conv.weight'] = sd['conv1.weight'] + 1
  with pytest.raises(convert.ConversionError, match=r'differs from conv1\.weight'):
    convert.convert_state_dict('resnet8', sd, 10)
  with pytest.raises(convert.ConversionError, match="no 'ftwt' key layout for 'mobilenet_v2'"):
    convert.layout('mobilenet_v2', 'ftwt')


@pytest.mark.slow
def test_authors_checkpoint_file_to_evaluated_workdir(tmp_path):
  """Their checkpoint dict ({'state_dict': module.-prefixed, 'epoch', 'optimizers'}, .pth.tar)
  -> CLI -> a reference-profile ftwt workdir that api.load, evaluation and the report take."""
  t = torch()
  from fttw_jax import api, evaluate, report
  from fttw_jax.data import testing as data_testing
  sd, _ = converted('resnet8')
  src, out = tmp_path / 'model_best.pth.tar', tmp_path / 'w'
  t.save({'epoch': 100, 'best_acc': 91.0, 'optimizers': [{'state': {}, 'param_groups': []}],
          'state_dict': {f'module.{k}': v.detach() for k, v in sd.items()}}, src)
  assert convert.main(['--model', 'resnet8', '--width', '0.5', '--src', str(src), '--out',
                       str(out), '--threshold', str(R)]) == 0
  m = api.load(out)
  assert (m.config.stage, m.config.fidelity, m.config.gate.threshold) == ('ftwt', 'reference', R)
  assert m.meta['layout'] == 'ftwt'
  x = images()
  with t.no_grad():
    want = TorchFTWT('resnet8', sd)(to_torch_input(x)).numpy()
  np.testing.assert_allclose(m.predict(x), want, atol=1e-4, rtol=0)
  config = make_config('resnet8')
  config.data_dir = str(tmp_path / 'data')
  with data_testing.mock_dataset('cifar10', tmp_path / 'data', 16):
    result = evaluate.evaluate_checkpoint(config, out, 'latest', max_examples=16, quiet=True)
    assert result['stage'] == 'ftwt' and 0 <= result['mask_accuracy'] <= 1
    assert report.write_report(out, config, max_examples=16).exists()
