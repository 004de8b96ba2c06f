"""A trained network's passes over a split, sharded over its mesh as training's evaluation is: each
example's softmax (averaged over its views) and the activations of named layers.

The per-device program (``make_outputs_step``) gathers what the towers hold — the logits over the
model axis, as the paper's last layer does, and a layer's maps the same way — so that every output
row is one whole example, split over ``data`` only. The host loop (``passes``) keeps one batch in
flight while it fetches the previous one, so the devices never wait for the host's copy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from alexnet_jax import sharding, steps
from alexnet_jax.data import augment, pipeline
from alexnet_jax.errors import ConfigError
from alexnet_jax.trained import Trained

POOLS = ('none', 'max', 'mean')


def check_layers(model, layers: Sequence[str]) -> None:
  """Refuses (``ConfigError``) a layer the model does not record."""
  for layer in layers:
    if layer not in model.layer_names:
      raise ConfigError(f'model {model.spec.__class__.__name__.removesuffix("Spec").lower()!r} has '
                        f'no layer {layer!r}; its layers: {", ".join(model.layer_names)}')


def penultimate_layer(model) -> str:
  """The last hidden layer: the one the classifier reads (AlexNet's fc7)."""
  return model.layer_names[-2]


def _whole(act: jax.Array, ctx: sharding.MeshContext, rows: int) -> jax.Array:
  """A captured activation ``(local_towers, b, ..., c)`` → this data shard's whole examples
  ``(rows, ..., all maps)``: the towers' maps gathered over the model axis (tower-major, as
  ``visualize.deconvnet.untower`` orders them), or where each model-axis device held its own
  share of the examples (the hybrid AlexNet's convolutions) those shares gathered."""
  if act.shape[1] == rows:
    return ctx.gather(act)
  return ctx.all_examples(act[0])


def _pooled(x: jax.Array, pool: str) -> jax.Array:
  """``(rows, h, w, c)`` maps → ``(rows, d)``: flattened, or their spatial max or mean per map;
  dense layers as they are."""
  if x.ndim == 4 and pool == 'max':
    return jnp.max(x, axis=(1, 2))
  if x.ndim == 4 and pool == 'mean':
    return jnp.mean(x, axis=(1, 2))
  return x.reshape(x.shape[0], -1)


def make_outputs_step(graphdef, ctx: sharding.MeshContext, *, mean_rgb, std_rgb,
                      compute_dtype=jnp.float32, mean_image=None, pca_basis=None,
                      channel_order: str = 'rgb', layers: Sequence[str] = (), pool: str = 'none',
                      probabilities: bool = True) -> Callable:
  """``(params, batch_stats, batch) → {'probs', layer..., 'label'}`` for one device's share of
  the batch. ``probs``: the softmax over the classes in float32, averaged over the views of an
  example (``batch['image']`` ``(b, views, H, W, 3)``); each layer's activations, pooled
  (``_pooled``) and averaged over the views likewise."""
  del pca_basis  # colour shifts are a training augmentation (a Program's norm carries it)
  if pool not in POOLS:
    raise ConfigError(f'unknown pooling {pool!r}; choose one of {", ".join(POOLS)}')
  norm = dict(mean_rgb=mean_rgb, std_rgb=std_rgb, mean_image=mean_image,
              channel_order=channel_order)
  layers = tuple(layers)

  def outputs_step(params, batch_stats, batch):
    batch = dict(batch)
    b = batch['label'].shape[0]
    views = batch['image'].shape[1] if batch['image'].ndim == 5 else 1
    if views > 1:  # views of one example stay adjacent
      batch['image'] = batch['image'].reshape(-1, *batch['image'].shape[2:])
      if 'crop' in batch:
        batch['crop'] = batch['crop'].reshape(-1, 3)
    images = steps.normalize_batch(batch, norm, compute_dtype, train=False)
    model = nnx.merge(graphdef, params, batch_stats)
    out = model(images, train=False, exchange=ctx, gather_logits=True, capture=bool(layers))
    result = dict(label=batch['label'])
    if probabilities:
      probs = jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1)
      result['probs'] = probs.reshape(b, views, -1).mean(axis=1)
    for layer in layers:
      x = _pooled(_whole(out.activations[layer], ctx, b * views), pool).astype(jnp.float32)
      result[layer] = x.reshape(b, views, -1).mean(axis=1)
    return result

  return outputs_step


@dataclasses.dataclass(frozen=True)
class Pass:
  """What one pass computes: the views of each example, the layers and their pooling, the
  softmax."""
  views: str = 'center'
  layers: tuple[str, ...] = ()
  pool: str = 'none'
  probabilities: bool = True
  # Resize the shorter side to this before the views are cut (default: the config's resize_to).
  resize_to: int | None = None
  # VGG's descriptor (Simonyan & Zisserman, Appendix B): the views at each of these shorter-side
  # scales, all averaged (``MultiScaleViews``); empty: the views at one scale.
  scales: tuple[int, ...] = ()


class MultiScaleViews(grain.transforms.Map):
  """The ``views`` (``'ten'``: corners, centre and their reflections) of an image rescaled so its
  shorter side is each of ``scales`` in turn (the centre square of it, as at one scale): image
  ``(len(scales) * views, crop, crop, 3)``. The crops of other scales than the mean image's do
  not match its windows, so the mean image is subtracted as its central window from all."""

  def __init__(self, crop_size: int, scales: Sequence[int], views: str = 'ten'):
    self.crop_size, self.scales, self.views = int(crop_size), tuple(scales), views
    for q in self.scales:
      if q < self.crop_size:
        raise ConfigError(f'descriptor scale {q} is smaller than the {self.crop_size}px input: '
                          f'every scale must be at least {self.crop_size}')

  def map(self, element):
    crops = []
    for q in self.scales:
      image = augment.fit_for_crop(element['image'], self.crop_size, q)
      for t, l, f in augment.view_windows(*image.shape[:2], self.crop_size, self.views):
        crops.append(augment.crop_flip(image, t, l, self.crop_size, f))
    return dict(image=np.stack(crops), label=np.int32(element['label']), crop=np.zeros(
        (len(crops), 3), np.int32), mask=np.float32(1.0))


def compile_pass(trained: Trained, what: Pass) -> Callable:
  """The jitted program of ``what`` for ``trained``'s network on its mesh."""
  prog = trained.program
  check_layers(prog.model, what.layers)
  step = make_outputs_step(prog.graphdef, sharding.MeshContext(), layers=what.layers,
                           pool=what.pool, probabilities=what.probabilities, **prog.norm)
  stats_specs = prog.state_specs.batch_stats
  fn = sharding.shard_step(step, prog.mesh,
                           in_specs=(prog.state_specs.params, stats_specs, P(sharding.DATA)),
                           out_specs=P(sharding.DATA), gathered=True)
  return jax.jit(fn)


def _to_host(tree):
  """Every row of the global arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def passes(trained: Trained, source, what: Pass, *, batch_size: int | None = None,
           workers: int | None = None, compiled: Callable | None = None,
           timing: dict | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """``(first index, outputs)`` per global batch of ``source`` in order, the padding of the last
  batch dropped: ``outputs`` holds ``probs`` (N, classes), ``label`` (N,) and each layer's (N, d)
  float32 rows, on every process. ``compiled``: ``compile_pass(trained, what)`` shared between
  passes. ``timing``: gets ``compile_seconds``, the time the program took to compile (before the
  first batch, apart from it), which a rate of images/s leaves out."""
  config = trained.config
  mesh = trained.mesh
  if batch_size is None:
    batch_size = int(config.eval_batch_size)
    # eval_batch_size images a step, whatever the views of each example: ten views of 500
    # examples take 16 GB on a CPU, mostly the convolutions' buffers.
    views = (10 if what.views == 'ten' else 1) * max(1, len(what.scales))
    if views > 1:
      shards = mesh.shape[sharding.DATA]
      batch_size = max(shards, batch_size // views // shards * shards)
  sharding.check_batch(batch_size, mesh, 'eval_batch_size')
  fn = compiled or compile_pass(trained, what)
  size = config.model.image_size
  transform = MultiScaleViews(size, what.scales, what.views) if what.scales else None
  ds = pipeline.eval_dataset(source, global_batch_size=batch_size, crop_size=size,
                             shards=mesh.shape[sharding.DATA],
                             host_shards=sharding.host_shards(mesh),
                             workers=config.input.workers if workers is None else workers,
                             resize_to=what.resize_to or config.input.resize_to, views=what.views,
                             transform=transform)
  # Without crop positions the mean image is subtracted as its central window (MultiScaleViews).
  keys = ('image', 'label') if what.scales else ('image', 'label', 'crop')
  n = len(source)
  in_flight = None
  for i, batch in enumerate(ds):
    batch = {k: batch[k] for k in keys if k in batch}
    args = (trained.params, trained.batch_stats, sharding.put_batch(batch, mesh))
    if i == 0 and hasattr(fn, 'lower'):  # jit's cache: nothing is compiled twice
      start = time.perf_counter()
      fn = fn.lower(*args).compile()
      if timing is not None:
        timing['compile_seconds'] = time.perf_counter() - start
    out = fn(*args)
    if in_flight is not None:
      yield _finished(*in_flight, n, batch_size)
    in_flight = (i, out)
  if in_flight is not None:
    yield _finished(*in_flight, n, batch_size)


def _finished(i: int, out, n: int, batch_size: int) -> tuple[int, dict[str, np.ndarray]]:
  start = i * batch_size
  valid = max(0, min(batch_size, n - start))
  host = _to_host(out)
  return start, {k: np.asarray(v[:valid]) for k, v in host.items()}


def collect(trained: Trained, source, what: Pass, **kwargs) -> dict[str, np.ndarray]:
  """Every output of ``passes`` for the whole split, concatenated."""
  parts = [out for _, out in passes(trained, source, what, **kwargs)]
  if not parts:
    raise ConfigError(f'{source!r} holds no example')
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
