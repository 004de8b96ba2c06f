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

Switches for the papers' ablations (defaults: the paper's network, unchanged):

| field                 | default | ablation                                                       |
|-----------------------|---------|----------------------------------------------------------------|
| ``pool_window``,      | 3, 2    | the three max-pools; 2, 2 is the paper's non-overlapping       |
| ``pool_stride``       |         | comparison, with the same sizes (55 → 27 → 13 → 6 at 227)      |
| ``activation``        | 'relu'  | 'tanh': the units of the paper's Fig. 1 comparison, after      |
|                       |         | every conv and fc layer (no deconvnet: it needs ReLUs)         |
| ``variant='one_gpu'`` |         | the paper's one-GPU net: one dense tower, conv1–conv4 with     |
|                       |         | half the kernels (48, 128, 192, 192), conv5 256 and fc6, fc7   |
|                       |         | 4096 as the two-GPU net; 59,798,312 parameters at 1000 classes |
| ``fc_width``          | 4096    | fc6 and fc7 (Zeiler & Fergus's 2048 and 8192)                  |
| ``remove``            | ()      | Zeiler & Fergus's Table 3: layers among 3, 4, 6, 7 of the      |
|                       |         | one-tower net; the next layer reads the last one left          |

``width`` scales every variant's widths, ``fc_width`` included. ``remove`` needs ``towers=1``
(their replication was one tower); the model's ``layer_names`` are then the layers it has.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from alexnet_jax.errors import ConfigError
from alexnet_jax.models import layers
from alexnet_jax.models.contract import Classifier, ModelOutput
from alexnet_jax.models.layers import LOCAL_TOWERS, TowerConv, TowerDense, TowerExchange
from alexnet_jax.models.zfnet import ABLATABLE

PAPER_WIDTHS = dict(conv1=96, conv2=256, conv3=384, conv4=384, conv5=256, fc6=4096, fc7=4096)
LAYERS = (*PAPER_WIDTHS, 'fc8')
# torchvision's alexnet: Krizhevsky's "one weird trick" widths; pool5 is average-pooled to 6×6.
TORCHVISION_WIDTHS = dict(conv1=64, conv2=192, conv3=384, conv4=256, conv5=256, fc6=4096, fc7=4096)
TORCHVISION_POOL = 6
# The paper's one-GPU comparison net: half the kernels of conv1-conv4; conv5 and the fc layers
# keep the two-GPU widths, so that the two nets have about as many parameters (most are fc6's).
ONE_GPU_WIDTHS = dict(conv1=48, conv2=128, conv3=192, conv4=192, conv5=256, fc6=4096, fc7=4096)
VARIANT_WIDTHS = dict(paper=PAPER_WIDTHS, torchvision=TORCHVISION_WIDTHS, one_gpu=ONE_GPU_WIDTHS)
VARIANTS = tuple(VARIANT_WIDTHS)
ACTIVATIONS = ('relu', 'tanh')


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
  # 'paper': the network above; 'torchvision': torchvision's alexnet; 'one_gpu': the paper's
  # one-GPU comparison net (see the module doc).
  variant: str = 'paper'
  # The three max-pools' window and stride: the paper's overlapping 3/2; its comparison 2/2.
  pool_window: int = 3
  pool_stride: int = 2
  activation: str = 'relu'  # after every conv and fc layer; 'tanh': the paper's Fig. 1 comparison
  fc_width: int = 4096  # fc6 and fc7, before ``width`` scales them
  remove: tuple[int, ...] = ()  # Zeiler & Fergus's Table 3: layers among 3, 4, 6, 7 (one tower)

  @property
  def splits_batch_over_towers(self) -> bool:
    return self.hybrid

  def widths(self) -> dict[str, int]:
    """Layer widths scaled by ``width``, each a multiple of the tower count."""
    t = self.towers
    base = dict(VARIANT_WIDTHS[self.variant], fc6=self.fc_width, fc7=self.fc_width)
    widths = {name: layers.scaled_width(w, self.width, t) for name, w in base.items()}
    if self.hybrid:  # the convolutions are one tower
      widths.update(
          {n: layers.scaled_width(w, self.width) for n, w in base.items() if n.startswith('conv')})
    return widths

  def layer_names(self) -> list[str]:
    """The layers the network has, in the order they run (``remove`` drops some)."""
    return [n for i, n in enumerate(LAYERS, 1) if i not in self.remove]

  def map_sizes(self) -> dict[str, int]:
    """Spatial size of each layer's output maps, before pooling; the torchvision variant's also
    ``avgpool``, the adaptive pool's (what fc6 reads)."""
    pooled = lambda s: (s - self.pool_window) // self.pool_stride + 1
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
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f'unknown model.activation {self.activation!r} for AlexNet; choose one of '
                        f'{", ".join(map(repr, ACTIVATIONS))}')
    if self.variant == 'torchvision' and (self.towers != 1 or self.hybrid):
      raise ConfigError(
          f"model.variant='torchvision' is torchvision's one-tower alexnet, but model.towers="
          f'{self.towers} and model.hybrid={self.hybrid}; set model.towers=1 and model.hybrid=False'
      )
    if self.variant == 'one_gpu' and (self.towers != 1 or self.hybrid):
      raise ConfigError(
          f"model.variant='one_gpu' is the paper's one-GPU net, one dense tower, but model.towers="
          f'{self.towers} and model.hybrid={self.hybrid}; set model.towers=1 and model.hybrid=False'
      )
    if self.init not in ('paper', 'he'):
      raise ConfigError(f"model.init must be 'paper' or 'he', got {self.init!r}")
    if self.towers < 1:
      raise ConfigError(f'model.towers must be at least 1, got {self.towers}')
    if self.pool_window < 1 or self.pool_stride < 1:
      raise ConfigError(f'model.pool_window={self.pool_window} and model.pool_stride='
                        f'{self.pool_stride} must both be at least 1')
    bad = set(self.remove) - set(ABLATABLE)
    if bad:
      raise ConfigError(
          f'model.remove={tuple(self.remove)}: only layers {ABLATABLE} can be removed '
          '(Zeiler & Fergus remove 3,4 / 7 / 6,7 / 3,4,6,7)')
    if self.remove and (self.towers != 1 or self.hybrid):
      raise ConfigError(
          f'model.remove={tuple(self.remove)} with model.towers={self.towers} and model.hybrid='
          f'{self.hybrid}: Zeiler & Fergus removed layers from a one-tower AlexNet; set '
          'model.towers=1 and model.hybrid=False')
    if self.num_classes % self.towers:
      raise ConfigError(f'model.num_classes={self.num_classes} must be divisible by model.towers='
                        f'{self.towers}: fc8 splits its outputs between the towers')
    if self.map_sizes()['pool5'] < 1:
      # Sizes only grow with the input, so the search ends, whatever the pools.
      smallest = next(s for s in itertools.count(self.image_size)
                      if dataclasses.replace(self, image_size=s).map_sizes()['pool5'] >= 1)
      raise ConfigError(
          f'model.image_size={self.image_size} is too small for AlexNet: the smallest '
          f'input with a 1x1 pool5 is {smallest}')


class AlexNet(Classifier):
  """See the module doc. ``layer_names`` and ``supports_deconv`` depend on the spec (``remove``,
  ``activation``), so each instance sets its own."""

  def __init__(self, spec: AlexNetSpec, *, rngs: nnx.Rngs):
    spec = dataclasses.replace(spec, remove=tuple(spec.remove))
    spec.validate()
    self.spec = spec
    self.layer_names = tuple(spec.layer_names())
    # The deconvnet rectifies its signal where the network has ReLUs: tanh units have no such rule.
    self.supports_deconv = spec.activation == 'relu'
    w, t = spec.widths(), spec.towers
    std = spec.weight_std if spec.init == 'paper' else None
    one = 1.0 if spec.init == 'paper' else 0.0  # the paper's unit biases on conv2, 4, 5, fc6, 7
    # Hybrid: one replicated tower of convolutions (conv3 then reads "all" of its only tower).
    conv_towers = dict(towers=1, tower_axis=None) if spec.hybrid else dict(towers=t)
    conv = lambda cin, cout, k, reads, stride=1, pad=0, bias=0.0: TowerConv(
        cin, cout, k, reads=reads, stride=stride, padding=pad, weight_std=std, bias_init=bias, rngs=
        rngs, **conv_towers)
    torchvision = spec.variant == 'torchvision'
    names = self.layer_names
    # Created in the order they run: the generator draws each layer's weights in creation order, so
    # the default network's weights are those it had before the ablation switches.
    self.conv1 = conv(3, w['conv1'], 11, 'input', stride=4, pad=2 if torchvision else 0)
    self.conv2 = conv(w['conv1'], w['conv2'], 5, 'own', pad=2, bias=one)
    cin = w['conv2']
    if 'conv3' in names:
      self.conv3 = conv(cin, w['conv3'], 3, 'own' if spec.hybrid else 'all', pad=1)
      cin = w['conv3']
    if 'conv4' in names:
      self.conv4 = conv(cin, w['conv4'], 3, 'own', pad=1, bias=one)
      cin = w['conv4']
    self.conv5 = conv(cin, w['conv5'], 3, 'own', pad=1, bias=one)
    side = TORCHVISION_POOL if torchvision else spec.map_sizes()['pool5']
    fin = side**2 * w['conv5']
    dense = lambda cin, cout, bias: TowerDense(cin, cout, towers=t, weight_std=std, bias_init=bias,
                                               rngs=rngs)
    if 'fc6' in names:
      self.fc6 = TowerDense(fin, w['fc6'], towers=t, reads='input' if spec.hybrid else 'all',
                            weight_std=std, bias_init=one, rngs=rngs)
      fin = w['fc6']
    if 'fc7' in names:
      self.fc7 = dense(fin, w['fc7'], one)
      fin = w['fc7']
    self.fc8 = dense(fin, spec.num_classes, 0.0)

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

  def _activation(self, deconv: bool):
    if self.spec.activation == 'relu':
      return layers.relu_for(deconv)
    if deconv:
      raise ConfigError(
          f'the deconvnet needs ReLU units, whose rule it applies to the signal coming down, but '
          f"model.activation={self.spec.activation!r}; project through a model.activation='relu' "
          'network')
    return jnp.tanh

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """See ``Classifier.__call__``. With ``deconv=True`` ReLUs rectify the signal coming down and
    LRN passes it unchanged (``alexnet_jax.visualize.deconvnet``); tanh networks refuse it."""
    acts = {}
    keep = lambda name, x: acts.__setitem__(name, x) if capture else None
    act = self._activation(deconv)
    lrn = layers.normalize_for(functools.partial(self._lrn, exchange=exchange), deconv)
    pool = lambda x: layers.max_pool(x, self.spec.pool_window, self.spec.pool_stride)
    torchvision = self.spec.variant == 'torchvision'  # no LRN; dropout before fc6 and fc7
    names = self.layer_names
    with jax.named_scope('conv1'):
      if self.spec.hybrid:  # this tower's share of the examples
        images = exchange.own_examples(images)
      x = act(self.conv1(images))
      keep('conv1', x)
      x = pool(lrn(x))
    with jax.named_scope('conv2'):
      x = act(self.conv2(x))
      keep('conv2', x)
      x = pool(lrn(x))
    for name in ('conv3', 'conv4'):
      if name in names:
        with jax.named_scope(name):
          x = act(getattr(self, name)(x, exchange))
          keep(name, x)
    with jax.named_scope('conv5'):
      x = act(self.conv5(x))
      keep('conv5', x)
      x = pool(x)
      if torchvision:
        x = layers.adaptive_avg_pool(x, TORCHVISION_POOL)
      x = x.reshape(*x.shape[:2], -1)
    # fc6 and fc7 keep their own dropout keys whichever of them ``remove`` drops.
    keys = (None, None) if not train or dropout_key is None else jax.random.split(dropout_key)
    rate = self.spec.dropout if train else 0.0
    for i, name in enumerate(('fc6', 'fc7')):
      if name not in names:
        continue
      with jax.named_scope(name):
        if self.spec.hybrid and name == 'fc6':
          # batch-split → neuron-split: every tower gets all examples' features
          x = exchange.all_examples(x[0])
        layer = getattr(self, name)
        if torchvision:
          x = act(layer(layers.dropout(x, rate, keys[i]), exchange))
        else:
          x = layers.dropout(act(layer(x, exchange)), rate, keys[i])
        keep(name, x)
    with jax.named_scope('fc8'):
      x = self.fc8(x, exchange)
      keep('fc8', x)
    return self._output(x, (), acts, exchange=exchange, gather_logits=gather_logits)
