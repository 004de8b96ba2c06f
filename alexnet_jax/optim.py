"""The optimiser: the paper's momentum SGD with weight decay, and the learning-rate schedules.

Krizhevsky et al.'s update, with ε the learning rate:

    v ← 0.9·v − 0.0005·ε·w − ε·∂L/∂w        w ← w + v

is ``add_decayed_weights(0.0005)`` → ``scale(−ε)`` → ``trace(0.9)``: the learning rate is applied
*before* the momentum, so velocity built up at an old ε keeps that ε after a drop, as in the paper
(optax's ``sgd`` applies ε after the momentum, which differs whenever ε changes).

Schedules: ``plateau`` (the paper: ε ÷ 10 when the validation error stops improving, at most three
times; decided on the host by ``PlateauController`` and written into the injected hyper-parameter
``lr_scale``, so it is checkpointed with the optimiser state), ``step`` and ``cosine``.

Freezing (``config.init.freeze_through``, for fine-tuning): the parameters of the named layer and
of every layer before it get no update at all: their gradients are zeroed before the chain (so
their momentum stays exactly zero), they are left out of the weight decay and of the filter
clipping, and their updates are zeroed again at its end. The hyper-parameters stay
``opt_state.hyperparams`` (``with_lr_scale``, the plateau controller) and every parameter keeps
its momentum slot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alexnet_jax import models
from alexnet_jax.errors import ConfigError


def learning_rate_schedule(optim_cfg, steps_per_epoch: int, num_epochs: float) -> optax.Schedule:
  base = float(optim_cfg.learning_rate)
  kind = optim_cfg.schedule
  total = int(num_epochs * steps_per_epoch)
  warmup = int(optim_cfg.warmup_epochs * steps_per_epoch)
  if kind == 'plateau':
    schedule = optax.constant_schedule(base)
  elif kind == 'step':
    boundaries = {
        int(e * steps_per_epoch): float(optim_cfg.step_factor) for e in optim_cfg.step_epochs
    }
    schedule = optax.piecewise_constant_schedule(base, boundaries)
  elif kind == 'cosine':
    schedule = optax.cosine_decay_schedule(base, max(1, total - warmup))
  else:
    raise ConfigError(f'unknown optim.schedule {kind!r}; choose plateau, step or cosine')
  if warmup:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, base, warmup), schedule], [warmup])
  return schedule


def _top_key(path) -> str | None:
  """The top-level name of a parameter's path in the model's parameter tree (its layer's)."""
  return getattr(path[0], 'key', None) if path else None


def _decay_mask(decay_biases: bool, frozen: frozenset[str] = frozenset()):

  def mask(params):
    return jax.tree.map_with_path(
        lambda path, _:
        (decay_biases or getattr(path[-1], 'key', None) != 'bias') and _top_key(path) not in frozen,
        params)

  return mask


def zero_frozen(frozen: frozenset[str]) -> optax.GradientTransformation:
  """Sets the updates of the parameters under the top-level names ``frozen`` to zero (stateless;
  a no-op for the others)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map_with_path(
        lambda path, u: jnp.zeros_like(u) if _top_key(path) in frozen else u, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def layer_of(name: str, layer_names) -> str | None:
  """The layer (one of ``layer_names``) a top-level parameter name belongs to: the layer itself
  (``conv1``), or a part of it named after it (VGG's and ResNet's ``conv1_1_bn``, ``conv1_bn``);
  the longest such layer name wins (GoogLeNet's ``conv2_reduce`` is not ``conv2``). None for
  parameters outside the run order (GoogLeNet's auxiliary classifiers ``aux1``, ``aux2``)."""
  owners = [l for l in layer_names if name == l or name.startswith(l + '_')]
  return max(owners, key=len) if owners else None


def frozen_layers(model_cfg, freeze_through) -> tuple[tuple[str, ...], frozenset[str]]:
  """``(layers, top-level parameter names)`` that ``config.init.freeze_through`` freezes: the
  layer it names and every layer before it in the model's run order (``layer_names``), with their
  parameters (batch-norm scales and offsets included). GoogLeNet's auxiliary classifiers, outside
  the run order, always train. ``freeze_through`` None or '': nothing.

  Raises:
    ConfigError: the name is not a layer of the model, or it is the last one (nothing would
      train).
  """
  if not freeze_through:
    return (), frozenset()
  model = nnx.eval_shape(lambda: models.create_model(model_cfg, nnx.Rngs(0)))
  names = tuple(model.layer_names)
  if freeze_through not in names:
    raise ConfigError(f'config.init.freeze_through={freeze_through!r} is not a layer of '
                      f'{model_cfg.name}; its layers, in order: {", ".join(names)}')
  if freeze_through == names[-1]:
    raise ConfigError(f'config.init.freeze_through={freeze_through!r} freezes every layer of '
                      f'{model_cfg.name}, leaving nothing to train; name a layer before it '
                      f'({names[-2]} trains only {names[-1]})')
  layers = names[:names.index(freeze_through) + 1]
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return layers, frozenset(k for k in params if layer_of(k, names) in layers)


def clip_filter_rms(max_rms: float = 0.1) -> optax.GradientTransformation:
  """Zeiler & Fergus's feature-scale clipping: after the update, every convolution filter whose RMS
  exceeds ``max_rms`` is rescaled to RMS ``max_rms``; the others are left exactly as they are.

  A filter is one output map's kernel: the ``(kh, kw, in)`` slice of a kernel shaped
  ``(towers, kh, kw, in, out)`` for one tower and one output map. Written as an update transform
  (the last of the chain), it returns the update that moves the parameters onto the clipped value.
  """

  def clip_update(update, param):
    if param.ndim != 5:  # not a convolution kernel
      return update
    new = param + update
    rms = jnp.sqrt(jnp.mean(jnp.square(new), axis=(1, 2, 3), keepdims=True))
    factor = jnp.where(rms > max_rms, max_rms / jnp.maximum(rms, 1e-30), 1.0)
    return jnp.where(rms > max_rms, new * factor - param, update)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('clip_filter_rms needs the parameters: call update(updates, state, params)')
    return jax.tree.map(clip_update, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    optim_cfg, steps_per_epoch: int, num_epochs: float,
    frozen: frozenset[str] = frozenset()) -> optax.GradientTransformation:
  """optax chain of the paper's update with an injected, checkpointed learning rate.

  ``frozen``: top-level parameter names (``frozen_layers``) that get no update at all."""

  max_rms = float(optim_cfg.filter_rms_clip)
  frozen = frozenset(frozen)
  freeze = [zero_frozen(frozen)] if frozen else []

  def paper_sgd(learning_rate, lr_scale, momentum, weight_decay):
    return optax.chain(
        *freeze,
        optax.add_decayed_weights(weight_decay, mask=_decay_mask(optim_cfg.decay_biases, frozen)),
        optax.scale(-learning_rate * lr_scale),
        optax.trace(decay=momentum, nesterov=False),
        *([clip_filter_rms(max_rms)] if max_rms > 0 else []),
        *freeze,
    )

  return optax.inject_hyperparams(paper_sgd)(learning_rate=learning_rate_schedule(
      optim_cfg, steps_per_epoch, num_epochs), lr_scale=1.0, momentum=float(optim_cfg.momentum),
                                             weight_decay=float(optim_cfg.weight_decay))


def current_learning_rate(opt_state) -> jax.Array:
  hp = opt_state.hyperparams
  return hp['learning_rate'] * hp['lr_scale']


def with_lr_scale(opt_state, scale: float):
  """The optimiser state with a new plateau factor (keeps dtype and sharding)."""
  old = opt_state.hyperparams['lr_scale']
  new = jax.device_put(jnp.asarray(scale, old.dtype), old.sharding)
  return opt_state._replace(hyperparams={**opt_state.hyperparams, 'lr_scale': new})


@dataclasses.dataclass
class PlateauController:
  """ε ÷ factor when the validation error has not improved by ``threshold`` for ``patience``
  evaluations, at most ``max_drops`` times. Its state is small and saved with each checkpoint."""
  factor: float = 0.1
  patience: int = 1
  threshold: float = 1e-3
  max_drops: int = 3
  best: float = float('inf')
  bad_evals: int = 0
  drops: int = 0

  def update(self, val_error: float) -> bool:
    """Records one evaluation; True when the learning rate should drop now."""
    if val_error < self.best - self.threshold:
      self.best, self.bad_evals = val_error, 0
      return False
    self.bad_evals += 1
    if self.bad_evals >= self.patience and self.drops < self.max_drops:
      self.drops += 1
      self.bad_evals = 0
      return True
    return False

  @property
  def scale(self) -> float:
    return self.factor**self.drops

  def state_dict(self) -> dict[str, Any]:
    return dict(best=self.best, bad_evals=self.bad_evals, drops=self.drops)

  def load_state_dict(self, d: dict[str, Any]) -> None:
    self.best, self.bad_evals, self.drops = float(d['best']), int(d['bad_evals']), int(d['drops'])
