"""The model registry: ``config.model.name`` → a Flax NNX module."""

from __future__ import annotations

from typing import Callable

from flax import nnx

from alexnet_jax.models.alexnet import AlexNet, AlexNetSpec


def _alexnet(fields: dict, rngs: nnx.Rngs) -> nnx.Module:
  return AlexNet(AlexNetSpec(**fields), rngs=rngs)


REGISTRY: dict[str, Callable[[dict, nnx.Rngs], nnx.Module]] = {
    'alexnet': _alexnet,
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
