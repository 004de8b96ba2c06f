"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), with its neurons split into two towers.

| layer | kernel/stride/pad | maps | reads       | bias init | after                      |
|-------|-------------------|------|-------------|-----------|----------------------------|
| conv1 | 11 / 4 / 0        |  96  | the image   | 0         | ReLU, LRN, max-pool 3/2    |
| conv2 |  5 / 1 / 2        | 256  | own tower   | 1         | ReLU, LRN, max-pool 3/2    |
| conv3 |  3 / 1 / 1        | 384  | both towers | 0         | ReLU                       |
| conv4 |  3 / 1 / 1        | 384  | own tower   | 1         | ReLU                       |
| conv5 |  3 / 1 / 1        | 256  | own tower   | 1         | ReLU, max-pool 3/2         |
| fc6   | dense             | 4096 | both towers | 1         | ReLU, dropout 0.5          |
| fc7   | dense             | 4096 | both towers | 1         | ReLU, dropout 0.5          |
| fc8   | dense             | 1000 | both towers | 0         | (softmax in the loss)      |

With ``towers=1`` the same widths form the dense one-tower network. Input 227 (the paper's "224"
only gives its 55×55 first layer with 227). ``width`` scales every layer for small demos and tests.

``hybrid=True`` is Krizhevsky's "one weird trick" (2014): the convolutional layers are the dense
one-tower network, replicated, each tower computing them for its own share of the examples (data
parallelism); before fc6 the towers exchange their examples' features and from there on every tower
computes its ``1/towers`` of the fc neurons for all examples (model parallelism).

Switches that make the zoo hold the original releases exactly (defaults: the paper's network).
``lrn_k``: LRN's additive constant (the paper's 2; Caffe's bvlc_alexnet 1, with
``lrn_alpha_divided_by_n``). ``lrn_across_towers``: Caffe's bvlc_alexnet keeps conv1's 96 maps as
one blob and concatenates conv2's two groups into one, so its LRN windows cross the towers'
boundary (maps 47|48 and 127|128 see each other); the paper normalises each tower's maps alone.
``variant='torchvision'``: torchvision's ``alexnet``, one tower of the "one weird trick" widths::

  conv1 11/4/2 64 → ReLU → max-pool 3/2 → conv2 5/1/2 192 → ReLU → max-pool 3/2 → conv3 3/1/1 384
  → ReLU → conv4 256 → ReLU → conv5 256 → ReLU → max-pool 3/2 → adaptive average pool 6×6
  → dropout → fc6 4096 → ReLU → dropout → fc7 4096 → ReLU → fc8

no LRN (``lrn*`` are ignored), 61,100,840 parameters at 1000 classes. It is meant for 224 inputs
(``image_size=224``; at 227 conv1 is 56×56 and pool5 still 6×6). The adaptive pool is torch's
``AdaptiveAvgPool2d((6, 6))`` (``layers.adaptive_avg_pool``): the identity at 224, overlapping
windows at other sizes, so fc6 has 9216 inputs at every size. fc6 reads its inputs in this
project's (h, w, c) order, where torch flattens (c, h, w): an importer permutes fc6's columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from alexnet_jax.errors import ConfigError
from alexnet_jax.models import layers
from alexnet_jax.models.contract import Classifier, ModelOutput
from alexnet_jax.models.layers import LOCAL_TOWERS, TowerConv, TowerDense, TowerExchange

PAPER_WIDTHS = dict(conv1=96, conv2=256, conv3=384, conv4=384, conv5=256, fc6=4096, fc7=4096)
LAYERS = (*PAPER_WIDTHS, 'fc8')
# torchvision's alexnet: Krizhevsky's "one weird trick" widths; pool5 is average-pooled to 6×6.
TORCHVISION_WIDTHS = dict(conv1=64, conv2=192, conv3=384, conv4=256, conv5=256, fc6=4096, fc7=4096)
TORCHVISION_POOL = 6
VARIANTS = ('paper', 'torchvision')


@dataclasses.dataclass(frozen=True)
class AlexNetSpec:
  """Hyper-parameters of the network (``config.model`` minus its name)."""
  towers: int = 2
  num_classes: int = 1000
  image_size: int = 227
  width: float = 1.0
  lrn: bool = True
  lrn_alpha_divided_by_n: bool = False  # True: cuda-convnet / Caffe / PyTorch convention
  lrn_k: float = 2.0  # the paper's 2; Caffe's bvlc_alexnet 1
  # Normalise conv1's and conv2's maps across all towers, as Caffe's bvlc_alexnet does.
  lrn_across_towers: bool = False
  dropout: float = 0.5
  weight_std: float = 0.01
  # 'paper': N(0, weight_std) and the paper's biases. 'he': N(0, 2/fan_in), for scaled-down nets,
  # whose small fan-ins make the paper's fixed 0.01 train very slowly.
  init: str = 'paper'
  # "One weird trick": data-parallel convolutions, fc layers split into ``towers`` parts.
  hybrid: bool = False
  # 'paper': the network above; 'torchvision': torchvision's alexnet (see the module doc).
  variant: str = 'paper'

  @property
  def splits_batch_over_towers(self) -> bool:
    return self.hybrid

  def widths(self) -> dict[str, int]:
    """Layer widths scaled by ``width``, each a multiple of the tower count."""
    t = self.towers
    base = TORCHVISION_WIDTHS if self.variant == 'torchvision' else PAPER_WIDTHS
    widths = {name: layers.scaled_width(w, self.width, t) for name, w in base.items()}
    if self.hybrid:  # the convolutions are one tower
      widths.update(
          {n: layers.scaled_width(w, self.width) for n, w in base.items() if n.startswith('conv')})
    return widths

  def map_sizes(self) -> dict[str, int]:
    """Spatial size of each layer's output maps, before pooling; the torchvision variant's also
    ``avgpool``, the adaptive pool's (what fc6 reads)."""
    pooled = lambda s: (s - 3) // 2 + 1
    torchvision = self.variant == 'torchvision'
    conv1 = (self.image_size + (4 if torchvision else 0) - 11) // 4 + 1
    conv2 = pooled(conv1)
    conv3 = pooled(conv2)
    sizes = dict(conv1=conv1, conv2=conv2, conv3=conv3, conv4=conv3, conv5=conv3,
                 pool5=pooled(conv3))
    if torchvision:
      sizes['avgpool'] = TORCHVISION_POOL
    return sizes

  def validate(self) -> None:
    if self.variant not in VARIANTS:
      raise ConfigError(f'unknown model.variant {self.variant!r} for AlexNet; choose one of '
                        f'{", ".join(map(repr, VARIANTS))}')
    if self.variant == 'torchvision' and (self.towers != 1 or self.hybrid):
      raise ConfigError(
          f"model.variant='torchvision' is torchvision's one-tower alexnet, but model.towers="
          f'{self.towers} and model.hybrid={self.hybrid}; set model.towers=1 and model.hybrid=False'
      )
    if self.init not in ('paper', 'he'):
      raise ConfigError(f"model.init must be 'paper' or 'he', got {self.init!r}")
    if self.towers < 1:
      raise ConfigError(f'model.towers must be at least 1, got {self.towers}')
    if self.num_classes % self.towers:
      raise ConfigError(f'model.num_classes={self.num_classes} must be divisible by model.towers='
                        f'{self.towers}: fc8 splits its outputs between the towers')
    if self.map_sizes()['pool5'] < 1:
      smallest = next(s for s in range(self.image_size, 1000)
                      if dataclasses.replace(self, image_size=s).map_sizes()['pool5'] >= 1)
      raise ConfigError(
          f'model.image_size={self.image_size} is too small for AlexNet: the smallest '
          f'input with a 1x1 pool5 is {smallest}')


class AlexNet(Classifier):
  supports_deconv = True
  layer_names = LAYERS

  def __init__(self, spec: AlexNetSpec, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    w, t = spec.widths(), spec.towers
    std = spec.weight_std if spec.init == 'paper' else None
    one = 1.0 if spec.init == 'paper' else 0.0  # the paper's unit biases on conv2, 4, 5, fc6, 7
    # Hybrid: one replicated tower of convolutions (conv3 then reads "all" of its only tower).
    conv_towers = dict(towers=1, tower_axis=None) if spec.hybrid else dict(towers=t)
    conv = lambda cin, cout, k, reads, stride=1, pad=0, bias=0.0: TowerConv(
        cin, cout, k, reads=reads, stride=stride, padding=pad, weight_std=std, bias_init=bias, rngs=
        rngs, **conv_towers)
    torchvision = spec.variant == 'torchvision'
    self.conv1 = conv(3, w['conv1'], 11, 'input', stride=4, pad=2 if torchvision else 0)
    self.conv2 = conv(w['conv1'], w['conv2'], 5, 'own', pad=2, bias=one)
    self.conv3 = conv(w['conv2'], w['conv3'], 3, 'own' if spec.hybrid else 'all', pad=1)
    self.conv4 = conv(w['conv3'], w['conv4'], 3, 'own', pad=1, bias=one)
    self.conv5 = conv(w['conv4'], w['conv5'], 3, 'own', pad=1, bias=one)
    side = TORCHVISION_POOL if torchvision else spec.map_sizes()['pool5']
    flat = side**2 * w['conv5']
    dense = lambda cin, cout, bias: TowerDense(cin, cout, towers=t, weight_std=std, bias_init=bias,
                                               rngs=rngs)
    self.fc6 = TowerDense(flat, w['fc6'], towers=t, reads='input' if spec.hybrid else 'all',
                          weight_std=std, bias_init=one, rngs=rngs)
    self.fc7 = dense(w['fc6'], w['fc7'], one)
    self.fc8 = dense(w['fc7'], spec.num_classes, 0.0)

  def _lrn(self, x, exchange: TowerExchange):
    spec = self.spec
    if not spec.lrn or spec.variant == 'torchvision':
      return x
    norm = functools.partial(layers.local_response_norm, k=spec.lrn_k,
                             alpha_divided_by_n=spec.lrn_alpha_divided_by_n)
    if not spec.lrn_across_towers or spec.towers == 1 or spec.hybrid:
      return norm(x)  # per tower, as the paper (one-tower convolutions: that is all maps already)
    # Caffe's bvlc_alexnet normalises all towers' maps as one blob. This is the one place the
    # network's towers talk outside the paper's layers (conv3, fc6-8), and only with this switch:
    # each tower needs only its neighbours' n//2 edge maps, but the whole gather is the exchange
    # every layer already has, and it is exact by construction.
    return exchange.own_maps(norm(exchange.gather(x)), x.shape[0])

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """See ``Classifier.__call__``. With ``deconv=True`` ReLUs rectify the signal coming down and
    LRN passes it unchanged (``alexnet_jax.visualize.deconvnet``)."""
    acts = {}
    keep = lambda name, x: acts.__setitem__(name, x) if capture else None
    relu = layers.relu_for(deconv)
    lrn = layers.normalize_for(functools.partial(self._lrn, exchange=exchange), deconv)
    torchvision = self.spec.variant == 'torchvision'  # no LRN; dropout before fc6 and fc7
    with jax.named_scope('conv1'):
      if self.spec.hybrid:  # this tower's share of the examples
        images = exchange.own_examples(images)
      x = relu(self.conv1(images))
      keep('conv1', x)
      x = layers.max_pool(lrn(x))
    with jax.named_scope('conv2'):
      x = relu(self.conv2(x))
      keep('conv2', x)
      x = layers.max_pool(lrn(x))
    with jax.named_scope('conv3'):
      x = relu(self.conv3(x, exchange))
      keep('conv3', x)
    with jax.named_scope('conv4'):
      x = relu(self.conv4(x))
      keep('conv4', x)
    with jax.named_scope('conv5'):
      x = relu(self.conv5(x))
      keep('conv5', x)
      x = layers.max_pool(x)
      if torchvision:
        x = layers.adaptive_avg_pool(x, TORCHVISION_POOL)
      x = x.reshape(*x.shape[:2], -1)
    keys = (None, None) if not train or dropout_key is None else jax.random.split(dropout_key)
    rate = self.spec.dropout if train else 0.0
    with jax.named_scope('fc6'):
      if self.spec.hybrid:  # batch-split → neuron-split: every tower gets all examples' features
        x = exchange.all_examples(x[0])
      if torchvision:
        x = relu(self.fc6(layers.dropout(x, rate, keys[0]), exchange))
      else:
        x = layers.dropout(relu(self.fc6(x, exchange)), rate, keys[0])
      keep('fc6', x)
    with jax.named_scope('fc7'):
      if torchvision:
        x = relu(self.fc7(layers.dropout(x, rate, keys[1]), exchange))
      else:
        x = layers.dropout(relu(self.fc7(x, exchange)), rate, keys[1])
      keep('fc7', x)
    with jax.named_scope('fc8'):
      x = self.fc8(x, exchange)
      keep('fc8', x)
    return self._output(x, (), acts, exchange=exchange, gather_logits=gather_logits)
