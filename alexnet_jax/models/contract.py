"""The model contract: one call signature, one returned structure, declared capabilities.

Every network of the zoo subclasses ``Classifier``. The training and evaluation steps, the tools
and the analyses call any of them the same way and read what a model can do from its attributes,
never from the type of what it returns or from the errors it raises:

* ``supports_deconv`` — ``deconv=True`` gives Zeiler & Fergus's deconvnet as the forward pass's
  backward pass (``layers.relu_for``, ``layers.normalize_for``);
* ``aux_loss_weight`` — > 0 when the model has auxiliary classifiers (GoogLeNet), whose training
  losses are added with this weight (``has_aux_heads``);
* ``has_batch_stats`` — the model keeps running averages (``nnx.BatchStat``: batch norm);
* ``layer_names`` — the layers ``capture=True`` records, in the order they run.

A model's hyper-parameters are a frozen dataclass, its *spec*, which ``Spec`` describes: besides
its own fields it declares how its neurons split into towers, which the mesh needs before the
model is built.
"""

from __future__ import annotations

import collections
from typing import ClassVar, NamedTuple, Protocol

import jax
from flax import nnx

from alexnet_jax.models.layers import LOCAL_TOWERS, TowerExchange


class ModelOutput(NamedTuple):
  """What every model returns (a pytree, so ``jax.eval_shape`` and ``jit`` pass it through).

  ``logits``: ``(batch, classes)``, or with ``gather_logits=False`` the towers' own slices
  ``(local_towers, batch, classes // towers)``. ``aux_logits``: the auxiliary classifiers' logits,
  laid out alike, in training only (else ``()``). ``activations``: with ``capture=True`` every
  layer's output after its ReLU, tower-split ``(local_towers, batch, ..., maps_per_tower)``, in the
  order the layers run (an ``OrderedDict``: pytrees keep its order, where a dict's keys are
  sorted); else empty.
  """
  logits: jax.Array
  aux_logits: tuple[jax.Array, ...]
  activations: collections.OrderedDict


class Spec(Protocol):
  """A model's hyper-parameters (``config.model`` minus its name), a frozen dataclass."""

  # Towers the neurons split into (1: a dense network); the mesh's model axis holds whole towers.
  towers: int
  # True when the model gives each device of the model axis its own share of the batch (the
  # hybrid AlexNet's data-parallel convolutions): the batch must split over those devices too.
  splits_batch_over_towers: bool

  def validate(self) -> None:
    """Raises ``errors.ConfigError`` for impossible values."""
    ...


class Classifier(nnx.Module):
  """Base class of the zoo's networks; see the module doc for the contract."""

  supports_deconv: ClassVar[bool] = False
  aux_loss_weight: float = 0.0  # GoogLeNet sets its own
  layer_names: tuple[str, ...]  # every model sets it (in its class or its constructor)
  spec: Spec  # the validated hyper-parameters the model was built from

  @property
  def has_aux_heads(self) -> bool:
    return self.aux_loss_weight > 0

  @property
  def has_batch_stats(self) -> bool:
    return bool(jax.tree.leaves(nnx.state(self, nnx.BatchStat)))

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: jax.Array | None = None, exchange: TowerExchange = LOCAL_TOWERS,
               gather_logits: bool = True, capture: bool = False,
               deconv: bool = False) -> ModelOutput:
    """Class scores for a batch of normalised NHWC images.

    ``train``: dropout (keyed by ``dropout_key``), batch statistics, auxiliary heads.
    ``exchange``: how towers reach each other (``layers.LOCAL_TOWERS``: all in the array at hand;
    ``sharding.MeshContext``: across the devices of a mesh axis). ``gather_logits``,
    ``capture``: see ``ModelOutput``. ``deconv``: see ``supports_deconv``.
    """
    raise NotImplementedError

  def _output(self, logits: jax.Array, aux_logits, activations, *, exchange: TowerExchange,
              gather_logits: bool) -> ModelOutput:
    """The ``ModelOutput`` of towered logits, gathered over the towers when asked to."""
    aux_logits = tuple(aux_logits)
    if gather_logits:
      logits = exchange.gather(logits)
      aux_logits = tuple(exchange.gather(a) for a in aux_logits)
    return ModelOutput(logits, aux_logits, collections.OrderedDict(activations))

  def _check_deconv(self, deconv: bool) -> None:
    """Callers read ``supports_deconv`` first: reaching here with ``deconv=True`` is a bug."""
    if deconv and not self.supports_deconv:
      raise TypeError(f'{type(self).__name__} does not support deconv=True (supports_deconv is '
                      'False); check model.supports_deconv before asking for it')
