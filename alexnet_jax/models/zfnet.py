"""ZFNet (Zeiler & Fergus 2013): AlexNet as one dense tower with smaller, denser first layers.

| layer | kernel/stride/pad | maps | after                                               |
|-------|-------------------|------|-----------------------------------------------------|
| conv1 | 7 / 2 / 1         |  96  | ReLU, max-pool 3/2 (rounded up), contrast norm      |
| conv2 | 5 / 2 / 0         | 256  | ReLU, max-pool 3/2 (rounded up), contrast norm      |
| conv3 | 3 / 1 / 1         | 384  | ReLU                                                |
| conv4 | 3 / 1 / 1         | 384  | ReLU                                                |
| conv5 | 3 / 1 / 1         | 256  | ReLU, max-pool 3/2                                  |
| fc6   | dense             | 4096 | ReLU, dropout 0.5                                   |
| fc7   | dense             | 4096 | ReLU, dropout 0.5                                   |
| fc8   | dense             | classes | (softmax in the loss)                            |

A 224 input gives the paper's maps 110 → 55 → 26 → 13 → 13 → 13 → 6: conv1 pads by one pixel and
the first two poolings round their output size up (Caffe's convention), which is the only reading
of the paper's figure that reproduces all of its sizes. "Contrast normalisation across feature maps"
is the response normalisation of AlexNet (``layers.local_response_norm``). Initialisation: weights
N(0, 0.01), biases 0. The paper's ablations are knobs: ``remove`` drops conv3/conv4 (3, 4) and fc6 /
fc7 (6, 7); ``conv_widths`` and ``fc_width`` change the widths of conv3–5 and fc6–7.

All layers are one tower (``towers=1``: a leading tower axis of size 1, as the one-tower AlexNet),
so the steps, the summary and the visualisations treat ZFNet and AlexNet alike.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from alexnet_jax.errors import ConfigError
from alexnet_jax.models import layers
from alexnet_jax.models.contract import Classifier, ModelOutput
from alexnet_jax.models.layers import LOCAL_TOWERS, ONE_TOWER, TowerConv, TowerDense, TowerExchange

ABLATABLE = (3, 4, 6, 7)
# (kernel, stride, padding) of the convolutions; the first two pools round up, the last rounds down.
CONVS = dict(conv1=(7, 2, 1), conv2=(5, 2, 0), conv3=(3, 1, 1), conv4=(3, 1, 1), conv5=(3, 1, 1))


@dataclasses.dataclass(frozen=True)
class ZFNetSpec:
  """Hyper-parameters of the network (``config.model`` minus its name)."""
  num_classes: int = 1000
  image_size: int = 224
  width: float = 1.0
  conv_widths: tuple[int, int, int] = (384, 384, 256)  # conv3, conv4, conv5
  fc_width: int = 4096  # fc6 and fc7
  remove: tuple[int, ...] = ()  # ablation: layers among 3, 4, 6, 7
  lrn: bool = True
  dropout: float = 0.5
  weight_std: float = 0.01
  init: str = 'paper'  # 'paper': N(0, weight_std), biases 0; 'he': N(0, 2/fan_in), for small nets

  towers: ClassVar[int] = 1  # one dense tower
  splits_batch_over_towers: ClassVar[bool] = False

  def widths(self) -> dict[str, int]:
    scale = lambda w: layers.scaled_width(w, self.width)
    c3, c4, c5 = self.conv_widths
    return dict(conv1=scale(96), conv2=scale(256), conv3=scale(c3), conv4=scale(c4),
                conv5=scale(c5), fc6=scale(self.fc_width), fc7=scale(self.fc_width))

  def map_sizes(self) -> dict[str, int]:
    """Spatial size of each layer's output before pooling, and after each pooling."""
    conv = lambda s, name: (s + 2 * CONVS[name][2] - CONVS[name][0]) // CONVS[name][1] + 1
    ceil_pool = lambda s: layers.ceil_pool_size(s, 3, 2)
    conv1 = conv(self.image_size, 'conv1')
    pool1 = ceil_pool(conv1)
    conv2 = conv(pool1, 'conv2')
    pool2 = ceil_pool(conv2)
    return dict(conv1=conv1, pool1=pool1, conv2=conv2, pool2=pool2, conv3=pool2, conv4=pool2,
                conv5=pool2, pool5=(pool2 - 3) // 2 + 1)

  def layer_names(self) -> list[str]:
    return [
        n
        for i, n in enumerate(('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'), 1)
        if i not in self.remove
    ]

  def validate(self) -> None:
    if self.init not in ('paper', 'he'):
      raise ConfigError(f"model.init must be 'paper' or 'he', got {self.init!r}")
    bad = set(self.remove) - set(ABLATABLE)
    if bad:
      raise ConfigError(
          f'model.remove={tuple(self.remove)}: only layers {ABLATABLE} can be removed '
          '(the paper removes 3,4 / 7 / 6,7 / 3,4,6,7)')
    if len(self.conv_widths) != 3:
      raise ConfigError(f'model.conv_widths needs three widths (conv3, conv4, conv5), got '
                        f'{tuple(self.conv_widths)}')
    if self.map_sizes()['pool5'] < 1:
      smallest = next(s for s in range(self.image_size, 1000)
                      if dataclasses.replace(self, image_size=s).map_sizes()['pool5'] >= 1)
      raise ConfigError(f'model.image_size={self.image_size} is too small for ZFNet: the smallest '
                        f'input with a 1x1 pool5 is {smallest}')


class ZFNet(Classifier):
  supports_deconv = True

  def __init__(self, spec: ZFNetSpec, *, rngs: nnx.Rngs):
    spec = dataclasses.replace(spec, conv_widths=tuple(spec.conv_widths), remove=tuple(spec.remove))
    spec.validate()
    self.spec = spec
    self.layer_names = tuple(spec.layer_names())
    w = spec.widths()
    std = spec.weight_std if spec.init == 'paper' else None
    names = spec.layer_names()
    convs = [n for n in names if n.startswith('conv')]
    cin = 3
    for name in convs:
      k, stride, pad = CONVS[name]
      setattr(
          self, name,
          TowerConv(cin, w[name], k, **ONE_TOWER, reads='input' if name == 'conv1' else 'own',
                    stride=stride, padding=pad, weight_std=std, rngs=rngs))
      cin = w[name]
    fin = spec.map_sizes()['pool5']**2 * cin
    for name in names[len(convs):]:
      out = spec.num_classes if name == 'fc8' else w[name]
      setattr(self, name, TowerDense(fin, out, **ONE_TOWER, weight_std=std, rngs=rngs))
      fin = out

  def _lrn(self, x):
    return layers.local_response_norm(x) if self.spec.lrn else x

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """See ``Classifier.__call__`` (one tower: a leading tower axis of 1); ``deconv`` as
    ``AlexNet``'s."""
    acts = {}
    relu = layers.relu_for(deconv)
    names = self.layer_names
    fcs = [n for n in names if n.startswith('fc')]
    last_conv = names[len(names) - len(fcs) - 1]  # pooled and flattened into the fc layers
    keys = [None] * len(fcs)
    if train and dropout_key is not None:
      keys = list(jax.random.split(dropout_key, len(fcs)))
    rate = self.spec.dropout if train else 0.0
    x = images
    for name in names:
      with jax.named_scope(name):
        layer = getattr(self, name)
        if name.startswith('conv'):
          x = relu(layer(x))
        elif name != 'fc8':
          x = layers.dropout(relu(layer(x, exchange)), rate, keys[fcs.index(name)])
        else:
          x = layer(x, exchange)
        if capture:
          acts[name] = x
        if name in ('conv1', 'conv2'):
          x = layers.normalize_for(self._lrn, deconv)(layers.max_pool_ceil(x, 3, 2))
        elif name == last_conv:
          x = layers.max_pool(x)
          x = x.reshape(*x.shape[:2], -1)
    return self._output(x, (), acts, exchange=exchange, gather_logits=gather_logits)
