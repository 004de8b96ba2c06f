"""ResNet (He et al. 2015): ResNet-18/34 (basic blocks) and ResNet-50/101/152 (bottlenecks).

Stem conv1 7×7/2 (64) → BN → ReLU → max-pool 3/2 (padding 1); stages conv2_x–conv5_x of residual
blocks y = ReLU(F(x) + shortcut(x)) with 64, 128, 256, 512 base widths (×4 at a bottleneck's
output), the first block of conv3_x–conv5_x halving the maps with stride 2; global average pool →
fc. Batch norm after every convolution, convolutions without biases; the shortcut is the identity,
or a 1×1 convolution with batch norm where the shape changes (the paper's option B). As in the paper
(and its Caffe models) a bottleneck's stride sits on its first 1×1 convolution; ``stride_on_3x3``
moves it to the 3×3 one (torchvision's "v1.5"); the parameter count is the same.

``residual=False`` gives the paper's "plain" networks, its baselines: the same stacks without any
shortcut, y = ReLU(F(x)), so also without the projection shortcuts (plain-18 and plain-34 have
173,824 parameters fewer than ResNet-18 and ResNet-34, those of the three 1×1 projections and
their batch norms).

Batch statistics are over the global batch: each batch norm averages its per-device moments over
the data shards (``exchange.data_mean``). Initialisation: He et al.'s N(0, 2/fan_in) for the
convolutions, N(0, 0.01) for the fc, BN scale 1 and shift 0. No dropout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from alexnet_jax.errors import ConfigError
from alexnet_jax.models import layers
from alexnet_jax.models.contract import Classifier, ModelOutput
from alexnet_jax.models.layers import (
    LOCAL_TOWERS,
    ONE_TOWER,
    BatchNorm,
    TowerConv,
    TowerDense,
    TowerExchange,
)

DEPTHS = {
    18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)), 152: ('bottleneck', (3, 8, 36, 3))
}
STAGE_WIDTHS = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  depth: int = 50
  num_classes: int = 1000
  image_size: int = 224
  width: float = 1.0
  stride_on_3x3: bool = False
  bn_momentum: float = 0.9
  residual: bool = True  # False: He et al.'s plain network, no shortcuts

  towers: ClassVar[int] = 1  # one dense tower
  splits_batch_over_towers: ClassVar[bool] = False

  def scale(self, w: int) -> int:
    return layers.scaled_width(w, self.width)

  def validate(self) -> None:
    if self.depth not in DEPTHS:
      raise ConfigError(f'unknown model.depth={self.depth} for ResNet; choose one of '
                        f'{", ".join(map(str, DEPTHS))}')
    if self.image_size < 32:
      raise ConfigError(f'model.image_size={self.image_size} is too small for ResNet: its five '
                        'halvings need at least 32')


def _conv(cin, cout, k, rngs, *, stride=1, reads='own'):
  return TowerConv(cin, cout, k, **ONE_TOWER, reads=reads, stride=stride, padding=k // 2,
                   weight_std=None, use_bias=False, rngs=rngs)


class Block(nnx.Module):
  """A basic block (3×3, 3×3) or a bottleneck (1×1, 3×3, 1×1 ×4), each convolution with its BN."""

  def __init__(self, cin: int, width: int, stride: int, kind: str, spec: ResNetSpec,
               rngs: nnx.Rngs):
    if kind == 'basic':
      plan = [(cin, width, 3, stride), (width, width, 3, 1)]
    else:
      s1, s3 = (1, stride) if spec.stride_on_3x3 else (stride, 1)
      plan = [(cin, width, 1, s1), (width, width, 3, s3), (width, 4 * width, 1, 1)]
    self.convs = nnx.List([_conv(a, b, k, rngs, stride=s) for a, b, k, s in plan])
    self.bns = nnx.List([BatchNorm(b, momentum=spec.bn_momentum) for _, b, _, _ in plan])
    self.out_features = plan[-1][1]
    if spec.residual and (stride != 1 or cin != self.out_features):
      self.shortcut = _conv(cin, self.out_features, 1, rngs, stride=stride)
      self.shortcut_bn = BatchNorm(self.out_features, momentum=spec.bn_momentum)
    else:
      self.shortcut = self.shortcut_bn = None
    self.residual = spec.residual

  def __call__(self, x, *, train: bool, exchange: TowerExchange):
    y = x
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      y = bn(conv(y), train=train, exchange=exchange)
      if i + 1 < len(self.convs):
        y = jax.nn.relu(y)
    if not self.residual:
      return jax.nn.relu(y)
    if self.shortcut is not None:
      x = self.shortcut_bn(self.shortcut(x), train=train, exchange=exchange)
    return jax.nn.relu(y + x)


class ResNet(Classifier):

  def __init__(self, spec: ResNetSpec, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    kind, counts = DEPTHS[spec.depth]
    self.conv1 = _conv(3, spec.scale(64), 7, rngs, stride=2, reads='input')
    self.conv1_bn = BatchNorm(spec.scale(64), momentum=spec.bn_momentum)
    cin = spec.scale(64)
    names = []
    for stage, (count, width) in enumerate(zip(counts, STAGE_WIDTHS), 2):
      for i in range(1, count + 1):
        stride = 2 if i == 1 and stage > 2 else 1
        block = Block(cin, spec.scale(width), stride, kind, spec, rngs)
        name = f'conv{stage}_{i}'
        setattr(self, name, block)
        names.append(name)
        cin = block.out_features
    self.block_names = tuple(names)
    self.layer_names = ('conv1', *names, 'fc')
    self.fc = TowerDense(cin, spec.num_classes, **ONE_TOWER, weight_std=0.01, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """See ``Classifier.__call__`` (one tower: a leading tower axis of 1); the activations are the
    stem's and every block's output after ReLU. No dropout, no deconvnet (the paper defines none
    through batch norm and residual sums)."""
    del dropout_key
    self._check_deconv(deconv)
    acts = {}
    with jax.named_scope('conv1'):
      x = jax.nn.relu(self.conv1_bn(self.conv1(images), train=train, exchange=exchange))
      if capture:
        acts['conv1'] = x
      x = layers.max_pool_padded(x, 3, 2, (1, 1))
    for name in self.block_names:
      with jax.named_scope(name):
        x = getattr(self, name)(x, train=train, exchange=exchange)
        if capture:
          acts[name] = x
    with jax.named_scope('fc'):
      x = self.fc(jnp.mean(x, axis=(-3, -2)), exchange)
      if capture:
        acts['fc'] = x
    return self._output(x, (), acts, exchange=exchange, gather_logits=gather_logits)
