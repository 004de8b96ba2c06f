"""The released networks this project can import, and how their tensors map onto its models.

A release is the model config that is exactly its architecture, the input convention it was
trained with, and the list of its tensors, each with the parameter of ours it becomes and how
(``Entry``). The conversion checks every tensor against what the model needs and names the first
that does not fit: a missing tensor, one left over, or one of another shape.

Layouts: Caffe and PyTorch store convolution kernels (out, in, kh, kw) and linear weights
(out, in); ours are (towers, kh, kw, in per tower, out per tower) and (towers, out per tower, in).
Caffe's groups and the paper's towers split the outputs alike (group g = tower g), so a grouped
kernel becomes the towers' kernels by splitting its outputs. The first fully connected layer
reads the last maps flattened as (channel, row, column) there and as (tower, row, column, channel
of the tower) here: its columns are permuted.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from alexnet_jax.configs import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from alexnet_jax.models.layers import scaled_width
from alexnet_jax.weights import WeightFileError

# Caffe's ILSVRC-2012 mean pixel (of ilsvrc_2012_mean.binaryproto; the releases list it B, G, R).
CAFFE_ALEXNET_MEAN_RGB = (122.67891434, 116.66876762, 104.00698793)
CAFFE_VGG_MEAN_RGB = (123.68, 116.779, 103.939)  # the VGG authors' deploy files
CAFFE_GOOGLENET_MEAN_RGB = (123.0, 117.0, 104.0)  # bvlc_googlenet's train_val mean_value


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor → one of our arrays. ``kind``: 'conv', 'dense' (``chw`` = the (channels,
  rows, columns) of the maps it reads when they arrive flattened), 'vector' (a bias, split over
  the towers), 'bn' (a per-channel vector of batch norm) or 'unused' (dropped where the file has
  it: BN's ``num_batches_tracked``, which files saved before PyTorch 0.4.1 lack)."""
  source: str
  target: tuple  # ('params' | 'batch_stats', key, ...)
  kind: str
  chw: tuple[int, int, int] | None = None
  in_towers: int = 1


@dataclasses.dataclass(frozen=True)
class Release:
  name: str  # --model
  source: str  # 'caffe' | 'torchvision'
  description: str
  model: dict  # config.model: name and fields
  input: dict  # config.input fields: the convention it was trained with
  entries: Callable[[dict], list[Entry]]  # (the model config's fields) → its tensors
  base_width: int  # the first convolution's maps at width 1 (the file's width is read from it)
  first: str  # the first convolution's kernel in the file
  classifier: str  # the classifier's weight in the file (its rows are the classes)


TORCHVISION_INPUT = dict(mean_rgb=IMAGENET_MEAN_RGB, std_rgb=IMAGENET_STD_RGB, channel_order='rgb',
                         resize_to=256, mean_image=False, pca_lighting_std=0.0, eval_views='center')


def _caffe_input(mean_rgb) -> dict:
  return dict(mean_rgb=mean_rgb, std_rgb=(1.0, 1.0, 1.0), channel_order='bgr', resize_to=256,
              mean_image=False, pca_lighting_std=0.0, eval_views='center')


def _p(*keys) -> tuple:
  return ('params', *keys)


def _s(*keys) -> tuple:
  return ('batch_stats', *keys)


def _conv(source_w: str, source_b: str | None, *target) -> list[Entry]:
  out = [Entry(source_w, _p(*target, 'kernel'), 'conv')]
  if source_b is not None:
    out.append(Entry(source_b, _p(*target, 'bias'), 'vector'))
  return out


def _dense(source_w: str, source_b: str, *target, chw=None, in_towers: int = 1) -> list[Entry]:
  return [
      Entry(source_w, _p(*target, 'kernel'), 'dense', chw=chw, in_towers=in_towers),
      Entry(source_b, _p(*target, 'bias'), 'vector')
  ]


def _torch_bn(prefix: str, *target) -> list[Entry]:
  return [
      Entry(f'{prefix}.weight', _p(*target, 'scale'), 'bn'),
      Entry(f'{prefix}.bias', _p(*target, 'bias'), 'bn'),
      Entry(f'{prefix}.running_mean', _s(*target, 'mean'), 'bn'),
      Entry(f'{prefix}.running_var', _s(*target, 'var'), 'bn'),
      Entry(
          f'{prefix}.num_batches_tracked',
          (),
          'unused',
      )
  ]


# -- torchvision ----------------------------------------------------------------------------------


def _tv_alexnet(m: dict) -> list[Entry]:
  w = m['width']
  out = []
  for name, index in zip(('conv1', 'conv2', 'conv3', 'conv4', 'conv5'), (0, 3, 6, 8, 10)):
    out += _conv(f'features.{index}.weight', f'features.{index}.bias', name)
  out += _dense('classifier.1.weight', 'classifier.1.bias', 'fc6', chw=(scaled_width(256, w), 6, 6))
  out += _dense('classifier.4.weight', 'classifier.4.bias', 'fc7')
  out += _dense('classifier.6.weight', 'classifier.6.bias', 'fc8')
  return out


VGG_KERNELS = {  # convolutions per stage (all 3×3 in A, B, D, E)
    'A': (1, 1, 2, 2, 2), 'B': (2, 2, 2, 2, 2), 'D': (2, 2, 3, 3, 3), 'E': (2, 2, 4, 4, 4)
}


def _tv_vgg(m: dict) -> list[Entry]:
  out, index = [], 0
  for stage, count in enumerate(VGG_KERNELS[m['variant']], 1):
    for i in range(1, count + 1):
      name = f'conv{stage}_{i}'
      out += _conv(f'features.{index}.weight', f'features.{index}.bias', name)
      if m['batch_norm']:
        out += _torch_bn(f'features.{index + 1}', f'{name}_bn')
      index += 3 if m['batch_norm'] else 2  # conv, [bn,] relu
    index += 1  # the stage's max-pool
  side = m['image_size'] // 32
  out += _dense('classifier.0.weight', 'classifier.0.bias', 'fc6',
                chw=(scaled_width(512, m['width']), side, side))
  out += _dense('classifier.3.weight', 'classifier.3.bias', 'fc7')
  out += _dense('classifier.6.weight', 'classifier.6.bias', 'fc8')
  return out


RESNET_BLOCKS = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)
}


def _tv_resnet(m: dict) -> list[Entry]:
  convs = 2 if m['depth'] < 50 else 3
  out = [Entry('conv1.weight', _p('conv1', 'kernel'), 'conv'), *_torch_bn('bn1', 'conv1_bn')]
  for stage, count in enumerate(RESNET_BLOCKS[m['depth']], 2):
    for i in range(1, count + 1):
      prefix, block = f'layer{stage - 1}.{i - 1}', f'conv{stage}_{i}'
      for j in range(convs):
        out.append(Entry(f'{prefix}.conv{j + 1}.weight', _p(block, 'convs', j, 'kernel'), 'conv'))
        out += _torch_bn(f'{prefix}.bn{j + 1}', block, 'bns', j)
      if i == 1 and (stage > 2 or convs == 3):  # the first block of a stage that changes shape
        out.append(Entry(f'{prefix}.downsample.0.weight', _p(block, 'shortcut', 'kernel'), 'conv'))
        out += _torch_bn(f'{prefix}.downsample.1', block, 'shortcut_bn')
  out += _dense('fc.weight', 'fc.bias', 'fc')
  return out


# -- Caffe ----------------------------------------------------------------------------------------


def _blob(layer: str, i: int) -> str:
  return f'{layer} blobs[{i}]'


def _caffe_conv(layer: str, *target) -> list[Entry]:
  return _conv(_blob(layer, 0), _blob(layer, 1), *target)


def _caffe_dense(layer: str, *target, chw=None, in_towers: int = 1) -> list[Entry]:
  return _dense(_blob(layer, 0), _blob(layer, 1), *target, chw=chw, in_towers=in_towers)


def _caffe_alexnet(m: dict) -> list[Entry]:
  out = []
  for name in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5'):
    out += _caffe_conv(name, name)
  towers = m['towers']
  out += _caffe_dense('fc6', 'fc6', chw=(scaled_width(256, m['width'], towers), 6, 6),
                      in_towers=towers)
  out += _caffe_dense('fc7', 'fc7')
  out += _caffe_dense('fc8', 'fc8')
  return out


def _caffe_vgg(m: dict) -> list[Entry]:
  out = []
  for stage, count in enumerate(VGG_KERNELS[m['variant']], 1):
    for i in range(1, count + 1):
      out += _caffe_conv(f'conv{stage}_{i}', f'conv{stage}_{i}')
  side = m['image_size'] // 32
  out += _caffe_dense('fc6', 'fc6', chw=(scaled_width(512, m['width']), side, side))
  out += _caffe_dense('fc7', 'fc7')
  out += _caffe_dense('fc8', 'fc8')
  return out


GOOGLENET_MODULES = ('3a', '3b', '4a', '4b', '4c', '4d', '4e', '5a', '5b')
_GOOGLENET_BRANCHES = (('1x1', 'branch1'), ('3x3_reduce', 'reduce3'), ('3x3', 'branch3'),
                       ('5x5_reduce', 'reduce5'), ('5x5', 'branch5'), ('pool_proj', 'pool_proj'))


def _caffe_googlenet(m: dict) -> list[Entry]:
  out = _caffe_conv('conv1/7x7_s2', 'conv1')
  out += _caffe_conv('conv2/3x3_reduce', 'conv2_reduce')
  out += _caffe_conv('conv2/3x3', 'conv2')
  for module in GOOGLENET_MODULES:
    for theirs, ours in _GOOGLENET_BRANCHES:
      out += _caffe_conv(f'inception_{module}/{theirs}', f'inception{module}', ours)
  if m['aux_heads']:
    # Their 5/3 average pool gives 4×4 maps from 4a's and 4d's 14×14 (at 224).
    side = ((m['image_size'] // 16) - 5) // 3 + 1
    for k in (1, 2):
      out += _caffe_conv(f'loss{k}/conv', f'aux{k}', 'conv')
      out += _caffe_dense(f'loss{k}/fc', f'aux{k}', 'fc1',
                          chw=(scaled_width(128, m['width']), side, side))
      out += _caffe_dense(f'loss{k}/classifier', f'aux{k}', 'fc2')
  out += _caffe_dense('loss3/classifier', 'fc')
  return out


def _releases() -> dict[str, Release]:
  out = {}
  tv = dict(source='torchvision', input=TORCHVISION_INPUT, first='features.0.weight')
  out['alexnet'] = Release(
      name='alexnet', description="torchvision's AlexNet (the 'one weird trick' widths)",
      model=dict(name='alexnet', variant='torchvision', towers=1, lrn=False, image_size=224),
      entries=_tv_alexnet, base_width=64, classifier='classifier.6.weight', **tv)
  for depth, variant in ((11, 'A'), (13, 'B'), (16, 'D'), (19, 'E')):
    for bn in (False, True):
      name = f'vgg{depth}' + ('_bn' if bn else '')
      out[name] = Release(
          name=name, description=f"torchvision's VGG-{depth}" + (' with batch norm' if bn else ''),
          model=dict(name='vgg', variant=variant, batch_norm=bn, image_size=224), entries=_tv_vgg,
          base_width=64, classifier='classifier.6.weight', **tv)
  for depth in RESNET_BLOCKS:
    name = f'resnet{depth}'
    out[name] = Release(name=name, source='torchvision', input=TORCHVISION_INPUT,
                        description=f"torchvision's ResNet-{depth}",
                        model=dict(name='resnet', depth=depth, stride_on_3x3=True,
                                   image_size=224), entries=_tv_resnet, base_width=64,
                        first='conv1.weight', classifier='fc.weight')
  out['bvlc_alexnet'] = Release(
      name='bvlc_alexnet', source='caffe',
      description="Caffe's bvlc_alexnet: the paper's two-tower network",
      model=dict(name='alexnet', towers=2, lrn_k=1.0, lrn_alpha_divided_by_n=True,
                 lrn_across_towers=True,
                 image_size=227), input=_caffe_input(CAFFE_ALEXNET_MEAN_RGB),
      entries=_caffe_alexnet, base_width=96, first=_blob('conv1', 0), classifier=_blob('fc8', 0))
  for depth, variant in ((16, 'D'), (19, 'E')):
    name = f'vgg{depth}_caffe'
    out[name] = Release(
        name=name, source='caffe',
        description=f"the VGG authors' VGG_ILSVRC_{depth}_layers (configuration "
        f'{variant})', model=dict(name='vgg', variant=variant,
                                  image_size=224), input=_caffe_input(CAFFE_VGG_MEAN_RGB),
        entries=_caffe_vgg, base_width=64, first=_blob('conv1_1', 0), classifier=_blob('fc8', 0))
  out['bvlc_googlenet'] = Release(
      name='bvlc_googlenet', source='caffe', description="Caffe's bvlc_googlenet, with its two "
      'auxiliary heads', model=dict(name='googlenet', lrn_k=1.0, lrn_alpha_divided_by_n=True,
                                    image_size=224), input=_caffe_input(CAFFE_GOOGLENET_MEAN_RGB),
      entries=_caffe_googlenet, base_width=64, first=_blob('conv1/7x7_s2', 0),
      classifier=_blob('loss3/classifier', 0))
  return out


RELEASES = _releases()


def names(source: str) -> list[str]:
  return [n for n, r in RELEASES.items() if r.source == source]


def detect(source: str, tensors: dict[str, np.ndarray]) -> str | None:
  """The release a file's tensor names say it is, or None."""
  keys = set(tensors)
  if source == 'caffe':
    if _blob('inception_3a/1x1', 0) in keys:
      return 'bvlc_googlenet'
    if _blob('conv5_4', 0) in keys:
      return 'vgg19_caffe'
    if _blob('conv5_3', 0) in keys:
      return 'vgg16_caffe'
    if _blob('conv5', 0) in keys and _blob('fc8', 0) in keys:
      return 'bvlc_alexnet'
    return None
  if 'layer1.0.conv1.weight' in keys:
    blocks = tuple(
        len({k.split('.')[1] for k in keys if k.startswith(f'layer{i}.')}) for i in range(1, 5))
    bottleneck = 'layer1.0.conv3.weight' in keys
    for depth, counts in RESNET_BLOCKS.items():
      if counts == blocks and (depth >= 50) == bottleneck:
        return f'resnet{depth}'
    return None
  convs = sorted(
      int(m.group(1))
      for k in keys
      if (m := re.fullmatch(r'features\.(\d+)\.weight', k)) and tensors[k].ndim == 4)
  if not convs:
    return None
  if 'classifier.1.weight' in keys and len(convs) == 5:
    return 'alexnet'
  bn = 'features.1.running_mean' in keys
  by_count = {8: 11, 10: 13, 13: 16, 16: 19}
  if len(convs) in by_count:
    return f'vgg{by_count[len(convs)]}' + ('_bn' if bn else '')
  return None


def _squeezed(x: np.ndarray, ndim: int) -> np.ndarray:
  """Caffe's legacy 4-D blob shapes ((1, 1, out, in) weights, (1, 1, 1, n) biases) as arrays of
  their real rank."""
  while x.ndim > ndim and x.shape[0] == 1:
    x = x[0]
  return x


def rows(release: Release, tensors: dict, name: str) -> int:
  """The output count of the file's weight ``name`` (whatever Caffe's legacy shape around it)."""
  if name not in tensors:
    raise WeightFileError(f'the file has no tensor {name!r}, which {release.name} needs: '
                          f'{_hint(release, tensors)}')
  return int(_squeezed(np.asarray(tensors[name]), 2).shape[0])


def _fits(entry: Entry, x: np.ndarray, want: tuple[int, ...], what: str) -> np.ndarray:
  """The source tensor ``x`` in our layout for a target of shape ``want``, or WeightFileError."""

  def refuse(expected) -> WeightFileError:
    return WeightFileError(f'tensor {entry.source!r} has shape {tuple(x.shape)}, but {what} of '
                           f'this model needs {expected}: a file of another model or size?')

  if entry.kind == 'conv':
    towers, kh, kw, cin, cout = want
    expected = (towers * cout, cin, kh, kw)
    x = _squeezed(x, 4)
    if x.shape != expected:
      raise refuse(expected)
    return x.reshape(towers, cout, cin, kh, kw).transpose(0, 3, 4, 2, 1)
  if entry.kind == 'dense':
    towers, cout, cin = want
    expected = (towers * cout, cin)
    x = _squeezed(x, 2)
    if x.shape != expected:
      raise refuse(expected)
    if entry.chw is not None:
      c, h, w = entry.chw
      if c * h * w != cin:
        raise refuse(expected)
      t = entry.in_towers
      x = x.reshape(-1, t, c // t, h, w).transpose(0, 1, 3, 4, 2).reshape(-1, cin)
    return x.reshape(towers, cout, cin)
  if entry.kind == 'vector':
    x = _squeezed(x, 1)
    if x.shape != (int(np.prod(want)),):
      raise refuse((int(np.prod(want)),))
    return x.reshape(want)
  if entry.kind == 'bn':
    x = _squeezed(x, 1)
    if x.shape != tuple(want):
      raise refuse(tuple(want))
    return x
  raise ValueError(f'unknown entry kind {entry.kind!r}')


def _describe(target: tuple) -> str:
  return '.'.join(str(k) for k in target[1:]) + (' (batch norm statistics)'
                                                 if target[0] == 'batch_stats' else '')


def convert(release: Release, model_fields: dict, tensors: dict[str, np.ndarray],
            abstract: dict) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` (nested dicts of float32 arrays shaped like
  ``abstract``'s) from the file's ``tensors``; WeightFileError naming the first tensor that is
  missing, left over, or of another shape."""
  out = {'params': {}, 'batch_stats': {}}
  used = set()
  for entry in release.entries(model_fields):
    if entry.kind == 'unused' and entry.source not in tensors:
      continue
    if entry.source not in tensors:
      raise WeightFileError(f'the file has no tensor {entry.source!r}, which {release.name} '
                            f'needs{_for(entry)}: {_hint(release, tensors)}')
    used.add(entry.source)
    if entry.kind == 'unused':
      continue
    want = _lookup(abstract, entry.target)
    value = _fits(entry, np.asarray(tensors[entry.source]), tuple(want.shape),
                  _describe(entry.target))
    _store(out, entry.target, np.ascontiguousarray(value, np.float32))
  extra = [k for k in tensors if k not in used]
  if extra:
    raise WeightFileError(f'the file has a tensor {release.name} does not have: {extra[0]!r} '
                          f'(and {len(extra) - 1} more): {_hint(release, tensors)}')
  return out


def _for(entry: Entry) -> str:
  return '' if entry.kind == 'unused' else f' (for {_describe(entry.target)})'


def _hint(release: Release, tensors: dict) -> str:
  found = detect(release.source, tensors)
  if found and found != release.name:
    return f'the file looks like {found}: pass --model={found}'
  return f'is it a {release.description} file? (--model names the release; choose from ' \
         f'{", ".join(names(release.source))})'


def _lookup(tree: dict, path: tuple):
  node = tree
  for key in path:
    if key not in node:
      raise KeyError(f'the model has no parameter {path}')  # a layout of ours that is wrong: a bug
    node = node[key]
  return node


def _store(tree: dict, path: tuple, value) -> None:
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value
