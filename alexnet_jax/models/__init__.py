"""The model registry: ``config.model.name`` → a Flax NNX module."""

from __future__ import annotations

from typing import Callable

from flax import nnx

from alexnet_jax.models.alexnet import AlexNet, AlexNetSpec
from alexnet_jax.models.googlenet import GoogLeNet, GoogLeNetSpec
from alexnet_jax.models.resnet import ResNet, ResNetSpec
from alexnet_jax.models.vgg import VGG, VGGSpec
from alexnet_jax.models.zfnet import ZFNet, ZFNetSpec


def _builder(model_cls, spec_cls) -> Callable[[dict, nnx.Rngs], nnx.Module]:
  return lambda fields, rngs: model_cls(spec_cls(**fields), rngs=rngs)


REGISTRY: dict[str, Callable[[dict, nnx.Rngs], nnx.Module]] = {
    'alexnet': _builder(AlexNet, AlexNetSpec),
    'zfnet': _builder(ZFNet, ZFNetSpec),
    'vgg': _builder(VGG, VGGSpec),
    'googlenet': _builder(GoogLeNet, GoogLeNetSpec),
    'resnet': _builder(ResNet, ResNetSpec),
}


class UnknownModelError(ValueError):
  pass


def create_model(model_cfg, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the network ``model_cfg.name`` from the other fields of ``model_cfg``."""
  fields = dict(model_cfg)
  name = fields.pop('name')
  if name not in REGISTRY:
    raise UnknownModelError(f'unknown model {name!r}; known models: {", ".join(sorted(REGISTRY))}')
  try:
    return REGISTRY[name](fields, rngs)
  except TypeError as e:  # an unexpected config field
    raise ValueError(f'bad config.model for {name!r}: {e}') from None
