"""fttw_jax.convert: PyTorch weights -> baseline checkpoint, checked against torch itself.

The torch tests build the reference architectures with exactly the module names
of torchvision / akamaster / kuangliu (torchvision itself is not installable
next to the CPU torch), randomise them, and compare eval-mode logits.
"""

import functools
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from fttw_jax import checkpoint, convert, models


# ------------------------------------------------------------ torch references

def torch_nets():
  """Namespace of reference torch.nn models (built lazily: torch is optional)."""
  torch = pytest.importorskip('torch')
  nn, F = torch.nn, torch.nn.functional

  def conv_bn(cin, cout, k, s=1, groups=1):
    return (nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout))

  class TVBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
      self.conv2, self.bn2 = conv_bn(cout, cout, 3)
      self.relu = nn.ReLU()
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
      return self.relu(y + (x if self.downsample is None else self.downsample(x)))

  class TVResNet(nn.Module):
    """torchvision.models.resnet.ResNet with basic blocks (resnet18/34 names)."""

    def __init__(self, layers, num_classes):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for i, (n, c) in enumerate(zip(layers, (64, 128, 256, 512))):
        blocks = [TVBlock(cin if b == 0 else c, c, 2 if i and b == 0 else 1) for b in range(n)]
        setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        cin = c
      self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(x.mean((2, 3)))

  class CifarBlock(nn.Module):
    """akamaster BasicBlock; shortcut = 2x2 avg pool + channel zero-pad (SPEC 2.3)."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
      self.conv2, self.bn2 = conv_bn(cout, cout, 3)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      if self.stride != 1:
        x = F.avg_pool2d(x, self.stride)
      if self.extra:
        x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return F.relu(y + x)

  class CifarResNet(nn.Module):
    """akamaster resnet_cifar10 names: conv1, bn1, layer{s}.{b}.*, linear."""

    def __init__(self, n, num_classes):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(3, 16, 3)
      cin = 16
      for i, c in enumerate((16, 32, 64)):
        blocks = [CifarBlock(cin if b == 0 else c, c, 2 if i and b == 0 else 1)
                  for b in range(n)]
        setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        cin = c
      self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      x = self.layer3(self.layer2(self.layer1(x)))
      return self.linear(x.mean((2, 3)))

  class VGG(nn.Module):
    """kuangliu VGG('VGG16')."""

    def __init__(self, num_classes):
      super().__init__()
      layers, cin = [], 3
      for v in models.vgg.VGG16_CFG:
        if v == 'M':
          layers.append(nn.MaxPool2d(2, 2))
        else:
          layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
          cin = v
      self.features = nn.Sequential(*layers)
      self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
      return self.classifier(self.features(x).flatten(1))

  class MBV1Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(cin, cin, 3, stride, groups=cin)
      self.conv2, self.bn2 = conv_bn(cin, cout, 1)

    def forward(self, x):
      return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))

  class MobileNet(nn.Module):
    """kuangliu MobileNet (CIFAR)."""

    def __init__(self, num_classes):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(3, 32, 3)
      blocks, cin = [], 32
      for c, s in models.mobilenet.MOBILENET_V1_CFG:
        blocks.append(MBV1Block(cin, c, s))
        cin = c
      self.layers = nn.Sequential(*blocks)
      self.linear = nn.Linear(1024, num_classes)

    def forward(self, x):
      x = self.layers(F.relu(self.bn1(self.conv1(x))))
      return self.linear(F.avg_pool2d(x, 2).flatten(1))

  class MBV2Block(nn.Module):
    def __init__(self, cin, cout, t, stride):
      super().__init__()
      h = cin * t
      self.stride = stride
      self.conv1, self.bn1 = conv_bn(cin, h, 1)
      self.conv2, self.bn2 = conv_bn(h, h, 3, stride, groups=h)
      self.conv3, self.bn3 = conv_bn(h, cout, 1)
      self.shortcut = nn.Sequential()
      if stride == 1 and cin != cout:
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
      return y + self.shortcut(x) if self.stride == 1 else y

  class MobileNetV2(nn.Module):
    """kuangliu MobileNetV2 (CIFAR)."""

    def __init__(self, num_classes):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(3, 32, 3)
      blocks, cin = [], 32
      for t, c, n, s in models.mobilenet.MOBILENET_V2_CFG:
        for b in range(n):
          blocks.append(MBV2Block(cin, c, t, s if b == 0 else 1))
          cin = c
      self.layers = nn.Sequential(*blocks)
      self.conv2, self.bn2 = conv_bn(320, 1280, 1)
      self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
      x = self.layers(F.relu(self.bn1(self.conv1(x))))
      x = F.relu(self.bn2(self.conv2(x)))
      return self.linear(F.avg_pool2d(x, 4).flatten(1))

  return {
      'resnet18': functools.partial(TVResNet, (2, 2, 2, 2)),
      'resnet34': functools.partial(TVResNet, (3, 4, 6, 3)),
      'resnet20': functools.partial(CifarResNet, 3),
      'vgg16_bn': VGG,
      'mobilenet_v1': MobileNet,
      'mobilenet_v2': MobileNetV2,
  }


def randomized(name, num_classes, seed=0):
  """Torch model in eval mode with realistic, non-trivial BatchNorm statistics.

  One train-mode pass with momentum 1 over a calibration batch sets the running
  stats (so activations stay O(1) through deep nets, and logits small enough
  for an absolute tolerance); variances are kept off zero, where eval-mode BN
  would amplify rounding, and the affines are perturbed.
  """
  torch = pytest.importorskip('torch')
  torch.manual_seed(seed)
  net = torch_nets()[name](num_classes)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in bns:
    m.momentum = 1.0
  net.train()
  with torch.no_grad():
    net(torch.from_numpy(input_batch(name, seed=seed + 100, batch=8)))
    for m in bns:
      m.running_var.add_(0.1)
      m.weight.mul_(1 + 0.2 * torch.rand_like(m.weight))
      m.bias.add_(0.1 * torch.randn_like(m.bias))
  return net.eval()


def numpy_state_dict(net):
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


@functools.cache
def flax_apply(name, num_classes):
  model = models.create_model(name, num_classes=num_classes)
  return jax.jit(lambda v, x: model.apply(v, x, train=False)[0])


def input_batch(name, seed=0, batch=2):
  size = 64 if name in models.IMAGENET_MODELS else 32
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def assert_same_logits(name, net, variables, x, num_classes):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy()
  got = np.asarray(flax_apply(name, num_classes)(variables, x.transpose(0, 2, 3, 1)))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(want[0] - want[1]).max() > 1e-3  # logits depend on the input: not vacuous


# ---------------------------------------------------------- numerical equality

@pytest.mark.parametrize('name', ['resnet18', 'resnet20', 'mobilenet_v1', 'mobilenet_v2',
                                  'vgg16_bn'])
def test_logits_match_torch(name):
  x = input_batch(name)
  net = randomized(name, 10)
  variables = convert.convert_state_dict(name, numpy_state_dict(net), num_classes=10)
  assert_same_logits(name, net, variables, x, 10)


def test_cli_resnet34_pth_to_restorable_workdir(tmp_path):
  """The issue's path: torchvision-layout .pth -> CLI -> restore_variables -> same logits."""
  torch = pytest.importorskip('torch')
  x = input_batch('resnet34', seed=1)
  net = randomized('resnet34', 1000, seed=1)
  src, out = tmp_path / 'resnet34.pth', tmp_path / 'out'
  torch.save(net.state_dict(), src)
  assert convert.main(['--model', 'resnet34', '--src', str(src), '--out', str(out)]) == 0

  target = convert.variable_shapes('resnet34', 1000)
  variables, cfg, meta, step = checkpoint.restore_variables(out, target=target)
  assert step == 0
  assert (cfg.model, cfg.dataset, cfg.stage, cfg.width) == ('resnet34', 'imagenet2012',
                                                            'baseline', 1.0)
  assert meta == {'step': 0, 'epoch': 0, 'model': 'resnet34', 'num_classes': 1000,
                  'dataset': 'imagenet2012', 'stage': 'baseline', 'source': str(src),
                  'layout': 'common'}
  assert cfg.fidelity == 'spec'
  assert checkpoint.read_config(out)[2] == 0
  assert_same_logits('resnet34', net, variables, x, 1000)


# ------------------------------------------------------------- file round trips

@pytest.fixture(scope='module')
def resnet20_sd():
  """A resnet20 state dict as numpy (from torch when present, else from the key map)."""
  if importlib.util.find_spec('torch') is None:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(convert.torch_shape(e.shape)).astype(np.float32)
            for k, e in convert.expected_keys('resnet20', 10).items()}
  return numpy_state_dict(randomized('resnet20', 10))


def assert_same_dict(got, want):
  want = {k: v for k, v in want.items() if not k.endswith('num_batches_tracked')}
  got = {k: v for k, v in got.items() if not k.endswith('num_batches_tracked')}
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_npz_round_trip(tmp_path, resnet20_sd):
  np.savez(tmp_path / 'w.npz', **resnet20_sd)
  assert_same_dict(convert.load_state_dict(tmp_path / 'w.npz'), resnet20_sd)


def test_safetensors_round_trip(tmp_path, resnet20_sd):
  st = pytest.importorskip('safetensors.numpy')
  st.save_file({k: np.ascontiguousarray(v) for k, v in resnet20_sd.items()},
               tmp_path / 'w.safetensors')
  assert_same_dict(convert.load_state_dict(tmp_path / 'w.safetensors'), resnet20_sd)


@pytest.mark.parametrize('wrapper', [None, 'state_dict', 'model', 'net'])
def test_pth_round_trip(tmp_path, resnet20_sd, wrapper):
  """Plain state dicts and training checkpoints with DataParallel's ``module.`` prefix."""
  torch = pytest.importorskip('torch')
  sd = {k: torch.from_numpy(v) for k, v in resnet20_sd.items()}
  obj = sd
  if wrapper:
    obj = {wrapper: {f'module.{k}': v for k, v in sd.items()}, 'epoch': 7}
  torch.save(obj, tmp_path / 'w.pt')
  got = convert.load_state_dict(tmp_path / 'w.pt')
  assert_same_dict(got, resnet20_sd)
  variables = convert.convert_state_dict('resnet20', got, 10)
  assert variables['params']['stem']['conv']['kernel'].shape == (3, 3, 3, 16)


def test_layout_names():
  """A few keys of each documented layout, as reference code names them."""
  keys = {n: convert.expected_keys(n, 10) for n in models.MODELS}
  assert {'fc.weight', 'layer2.0.downsample.0.weight', 'layer2.0.downsample.1.running_var',
          'layer4.1.bn2.weight'} <= set(keys['resnet18'])
  assert keys['resnet18']['fc.weight'][0] == ('params', 'classifier', 'kernel')
  assert {'linear.weight', 'layer3.2.conv2.weight'} <= set(keys['resnet20'])
  convs = sorted(int(k.split('.')[1]) for k, e in keys['vgg16_bn'].items()
                 if len(e.shape) == 4)
  assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
  assert {'features.1.running_mean', 'features.41.weight', 'classifier.weight'} <= set(
      keys['vgg16_bn'])
  assert keys['mobilenet_v1']['layers.0.conv1.weight'][1] == (3, 3, 1, 32)  # depthwise
  assert keys['mobilenet_v1_imagenet'].keys() == keys['mobilenet_v1'].keys()
  assert {'layers.1.shortcut.0.weight', 'layers.16.bn3.bias', 'conv2.weight',
          'bn2.running_var'} <= set(keys['mobilenet_v2'])
  assert 'layers.2.shortcut.0.weight' not in keys['mobilenet_v2']  # identity shortcut


def test_depthwise_and_linear_layouts():
  w = np.arange(2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3)
  assert convert.to_flax(w).shape == (3, 3, 1, 2)
  assert convert.to_flax(w)[1, 2, 0, 1] == w[1, 0, 1, 2]
  fc = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(convert.to_flax(fc), fc.T)


# ----------------------------------------------------------------- bad inputs

def run_cli(tmp_path, sd, model='resnet20', extra=()):
  """Save ``sd`` as .npz and run the CLI into tmp_path/out; returns (rc, out path)."""
  src, out = tmp_path / 'w.npz', tmp_path / 'out'
  np.savez(src, **sd)
  return convert.main(['--model', model, '--src', str(src), '--out', str(out), *extra]), out


def test_missing_key_lists_all(tmp_path, resnet20_sd, capsys):
  sd = dict(resnet20_sd)
  del sd['linear.bias'], sd['layer2.1.bn1.running_var']
  rc, out = run_cli(tmp_path, sd)
  err = capsys.readouterr().err
  assert rc == 1 and not out.exists()
  assert 'missing (2)' in err
  assert 'linear.bias  expected (10,)' in err
  assert 'layer2.1.bn1.running_var  expected (32,)' in err


def test_unexpected_key_lists_all(tmp_path, resnet20_sd):
  sd = dict(resnet20_sd, **{'extra.weight': np.zeros((4, 2), np.float32),
                            'layer9.0.conv1.weight': np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict('resnet20', sd, 10)
  msg = str(e.value)
  assert 'unexpected (2)' in msg and 'extra.weight  (4, 2)' in msg
  assert 'layer9.0.conv1.weight  (3,)' in msg
  assert not (tmp_path / 'out').exists()


def test_wrong_shapes_list_both_shapes(tmp_path, resnet20_sd, capsys):
  sd = dict(resnet20_sd)
  sd['linear.weight'] = np.zeros((100, 64), np.float32)
  sd['linear.bias'] = np.zeros(100, np.float32)
  sd['conv1.weight'] = np.zeros((16, 3, 5, 5), np.float32)
  rc, out = run_cli(tmp_path, sd)
  err = capsys.readouterr().err
  assert rc == 1 and not out.exists()
  assert 'wrong shape (3)' in err
  assert 'linear.weight  got (100, 64), expected (10, 64)' in err
  assert 'linear.bias  got (100,), expected (10,)' in err
  assert 'conv1.weight  got (16, 3, 5, 5), expected (16, 3, 3, 3)' in err
  assert 'num_classes=100' in err
  rc, out = run_cli(tmp_path, dict(resnet20_sd, conv1=0), extra=['--dataset', 'cifar100'])
  assert rc == 1 and not out.exists()


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors', '.pth'])
def test_corrupt_file(tmp_path, suffix):
  if suffix == '.safetensors':
    pytest.importorskip('safetensors')
  if suffix == '.pth':
    pytest.importorskip('torch')
  src = tmp_path / f'bad{suffix}'
  src.write_bytes(b'\x00not a weights file' * 10)
  with pytest.raises(convert.ConversionError, match='cannot read'):
    convert.convert('resnet20', src, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_bad_arguments(tmp_path, resnet20_sd):
  with pytest.raises(convert.ConversionError, match="unknown model 'resnet99'"):
    convert.convert_state_dict('resnet99', resnet20_sd, 10)
  rc, out = run_cli(tmp_path, resnet20_sd, model='resnet99')
  assert rc == 1 and not out.exists()
  with pytest.raises(convert.ConversionError, match='unknown file type'):
    convert.load_state_dict(tmp_path / 'w.h5')
  with pytest.raises(convert.ConversionError, match='no such file'):
    convert.load_state_dict(tmp_path / 'absent.npz')
  with pytest.raises(convert.ConversionError, match='disagrees'):
    convert.convert('resnet20', tmp_path / 'absent.npz', out, num_classes=100)
  assert not out.exists()


def test_existing_checkpoint_needs_overwrite(tmp_path, resnet20_sd):
  assert run_cli(tmp_path, resnet20_sd)[0] == 0
  sd = dict(resnet20_sd, **{'linear.bias': np.full(10, 3.0, np.float32)})
  rc, out = run_cli(tmp_path, sd)
  assert rc == 1
  restored = checkpoint.restore_variables(out)[0]
  np.testing.assert_array_equal(restored['params']['classifier']['bias'],
                                resnet20_sd['linear.bias'])
  assert run_cli(tmp_path, sd, extra=['--overwrite'])[0] == 0
  restored = checkpoint.restore_variables(out)[0]
  np.testing.assert_array_equal(restored['params']['classifier']['bias'], sd['linear.bias'])
  assert sorted(p.name for p in (pathlib.Path(out) / 'checkpoints').iterdir()) == ['0']


def test_relative_out_dir(tmp_path, resnet20_sd, monkeypatch):
  """orbax needs absolute paths; a relative --out (as in the docs) must still work."""
  monkeypatch.chdir(tmp_path)
  np.savez('w.npz', **resnet20_sd)
  assert convert.main(['--model', 'resnet20', '--src', 'w.npz', '--out', 'rel/out']) == 0
  restored = checkpoint.restore_variables(tmp_path / 'rel' / 'out')[0]
  np.testing.assert_array_equal(restored['params']['classifier']['bias'],
                                resnet20_sd['linear.bias'])


def test_failed_write_leaves_nothing(tmp_path, resnet20_sd, monkeypatch):
  def broken(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(convert.ocp.args, 'StandardSave', broken)
  np.savez(tmp_path / 'w.npz', **resnet20_sd)
  with pytest.raises(OSError, match='disk full'):
    convert.convert('resnet20', tmp_path / 'w.npz', tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
  (tmp_path / 'keep').mkdir()
  (tmp_path / 'keep' / 'notes.txt').write_text('mine')
  with pytest.raises(OSError, match='disk full'):
    convert.convert('resnet20', tmp_path / 'w.npz', tmp_path / 'keep')
  assert [p.name for p in (tmp_path / 'keep').iterdir()] == ['notes.txt']
