"""Import pretrained PyTorch weights as a checkpoint workdir (GitHub issues 7, 14).

    python -m fttw_jax.convert --model resnet34 --src resnet34.pth \\
        --out workdirs/resnet34_torchvision [--dataset imagenet2012] [--num_classes N]
    python -m fttw_jax.convert --model resnet56 --src model_best.pth.tar \\
        --out workdirs/r56_authors [--layout ftwt] [--threshold 0.8]

reads a PyTorch ``state_dict`` (``.pth``/``.pt``/``.tar`` via torch,
``.safetensors``, or ``.npz``), maps it onto the Flax network and writes ``OUT``
as a workdir holding one checkpoint (step 0) in the project's layout, so that
``--config.init_from=OUT``, evaluation, the report and the research API accept
it. Every key is checked before anything is written: a missing, unexpected or
mis-shaped key is an error listing all of them.

Two key layouts per family: ``common`` (the usual reference code, below) and
``ftwt`` (the FTWT authors' own code, github selkerdawy/FTWT, baseline *and*
gated, heads included; SPEC 9.7). ``--layout auto`` (default) takes the one the
file fits, as a baseline or, when it holds heads, as a gated (``ftwt`` stage)
model. A workdir converted from the ``ftwt`` layout gets ``fidelity='reference'``
(the authors' shortcut padding, depthwise rule, ... SPEC 9); from ``common``,
``'spec'``.

``common`` PyTorch key layouts (module prefixes; convs and linears carry
``.weight`` and ``.bias`` if they have one, BatchNorms ``.weight .bias
.running_mean .running_var`` and an ignored ``.num_batches_tracked``):

- ``resnet18``/``resnet34``: torchvision's ResNet: ``conv1 bn1``,
  ``layer{1..4}.{j}.conv1/bn1/conv2/bn2``, ``layer{2..4}.0.downsample.0/1``, ``fc``.
- ``resnet20/32/44/56/110`` (every CIFAR ResNet-(6n+2) in the registry): the
  common CIFAR ResNet (akamaster's ``resnet_cifar10``): ``conv1 bn1``,
  ``layer{1..3}.{b}.conv1/bn1/conv2/bn2``,
  ``linear``. Its option-A shortcut has no parameters, so keys match; note
  that akamaster's shortcut subsamples (``x[:, :, ::2, ::2]``) where ours (the
  FTWT reference's) average-pools 2x2, so such weights give slightly different
  outputs here until fine-tuned.
- ``vgg16_bn``: kuangliu's CIFAR VGG('VGG16') (same ``features`` indices as
  torchvision's vgg16_bn): ``features.{i}`` a Sequential of Conv2d(bias) +
  BatchNorm2d + ReLU triples and MaxPool2d (one index each), so the 13 convs
  sit at 0 3 7 10 14 17 20 24 27 30 34 37 40 and their BNs one after; then a
  single ``classifier`` Linear(512, classes).
- ``mobilenet_v1`` and ``mobilenet_v1_imagenet``: kuangliu's MobileNet:
  ``conv1 bn1``, ``layers.{0..12}.conv1/bn1`` (depthwise 3x3) and
  ``.conv2/bn2`` (pointwise 1x1), ``linear``.
- ``mobilenet_v2``: kuangliu's CIFAR MobileNetV2: ``conv1 bn1``,
  ``layers.{0..16}.conv1/bn1`` (expansion), ``.conv2/bn2`` (depthwise),
  ``.conv3/bn3`` (projection), ``.shortcut.0/1`` (1x1 conv + BN, only on
  stride-1 blocks that change width), then ``conv2 bn2`` (1x1 to 1280), ``linear``.

``ftwt`` layouts (the authors' models/cifar/*.py after ``fuse_masking``, whose
heads are ``MaskPredictorNN`` modules: a 1x1 ``Conv2d`` named ``mask.model.1Conv2dMask``
next to each gated conv's ``conv`` and ``bn``):

- CIFAR ResNets: baseline ``conv1 bn1 layer{1..3}.{b}.conv1/bn1/conv2/bn2 fc``;
  gated the same plus ``masked_conv.{conv,bn,mask...}`` (stem) and
  ``layer{s}.{b}.masked_conv{1,2}.{conv,bn,mask...}``, where ``conv``/``bn``
  are the plain keys' modules stored twice (both copies are checked to agree).
- ``vgg16_bn``: baseline as ``common``; gated ``features.{p}.conv/bn/mask...``
  with ``p`` the position in the cfg (a masked triple takes one index), then
  ``classifier``.
- ``mobilenet_v1`` / ``mobilenet_v1_imagenet``: baseline ``model.0.{0,1}``
  (stem conv, BN), ``model.{i}.{0,1,3,4}`` (dw conv, BN, pw conv, BN) for
  i = 1..13, ``fc``; gated ``model.{k}.conv/bn/mask...`` with k = 0 (stem),
  2i+1 (block i's dw), 2i+2 (its pw), then ``fc``.
- The authors' MobileNetV2 is another network (ReLU6, identity shortcuts only,
  other strides) than ``mobilenet_v2`` here (SPEC 2.3): no ``ftwt`` layout.

Tensors become Flax layouts: conv OIHW -> HWIO (a depthwise (C,1,k,k) becomes
(k,k,1,C)), Linear (out,in) -> (in,out), BN weight/bias -> scale/bias and
running_mean/var -> batch_stats mean/var, a head's (out,in,1,1) -> Dense (in,out).
The expected keys are generated from
the Flax model's own parameter tree, so a model change cannot silently drift
from this map.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fttw_jax import checkpoint, config as config_lib, models
from fttw_jax.models.mobilenet import MobileNetV1, MobileNetV2
from fttw_jax.models.resnet import ResNet
from fttw_jax.models.vgg import VGG, VGG16_CFG

DATASETS = ('cifar10', 'cifar100', 'imagenet2012', 'digits')
SUFFIXES = ('.pth', '.pt', '.tar', '.safetensors', '.npz')  # .tar: torch.save's, e.g. the
# authors' model_best.pth.tar
WRAPPER_KEYS = ('state_dict', 'model', 'net')
IGNORED_SUFFIXES = ('.num_batches_tracked',)
# Flax leaf name -> torch parameter name (conv/dense kernel and BN scale are both 'weight').
LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
              'mean': 'running_mean', 'var': 'running_var'}


class ConversionError(ValueError):
  """A source file that cannot be read or does not fit the model."""


# ---------------------------------------------------------------- key layouts

LAYOUTS = ('common', 'ftwt')
HEAD_MODULE = 'mask.model.1Conv2dMask'  # the authors' MaskPredictorNN's 1x1 conv


def _vgg_feature_indices(cfg, masked: bool = False) -> list[int]:
  """Index in ``features`` of each conv: a conv-BN-ReLU triple takes 3 (1 once the
  authors' ``fuse_masking`` made it one ``ConvWithMask``), a max pool 1."""
  out, i = [], 0
  for v in cfg:
    if v == 'M':
      i += 1
    else:
      out.append(i)
      i += 1 if masked else 3
  return out


# (regex on the Flax module path, replacement: str, fn(match), or a tuple of them
# whose first is the key read and the others copies the file must hold too).
Rule = tuple[str, Any]

_RESNET_BLOCKS: tuple[Rule, ...] = (
    ('stem/conv', 'conv1'), ('stem/bn', 'bn1'),
    (r'layer(\d+)_(\d+)/conv(\d)/conv', r'layer\1.\2.conv\3'),
    (r'layer(\d+)_(\d+)/conv(\d)/bn', r'layer\1.\2.bn\3'),
    (r'layer(\d+)_(\d+)/downsample_conv', r'layer\1.\2.downsample.0'),
    (r'layer(\d+)_(\d+)/downsample_bn', r'layer\1.\2.downsample.1'),
)
# The authors' gated ResNet keeps conv1/bn1 and also registers them in masked_conv*.
_RESNET_FTWT_GATED: tuple[Rule, ...] = (
    ('stem/conv', ('conv1', 'masked_conv.conv')), ('stem/bn', ('bn1', 'masked_conv.bn')),
    ('stem/head', f'masked_conv.{HEAD_MODULE}'),
    (r'layer(\d+)_(\d+)/conv(\d)/conv', (r'layer\1.\2.conv\3', r'layer\1.\2.masked_conv\3.conv')),
    (r'layer(\d+)_(\d+)/conv(\d)/bn', (r'layer\1.\2.bn\3', r'layer\1.\2.masked_conv\3.bn')),
    (r'layer(\d+)_(\d+)/conv(\d)/head', rf'layer\1.\2.masked_conv\3.{HEAD_MODULE}'),
    ('classifier', 'fc'),
)
_MOBILENET_V1: tuple[Rule, ...] = (
    ('stem/conv', 'conv1'), ('stem/bn', 'bn1'),
    (r'block(\d+)_dw/conv', r'layers.\1.conv1'), (r'block(\d+)_dw/bn', r'layers.\1.bn1'),
    (r'block(\d+)_pw/conv', r'layers.\1.conv2'), (r'block(\d+)_pw/bn', r'layers.\1.bn2'),
    ('classifier', 'linear'),
)
_MOBILENET_V1_FTWT: tuple[Rule, ...] = (
    ('stem/conv', 'model.0.0'), ('stem/bn', 'model.0.1'),
    (r'block(\d+)_dw/conv', lambda m: f'model.{int(m[1]) + 1}.0'),
    (r'block(\d+)_dw/bn', lambda m: f'model.{int(m[1]) + 1}.1'),
    (r'block(\d+)_pw/conv', lambda m: f'model.{int(m[1]) + 1}.3'),
    (r'block(\d+)_pw/bn', lambda m: f'model.{int(m[1]) + 1}.4'),
    ('classifier', 'fc'),
)


def _mobilenet_v1_ftwt_gated(m):
  """stem -> model.0, block i's dw -> model.{2i+1}, its pw -> model.{2i+2}."""
  k = 0 if m['block'] is None else 2 * int(m['block']) + (1 if m['kind'] == 'dw' else 2)
  return f'model.{k}.{HEAD_MODULE if m["leaf"] == "head" else m["leaf"]}'


_MOBILENET_V2: tuple[Rule, ...] = (
    ('stem/conv', 'conv1'), ('stem/bn', 'bn1'),
    (r'block(\d+)/expand/conv', r'layers.\1.conv1'), (r'block(\d+)/expand/bn', r'layers.\1.bn1'),
    (r'block(\d+)/dw/conv', r'layers.\1.conv2'), (r'block(\d+)/dw/bn', r'layers.\1.bn2'),
    (r'block(\d+)/project/conv', r'layers.\1.conv3'),
    (r'block(\d+)/project/bn', r'layers.\1.bn3'),
    (r'block(\d+)/shortcut_conv', r'layers.\1.shortcut.0'),
    (r'block(\d+)/shortcut_bn', r'layers.\1.shortcut.1'),
    ('final_conv/conv', 'conv2'), ('final_conv/bn', 'bn2'),
    ('classifier', 'linear'),
)


def _vgg_rules(cfg, masked: bool = False) -> tuple[Rule, ...]:
  index = _vgg_feature_indices(cfg, masked)
  if masked:
    sub = {'conv': 'conv', 'bn': 'bn', 'head': HEAD_MODULE}
    return ((r'conv(\d+)/(conv|bn|head)', lambda m: f'features.{index[int(m[1])]}.{sub[m[2]]}'),
            ('classifier', 'classifier'))
  return ((r'conv(\d+)/conv', lambda m: f'features.{index[int(m[1])]}'),
          (r'conv(\d+)/bn', lambda m: f'features.{index[int(m[1])] + 1}'),
          ('classifier', 'classifier'))


def layout(model_name: str, key_layout: str = 'common',
           gated: bool = False) -> tuple[Rule, ...]:
  """The rename rules of a registered model, found from its module class and options.

  Derived from the registry rather than listed by name, so every depth of a
  family (e.g. any CIFAR ResNet-(6n+2)) converts without touching this file.
  ``gated``: the keys of a model with heads (only the ``ftwt`` layout has them).
  """
  if model_name not in models.MODELS:
    raise ConversionError(
        f'unknown model {model_name!r}; valid models: {sorted(models.MODELS)}')
  if key_layout not in LAYOUTS:
    raise ConversionError(f'unknown layout {key_layout!r}; valid: {list(LAYOUTS)}')
  if gated and key_layout != 'ftwt':
    raise ConversionError(f'the {key_layout!r} layout has no heads; a gated state dict '
                          "(with heads) needs layout 'ftwt'")
  ctor = models.MODELS[model_name]
  cls = getattr(ctor, 'func', ctor)
  options = getattr(ctor, 'keywords', {})
  if key_layout == 'ftwt':
    if cls is ResNet and not options.get('imagenet'):
      return _RESNET_FTWT_GATED if gated else _RESNET_BLOCKS + (('classifier', 'fc'),)
    if cls is VGG:
      return _vgg_rules(options.get('cfg', VGG16_CFG), masked=gated)
    if cls is MobileNetV1:
      return ((r'(?:stem|block(?P<block>\d+)_(?P<kind>dw|pw))/(?P<leaf>conv|bn|head)',
               _mobilenet_v1_ftwt_gated), ('classifier', 'fc')) if gated else _MOBILENET_V1_FTWT
    raise ConversionError(
        f"no 'ftwt' key layout for {model_name!r}: the FTWT authors' code has CIFAR "
        'ResNets, VGG and MobileNetV1 of this project; its MobileNetV2 is another network '
        '(ReLU6, identity shortcuts only, other strides) than mobilenet_v2 here')
  if cls is ResNet:
    return _RESNET_BLOCKS + (('classifier', 'fc' if options.get('imagenet') else 'linear'),)
  if cls is VGG:
    return _vgg_rules(options.get('cfg', VGG16_CFG))
  if cls is MobileNetV1:
    return _MOBILENET_V1
  if cls is MobileNetV2:
    return _MOBILENET_V2
  raise ConversionError(f'no PyTorch key layout is defined for {model_name!r}')


def torch_module_names(model_name: str, flax_module: str, key_layout: str = 'common',
                       gated: bool = False) -> tuple[str, ...]:
  """PyTorch module prefixes of a Flax module path such as ``layer1_0/conv1/conv``: the
  one read first, then the copies the file holds of the same module."""
  for pattern, repl in layout(model_name, key_layout, gated):
    m = re.fullmatch(pattern, flax_module)
    if m:
      repls = repl if isinstance(repl, tuple) else (repl,)
      return tuple(r(m) if callable(r) else m.expand(r) for r in repls)
  raise KeyError(f'no PyTorch name for Flax module {flax_module!r} of {model_name}')


def torch_module_name(model_name: str, flax_module: str, key_layout: str = 'common',
                      gated: bool = False) -> str:
  """The PyTorch module prefix read for a Flax module path."""
  return torch_module_names(model_name, flax_module, key_layout, gated)[0]


def torch_shape(flax_shape: tuple[int, ...], head: bool = False) -> tuple[int, ...]:
  """Shape PyTorch stores a tensor in: HWIO -> OIHW, (in, out) -> (out, in); a head's
  Dense kernel (in, out) was the authors' 1x1 conv, (out, in, 1, 1)."""
  if len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape)) + ((1, 1) if head else ())
  return tuple(flax_shape)


def to_flax(array: np.ndarray, head: bool = False) -> np.ndarray:
  """Inverse of ``torch_shape`` on the data (depthwise (C,1,k,k) -> (k,k,1,C) too)."""
  if head and array.ndim == 4:
    array = array[:, :, 0, 0]
  if array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  if array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def check_model(model_name: str) -> None:
  """ConversionError unless ``model_name`` is registered and has a key layout."""
  layout(model_name)


def input_size(model_name: str) -> int:
  """Input side the model is built for: it fixes MobileNetV1-CIFAR's classifier width."""
  return 224 if model_name in models.IMAGENET_MODELS else 32


@functools.cache
def variable_shapes(model_name: str, num_classes: int, width: float = 1.0,
                    gated: bool = False):
  """The model's ``{'params', 'batch_stats'}`` as ShapeDtypeStructs (no compute);
  ``gated``: with the heads."""
  check_model(model_name)
  model = models.create_model(model_name, num_classes=num_classes, width=width,
                              gate=models.GateConfig() if gated else None)
  size = input_size(model_name)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


class Expected(NamedTuple):
  names: tuple[str, ...]     # Flax path: (collection, *modules, leaf)
  shape: tuple[int, ...]     # Flax shape
  head: bool                 # a head's kernel or bias
  copy_of: str | None        # for a duplicate module's key: the key read instead


def expected_keys(model_name: str, num_classes: int, width: float = 1.0,
                  key_layout: str = 'common', gated: bool = False) -> dict[str, Expected]:
  """``{torch key: Expected}`` for the model (with heads if ``gated``)."""
  out = {}
  shapes = variable_shapes(model_name, num_classes, width, gated)
  for path, leaf in jax.tree.leaves_with_path(shapes):
    names = tuple(p.key for p in path)
    head = models.gating.HEAD_NAME in names
    prefixes = torch_module_names(model_name, '/'.join(names[1:-1]), key_layout, gated)
    keys = [f'{p}.{LEAF_NAMES[names[-1]]}' for p in prefixes]
    out[keys[0]] = Expected(names, tuple(leaf.shape), head, None)
    out.update({k: Expected(names, tuple(leaf.shape), head, keys[0]) for k in keys[1:]})
  return out


# ------------------------------------------------------------------- checking

def _fmt(shape) -> str:
  return str(tuple(shape))


def _problems(expected: dict[str, Expected], state_dict) -> dict[str, list]:
  got = {k: tuple(np.shape(v)) for k, v in state_dict.items()
         if not k.endswith(IGNORED_SUFFIXES)}
  want = {k: torch_shape(e.shape, e.head) for k, e in expected.items()}
  both = set(want) & set(got)
  wrong = sorted(k for k in both if want[k] != got[k])
  differ = sorted(k for k in both - set(wrong)
                  if expected[k].copy_of in got and not np.array_equal(
                      state_dict[k], state_dict[expected[k].copy_of]))
  return {'missing': sorted((k, want[k]) for k in set(want) - set(got)),
          'unexpected': sorted((k, got[k]) for k in set(got) - set(want)),
          'wrong': [(k, got[k], want[k]) for k in wrong],
          'differ': [(k, expected[k].copy_of) for k in differ]}


def mismatch_report(model_name: str, state_dict: dict[str, np.ndarray], num_classes: int,
                    width: float = 1.0, key_layout: str = 'common',
                    gated: bool = False) -> str | None:
  """None when ``state_dict`` fits the model, else a message listing every bad key."""
  p = _problems(expected_keys(model_name, num_classes, width, key_layout, gated), state_dict)
  if not any(p.values()):
    return None
  lines = [f'the state dict does not fit {model_name} '
           f'(num_classes={num_classes}, width={width}, layout {key_layout!r}, '
           f'{"gated" if gated else "baseline"}):']
  if p['missing']:
    lines.append(f'  missing ({len(p["missing"])}):')
    lines += [f'    {k}  expected {_fmt(s)}' for k, s in p['missing']]
  if p['unexpected']:
    lines.append(f'  unexpected ({len(p["unexpected"])}):')
    lines += [f'    {k}  {_fmt(s)}' for k, s in p['unexpected']]
  if p['wrong']:
    lines.append(f'  wrong shape ({len(p["wrong"])}):')
    lines += [f'    {k}  got {_fmt(g)}, expected {_fmt(w)}' for k, g, w in p['wrong']]
  if p['differ']:
    lines.append(f'  copies of one module that differ ({len(p["differ"])}):')
    lines += [f'    {k}  differs from {c}' for k, c in p['differ']]
  classifier = torch_module_name(model_name, 'classifier', key_layout, gated) + '.weight'
  for k, g, _ in p['wrong']:
    if k == classifier and len(g) == 2:
      lines.append(f'  hint: the file has {g[0]} classes; pass the matching '
                   f'--dataset (or num_classes={g[0]})')
  return '\n'.join(lines)


def candidate_layouts(model_name: str) -> list[tuple[str, bool]]:
  """The (layout, gated) pairs ``model_name`` has, baseline 'common' first."""
  out = []
  for key_layout, gated in (('common', False), ('ftwt', False), ('ftwt', True)):
    try:
      layout(model_name, key_layout, gated)
    except ConversionError:
      continue
    out.append((key_layout, gated))
  return out


def detect_layout(model_name: str, state_dict, num_classes: int,
                  width: float = 1.0) -> tuple[str, bool]:
  """(layout, gated) whose keys ``state_dict`` fits; where none fits, the closest one
  (fewest bad keys), so that its mismatch report is the one shown."""
  scored = []
  for key_layout, gated in candidate_layouts(model_name):
    p = _problems(expected_keys(model_name, num_classes, width, key_layout, gated), state_dict)
    scored.append((sum(len(v) for v in p.values()), key_layout, gated))
  _, key_layout, gated = min(scored, key=lambda t: t[0])
  return key_layout, gated


def convert_state_dict(model_name: str, state_dict: dict[str, np.ndarray], num_classes: int,
                       width: float = 1.0, key_layout: str = 'auto',
                       gated: bool | None = None) -> dict[str, Any]:
  """Flax ``{'params', 'batch_stats'}`` (float32 numpy) from a torch state dict.

  ``key_layout`` 'auto' and ``gated`` None: as ``detect_layout`` finds. Raises
  ConversionError listing every missing, unexpected and mis-shaped key.
  """
  check_model(model_name)
  if key_layout == 'auto':
    key_layout, found = detect_layout(model_name, state_dict, num_classes, width)
    gated = found if gated is None else gated
  report = mismatch_report(model_name, state_dict, num_classes, width, key_layout, bool(gated))
  if report:
    raise ConversionError(report)
  variables: dict[str, Any] = {}
  for key, e in expected_keys(model_name, num_classes, width, key_layout, bool(gated)).items():
    if e.copy_of is not None:
      continue
    node = variables
    for n in e.names[:-1]:
      node = node.setdefault(n, {})
    node[e.names[-1]] = to_flax(np.asarray(state_dict[key], dtype=np.float32), e.head)
  return variables


# -------------------------------------------------------------------- reading

def _strip_prefix(state_dict: dict[str, Any], prefix: str = 'module.') -> dict[str, Any]:
  """Drop DataParallel's ``module.`` prefix so multi-GPU checkpoints load too."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _unwrap(obj: Any, path) -> dict[str, Any]:
  """The state dict inside a training checkpoint dict ('state_dict', 'model' or 'net')."""
  if not isinstance(obj, dict):
    raise ConversionError(f'{path}: expected a state dict, got {type(obj).__name__}; '
                          'save model.state_dict(), not the model')
  for k in WRAPPER_KEYS:
    if isinstance(obj.get(k), dict):
      return obj[k]
  return obj


def _torch_to_numpy(path, obj: dict[str, Any]) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise ConversionError(f'{path}: not tensors ({len(bad)}): {bad}')
  # bfloat16 has no numpy dtype: go through float32.
  return {k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy()
          for k, v in obj.items()}


def _read_torch(path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        f'reading {path} needs PyTorch (pip install torch), or save it as .npz or '
        '.safetensors where torch is installed') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for a bad file
    raise ConversionError(f'cannot read {path} with torch.load(weights_only=True): {e}') from e
  return _torch_to_numpy(path, _unwrap(obj, path))


def _read_safetensors(path) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f'reading {path} needs safetensors (pip install safetensors)') from None
  try:
    return load_file(str(path))
  except Exception as e:  # safetensors raises its own error types
    raise ConversionError(f'cannot read {path} as safetensors: {e}') from e


def _read_npz(path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # zipfile / ValueError / OSError for a bad file
    raise ConversionError(f'cannot read {path} as .npz: {e}') from e


_READERS: dict[str, Callable[[Any], dict[str, np.ndarray]]] = {
    '.pth': _read_torch, '.pt': _read_torch, '.tar': _read_torch,
    '.safetensors': _read_safetensors, '.npz': _read_npz}


def load_state_dict(path) -> dict[str, np.ndarray]:
  """``{key: numpy array}`` from a .pth/.pt, .safetensors or .npz file, ``module.`` stripped."""
  path = pathlib.Path(path)
  if path.suffix not in _READERS:
    raise ConversionError(f'{path}: unknown file type {path.suffix!r}; '
                          f'supported: {", ".join(SUFFIXES)}')
  if not path.is_file():
    raise ConversionError(f'no such file: {path}')
  return _strip_prefix(_READERS[path.suffix](path))


# -------------------------------------------------------------------- writing

def num_classes_of(dataset: str) -> int:
  """Class count of a dataset (imports the data package lazily: it loads TensorFlow)."""
  from fttw_jax.data import info  # pylint: disable=g-import-not-at-top
  return info.get_info(dataset).num_classes


def default_dataset(model_name: str) -> str:
  return 'imagenet2012' if model_name in models.IMAGENET_MODELS else 'cifar10'


def has_checkpoint(out) -> bool:
  out = epath.Path(out)
  return any((out / d).exists() and any(p.name.isdigit() for p in (out / d).iterdir())
             for d in checkpoint.CHECKPOINT_DIRS)


def make_config(model_name: str, dataset: str, width: float, key_layout: str = 'common',
                gated: bool = False, threshold: float | None = None):
  """The stored config: a baseline or (``gated``) ftwt stage; the authors' ``ftwt``
  layout gets their behaviour, ``fidelity='reference'``. ``threshold`` (r) only
  decides the targets, hence mask loss and accuracy; the predicted masks, logits
  and FLOPs do not depend on it."""
  c = config_lib.base_config()
  c.model, c.dataset, c.width = model_name, dataset, width
  c.stage = 'ftwt' if gated else 'baseline'
  c.fidelity = 'reference' if key_layout == 'ftwt' else 'spec'
  if threshold is not None:
    c.gate.threshold = threshold
  try:
    config_lib.validate(c)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  return c


def absolute(out) -> epath.Path:
  """``out`` as orbax needs it: local paths made absolute, ``gs://`` left alone."""
  return epath.Path(out) if '://' in str(out) else epath.Path(os.path.abspath(out))


def write_checkpoint(out, variables, cfg, meta: dict, overwrite: bool = False,
                     step: int = 0) -> None:
  """Step ``step`` of ``out/checkpoints`` holding variables, config and meta (no optimizer
  state).

  ``opt_state`` is left out: a converted network has none, and orbax refuses an
  empty item; evaluation, ``init_from`` and the API restore variables only. If
  writing fails, the directories this call created are removed again.
  """
  out = absolute(out)
  if has_checkpoint(out):
    if not overwrite:
      raise ConversionError(f'{out} already holds a checkpoint; pass --overwrite to replace it')
    for d in checkpoint.CHECKPOINT_DIRS:  # a stale best/ would shadow the new weights
      if (out / d).exists():
        (out / d).rmtree()
  new_dirs = [p for p in (out, out / checkpoint.CHECKPOINTS) if not p.exists()]
  try:
    manager = checkpoint.create_manager(out)
    try:
      manager.save(step, args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables),
          config=ocp.args.JsonSave(json.loads(cfg.to_json_best_effort())),
          meta=ocp.args.JsonSave(meta)))
      manager.wait_until_finished()
    finally:
      manager.close()
  except BaseException:
    for p in new_dirs:
      if p.exists():
        p.rmtree()
    raise


def convert(model_name: str, src, out, dataset: str | None = None,
            num_classes: int | None = None, width: float = 1.0,
            overwrite: bool = False, key_layout: str = 'auto',
            threshold: float | None = None) -> dict[str, Any]:
  """Read ``src``, check it fully, then write the workdir ``out``; returns the variables.

  ``key_layout``: 'auto' (the one ``src`` fits, baseline or gated), 'common' or
  'ftwt' (baseline or gated, as the file's keys say).
  """
  if key_layout not in ('auto', *LAYOUTS):
    raise ConversionError(f'unknown layout {key_layout!r}; valid: {["auto", *LAYOUTS]}')
  check_model(model_name)
  dataset = dataset or default_dataset(model_name)
  if dataset not in DATASETS:
    raise ConversionError(f'unknown dataset {dataset!r}; valid: {list(DATASETS)}')
  classes = num_classes_of(dataset)
  if num_classes is not None and num_classes != classes:
    raise ConversionError(f'--num_classes {num_classes} disagrees with {dataset} '
                          f'({classes} classes)')
  if has_checkpoint(out) and not overwrite:
    raise ConversionError(f'{out} already holds a checkpoint; pass --overwrite to replace it')
  state_dict = load_state_dict(src)
  found, gated = detect_layout(model_name, state_dict, classes, width)
  if key_layout == 'auto':
    key_layout = found
  elif key_layout == 'common':
    gated = False
  cfg = make_config(model_name, dataset, width, key_layout, gated, threshold)
  variables = convert_state_dict(model_name, state_dict, classes, width, key_layout, gated)
  meta = {'step': 0, 'epoch': 0, 'model': model_name, 'num_classes': classes,
          'dataset': dataset, 'stage': cfg.stage, 'source': str(src), 'layout': key_layout}
  write_checkpoint(out, variables, cfg, meta, overwrite)
  return variables


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m fttw_jax.convert',
      description='Convert a PyTorch state dict into a baseline checkpoint workdir.')
  p.add_argument('--model', required=True, help=f'one of {sorted(models.MODELS)}')
  p.add_argument('--src', required=True, help=f'state dict file ({", ".join(SUFFIXES)})')
  p.add_argument('--out', required=True, help='workdir to write (OUT/checkpoints/0)')
  p.add_argument('--dataset', choices=DATASETS, default=None,
                 help='default: imagenet2012 for ImageNet models, else cifar10')
  p.add_argument('--num_classes', type=int, default=None,
                 help="default: the dataset's; must agree with it if given")
  p.add_argument('--width', type=float, default=1.0, help='channel width multiplier')
  p.add_argument('--overwrite', action='store_true',
                 help="replace OUT's existing checkpoints")
  p.add_argument('--layout', choices=('auto', *LAYOUTS), default='auto',
                 help="key layout: 'common' (torchvision/akamaster/kuangliu), 'ftwt' (the "
                      "FTWT authors' code, baseline or gated) or 'auto' (the one the file fits)")
  p.add_argument('--threshold', type=float, default=None,
                 help='gated models: the r they were trained with (decides the targets, '
                      'hence mask loss/accuracy; not the predicted masks)')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    convert(args.model, args.src, args.out, args.dataset, args.num_classes, args.width,
            args.overwrite, args.layout, args.threshold)
  except ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {epath.Path(args.out) / "checkpoints" / "0"} ({args.model} from {args.src})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
