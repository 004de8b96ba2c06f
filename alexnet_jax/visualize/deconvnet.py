"""Zeiler & Fergus's deconvnet as a vector-Jacobian product, and receptive fields.

A deconvnet projects one activation back to pixel space: zero all other activations of its layer,
then per layer downwards unpool with the switches of the forward pass, rectify, and filter with the
layer's filters transposed (flipped vertically and horizontally). Each of these steps is what
reverse mode differentiation already does to a signal coming down — the vjp of max-pooling routes it
to the recorded maxima, the vjp of a convolution w.r.t. its input is the convolution with the
flipped, transposed filters, and biases drop out — except at the ReLUs, where the gradient masks by
the forward activation and the deconvnet rectifies the signal instead. Models called with
``deconv=True`` use ReLUs with that backward pass (``models.layers.deconv_relu``) and pass the
signal unchanged through their response / contrast normalisation, as the paper does; so the
projection is ``vjp(images ↦ layer activations)(one-hot at the chosen activation)``, for any model
that declares ``supports_deconv`` (``models.contract``), through both towers of the two-tower
AlexNet.

Conventions: images are normalised NHWC float arrays (the model's input); layer activations are
untowered, ``(batch, h, w, maps)`` for conv layers and ``(batch, maps)`` for dense ones, maps
numbered tower-major as the towers' ``gather`` lays them out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alexnet_jax.errors import ConfigError

# (params, images, deconv) → (logits, {layer: tower-split activation})
Apply = Callable[[Any, jax.Array, bool], tuple[jax.Array, dict[str, jax.Array]]]


def make_apply(graphdef: nnx.GraphDef) -> Apply:
  """The network's forward pass with every layer's activation, on one array (no mesh)."""

  def apply(params, images, deconv=False):
    model = nnx.merge(graphdef, params)
    if deconv and not model.supports_deconv:
      raise ConfigError(f'{type(model).__name__} has no deconvnet (its supports_deconv is False): '
                        "projections need AlexNet (with model.activation='relu'), ZFNet or VGG")
    out = model(images, capture=True, deconv=deconv)
    return out.logits, out.activations

  return apply


def untower(act: jax.Array) -> jax.Array:
  """``(towers, batch, ..., c)`` → ``(batch, ..., towers * c)``, tower-major."""
  return jnp.concatenate(list(act), axis=-1)


def features(apply: Apply, params, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits and every layer's untowered activations."""
  logits, acts = apply(params, images, False)
  return logits, {name: untower(a) for name, a in acts.items()}


def is_spatial(act) -> bool:
  return len(act.shape) == 4


def strongest_positions(act: jax.Array, maps: jax.Array) -> jax.Array:
  """``(batch, 2)`` row, column of each example's strongest activation in its map ``maps[n]``."""
  per_map = jnp.take_along_axis(act, maps[:, None, None, None], axis=-1)[..., 0]  # (n, h, w)
  flat = jnp.argmax(per_map.reshape(per_map.shape[0], -1), axis=-1)
  return jnp.stack([flat // act.shape[2], flat % act.shape[2]], axis=-1)


def one_hot_activation(act: jax.Array, maps: jax.Array, positions: jax.Array | None) -> jax.Array:
  """The layer's activations with all but ``(n, positions[n], maps[n])`` zeroed, per example."""
  n = jnp.arange(act.shape[0])
  if is_spatial(act):
    index = (n, positions[:, 0], positions[:, 1], maps)
  else:
    index = (n, maps)
  return jnp.zeros_like(act).at[index].set(act[index])


def project(apply: Apply, params, images: jax.Array, layer: str, maps: jax.Array,
            positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Deconvnet projections of one activation per example to pixel space.

  ``maps``: ``(batch,)`` the feature map of each example; ``positions``: ``(batch, 2)`` the
  activation's row and column in it, where negative the map's strongest one, or ``None`` for the
  strongest one in every example (ignored for dense layers). Returns ``(projections (batch, H, W,
  3), positions (batch, 2), values (batch,))``: the projections in the units of the normalised
  input, each from its example's own switches.
  """
  maps = jnp.asarray(maps, jnp.int32)
  layer_act = lambda x: untower(apply(params, x, True)[1][layer])
  act, vjp = jax.vjp(layer_act, images)
  if is_spatial(act):
    strongest = strongest_positions(act, maps)
    if positions is None:
      positions = strongest
    positions = jnp.asarray(positions, jnp.int32)
    positions = jnp.where(jnp.any(positions < 0, axis=-1, keepdims=True), strongest, positions)
  else:
    positions = jnp.zeros((act.shape[0], 2), jnp.int32)
  chosen = one_hot_activation(act, maps, positions if is_spatial(act) else None)
  (projection,) = vjp(chosen)
  values = jnp.sum(chosen.reshape(chosen.shape[0], -1), axis=-1)
  return projection, positions, values


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """The input rows and columns each position of a layer sees, clipped to the image.

  ``rows[p] = (first, last)`` input row (inclusive) of output row ``p``; ``cols`` likewise.
  """
  rows: np.ndarray  # (h, 2) int
  cols: np.ndarray  # (w, 2) int

  def box(self, row: int, col: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)``, inclusive."""
    return (int(self.rows[row, 0]), int(self.cols[col, 0]), int(self.rows[row,
                                                                          1]), int(self.cols[col,
                                                                                             1]))


def receptive_fields(apply: Apply, params, image_size: int,
                     chunk: int = 32) -> dict[str, ReceptiveField]:
  """Every layer's receptive fields, measured exactly by propagating NaNs.

  An input row (or column) of NaNs turns into NaN exactly the activations whose receptive field
  contains it — convolutions, ReLU (``max(x, 0)``), max-pooling and normalisation all propagate
  NaN — so one forward pass per input row and column gives the receptive field of every position
  of every layer, whatever the architecture, padding included. Dense layers see the whole image.
  """
  size = image_size
  probes = np.zeros((2 * size, size, size, 3), np.float32)
  for r in range(size):
    probes[r, r, :, :] = np.nan
    probes[size + r, :, r, :] = np.nan

  @jax.jit
  def touched(x):
    # (chunk, h) and (chunk, w): which output rows / columns a NaN input line reaches.
    _, acts = features(apply, params, x)
    return {
        name: (jnp.isnan(a).any(axis=(2, 3)), jnp.isnan(a).any(axis=(1, 3)))
        for name, a in acts.items()
        if is_spatial(a)
    }

  parts = []
  for start in range(0, 2 * size, chunk):
    batch = probes[start:start + chunk]
    pad = chunk - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.float32)])
    parts.append(jax.device_get(touched(batch)))
    parts[-1] = {k: (r[:chunk - pad], c[:chunk - pad]) for k, (r, c) in parts[-1].items()}
  fields = {}
  for name in parts[0]:
    rows_hit = np.concatenate([p[name][0] for p in parts])[:size]  # (input row, out row)
    cols_hit = np.concatenate([p[name][1] for p in parts])[size:]  # (input col, out col)
    fields[name] = ReceptiveField(rows=_extent(rows_hit), cols=_extent(cols_hit))
  return fields


def _extent(hit: np.ndarray) -> np.ndarray:
  """``hit[input line, output line]`` → ``(output lines, 2)`` first and last input line."""
  if not hit.any(axis=0).all():
    raise ValueError('a position sees no input line: the model does not propagate NaN (does a ReLU '
                     'use jnp.where instead of jnp.maximum?)')
  first = np.argmax(hit, axis=0)
  last = hit.shape[0] - 1 - np.argmax(hit[::-1], axis=0)
  return np.stack([first, last], axis=-1)
