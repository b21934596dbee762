"""The gated convolution of FTWT (SPEC 2) and the small modules every backbone shares.

A ``GatedConv`` is conv -> BN -> act. With a ``GateConfig`` it also owns a mask
predictor head (a ``Dense`` named ``head``), computes the self-supervised target
mask of its own unmasked output, and multiplies its output by the predicted mask.
Without one (baseline mode) it is a plain conv-BN-act layer with the same
parameter names, so baseline weights load into a gated model unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fttw_jax import choices, ftwt
from fttw_jax.models.batch_norm import BatchNorm
from fttw_jax.models.conv_impl import CPU_IMPLS, conv_general_dilated, layer_boundary

HEAD_NAME = 'head'
ACTIVATIONS = {'relu': nn.relu, 'none': lambda x: x}


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Options of the gated layer (SPEC 2, 3); one instance is shared by all layers.

  Attributes:
    pool: head pooling, 'avg' (reference code) or 'max' (paper text).
    softmax: softmax over channels on the pooled head input.
    mode: 'decoupled' (heads see stop_gradient(x)) or 'joint'.
    criterion: target criterion, 'mass' (threshold = r) or 'uniform' (threshold
      = prune ratio q).
    threshold: r for 'mass', q for 'uniform'.
    gt_after_block: ResNet: take the second conv's target after add + ReLU.
    depthwise_rule: 'follow_input' (SPEC 2.2: a depthwise channel whose input
      channel is zero stays off) or 'head' (the reference: the head alone
      decides, so such a channel outputs act(BN shift); SPEC 9.2).
    head_weight_init: 'lecun_normal' kernel and zero bias (Flax's Dense) or
      'torch_uniform' (PyTorch's default for the reference's head layer: kernel
      and bias uniform in +-1/sqrt(fan_in); SPEC 9.5).
    head_norm: what the head's dense layer sees after pool (and softmax).
      'none' (paper and reference): the softmax output itself, ~1/Cin per
      channel plus small deviations; in the short digits demo the heads then
      settle on one input-independent mask (issue 19: the weights' gradient
      is ~1/Cin of the biases'). 'standardize': per sample,
      subtract the mean over channels and divide by the standard deviation
      (+1e-6), so the head's weights see O(1) inputs (issue 19).
    mask_source: which mask multiplies the output: the heads' 'predicted' mask
      (training and evaluation), the 'target' (FLOPs estimation before
      training) or 'ones' (no masking at all, not even SPEC 2.2's depthwise
      rule: the output equals the baseline network's; for checks).
  """
  pool: str = 'avg'
  softmax: bool = True
  mode: str = 'decoupled'
  criterion: str = 'mass'
  threshold: float = 0.9
  gt_after_block: bool = False
  depthwise_rule: str = 'follow_input'
  head_weight_init: str = 'lecun_normal'
  mask_source: str = 'predicted'
  head_norm: str = 'none'

  def __post_init__(self):
    choices.check_gate({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class BackboneOptions:
  """Backbone behaviours where the reference code departs from SPEC 2.3 (SPEC 9.1, 9.4).

  Attributes:
    shortcut_pad: CIFAR ResNet downsampling shortcut: zero channels split on
      'both' sides of the identity channels (akamaster-style) or appended at the
      'end' (the reference's ``torch.cat([x, zeros])``).
    shortcut_grad: 'flow' (gradient flows through that shortcut) or 'detached'
      (the reference builds it from ``x.data``).
    bn_running_var: BatchNorm running variance updated with the 'biased' batch
      variance (Flax) or the 'unbiased' one, n/(n-1) (PyTorch).
  """
  shortcut_pad: str = 'both'
  shortcut_grad: str = 'flow'
  bn_running_var: str = 'biased'

  def __post_init__(self):
    choices.check_choice('shortcut_pad', self.shortcut_pad, choices.SHORTCUT_PADS)
    choices.check_choice('shortcut_grad', self.shortcut_grad, choices.SHORTCUT_GRADS)
    choices.check_choice('bn_running_var', self.bn_running_var, choices.BN_RUNNING_VARS)


def check_images(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(
        f'expected images of rank 4 (N, H, W, C), got shape {tuple(x.shape)}')


def batch_norm(train: bool, axis_name: str | None, dtype: Any, name: str,
               running_var: str = 'biased', conv_impl: str = 'xla'):
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5); train mode under
  ``conv_impl`` 'cpu' or 'onednn' takes its own VJP (batch_norm.py)."""
  return BatchNorm(use_running_average=not train, axis_name=axis_name if train else None,
                   dtype=dtype, running_var=running_var,
                   custom_vjp=train and conv_impl in CPU_IMPLS, name=name)


def head_initializers(gate: GateConfig, fan_in: int) -> dict:
  """Dense kernel/bias initialisers of a head for ``gate.head_weight_init``."""
  if gate.head_weight_init == 'lecun_normal':
    return {}
  bound = 1.0 / float(fan_in) ** 0.5
  return {'kernel_init': nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
          'bias_init': lambda key, shape, dtype=jnp.float32: jax.random.uniform(
              key, shape, dtype, -bound, bound)}


class AvgPool(nn.Module):
  """Average pool as a module so the FLOPs profiler sees it.

  ``window=0`` is the global average. ``counted`` says whether the reference
  profile charges 1 MAC per output element for it (SPEC 5).
  """
  window: int = 0
  counted: bool = False

  def __call__(self, x):
    if self.window == 0:
      return jnp.mean(x, axis=(1, 2), keepdims=True)
    w = (self.window, self.window)
    return nn.avg_pool(x, w, strides=w)


def normalize_head_input(pooled: jax.Array, head_norm: str) -> jax.Array:
  """GateConfig.head_norm on the (N, Cin) pooled head input."""
  if head_norm == 'standardize':
    centred = pooled - jnp.mean(pooled, axis=-1, keepdims=True)
    return centred / (jnp.std(pooled, axis=-1, keepdims=True) + 1e-6)
  return pooled


class GatedConv(nn.Module):
  """conv -> BN -> act, optionally masked per sample by a predictor head (SPEC 2).

  ``__call__`` returns ``(out, gates)`` where ``gates`` is ``{}`` in baseline
  mode and ``{path: {'logits', 'target', 'mask', 'in_nz'}}`` in gated mode:
  head logits, target mask and applied mask are (N, Cout); ``in_nz`` (N, Cin)
  marks the input channels that are not identically zero (exact FLOPs).

  With ``residual`` (second conv of a ResNet block) the output is
  ``relu(mask * BN(conv(x)) + residual)``, or with ``gt_after_block``
  ``mask * relu(BN(conv(x)) + residual)``.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  depthwise: bool = False
  use_bias: bool = False
  act: str = 'relu'
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_running_var: str = 'biased'
  conv_impl: str = 'xla'  # 'xla' | 'cpu' | 'onednn' (models/conv_impl.py)

  @nn.compact
  def __call__(self, x, train: bool = False, residual=None):
    cin = x.shape[-1]
    if self.depthwise and self.features != cin:
      raise ValueError(
          f'depthwise conv needs features == input channels, got {self.features} vs {cin}')
    pad = self.kernel_size // 2
    z = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size),
        strides=(self.strides, self.strides), padding=((pad, pad), (pad, pad)),
        feature_group_count=cin if self.depthwise else 1, use_bias=self.use_bias,
        dtype=self.dtype, conv_general_dilated=conv_general_dilated(self.conv_impl),
        name='conv')(x)
    z = batch_norm(train, self.bn_axis_name, self.dtype, 'bn', self.bn_running_var,
                   self.conv_impl)(z)

    act = ACTIVATIONS[self.act]
    finish = lambda t: t
    if residual is None:
      y = act(z)
    elif self.gate is not None and self.gate.gt_after_block:
      y = nn.relu(z + residual)
    else:
      y = act(z)
      finish = lambda t: nn.relu(t + residual)
    if self.gate is None:
      return layer_boundary(finish(y), self.conv_impl), {}

    gate = self.gate
    head_in = x if gate.mode == 'joint' else jax.lax.stop_gradient(x)
    head_in = head_in.astype(jnp.float32)
    pooled = (jnp.mean if gate.pool == 'avg' else jnp.max)(head_in, axis=(1, 2))
    if gate.softmax:
      pooled = jax.nn.softmax(pooled, axis=-1)
    pooled = normalize_head_input(pooled, gate.head_norm)
    logits = nn.Dense(self.features, use_bias=True, name=HEAD_NAME,
                      **head_initializers(gate, cin))(pooled)

    target = jax.lax.stop_gradient(ftwt.targets(y, gate.criterion, gate.threshold))
    in_nz = jax.lax.stop_gradient(jnp.any(x != 0, axis=(1, 2)).astype(jnp.float32))
    if gate.mask_source == 'predicted':
      mask = jax.lax.stop_gradient((logits > 0).astype(jnp.float32))
    elif gate.mask_source == 'target':
      mask = target
    else:
      mask = jnp.ones_like(target)
    if self.depthwise and gate.mask_source != 'ones' and gate.depthwise_rule == 'follow_input':
      # SPEC 2.2: a channel switched off upstream stays off.
      mask = mask * in_nz
    out = layer_boundary(finish(y * mask[:, None, None, :].astype(y.dtype)), self.conv_impl)
    entry = {'logits': logits, 'target': target, 'mask': mask, 'in_nz': in_nz}
    return out, {'/'.join(self.scope.path): entry}


class GatedNetwork(nn.Module):
  """Options every backbone and block passes down to its gated convs."""
  gate: GateConfig | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  options: BackboneOptions = BackboneOptions()
  conv_impl: str = 'xla'  # models/conv_impl.py: how, not what, it computes

  def shared(self) -> dict:
    """The fields above, for building a sub-block with the same options."""
    return {'gate': self.gate, 'dtype': self.dtype, 'bn_axis_name': self.bn_axis_name,
            'options': self.options, 'conv_impl': self.conv_impl}

  def gated_conv(self, features: int, kernel_size: int = 3, strides: int = 1,
                 **kwargs) -> GatedConv:
    return GatedConv(features, kernel_size, strides, gate=self.gate, dtype=self.dtype,
                     bn_axis_name=self.bn_axis_name,
                     bn_running_var=self.options.bn_running_var, conv_impl=self.conv_impl,
                     **kwargs)

  def conv(self, features: int, kernel_size: tuple[int, int], **kwargs) -> nn.Conv:
    """A plain (never gated) conv, computed as ``conv_impl`` says."""
    return nn.Conv(features, kernel_size, dtype=self.dtype,
                   conv_general_dilated=conv_general_dilated(self.conv_impl), **kwargs)

  def batch_norm(self, train: bool, name: str):
    return batch_norm(train, self.bn_axis_name, self.dtype, name, self.options.bn_running_var,
                      self.conv_impl)


class Backbone(GatedNetwork, kw_only=True):
  """A registered model: ``__call__(x, train) -> (logits, {'gates': ...})``."""
  num_classes: int
  width: float = 1.0

  def scaled(self, channels: int) -> int:
    return max(1, int(round(channels * self.width)))

  def classify(self, x, gates):
    """Flatten, the (never masked) dense classifier, float32 logits and aux."""
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(
        x.reshape(x.shape[0], -1))
    return logits.astype(jnp.float32), {'gates': gates}
