"""The per-device training and evaluation programs (pure functions, run under ``shard_map``).

Logits stay split between the towers: each device holds its towers' share of the classes, and the
softmax cross-entropy and the top-k ranks are assembled with two scalar-per-example reductions over
the model axis instead of gathering the logits (the loss's only model-axis collectives).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from alexnet_jax.sharding import MeshContext


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser updates done
  params: Any  # pure dict of arrays
  opt_state: Any
  # The key's raw uint32 data (portable in checkpoints); the step wraps it into a typed key and
  # folds the step number and the device into it for dropout.
  rng: jax.Array
  # Running averages of batch norm (``nnx.BatchStat``), a pure dict; empty for models without BN.
  batch_stats: Any = struct.field(default_factory=dict)


def normalize(images: jax.Array, mean_rgb, std_rgb, dtype, *, mean_image=None, crop=None,
              alpha=None, pca_basis=None, channel_order: str = 'rgb') -> jax.Array:
  """uint8 NHWC → ``dtype``, normalised on the device (the host ships uint8: 4× less traffic).

  ``(image + PCA shift − mean) / std_rgb`` where the mean is ``mean_rgb``, or with ``mean_image``
  (S, S, 3) the window of it each crop came from: ``crop`` (N, 3) = (top, left, flipped) as the
  host pipeline reports it (``data.augment``); without ``crop`` the central window. The PCA
  shift is ``pca_basis @ alpha`` per image (``pca_basis``: eigenvectors as columns scaled by the
  square roots of the eigenvalues; ``alpha`` (N, 3)), added to every pixel. ``channel_order``
  'bgr' then reverses the channels, for networks that read B, G, R (``config.input``).
  """
  x = images.astype(jnp.float32)
  if pca_basis is not None and alpha is not None:
    shift = alpha.astype(jnp.float32) @ jnp.asarray(pca_basis, jnp.float32).T  # (N, 3)
    x = x + shift[:, None, None, :]
  if mean_image is None:
    x = x - jnp.asarray(mean_rgb, jnp.float32)
  else:
    x = x - mean_windows(jnp.asarray(mean_image, jnp.float32), crop, images.shape[0],
                         images.shape[1])
  inv_std = 1.0 / jnp.asarray(std_rgb, jnp.float32)
  x = x * inv_std
  if channel_order == 'bgr':
    x = x[..., ::-1]
  return x.astype(dtype)


def mean_windows(mean_image: jax.Array, crop, n: int, size: int) -> jax.Array:
  """The (n, size, size, 3) windows of the mean image matching each crop (reflected alike)."""
  if crop is None:
    top = (mean_image.shape[0] - size) // 2
    left = (mean_image.shape[1] - size) // 2
    return jnp.broadcast_to(mean_image[top:top + size, left:left + size], (n, size, size, 3))

  def one(c):
    window = jax.lax.dynamic_slice(mean_image, (c[0], c[1], 0), (size, size, 3))
    return jnp.where(c[2] > 0, window[:, ::-1], window)

  return jax.vmap(one)(crop.astype(jnp.int32))


def _tower_log_normalizer(logits: jax.Array, ctx: MeshContext) -> jax.Array:
  """log Σ exp over all classes of ``(local_towers, batch, classes_per_tower)`` float32 logits,
  assembled over the towers (a max and a sum across them); ``(batch,)``."""
  shift = ctx.tower_max(jnp.max(jax.lax.stop_gradient(logits), axis=(0, 2)))
  sum_exp = ctx.tower_sum(jnp.sum(jnp.exp(logits - shift[None, :, None]), axis=(0, 2)))
  return jnp.log(sum_exp) + shift


def _tower_label_mask(shape, labels: jax.Array, ctx: MeshContext) -> jax.Array:
  """``(local_towers, batch, classes_per_tower)`` booleans: where this device's classes are the
  labels."""
  local_towers, _, per_tower = shape
  tower_ids = ctx.first_tower(local_towers) + jnp.arange(local_towers)
  class_ids = tower_ids[:, None] * per_tower + jnp.arange(per_tower)[None, :]  # (towers, per_tower)
  return class_ids[:, None, :] == labels[None, :, None]


def tower_split_cross_entropy(logits: jax.Array, labels: jax.Array, ctx: MeshContext):
  """Softmax cross-entropy and the label's rank from logits split over towers.

  ``logits``: ``(local_towers, batch, classes_per_tower)``, this device's towers' classes.
  Returns ``(cross_entropy, rank)`` per example; rank 0 means top-1 correct, < 5 top-5 correct.
  """
  logits = logits.astype(jnp.float32)
  with jax.named_scope('loss'):
    log_z = _tower_log_normalizer(logits, ctx)
    is_label = _tower_label_mask(logits.shape, labels, ctx)
    label_logit = ctx.tower_sum(jnp.sum(jnp.where(is_label, logits, 0.0), axis=(0, 2)))
    above = jax.lax.stop_gradient(logits) > jax.lax.stop_gradient(label_logit)[None, :, None]
    rank = ctx.tower_sum(_count_with_non_finite(above, logits))
  return log_z - label_logit, rank


# The rank given to an example with a NaN or infinite score: beyond any top-k, so it counts as an
# error in every metric (a NaN compares False with everything and would otherwise rank first).
NON_FINITE_RANK = 1 << 20


def _count_with_non_finite(above: jax.Array, scores: jax.Array) -> jax.Array:
  """Per example, the classes of this device's towers above the label, plus ``NON_FINITE_RANK``
  where any of its scores is not finite; summed over the towers by the caller, in the same
  reduction."""
  count = jnp.sum(above, axis=(0, 2), dtype=jnp.int32)
  bad = jnp.any(~jnp.isfinite(jax.lax.stop_gradient(scores)), axis=(0, 2))
  return count + NON_FINITE_RANK * bad.astype(jnp.int32)


def tower_split_view_average(logits: jax.Array, labels: jax.Array, ctx: MeshContext, views: int):
  """Cross-entropy and rank of the softmax averaged over ``views`` views of every example.

  ``logits``: ``(local_towers, batch * views, classes_per_tower)``, views of an example adjacent.
  Each view's log-normaliser is assembled over the towers as in ``tower_split_cross_entropy``;
  the probabilities are averaged per tower slice (no more communication), then the label's
  averaged probability and the number of classes above it are summed over the towers.
  """
  local_towers, n, per_tower = logits.shape
  logits = logits.astype(jnp.float32)
  with jax.named_scope('loss'):
    probs = jnp.exp(logits - _tower_log_normalizer(logits, ctx)[None, :, None])
    probs = probs.reshape(local_towers, n // views, views, per_tower).mean(axis=2)
    is_label = _tower_label_mask(probs.shape, labels, ctx)
    label_prob = ctx.tower_sum(jnp.sum(jnp.where(is_label, probs, 0.0), axis=(0, 2)))
    rank = ctx.tower_sum(_count_with_non_finite(probs > label_prob[None, :, None], probs))
  return -jnp.log(jnp.maximum(label_prob, jnp.finfo(jnp.float32).tiny)), rank


def normalize_batch(batch, norm: dict, dtype, *, train: bool) -> jax.Array:
  images = batch['image']
  return normalize(images, norm['mean_rgb'], norm['std_rgb'], dtype,
                   mean_image=norm.get('mean_image'), crop=batch.get('crop'),
                   alpha=batch.get('alpha') if train else None, pca_basis=norm.get('pca_basis'),
                   channel_order=norm.get('channel_order', 'rgb'))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, ctx: MeshContext, *,
                    mean_rgb, std_rgb, compute_dtype=jnp.float32, mean_image=None, pca_basis=None,
                    channel_order: str = 'rgb', aux_loss_weight: float = 0.0) -> Callable:
  """``(state, batch) → (state, metrics)`` for one device's share of the batch.

  ``mean_image`` / ``pca_basis`` switch on the paper's mean-image subtraction and PCA colour
  shift (see ``normalize``); the batch then carries ``crop`` / ``alpha``. ``aux_loss_weight``: the
  model's (``Classifier.aux_loss_weight``); > 0 adds its auxiliary classifiers' losses to the
  objective, which the metrics then report beside the loss."""
  norm = dict(mean_rgb=mean_rgb, std_rgb=std_rgb, mean_image=mean_image, pca_basis=pca_basis,
              channel_order=channel_order)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    images = normalize_batch(batch, norm, compute_dtype, train=True)
    labels = batch['label']
    global_batch = labels.shape[0] * jax.lax.axis_size(ctx.data_axis)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_key = ctx.device_key(step_key)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats)
      out = model(images, train=True, dropout_key=dropout_key, exchange=ctx, gather_logits=False)
      ce, rank = tower_split_cross_entropy(out.logits, labels, ctx)
      loss = jnp.sum(ce) / global_batch
      objective = loss
      for aux in out.aux_logits:
        aux_ce, _ = tower_split_cross_entropy(aux, labels, ctx)
        objective += aux_loss_weight * jnp.sum(aux_ce) / global_batch
      batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return objective, (loss, rank, batch_stats)

    # Parameters are replicated over the data axis, so the gradient of this device's share of the
    # mean loss arrives already summed over the data axis (the transpose of that replication).
    (objective, (loss, rank, batch_stats)), grads = jax.value_and_grad(loss_fn,
                                                                       has_aux=True)(state.params)
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    with jax.named_scope('metrics'):
      hp = state.opt_state.hyperparams
      metrics = ctx.data_sum(
          dict(loss=loss, top1_error=jnp.sum(rank >= 1) / global_batch,
               top5_error=jnp.sum(rank >= 5) / global_batch))
      if aux_loss_weight > 0:
        metrics['objective'] = ctx.data_sum(
            objective)  # the loss plus the weighted auxiliary losses
      metrics['learning_rate'] = hp['learning_rate'] * hp['lr_scale']
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, ctx: MeshContext, *, mean_rgb, std_rgb,
                   compute_dtype=jnp.float32, mean_image=None, pca_basis=None,
                   channel_order: str = 'rgb') -> Callable:
  """``(params, batch_stats, batch) → sums`` of loss, top-1 / top-5 mistakes and examples over the
  global batch; ``batch['mask']`` marks the padding of a last, partial batch. Batch norm uses the
  running averages ``batch_stats``; auxiliary classifiers are not run. Images
  ``(batch, views, H, W, 3)`` (the paper's 10 views) are classified by their softmax averaged over
  the views."""
  del pca_basis  # colour shifts are a training augmentation
  norm = dict(mean_rgb=mean_rgb, std_rgb=std_rgb, mean_image=mean_image,
              channel_order=channel_order)

  def eval_step(params, batch_stats, batch: dict[str, jax.Array]):
    views = batch['image'].shape[1] if batch['image'].ndim == 5 else 1
    if views > 1:  # fold the views into the batch: views of one example stay adjacent
      batch = dict(batch, image=batch['image'].reshape(-1, *batch['image'].shape[2:]))
      if 'crop' in batch:
        batch['crop'] = batch['crop'].reshape(-1, 3)
    images = normalize_batch(batch, norm, compute_dtype, train=False)
    mask = batch['mask'].astype(jnp.float32)
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(images, train=False, exchange=ctx, gather_logits=False).logits
    if views > 1:
      ce, rank = tower_split_view_average(logits, batch['label'], ctx, views)
    else:
      ce, rank = tower_split_cross_entropy(logits, batch['label'], ctx)
    with jax.named_scope('metrics'):
      return ctx.data_sum(
          dict(loss=jnp.sum(ce * mask), top1_errors=jnp.sum((rank >= 1) * mask),
               top5_errors=jnp.sum((rank >= 5) * mask), count=jnp.sum(mask)))

  return eval_step
