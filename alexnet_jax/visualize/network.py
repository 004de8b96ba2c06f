"""A network with parameters, ready to be analysed: device batching and compiled functions.

``Network.map_batches`` runs a jitted function over a leading batch axis split across the local
devices, with a progress bar; ``Network.fold_batches`` folds one over a stream of chunks into a
state that stays on the devices. ``CompiledFunctions`` holds what is compiled for one
architecture, so that the networks of one session (a run's checkpoints, the snapshots taken during
training) compile each analysis once per padded batch shape; each session makes its own.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from alexnet_jax.steps import normalize as normalize_on_device
from alexnet_jax.visualize import deconvnet

BATCH = 'batch'


def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.local_devices()), (BATCH,))


def replicated() -> NamedSharding:
  """Whole on every local device: the sharding of what ``Network.fold_batches`` folds into."""
  return NamedSharding(_mesh(), P())


def device_count() -> int:
  """The local devices a batch is split across: chunks for ``fold_batches`` are multiples of it."""
  return len(jax.local_devices())


def _bucket(n: int, devices: int, cap: int) -> int:
  """The padded batch for ``n`` examples: ``devices`` × the smallest power of two that holds them,
  at most ``cap`` (rounded up to a multiple of ``devices``). A handful of shapes, so a handful of
  compiles, serve every count of images, occluder positions or projections."""
  cap = -(-cap // devices) * devices
  per_device = 1
  while devices * per_device < min(n, cap):
    per_device *= 2
  return min(devices * per_device, cap)


def normalizer(mean_rgb, std_rgb, mean_image: np.ndarray | None = None,
               channel_order: str = 'rgb') -> Callable[[jax.Array], jax.Array]:
  """uint8-valued images → the model's input, as evaluation normalises them: minus the central
  window of the training set's ``mean_image`` when the network was trained on mean-image-subtracted
  pixels, else minus ``mean_rgb``; then divided by ``std_rgb`` (and reordered to the network's
  ``channel_order``). Closes over these constants only
  (not a network), so the compiled functions keep no parameters alive."""
  mean_rgb, std_rgb = tuple(mean_rgb), tuple(std_rgb)
  return lambda images: normalize_on_device(jnp.asarray(images), mean_rgb, std_rgb, jnp.float32,
                                            mean_image=mean_image, channel_order=channel_order)


class CompiledFunctions:
  """The applies (one per graph definition), jitted functions and receptive fields of the networks
  that share it: functions jitted around one apply are compiled once."""

  def __init__(self):
    self._applies: dict = {}
    self._jitted: dict = {}
    self._receptive_fields: dict = {}

  def apply(self, graphdef: nnx.GraphDef) -> deconvnet.Apply:
    if graphdef not in self._applies:
      self._applies[graphdef] = deconvnet.make_apply(graphdef)
    return self._applies[graphdef]

  def jitted(self, key, make: Callable[[], Callable]) -> Callable:
    if key not in self._jitted:
      self._jitted[key] = jax.jit(make())
    return self._jitted[key]

  def receptive_fields(self, apply: deconvnet.Apply, compute):
    """They depend on the architecture only (NaN propagates through any weight): once per apply."""
    if apply not in self._receptive_fields:
      self._receptive_fields[apply] = compute()
    return self._receptive_fields[apply]


@dataclasses.dataclass
class Network:
  """A network with parameters, ready to be analysed. Images given to it are uint8-valued NHWC."""
  config: Any
  apply: deconvnet.Apply
  params: Any
  step: int = 0
  epoch: float | None = None
  # The training set's mean image, when the network was trained on pixels minus it.
  mean_image: np.ndarray | None = None
  # Shared by the networks of one session (``load_network(..., functions=)``); a network made
  # without one compiles its own.
  functions: CompiledFunctions = dataclasses.field(default_factory=lambda: CompiledFunctions(),
                                                   repr=False)
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  def function(self, key, make):
    """``jax.jit(make())``, made once per architecture, input normalisation and ``key`` in
    ``self.functions``: ``make``'s function may close over the apply, ``normalize``, the config's
    colours, the mean image and what ``key`` names (never over the parameters, which it takes as
    its first argument)."""
    full = (self.apply, tuple(self.config.input.mean_rgb), tuple(self.config.input.std_rgb),
            self.config.input.channel_order, self._mean_image_digest, key)
    return self.functions.jitted(full, make)

  @functools.cached_property
  def _mean_image_digest(self) -> str | None:
    if self.mean_image is None:
      return None
    return hashlib.sha1(np.ascontiguousarray(self.mean_image).tobytes()).hexdigest()

  @property
  def image_size(self) -> int:
    return int(self.config.model.image_size)

  @property
  def normalize(self) -> Callable[[jax.Array], jax.Array]:
    return normalizer(self.config.input.mean_rgb, self.config.input.std_rgb, self.mean_image,
                      self.config.input.channel_order)

  @functools.cached_property
  def _replicated(self):
    return jax.device_put(self.params, NamedSharding(_mesh(), P()))

  def map_batches(self, fn: Callable, *arrays, batch_size: int = 64, desc: str | None = None,
                  shared: tuple = ()):
    """``fn(params, *shared, *chunks)`` over the leading axis of ``arrays`` (all the same length),
    each chunk split across the local devices, ``shared`` replicated on them; outputs (any pytree)
    concatenated along axis 0. Chunks are padded to a few fixed sizes (``_bucket``); ``fn`` is best
    one from ``function``, so that its compiles are shared."""
    mesh = _mesh()
    n = len(arrays[0])
    batch_size = _bucket(max(n, 1), mesh.devices.size, batch_size)
    if hasattr(fn, 'lower'):  # already jitted
      jitted = fn
    else:  # the arguments' shardings split the batch across the devices
      if fn not in self._jitted:
        self._jitted[fn] = jax.jit(fn)
      jitted = self._jitted[fn]
    shared = jax.device_put(tuple(np.asarray(a) for a in shared), NamedSharding(mesh, P()))
    outputs = []
    starts = range(0, n, batch_size)
    if desc is not None and len(starts) > 1:
      starts = tqdm(starts, desc=desc, unit='batch', leave=False)
    for start in starts:
      chunks = [np.asarray(a[start:start + batch_size]) for a in arrays]
      real = len(chunks[0])
      chunks = [
          np.concatenate([c, np.repeat(c[-1:], batch_size -
                                       real, axis=0)]) if real < batch_size else c for c in chunks
      ]
      chunks = [jax.device_put(c, NamedSharding(mesh, P(BATCH))) for c in chunks]
      out = jax.device_get(jitted(self._replicated, *shared, *chunks))
      outputs.append(jax.tree.map(lambda x: x[:real], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

  def fold_batches(self, fn: Callable, state, chunks: Iterable[tuple], *, shared: tuple = (),
                   desc: str | None = None, total: int | None = None, in_flight: int = 2):
    """``state = fn(params, *shared, state, *chunk)`` for each chunk of ``chunks`` (tuples of
    arrays of one leading size, a multiple of ``device_count()``, split across the local devices),
    the state replicated on the devices throughout (``fn`` keeps it so, e.g. with
    ``jax.lax.with_sharding_constraint(..., replicated())``): only the final state comes to the
    host. Dispatch is asynchronous, so the host reads the next chunks while the devices work;
    at most ``in_flight`` chunks wait on the devices. ``fn`` is best one from ``function``."""
    mesh = _mesh()
    split = NamedSharding(mesh, P(BATCH))
    if not hasattr(fn, 'lower') and fn not in self._jitted:
      self._jitted[fn] = jax.jit(fn)
    jitted = fn if hasattr(fn, 'lower') else self._jitted[fn]
    shared = jax.device_put(jax.tree.map(np.asarray, tuple(shared)), replicated())
    state = jax.device_put(jax.tree.map(np.asarray, state), replicated())
    if desc is not None:
      chunks = tqdm(chunks, desc=desc, total=total, unit='batch', leave=False)
    pending = collections.deque()
    for chunk in chunks:
      parts = [jax.device_put(np.asarray(c), split) for c in chunk]
      state = jitted(self._replicated, *shared, state, *parts)
      pending.append(state)
      if len(pending) > in_flight:
        jax.block_until_ready(pending.popleft())
    return jax.device_get(state)

  def features(self, images: np.ndarray, *, desc: str | None = None, batch_size: int = 64):
    """``(logits, {layer: untowered activations})`` as numpy arrays. ``images`` may hold fractional
    values (occluded by the mean colour): they go in as float32, so one compile serves both."""
    apply, normalize = self.apply, self.normalize
    fn = self.function('features',
                       lambda: lambda params, x: deconvnet.features(apply, params, normalize(x)))
    return self.map_batches(fn, np.asarray(images, np.float32), desc=desc, batch_size=batch_size)

  def project(self, images: np.ndarray, layer: str, maps: np.ndarray,
              positions: np.ndarray | None = None, *, desc: str | None = None):
    """Deconvnet projections (see ``deconvnet.project``) of one activation per image: at
    ``positions``, or where it is ``None`` the maps' strongest (one compile serves both). The
    projections' colour channels are R, G, B whatever order the network reads."""
    apply, normalize = self.apply, self.normalize
    bgr = self.config.input.channel_order == 'bgr'
    maps = np.asarray(maps, np.int32)
    if positions is None:
      positions = np.full((len(maps), 2), -1, np.int32)  # -1: the strongest

    def make():

      def project(params, x, m, p):
        pixels, where, value = deconvnet.project(apply, params, normalize(x), layer, m, p)
        return (pixels[..., ::-1] if bgr else pixels), where, value

      return project

    fn = self.function(('project', layer), make)
    return self.map_batches(fn, images, maps, np.asarray(positions, np.int32), desc=desc,
                            batch_size=32)

  @property
  def receptive_fields(self) -> dict[str, deconvnet.ReceptiveField]:
    # They depend on the architecture only (NaN propagates through any weight): computed once.
    return self.functions.receptive_fields(
        self.apply,
        lambda: deconvnet.receptive_fields(self.apply, self._replicated, self.image_size))
