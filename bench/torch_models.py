"""The CIFAR ResNet-(6n+2) and VGG16-BN of ``fttw_jax.models`` in PyTorch, same shapes.

For ``train_step.py --compare-torch`` only: a dense torch reference step on the same
CPU. ResNet: 3x3 stem 16, stages 16/32/64, basic blocks, parameter-free shortcut
(2x2 average pool, channels zero-padded on both sides, as ``models.resnet.pad_shortcut``);
VGG16-BN: 13 conv(bias)-BN-ReLU, 5 max pools, one linear layer.
"""

import torch
from torch import nn
from torch.nn import functional as F

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M',
             512, 512, 512, 'M', 512, 512, 512, 'M')


def conv_bn(cin, cout, stride=1, bias=False):
  return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1, self.conv2 = conv_bn(cin, cout, stride), conv_bn(cout, cout)
    self.stride, self.extra = stride, cout - cin

  def forward(self, x):
    residual = x
    if self.stride != 1:
      residual = F.avg_pool2d(residual, self.stride)
    if self.extra:
      residual = F.pad(residual, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return F.relu(self.conv2(F.relu(self.conv1(x))) + residual)


class CifarResNet(nn.Module):

  def __init__(self, blocks_per_stage, num_classes=10):
    super().__init__()
    self.stem = conv_bn(3, 16)
    layers, cin = [], 16
    for stage, cout in enumerate((16, 32, 64)):
      for b in range(blocks_per_stage):
        layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
        cin = cout
    self.layers = nn.Sequential(*layers)
    self.classifier = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.layers(F.relu(self.stem(x)))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):

  def __init__(self, num_classes=10):
    super().__init__()
    layers, cin = [], 3
    for v in VGG16_CFG:
      if v == 'M':
        layers.append(nn.MaxPool2d(2))
      else:
        layers += [*conv_bn(cin, v, bias=True), nn.ReLU()]
        cin = v
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    return self.classifier(torch.flatten(self.features(x), 1))


def create(name: str, num_classes: int = 10) -> nn.Module:
  if name == 'vgg16_bn':
    return VGG(num_classes)
  depth = int(name.removeprefix('resnet')) if name.startswith('resnet') else 0
  if depth <= 2 or (depth - 2) % 6:
    raise ValueError(f'no torch reference for model {name!r}; valid: vgg16_bn, resnet(6n+2)')
  return CifarResNet((depth - 2) // 6, num_classes)


def make_step(model: nn.Module, lr=0.1, momentum=0.9, weight_decay=5e-4):
  """A dense SGD step (momentum, coupled weight decay) on (images NCHW, labels)."""
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                        weight_decay=weight_decay)
  model.train()

  def step(images, labels):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()
    return loss.item()
  return step
