"""VGG (Simonyan & Zisserman 2014), configurations A, A-LRN, B, C, D, E, with or without batch norm.

Five stages of convolutions (stride 1, padding 1 for 3×3 and 0 for 1×1) with 64, 128, 256, 512, 512
maps, each followed by a 2×2 max-pool of stride 2; then fc6, fc7 (4096, ReLU, dropout 0.5) and fc8.
Configuration C ends stages 3–5 with a 1×1 convolution where D has a 3×3 one; A-LRN normalises the
responses of conv1_1 (AlexNet's normalisation). Weights N(0, 0.01) and zero biases
(``init='paper'``, how the paper trained A), or Glorot's initialisation, which the paper notes
trains the deeper configurations without pre-training (``init='glorot'``). ``batch_norm=True``
inserts batch norm between each convolution and its ReLU (keeping the convolution's bias, as
torchvision's ``vgg*_bn``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
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

STAGE_WIDTHS = (64, 128, 256, 512, 512)
# Kernel sizes of each stage's convolutions.
VARIANTS = {
    'A': ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    'A-LRN': ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    'B': ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3)),
    'C': ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    'D': ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    'E': ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}


@dataclasses.dataclass(frozen=True)
class VGGSpec:
  variant: str = 'D'
  batch_norm: bool = False
  num_classes: int = 1000
  image_size: int = 224
  width: float = 1.0
  dropout: float = 0.5
  weight_std: float = 0.01
  init: str = 'paper'  # 'paper': N(0, weight_std); 'glorot': Glorot normal; 'he': N(0, 2/fan_in)

  towers: ClassVar[int] = 1  # one dense tower
  splits_batch_over_towers: ClassVar[bool] = False

  def convs(self) -> list[tuple[str, int, int]]:
    """(name, kernel size, maps) of every convolution, in order."""
    scale = lambda w: layers.scaled_width(w, self.width)
    return [(f'conv{s}_{i}', k, scale(STAGE_WIDTHS[s - 1]))
            for s, kernels in enumerate(VARIANTS[self.variant], 1)
            for i, k in enumerate(kernels, 1)]

  def validate(self) -> None:
    if self.variant not in VARIANTS:
      raise ConfigError(f'unknown model.variant {self.variant!r} for VGG; choose one of '
                        f'{", ".join(VARIANTS)}')
    if self.init not in ('paper', 'glorot', 'he'):
      raise ConfigError(f"model.init must be 'paper', 'glorot' or 'he', got {self.init!r}")
    if self.image_size < 32:
      raise ConfigError(f'model.image_size={self.image_size} is too small for VGG: five 2x2 '
                        'poolings need at least 32')


class VGG(Classifier):
  supports_deconv = True

  def __init__(self, spec: VGGSpec, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    self.layer_names = (*(name for name, _, _ in spec.convs()), 'fc6', 'fc7', 'fc8')

    def std(fan_in, fan_out):
      return dict(paper=spec.weight_std, glorot=(2.0 / (fan_in + fan_out))**0.5, he=None)[spec.init]

    cin = 3
    for name, k, cout in spec.convs():
      setattr(
          self, name,
          TowerConv(cin, cout, k, **ONE_TOWER, reads='input' if cin == 3 else 'own', padding=k // 2,
                    weight_std=std(k * k * cin, k * k * cout), rngs=rngs))
      if spec.batch_norm:
        setattr(self, name + '_bn', BatchNorm(cout))
      cin = cout
    fin = (spec.image_size // 32)**2 * cin
    fc_width = layers.scaled_width(4096, spec.width)
    for name, out in (('fc6', fc_width), ('fc7', fc_width), ('fc8', spec.num_classes)):
      setattr(self, name, TowerDense(fin, out, **ONE_TOWER, weight_std=std(fin, out), rngs=rngs))
      fin = out

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """See ``Classifier.__call__`` (one tower: a leading tower axis of 1); ``deconv`` as
    ``AlexNet``'s."""
    acts = {}
    relu = layers.relu_for(deconv)
    x = images
    convs = self.spec.convs()
    for i, (name, _, _) in enumerate(convs):
      with jax.named_scope(name):
        x = getattr(self, name)(x)
        if self.spec.batch_norm:
          x = getattr(self, name + '_bn')(x, train=train, exchange=exchange)
        x = relu(x)
        if capture:
          acts[name] = x
        if name == 'conv1_1' and self.spec.variant == 'A-LRN':
          x = layers.normalize_for(layers.local_response_norm, deconv)(x)
        if i + 1 == len(convs) or convs[i + 1][0].split('_')[0] != name.split('_')[0]:
          x = layers.max_pool(x, 2, 2)
    x = x.reshape(*x.shape[:2], -1)
    keys = (None, None) if not train or dropout_key is None else jax.random.split(dropout_key)
    rate = self.spec.dropout if train else 0.0
    for name, key in (('fc6', keys[0]), ('fc7', keys[1]), ('fc8', None)):
      with jax.named_scope(name):
        x = getattr(self, name)(x, exchange)
        if name != 'fc8':
          x = layers.dropout(relu(x), rate, key)
        if capture:
          acts[name] = x
    return self._output(x, (), acts, exchange=exchange, gather_logits=gather_logits)
