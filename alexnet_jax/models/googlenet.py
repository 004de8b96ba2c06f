"""GoogLeNet (Szegedy et al. 2014, Inception v1) as the paper defines it: no batch norm, response
normalisation after the stem's convolutions, 5×5 branches, two auxiliary classifiers.

Stem: conv1 7×7/2 (64) → max-pool 3/2 → LRN → conv2_reduce 1×1 (64) → conv2 3×3 (192) → LRN →
max-pool 3/2; inception 3a, 3b → max-pool 3/2; 4a–4e → max-pool 3/2; 5a, 5b → global average pool →
dropout 0.4 → fc. Max-pools round their output size up (224 → 112 → 56 → 28 → 14 → 7). Each
inception module concatenates four branches: 1×1; 1×1 reduce → 3×3; 1×1 reduce → 5×5; 3×3/1 max-pool
→ 1×1 projection (widths from the paper's Table 1). Auxiliary classifiers after 4a and 4d:
average-pool 5/3 → 1×1 conv (128) → fc 1024 → dropout 0.7 → fc classes; in training their losses are
added with weight 0.3 (``aux_loss_weight``), at evaluation they are not run. Every convolution and
fc is followed by ReLU (except the classifiers' last fc).

The paper gives no initialisation (it trained on DistBelief); ``init='xavier'`` is that of the
reference Caffe model (bvlc_googlenet: variance 1/fan_in, biases 0.2), ``'he'`` N(0, 2/fan_in).

Caffe's bvlc_googlenet is this network with ``lrn_k=1, lrn_alpha_divided_by_n=True`` at 224
inputs. At other sizes two of its poolings differ from this model's: Caffe rounds the auxiliary
heads' 5/3 average pool up, where this model rounds down (the same where (4a's size − 5) is a
multiple of 3, as 14 at 224 is), and its final 7×7/1 average pool is this model's global mean
only where stage 5 is 7×7. Caffe's auxiliary fc layers (loss*/fc) read their 4×4×128 maps
flattened (c, h, w), these (h, w, c): an importer permutes those kernels' columns.
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
from alexnet_jax.models.layers import LOCAL_TOWERS, ONE_TOWER, TowerConv, TowerDense, TowerExchange

# #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj (Table 1).
INCEPTION = {
    '3a': (64, 96, 128, 16, 32, 32),
    '3b': (128, 128, 192, 32, 96, 64),
    '4a': (192, 96, 208, 16, 48, 64),
    '4b': (160, 112, 224, 24, 64, 64),
    '4c': (128, 128, 256, 24, 64, 64),
    '4d': (112, 144, 288, 32, 64, 64),
    '4e': (256, 160, 320, 32, 128, 128),
    '5a': (256, 160, 320, 32, 128, 128),
    '5b': (384, 192, 384, 48, 128, 128),
}
AUX_AFTER = ('4a', '4d')
# A 3/2 max-pool precedes these modules (the stem's second pool precedes 3a).
POOL_BEFORE = ('3a', '4a', '5a')


@dataclasses.dataclass(frozen=True)
class GoogLeNetSpec:
  num_classes: int = 1000
  image_size: int = 224
  width: float = 1.0
  aux_heads: bool = True
  aux_loss_weight: float = 0.3
  dropout: float = 0.4
  aux_dropout: float = 0.7
  init: str = 'xavier'
  # LRN as the paper's AlexNet defines it (k=2, alpha on the plain sum); Caffe's bvlc_googlenet
  # uses k=1 and alpha divided by the window size n=5 (its LRN layer's convention).
  lrn_k: float = 2.0
  lrn_alpha_divided_by_n: bool = False

  towers: ClassVar[int] = 1  # one dense tower
  splits_batch_over_towers: ClassVar[bool] = False

  def scale(self, w: int) -> int:
    return layers.scaled_width(w, self.width)

  def map_sizes(self) -> dict[str, int]:
    """Spatial size of the stem's outputs and of each stage's maps."""
    pool = lambda s: layers.ceil_pool_size(s, 3, 2)
    conv1 = (self.image_size + 6 - 7) // 2 + 1
    conv2 = pool(conv1)
    stage3 = pool(conv2)
    stage4 = pool(stage3)
    return dict(conv1=conv1, conv2=conv2, stage3=stage3, stage4=stage4, stage5=pool(stage4))

  def validate(self) -> None:
    if self.init not in ('xavier', 'he'):
      raise ConfigError(f"model.init must be 'xavier' or 'he', got {self.init!r}")
    if self.aux_heads and self.map_sizes()['stage4'] < 5:
      smallest = next(s for s in range(self.image_size, 1000)
                      if dataclasses.replace(self, image_size=s).map_sizes()['stage4'] >= 5)
      raise ConfigError(f'model.image_size={self.image_size} is too small for the auxiliary heads '
                        f'(their 5x5 average pool needs 4a maps of at least 5x5: an input of at '
                        f'least {smallest}); use a larger image or model.aux_heads=False')


def _conv(cin, cout, k, spec, rngs, *, reads='own', stride=1):
  std = (1.0 / (k * k * cin))**0.5 if spec.init == 'xavier' else None
  return TowerConv(cin, cout, k, **ONE_TOWER, reads=reads, stride=stride, padding=k // 2,
                   weight_std=std, bias_init=0.2 if spec.init == 'xavier' else 0.0, rngs=rngs)


def _dense(fin, fout, spec, rngs):
  std = (1.0 / fin)**0.5 if spec.init == 'xavier' else None
  return TowerDense(fin, fout, **ONE_TOWER, weight_std=std,
                    bias_init=0.2 if spec.init == 'xavier' else 0.0, rngs=rngs)


class Inception(nnx.Module):

  def __init__(self, cin: int, widths: tuple[int, ...], spec: GoogLeNetSpec, rngs: nnx.Rngs):
    n1, r3, n3, r5, n5, proj = (spec.scale(w) for w in widths)
    self.branch1 = _conv(cin, n1, 1, spec, rngs)
    self.reduce3 = _conv(cin, r3, 1, spec, rngs)
    self.branch3 = _conv(r3, n3, 3, spec, rngs)
    self.reduce5 = _conv(cin, r5, 1, spec, rngs)
    self.branch5 = _conv(r5, n5, 5, spec, rngs)
    self.pool_proj = _conv(cin, proj, 1, spec, rngs)
    self.out_features = n1 + n3 + n5 + proj

  def __call__(self, x):
    relu = jax.nn.relu
    pooled = layers.max_pool_padded(x, 3, 1, (1, 1))
    return jnp.concatenate([
        relu(self.branch1(x)),
        relu(self.branch3(relu(self.reduce3(x)))),
        relu(self.branch5(relu(self.reduce5(x)))),
        relu(self.pool_proj(pooled)),
    ], axis=-1)


class AuxHead(nnx.Module):

  def __init__(self, cin: int, map_size: int, spec: GoogLeNetSpec, rngs: nnx.Rngs):
    pooled = (map_size - 5) // 3 + 1
    self.conv = _conv(cin, spec.scale(128), 1, spec, rngs)
    self.fc1 = _dense(pooled * pooled * spec.scale(128), spec.scale(1024), spec, rngs)
    self.fc2 = _dense(spec.scale(1024), spec.num_classes, spec, rngs)
    self.rate = spec.aux_dropout

  def __call__(self, x, exchange, dropout_key):
    x = jax.nn.relu(self.conv(layers.avg_pool(x, 5, 3)))
    x = jax.nn.relu(self.fc1(x.reshape(*x.shape[:2], -1), exchange))
    return self.fc2(layers.dropout(x, self.rate, dropout_key), exchange)


class GoogLeNet(Classifier):

  def __init__(self, spec: GoogLeNetSpec, *, rngs: nnx.Rngs):
    spec.validate()
    self.spec = spec
    s = spec.scale
    # The training step adds the auxiliary classifiers' losses with this weight (0: none).
    self.aux_loss_weight = spec.aux_loss_weight if spec.aux_heads else 0.0
    self.conv1 = _conv(3, s(64), 7, spec, rngs, reads='input', stride=2)
    self.conv2_reduce = _conv(s(64), s(64), 1, spec, rngs)
    self.conv2 = _conv(s(64), s(192), 3, spec, rngs)
    cin = s(192)
    for name, widths in INCEPTION.items():
      module = Inception(cin, widths, spec, rngs)
      setattr(self, 'inception' + name, module)
      cin = module.out_features
      if spec.aux_heads and name in AUX_AFTER:
        setattr(self, f'aux{AUX_AFTER.index(name) + 1}',
                AuxHead(cin,
                        spec.map_sizes()['stage4'], spec, rngs))
    self.fc = _dense(cin, spec.num_classes, spec, rngs)
    self.layer_names = ('conv1', 'conv2_reduce', 'conv2', *('inception' + n for n in INCEPTION),
                        'fc')

  def _lrn(self, x):
    return layers.local_response_norm(x, k=self.spec.lrn_k,
                                      alpha_divided_by_n=self.spec.lrn_alpha_divided_by_n)

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """See ``Classifier.__call__`` (one tower: a leading tower axis of 1). In training with
    auxiliary heads ``aux_logits`` holds theirs (after 4a, 4d). No deconvnet yet."""
    self._check_deconv(deconv)
    acts = {}
    keep = lambda name, x: acts.__setitem__(name, x) if capture else None
    relu = jax.nn.relu
    ceil_pool = lambda x: layers.max_pool_ceil(x, 3, 2)
    keys = [None] * 3
    if train and dropout_key is not None:
      keys = list(jax.random.split(dropout_key, 3))
    with jax.named_scope('conv1'):
      x = relu(self.conv1(images))
      keep('conv1', x)
      x = self._lrn(ceil_pool(x))
    with jax.named_scope('conv2_reduce'):
      x = relu(self.conv2_reduce(x))
      keep('conv2_reduce', x)
    with jax.named_scope('conv2'):
      x = relu(self.conv2(x))
      keep('conv2', x)
      x = self._lrn(x)
    aux = []
    for name in INCEPTION:
      with jax.named_scope('inception' + name):
        if name in POOL_BEFORE:
          x = ceil_pool(x)
        x = getattr(self, 'inception' + name)(x)
        keep('inception' + name, x)
      if train and self.has_aux_heads and name in AUX_AFTER:
        i = AUX_AFTER.index(name) + 1
        with jax.named_scope(f'aux{i}'):
          aux.append(getattr(self, f'aux{i}')(x, exchange, keys[i]))
    with jax.named_scope('fc'):
      x = jnp.mean(x, axis=(-3, -2))
      x = self.fc(layers.dropout(x, self.spec.dropout if train else 0.0, keys[0]), exchange)
      keep('fc', x)
    return self._output(x, aux, acts, exchange=exchange, gather_logits=gather_logits)
