"""A trained network and images to look at it with: checkpoints, image sources, device batching.

``load_network`` restores a checkpoint's parameters through the very program that trained them
(``program.build_program``'s abstract state, so a checkpoint from any mesh restores), then
replicates them over all local devices. ``Network.map_batches`` runs a jitted function over a
leading batch axis split across those devices, with a progress bar.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from alexnet_jax import checkpointing
from alexnet_jax.steps import normalize as normalize_on_device
from alexnet_jax.visualize import deconvnet

BATCH = 'batch'
SKIMAGE_PHOTOS = ('chelsea', 'astronaut', 'coffee')


def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.local_devices()), (BATCH,))


def _bucket(n: int, devices: int, cap: int) -> int:
  """The padded batch for ``n`` examples: ``devices`` × the smallest power of two that holds them,
  at most ``cap`` (rounded up to a multiple of ``devices``). A handful of shapes, so a handful of
  compiles, serve every count of images, occluder positions or projections."""
  cap = -(-cap // devices) * devices
  per_device = 1
  while devices * per_device < min(n, cap):
    per_device *= 2
  return min(devices * per_device, cap)


def normalizer(mean_rgb, std_rgb, mean_image: np.ndarray | None = None
               ) -> Callable[[jax.Array], jax.Array]:
  """uint8-valued images → the model's input, as evaluation normalises them: minus the central
  window of the training set's ``mean_image`` when the network was trained on mean-image-subtracted
  pixels, else minus ``mean_rgb``; then divided by ``std_rgb``. Closes over these constants only
  (not a network), so functions cached in ``_COMPILED`` keep no parameters alive."""
  mean_rgb, std_rgb = tuple(mean_rgb), tuple(std_rgb)
  return lambda images: normalize_on_device(jnp.asarray(images), mean_rgb, std_rgb, jnp.float32,
                                            mean_image=mean_image)


def training_mean_image(config) -> np.ndarray | None:
  """The mean image the network of ``config`` was trained with (``config.input.mean_image``), read
  from the ``statistics.npz`` that training stored beside the data set; None when it subtracted
  the mean colour instead."""
  if not config.input.get('mean_image', False):
    return None
  from alexnet_jax.data import sources, statistics  # pylint: disable=g-import-not-at-top
  source = sources.open_source(config.dataset, config.dataset.train_split,
                               min_side=config.input.get('resize_to'))
  path = statistics.path_for(source)
  if not os.path.exists(path):
    raise ValueError(f'the network was trained on images minus the training set\'s mean image '
                     f'(config.input.mean_image=True), but {path} does not exist: train on this data '
                     'set first (training computes it), or pass --config.input.mean_image=False to '
                     'subtract the mean colour instead')
  return np.asarray(statistics.load(path).mean_image, np.float32)


# (apply, mean, std, key) → jitted function, shared by every ``Network`` of one architecture (a
# run's checkpoints, the snapshots taken during training, every command of a session), so that
# each analysis compiles once per padded batch shape. ``deconvnet.make_apply`` returns one apply
# per graph definition, which makes it a key.
_COMPILED: dict = {}


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
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  def function(self, key, make):
    """``jax.jit(make())``, made once per architecture, input normalisation and ``key``: ``make``'s
    function may close over the apply, ``normalize``, the config's colours, the mean image and what
    ``key`` names (never over the parameters, which it takes as its first argument)."""
    full = (self.apply, tuple(self.config.input.mean_rgb), tuple(self.config.input.std_rgb),
            self._mean_image_digest, key)
    if full not in _COMPILED:
      _COMPILED[full] = jax.jit(make())
    return _COMPILED[full]

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
    return normalizer(self.config.input.mean_rgb, self.config.input.std_rgb, self.mean_image)

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
    if hasattr(fn, 'lower'):   # already jitted
      jitted = fn
    else:  # the arguments' shardings split the batch across the devices
      if fn not in self._jitted:
        self._jitted[fn] = jax.jit(fn)
      jitted = self._jitted[fn]
    shared = jax.device_put(tuple(np.asarray(a) for a in shared), NamedSharding(mesh, P()))
    outputs = []
    starts = range(0, n, batch_size)
    if desc is not None and len(starts) > 1:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm(starts, desc=desc, unit='batch', leave=False)
    for start in starts:
      chunks = [np.asarray(a[start:start + batch_size]) for a in arrays]
      real = len(chunks[0])
      chunks = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, axis=0)]) if real < batch_size
                else c for c in chunks]
      chunks = [jax.device_put(c, NamedSharding(mesh, P(BATCH))) for c in chunks]
      out = jax.device_get(jitted(self._replicated, *shared, *chunks))
      outputs.append(jax.tree.map(lambda x: x[:real], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

  def features(self, images: np.ndarray, *, desc: str | None = None, batch_size: int = 64):
    """``(logits, {layer: untowered activations})`` as numpy arrays. ``images`` may hold fractional
    values (occluded by the mean colour): they go in as float32, so one compile serves both."""
    apply, normalize = self.apply, self.normalize
    fn = self.function('features', lambda: lambda params, x: deconvnet.features(
        apply, params, normalize(x)))
    return self.map_batches(fn, np.asarray(images, np.float32), desc=desc, batch_size=batch_size)

  def project(self, images: np.ndarray, layer: str, maps: np.ndarray,
              positions: np.ndarray | None = None, *, desc: str | None = None):
    """Deconvnet projections (see ``deconvnet.project``) of one activation per image: at
    ``positions``, or where it is ``None`` the maps' strongest (one compile serves both)."""
    apply, normalize = self.apply, self.normalize
    maps = np.asarray(maps, np.int32)
    if positions is None:
      positions = np.full((len(maps), 2), -1, np.int32)   # -1: the strongest
    fn = self.function(('project', layer), lambda: lambda params, x, m, p: deconvnet.project(
        apply, params, normalize(x), layer, m, p))
    return self.map_batches(fn, images, maps, np.asarray(positions, np.int32), desc=desc,
                            batch_size=32)

  @property
  def receptive_fields(self) -> dict[str, deconvnet.ReceptiveField]:
    # They depend on the architecture only (NaN propagates through any weight): computed once.
    key = (repr(sorted(dict(self.config.model).items())), self.image_size)
    if key not in _RECEPTIVE_FIELDS:
      _RECEPTIVE_FIELDS[key] = deconvnet.receptive_fields(self.apply, self._replicated,
                                                          self.image_size)
    return _RECEPTIVE_FIELDS[key]


_RECEPTIVE_FIELDS: dict = {}


# --- Checkpoints ----------------------------------------------------------------------------------

def checkpoint_directory(path: str) -> str:
  """A training workdir or its ``checkpoints`` folder → the folder holding the step directories."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if not os.path.isdir(path):
    raise checkpointing.CheckpointError(f'no checkpoint directory at {path}: pass --checkpoint=the '
                                        'training --workdir (or its checkpoints/ folder)')
  return path


class _DropReadOnlyNotice(logging.Filter):
  """Orbax warns 'Given directory is read only' whenever a read-only manager opens: here that is
  the intent (the analyses never write into a training run), not news."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


def _manager(config, path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # save_interval_steps=0 says what read_only implies (else orbax warns that it changes it).
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  notice = _DropReadOnlyNotice()
  logger = logging.getLogger('absl')
  logger.addFilter(notice)
  try:
    return ocp.CheckpointManager(checkpoint_directory(path), options=options,
                                 item_names=('state', 'data', 'meta'))
  finally:
    logger.removeFilter(notice)


def checkpoint_steps(config, path: str) -> list[int]:
  with _manager(config, path) as manager:
    steps = sorted(manager.all_steps())
  if not steps:
    raise checkpointing.CheckpointError(f'{checkpoint_directory(path)} holds no checkpoint: train '
                                        'first (python -m alexnet_jax.main --workdir=...)')
  return steps


def load_network(config, path: str, step: int | None = None) -> Network:
  """The network of ``config`` with the parameters of checkpoint ``step`` (default: the latest)."""
  from alexnet_jax import program as program_lib  # pylint: disable=g-import-not-at-top
  steps = checkpoint_steps(config, path)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise checkpointing.CheckpointError(f'no checkpoint at step {step} in {checkpoint_directory(path)}'
                                        f'; it holds steps {", ".join(map(str, steps))}')
  prog = program_lib.build_program(config, steps_per_epoch=1)
  with _manager(config, path) as manager:
    restored = checkpointing.restore(manager, step, prog.abstract_state, None)
  return network_from_state(config, prog.graphdef, restored.state, step=step,
                            epoch=restored.meta.get('epoch'), mean_image=training_mean_image(config))


def network_from_state(config, graphdef: nnx.GraphDef, state, *, step: int = 0,
                       epoch: float | None = None, mean_image: np.ndarray | None = None) -> Network:
  """The network of a training state (``steps.TrainState``, on the devices or the host). Its
  parameters and batch-norm statistics become one pure dict of every variable, the model in
  evaluation mode as the analyses run it. ``mean_image``: see ``training_mean_image``."""
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.batch_stats))
  graphdef, variables = nnx.split(model)
  return Network(config=config, apply=deconvnet.make_apply(graphdef),
                 params=nnx.to_pure_dict(variables), step=step, epoch=epoch, mean_image=mean_image)


# --- Images ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Images:
  pixels: np.ndarray                  # uint8 (N, S, S, 3)
  labels: np.ndarray | None           # int (N,), or None when the images carry no labels
  names: list[str]
  class_names: Sequence[str] = ()

  def class_name(self, c: int) -> str:
    return self.class_names[c] if 0 <= c < len(self.class_names) else f'class {c}'


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
  """Rescale the shorter side to ``size`` and keep the central square (the eval recipe)."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def _read_file(path: str) -> np.ndarray:
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert('RGB'))
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read image {path}: {e}') from None


def load_images(config, spec: str | None, count: int, seed: int = 0) -> Images:
  """Images at the network's input size.

  ``spec``: ``None`` or ``'dataset'`` — ``count`` images of the config's evaluation split (centre
  crops, with labels); ``'skimage'`` — scikit-image's photographs; otherwise comma-separated image
  files or folders of them.
  """
  size = int(config.model.image_size)
  if spec in (None, '', 'dataset'):
    from alexnet_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
    source = sources.open_source(config.dataset, config.dataset.eval_split)
    n = min(count, len(source))
    indices = np.sort(np.random.default_rng(seed).choice(len(source), n, replace=False))
    crop = pipeline.EvalTransform(size)
    items = [crop.map(source[int(i)]) for i in indices]
    return Images(pixels=np.stack([x['image'] for x in items]),
                  labels=np.array([int(x['label']) for x in items]),
                  names=[f'{config.dataset.eval_split}[{i}]' for i in indices],
                  class_names=tuple(source.class_names))
  if spec == 'skimage':
    try:
      import skimage.data  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError('--images=skimage needs scikit-image: pip install scikit-image') from None
    photos = [(name, getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS][:max(count, 1)]
    return Images(pixels=np.stack([centre_square(p, size) for _, p in photos]), labels=None,
                  names=[name for name, _ in photos])
  paths = []
  for part in spec.split(','):
    part = os.path.expanduser(part.strip())
    if os.path.isdir(part):
      paths += sorted(os.path.join(part, f) for f in os.listdir(part)
                      if f.lower().endswith(('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')))
    elif os.path.isfile(part):
      paths.append(part)
    else:
      raise ValueError(f'--images: {part!r} is neither dataset, skimage, an image file nor a folder')
  if not paths:
    raise ValueError(f'--images={spec!r} names no image files')
  return Images(pixels=np.stack([centre_square(_read_file(p), size) for p in paths]), labels=None,
                names=[os.path.basename(p) for p in paths])
