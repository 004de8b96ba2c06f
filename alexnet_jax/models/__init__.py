"""The model registry: ``config.model.name`` → a spec (its hyper-parameters) → a Flax NNX module.

Each entry pairs a ``contract.Classifier`` with its spec dataclass, whose field defaults are the
one source of ``config.model``'s defaults (``configs.model_config`` builds the section from them).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from flax import nnx

from alexnet_jax.errors import ConfigError, UnknownModelError
from alexnet_jax.models.alexnet import AlexNet, AlexNetSpec
from alexnet_jax.models.contract import Classifier, ModelOutput, Spec
from alexnet_jax.models.googlenet import GoogLeNet, GoogLeNetSpec
from alexnet_jax.models.resnet import ResNet, ResNetSpec
from alexnet_jax.models.vgg import VGG, VGGSpec
from alexnet_jax.models.zfnet import ZFNet, ZFNetSpec

__all__ = [
    'Classifier', 'ModelOutput', 'Spec', 'REGISTRY', 'spec_defaults', 'spec_from_config',
    'create_model'
]


class Entry(NamedTuple):
  model: type[Classifier]
  spec: type


REGISTRY: dict[str, Entry] = {
    'alexnet': Entry(AlexNet, AlexNetSpec),
    'zfnet': Entry(ZFNet, ZFNetSpec),
    'vgg': Entry(VGG, VGGSpec),
    'googlenet': Entry(GoogLeNet, GoogLeNetSpec),
    'resnet': Entry(ResNet, ResNetSpec),
}


def _entry(name: str) -> Entry:
  if name not in REGISTRY:
    raise UnknownModelError(f'unknown model {name!r}; known models: {", ".join(sorted(REGISTRY))}')
  return REGISTRY[name]


def spec_defaults(name: str) -> dict:
  """The hyper-parameters of model ``name`` and their defaults, in declaration order."""
  return {f.name: f.default for f in dataclasses.fields(_entry(name).spec)}


def spec_from_config(model_cfg) -> Spec:
  """``config.model`` (or any mapping with ``name`` and spec fields) → the validated spec of the
  model it names."""
  fields = dict(model_cfg)
  name = fields.pop('name')
  spec_cls = _entry(name).spec
  known = spec_defaults(name)
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ConfigError(f'config.model has no field {unknown[0]!r} for model {name!r}; its fields: '
                      f'{", ".join(known)}')
  spec = spec_cls(**fields)
  spec.validate()
  return spec


def create_model(model_cfg, rngs: nnx.Rngs) -> Classifier:
  """Builds the network ``model_cfg.name`` from the other fields of ``model_cfg``."""
  spec = spec_from_config(model_cfg)
  return REGISTRY[model_cfg['name']].model(spec, rngs=rngs)
