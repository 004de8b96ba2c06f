"""The released networks as their source frameworks define them, in PyTorch, for the tests of the
weight importer.

An importer test needs something to compare against that does not share the importer's
assumptions: this module is that "source framework". It holds

* torchvision's ``alexnet``, ``vgg*``/``vgg*_bn`` and ``resnet*``, written out here (torchvision
  itself is not installed) with torchvision's exact module tree, so ``state_dict()`` keys and
  shapes are the ones of torchvision's released ``.pth`` files;
* the Caffe model-zoo nets (``bvlc_alexnet``, ``VGG_ILSVRC_16/19_layers``, ``bvlc_googlenet`` with
  its two auxiliary heads), each as a list of ``(layer_name, [blobs])`` in Caffe's layout and
  order plus a forward pass in torch that is Caffe's computation (groups, across-channel LRN with
  ``alpha / local_size``, pooling that rounds its output size up).

It is written from the published architectures (torchvision's sources, Caffe's prototxt files)
and imports nothing from ``alexnet_jax``, so a mistake in the importer or in the JAX models cannot
be repeated here and cancel out. Every builder takes ``width`` (scaling each hidden layer's channel
count, as the JAX models' ``width`` does) so the tests can run tiny networks at full resolution;
at ``width=1`` shapes and names are exactly the releases'.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def scaled(channels: int, width: float, multiple: int = 1) -> int:
  """``channels * width`` rounded to a positive multiple of ``multiple`` (2 where two groups split
  a layer's maps)."""
  return max(multiple, int(round(channels * width / multiple)) * multiple)


# ------------------------------------------------------------------------------------------------
# torchvision


class TvAlexNet(nn.Module):
  """torchvision's ``alexnet`` (the "one weird trick" widths, one tower, no LRN)."""

  def __init__(self, num_classes: int = 1000, width: float = 1.0):
    super().__init__()
    c1, c2, c3, c4, c5 = (scaled(c, width) for c in (64, 192, 384, 256, 256))
    fc = scaled(4096, width)
    self.features = nn.Sequential(nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2), nn.Conv2d(c1, c2, 5, padding=2),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
                                  nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2))
    self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(c5 * 6 * 6, fc),
                                    nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(fc, fc),
                                    nn.ReLU(inplace=True), nn.Linear(fc, num_classes))

  def forward(self, x):
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


def tv_alexnet(num_classes: int = 1000, width: float = 1.0) -> TvAlexNet:
  return TvAlexNet(num_classes, width)


# torchvision's cfgs: 'M' is a 2×2 max-pool.
VGG_CFGS = {
    'A': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'B': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'D': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'E': [
        64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512,
        512, 'M'
    ],
}
VGG_NAMES = {'vgg11': 'A', 'vgg13': 'B', 'vgg16': 'D', 'vgg19': 'E'}


class TvVGG(nn.Module):
  """torchvision's ``VGG``: ``features`` numbered as its ``make_layers`` numbers them (conv[, BN],
  ReLU; pool), 7×7 adaptive average pool, three-layer classifier."""

  def __init__(self, cfg: str, batch_norm: bool, num_classes: int = 1000, width: float = 1.0):
    super().__init__()
    layers, cin = [], 3
    for v in VGG_CFGS[cfg]:
      if v == 'M':
        layers.append(nn.MaxPool2d(2, stride=2))
        continue
      cout = scaled(v, width)
      layers.append(nn.Conv2d(cin, cout, 3, padding=1))
      if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
      layers.append(nn.ReLU(inplace=True))
      cin = cout
    fc = scaled(4096, width)
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(nn.Linear(cin * 7 * 7, fc), nn.ReLU(True), nn.Dropout(0.5),
                                    nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(0.5),
                                    nn.Linear(fc, num_classes))

  def forward(self, x):
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


def tv_vgg(name: str, num_classes: int = 1000, width: float = 1.0) -> TvVGG:
  """``name``: 'vgg11', 'vgg13', 'vgg16', 'vgg19', or one of them with '_bn'."""
  base, bn = (name[:-3], True) if name.endswith('_bn') else (name, False)
  if base not in VGG_NAMES:
    raise ValueError(f'unknown VGG {name!r}')
  return TvVGG(VGG_NAMES[base], bn, num_classes, width)


class BasicBlock(nn.Module):
  expansion = 1
  # The BN whose output is added to the shortcut: random_state_dict damps it.
  residual_bn = 'bn2'

  def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  """torchvision's bottleneck ("ResNet v1.5"): the stride is on the 3×3 conv, not the first 1×1."""
  expansion = 4
  residual_bn = 'bn3'

  def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class TvResNet(nn.Module):
  """torchvision's ``ResNet``. ``width`` scales the stem and each stage's ``planes``; a
  bottleneck's output stays ``4 * planes``, as in the JAX ResNet."""

  def __init__(self, depth: int, num_classes: int = 1000, width: float = 1.0):
    super().__init__()
    block, counts = RESNET_LAYOUTS[depth]
    self.inplanes = scaled(64, width)
    self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    for i, (count, planes) in enumerate(zip(counts, (64, 128, 256, 512))):
      setattr(self, f'layer{i + 1}',
              self._make_layer(block, scaled(planes, width), count, 1 if i == 0 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(self.inplanes, num_classes)

  def _make_layer(self, block, planes: int, count: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    blocks = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    blocks += [block(self.inplanes, planes) for _ in range(1, count)]
    return nn.Sequential(*blocks)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_resnet(depth: int, num_classes: int = 1000, width: float = 1.0) -> TvResNet:
  """``depth``: 18, 34, 50, 101 or 152."""
  if depth not in RESNET_LAYOUTS:
    raise ValueError(f'unknown ResNet depth {depth}')
  return TvResNet(depth, num_classes, width)


def count_parameters(module: nn.Module) -> int:
  """Trainable parameters (BN buffers excluded, as in the published counts); works on 'meta'."""
  return sum(p.numel() for p in module.parameters())


def random_state_dict(module: nn.Module, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
  """Fills every parameter and BN buffer of ``module`` (a CPU module) reproducibly from ``seed``,
  loads it, and returns a copy of the filled ``state_dict()``.

  Weights are He-scaled (std sqrt(2 / fan_in)); biases, BN shifts and running means are small;
  BN scales and running variances are positive around 1, so a BN layer neither amplifies nor
  kills its input and activations stay O(1). The BN that closes a residual branch gets a scale
  around 0.2: with scale 1 every block would double the variance of the sum (a ResNet-152's
  logits would reach ~1e15), the reason torchvision offers ``zero_init_residual``.
  """
  g = torch.Generator().manual_seed(seed)
  normal = lambda shape, std: torch.randn(shape, generator=g) * std
  uniform = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g)
  residual = set()
  for name, m in module.named_modules():
    if isinstance(m, (BasicBlock, Bottleneck)):
      residual.add(f'{name}.{m.residual_bn}')
  state = OrderedDict()
  for name, m in module.named_modules():
    prefix = f'{name}.' if name else ''
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = math.prod(m.weight.shape[1:])
      state[prefix + 'weight'] = normal(m.weight.shape, math.sqrt(2.0 / fan_in))
      if m.bias is not None:
        state[prefix + 'bias'] = normal(m.bias.shape, 0.05)
    elif isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      gamma = uniform(n, 0.8, 1.2) * (0.2 if name in residual else 1.0)
      state[prefix + 'weight'] = gamma
      state[prefix + 'bias'] = normal(n, 0.05)
      state[prefix + 'running_mean'] = normal(n, 0.05)
      state[prefix + 'running_var'] = uniform(n, 0.8, 1.2)
      state[prefix + 'num_batches_tracked'] = torch.randint(1, 10**6, (), generator=g,
                                                            dtype=torch.long)
  expected = module.state_dict()
  missing = set(expected) ^ set(state)
  if missing:
    raise ValueError(f'random_state_dict does not cover {sorted(missing)}')
  state = OrderedDict((k, state[k].to(expected[k].dtype)) for k in expected)
  module.load_state_dict(state)
  return OrderedDict((k, v.clone()) for k, v in state.items())


# ------------------------------------------------------------------------------------------------
# Caffe

Blobs = list[tuple[str, list[np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Conv:
  name: str
  cin: int
  cout: int
  kernel: int
  stride: int = 1
  pad: int = 0
  group: int = 1

  @property
  def shapes(self):
    return [(self.cout, self.cin // self.group, self.kernel, self.kernel), (self.cout,)]

  def module(self, blobs: list[np.ndarray]) -> nn.Module:
    m = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.pad, groups=self.group)
    return _load(m, blobs)


@dataclasses.dataclass(frozen=True)
class InnerProduct:
  name: str
  cin: int
  cout: int

  @property
  def shapes(self):
    return [(self.cout, self.cin), (self.cout,)]

  def module(self, blobs: list[np.ndarray]) -> nn.Module:
    return _load(nn.Linear(self.cin, self.cout), blobs)


def _load(m: nn.Module, blobs: list[np.ndarray]) -> nn.Module:
  # Caffe's (out, in/group, kh, kw) and (out, in) are torch's layouts as they are: no transposes,
  # so the blob and the torch parameter are the same numbers.
  with torch.no_grad():
    m.weight.copy_(torch.from_numpy(np.asarray(blobs[0], np.float32)))
    m.bias.copy_(torch.from_numpy(np.asarray(blobs[1], np.float32)))
  return m.eval()


def caffe_lrn() -> nn.Module:
  """Caffe's across-channel LRN of the zoo nets (local_size 5, alpha 1e-4, beta 0.75, k 1):
  b_c = a_c / (k + alpha / n * sum_{c' = c-2}^{c+2} a_c'^2)^beta, channels outside the blob
  counted as zeros. torch's LocalResponseNorm is that formula: it zero-pads n // 2 maps on both
  sides (n odd) and averages the squares over n, i.e. divides alpha by n as Caffe does."""
  return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def caffe_max_pool(kernel: int, stride: int, pad: int = 0) -> nn.Module:
  """Caffe's MAX pooling: its output size is ceil((H + 2 pad - k) / s) + 1, less one where the
  last window would start in the padding; torch's ceil_mode applies the same rule."""
  return nn.MaxPool2d(kernel, stride, pad, ceil_mode=True)


def caffe_ave_pool(kernel: int, stride: int) -> nn.Module:
  # Caffe divides by the window clipped to the padded input, not to the image: torch's
  # count_include_pad=True (the default) does the same with ceil_mode.
  return nn.AvgPool2d(kernel, stride, ceil_mode=True)


def random_blobs(layers, seed: int = 0) -> Blobs:
  """Blobs for ``layers`` in Caffe's order (weights, bias), He-scaled (std sqrt(2 / fan_in), fan_in
  the weight's in/group * kh * kw) with small random biases, so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  out = []
  for layer in layers:
    wshape, bshape = layer.shapes
    std = math.sqrt(2.0 / math.prod(wshape[1:]))
    w = (rng.standard_normal(wshape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    b = (rng.standard_normal(bshape, dtype=np.float32) * np.float32(0.05)).astype(np.float32)
    out.append((layer.name, [w, b]))
  return out


class CaffeNet:
  """A Caffe net: ``blobs`` (list of (layer name, [weights, bias]) as a ``.caffemodel`` holds
  them) and a torch forward built from those blobs, so the blobs are the single source of truth.

  ``tops(x)``: every named top blob (Caffe's top names) as torch tensors; ``forward(x)``: the
  logits as a float32 NumPy array (with ``aux=True``, GoogLeNet's auxiliary logits after them).
  ``x``: NCHW float images (NumPy or torch), in whatever preprocessing the caller chose.
  """

  def __init__(self, name: str, layers, blobs: Blobs, run: Callable, outputs: tuple[str, ...]):
    self.name = name
    self.layers = list(layers)
    expected = [(l.name, l.shapes) for l in self.layers]
    got = [(n, [tuple(np.shape(b)) for b in bs]) for n, bs in blobs]
    if got != expected:
      raise ValueError(f'{name}: blobs {got} do not match the net {expected}')
    self.blobs = [(n, [np.asarray(b, np.float32) for b in bs]) for n, bs in blobs]
    self.modules = {l.name: l.module(bs) for l, (_, bs) in zip(self.layers, self.blobs)}
    self._run = run
    self.outputs = outputs

  def blob_dict(self) -> dict[str, list[np.ndarray]]:
    return dict(self.blobs)

  def tops(self, x) -> dict[str, torch.Tensor]:
    x = torch.as_tensor(np.asarray(x, np.float32)) if not torch.is_tensor(x) else x.float()
    with torch.no_grad():
      return self._run(self.modules, x)

  def forward(self, x, aux: bool = False):
    tops = self.tops(x)
    outs = [tops[n].numpy() for n in (self.outputs if aux else self.outputs[:1])]
    return tuple(outs) if aux else outs[0]

  __call__ = forward


def _sequential(steps, x, tops):
  """Runs (top name, fn) steps in order, recording each top (in-place ReLUs keep the name)."""
  for top, fn in steps:
    x = fn(x)
    tops[top] = x
  return x


def _alexnet_layers(num_classes: int, width: float):
  # conv1..conv5 feed or are two-group convolutions: keep every count even so each group gets an
  # integer number of maps; fc6/fc7 even too, matching the JAX AlexNet's tower multiples.
  c1, c2, c3, c4, c5, fc = (scaled(c, width, 2) for c in (96, 256, 384, 384, 256, 4096))
  return [
      Conv('conv1', 3, c1, 11, stride=4),
      Conv('conv2', c1, c2, 5, pad=2, group=2),
      Conv('conv3', c2, c3, 3, pad=1),
      Conv('conv4', c3, c4, 3, pad=1, group=2),
      Conv('conv5', c4, c5, 3, pad=1, group=2),
      InnerProduct('fc6', c5 * 6 * 6, fc),
      InnerProduct('fc7', fc, fc),
      InnerProduct('fc8', fc, num_classes),
  ]


def _run_alexnet(m, x):
  relu, lrn, pool = F.relu, caffe_lrn(), caffe_max_pool(3, 2)
  tops = {}
  # bvlc_alexnet normalises before pooling (CaffeNet pools first). The LRN sees the whole blob:
  # its window crosses the boundary between conv1's (conv2's) two groups.
  _sequential([('conv1', lambda v: relu(m['conv1'](v))), ('norm1', lrn), ('pool1', pool),
               ('conv2', lambda v: relu(m['conv2'](v))), ('norm2', lrn), ('pool2', pool),
               ('conv3', lambda v: relu(m['conv3'](v))), ('conv4', lambda v: relu(m['conv4'](v))),
               ('conv5', lambda v: relu(m['conv5'](v))), ('pool5', pool),
               ('fc6', lambda v: relu(m['fc6'](torch.flatten(v, 1)))),
               ('fc7', lambda v: relu(m['fc7'](v))), ('fc8', m['fc8'])], x, tops)
  return tops


def caffe_alexnet(num_classes: int = 1000, width: float = 1.0, seed: int = 0,
                  blobs: Blobs | None = None) -> CaffeNet:
  """bvlc_alexnet (deploy.prototxt), input 227: random blobs from ``seed`` unless ``blobs`` given.
  Tops: conv1 norm1 pool1 conv2 norm2 pool2 conv3 conv4 conv5 pool5 fc6 fc7 fc8."""
  layers = _alexnet_layers(num_classes, width)
  blobs = random_blobs(layers, seed) if blobs is None else blobs
  return CaffeNet('bvlc_alexnet', layers, blobs, _run_alexnet, ('fc8',))


VGG_STAGES = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _vgg_layers(depth: int, num_classes: int, width: float):
  layers, cin = [], 3
  for stage, (count, c) in enumerate(zip(VGG_STAGES[depth], (64, 128, 256, 512, 512)), 1):
    for i in range(1, count + 1):
      layers.append(Conv(f'conv{stage}_{i}', cin, scaled(c, width), 3, pad=1))
      cin = scaled(c, width)
  fc = scaled(4096, width)
  return layers + [
      InnerProduct('fc6', cin * 7 * 7, fc),
      InnerProduct('fc7', fc, fc),
      InnerProduct('fc8', fc, num_classes)
  ]


def _run_vgg(m, x):
  tops, pool = {}, caffe_max_pool(2, 2)
  for name, conv in m.items():
    if name.startswith('conv'):
      x = tops[name] = F.relu(conv(x))
      stage, i = name[4:].split('_')
      if f'conv{stage}_{int(i) + 1}' not in m:
        x = tops[f'pool{stage}'] = pool(x)
  x = tops['fc6'] = F.relu(m['fc6'](torch.flatten(x, 1)))
  x = tops['fc7'] = F.relu(m['fc7'](x))
  tops['fc8'] = m['fc8'](x)
  return tops


def caffe_vgg(depth: int = 16, num_classes: int = 1000, width: float = 1.0, seed: int = 0,
              blobs: Blobs | None = None) -> CaffeNet:
  """VGG_ILSVRC_16_layers / VGG_ILSVRC_19_layers (deploy), input 224. Tops: conv1_1 … pool1 …
  pool5 fc6 fc7 fc8."""
  if depth not in VGG_STAGES:
    raise ValueError(f'unknown VGG depth {depth}')
  layers = _vgg_layers(depth, num_classes, width)
  blobs = random_blobs(layers, seed) if blobs is None else blobs
  return CaffeNet(f'VGG_ILSVRC_{depth}_layers', layers, blobs, _run_vgg, ('fc8',))


# bvlc_googlenet's inception modules: 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj.
INCEPTION = OrderedDict([
    ('3a', (64, 96, 128, 16, 32, 32)),
    ('3b', (128, 128, 192, 32, 96, 64)),
    ('4a', (192, 96, 208, 16, 48, 64)),
    ('4b', (160, 112, 224, 24, 64, 64)),
    ('4c', (128, 128, 256, 24, 64, 64)),
    ('4d', (112, 144, 288, 32, 64, 64)),
    ('4e', (256, 160, 320, 32, 128, 128)),
    ('5a', (256, 160, 320, 32, 128, 128)),
    ('5b', (384, 192, 384, 48, 128, 128)),
])
# The auxiliary heads (train_val.prototxt) read these modules' outputs.
AUX_HEADS = {'4a': 'loss1', '4d': 'loss2'}


def _googlenet_layers(num_classes: int, width: float):
  s = lambda c: scaled(c, width)
  layers = [
      Conv('conv1/7x7_s2', 3, s(64), 7, stride=2, pad=3),
      Conv('conv2/3x3_reduce', s(64), s(64), 1),
      Conv('conv2/3x3', s(64), s(192), 3, pad=1),
  ]
  cin = s(192)
  for name, widths in INCEPTION.items():
    n1, r3, n3, r5, n5, proj = (s(w) for w in widths)
    p = f'inception_{name}/'
    layers += [
        Conv(p + '1x1', cin, n1, 1),
        Conv(p + '3x3_reduce', cin, r3, 1),
        Conv(p + '3x3', r3, n3, 3, pad=1),
        Conv(p + '5x5_reduce', cin, r5, 1),
        Conv(p + '5x5', r5, n5, 5, pad=2),
        Conv(p + 'pool_proj', cin, proj, 1),
    ]
    cout = n1 + n3 + n5 + proj
    if name in AUX_HEADS:
      # 14×14 average-pooled 5/3 to 4×4.
      h = AUX_HEADS[name]
      layers += [
          Conv(h + '/conv', cout, s(128), 1),
          InnerProduct(h + '/fc',
                       s(128) * 4 * 4, s(1024)),
          InnerProduct(h + '/classifier', s(1024), num_classes),
      ]
    cin = cout
  return layers + [InnerProduct('loss3/classifier', cin, num_classes)]


def _run_googlenet(m, x):
  relu, lrn, tops = F.relu, caffe_lrn(), {}
  pool = caffe_max_pool(3, 2)
  x = _sequential([
      ('conv1/7x7_s2', lambda v: relu(m['conv1/7x7_s2'](v))),
      ('pool1/3x3_s2', pool),
      ('pool1/norm1', lrn),
      ('conv2/3x3_reduce', lambda v: relu(m['conv2/3x3_reduce'](v))),
      ('conv2/3x3', lambda v: relu(m['conv2/3x3'](v))),
      ('conv2/norm2', lrn),
      ('pool2/3x3_s2', pool),
  ], x, tops)
  for name in INCEPTION:
    p = f'inception_{name}/'
    conv = lambda n, v: tops.setdefault(p + n, relu(m[p + n](v)))
    branches = [
        conv('1x1', x),
        conv('3x3', conv('3x3_reduce', x)),
        conv('5x5', conv('5x5_reduce', x)),
        conv('pool_proj', tops.setdefault(p + 'pool',
                                          caffe_max_pool(3, 1, 1)(x))),
    ]
    x = tops[p + 'output'] = torch.cat(branches, 1)
    if name in AUX_HEADS:
      h = AUX_HEADS[name]
      _sequential([
          (h + '/ave_pool', caffe_ave_pool(5, 3)),
          (h + '/conv', lambda v: relu(m[h + '/conv'](v))),
          (h + '/fc', lambda v: relu(m[h + '/fc'](torch.flatten(v, 1)))),
          (h + '/classifier', m[h + '/classifier']),
      ], x, tops)
    if name in ('3b', '4e'):
      x = tops['pool3/3x3_s2' if name == '3b' else 'pool4/3x3_s2'] = pool(x)
  x = tops['pool5/7x7_s1'] = caffe_ave_pool(7, 1)(x)
  tops['loss3/classifier'] = m['loss3/classifier'](torch.flatten(x, 1))
  return tops


def caffe_googlenet(num_classes: int = 1000, width: float = 1.0, seed: int = 0,
                    blobs: Blobs | None = None) -> CaffeNet:
  """bvlc_googlenet (deploy.prototxt) plus the loss1/loss2 heads of its train_val.prototxt, input
  224. ``forward(x)``: loss3/classifier; ``forward(x, aux=True)``: (loss3, loss1, loss2)."""
  layers = _googlenet_layers(num_classes, width)
  blobs = random_blobs(layers, seed) if blobs is None else blobs
  return CaffeNet('bvlc_googlenet', layers, blobs, _run_googlenet,
                  ('loss3/classifier', 'loss1/classifier', 'loss2/classifier'))


def caffe_shapes(net: str, num_classes: int = 1000,
                 width: float = 1.0) -> list[tuple[str, list[tuple[int, ...]]]]:
  """The blob shapes of ``net`` ('alexnet', 'vgg16', 'vgg19', 'googlenet') without building it."""
  builders = {
      'alexnet': _alexnet_layers,
      'vgg16': lambda n, w: _vgg_layers(16, n, w),
      'vgg19': lambda n, w: _vgg_layers(19, n, w),
      'googlenet': _googlenet_layers,
  }
  return [(l.name, l.shapes) for l in builders[net](num_classes, width)]
