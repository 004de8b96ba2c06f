"""The training loop: config → mesh → data → program → restore → train / evaluate / checkpoint."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from alexnet_jax import checkpointing, metrics as metrics_lib, optim, program as program_lib, sharding
from alexnet_jax.data import pipeline, sources, statistics


def evaluate(prog: program_lib.Program, state, eval_ds) -> dict[str, float]:
  """Loss and top-1 / top-5 error of ``state``'s parameters (and batch-norm statistics) over one
  pass of ``eval_ds`` (its views, padded batches)."""
  totals = None
  for batch in eval_ds:
    out = prog.eval_step(state.params, state.batch_stats, sharding.put_batch(batch, prog.mesh))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  totals = jax.device_get(totals)
  n = max(float(totals['count']), 1.0)
  return dict(loss=float(totals['loss']) / n, top1_error=float(totals['top1_errors']) / n,
              top5_error=float(totals['top5_errors']) / n, examples=n)


def input_statistics(config, train_source):
  """The training set's mean image and RGB PCA when ``config.input`` asks for them (computed in one
  pass and stored beside the data set on first use), else None."""
  inp = config.input
  if not inp.get('mean_image', False) and inp.get('pca_lighting_std', 0.0) <= 0:
    return None
  side = inp.get('resize_to') or train_source.info.image_size
  if side is None:
    raise ValueError(f'data set {config.dataset.name!r} has images of different sizes, so the mean '
                     'image needs them rescaled: set --config.input.resize_to=256 (the paper), or '
                     '--config.input.mean_image=False --config.input.pca_lighting_std=0')
  if side < config.model.image_size:
    raise ValueError(f'images are {side}px, smaller than the {config.model.image_size}px crops: set '
                     f'--config.input.resize_to to at least {config.model.image_size}')
  return statistics.ensure(train_source, side, progress=jax.process_index() == 0,
                           workers=inp.workers)


def train_batches(config, train_source, mesh) -> pipeline.DevicePrefetch:
  """This process's training batches with ``config.input``'s augmentation, arriving on ``mesh``
  ``prefetch_batches`` ahead of the step; its checkpoint records the position of the next batch
  the step will see."""
  inp = config.input
  return pipeline.DevicePrefetch(iter(pipeline.train_dataset(
      train_source, global_batch_size=config.batch_size, crop_size=config.model.image_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      workers=inp.workers, resize_to=inp.get('resize_to'), random_crop=inp.get('random_crop', True),
      flip=inp.get('flip', True), pca_std=inp.get('pca_lighting_std', 0.0),
      worker_priority=inp.get('worker_priority', 'normal'))),
      put=lambda b: sharding.put_batch(b, mesh), size=inp.get('prefetch_batches', 2))


def _check_data(config, train_source) -> None:
  classes = train_source.num_classes
  if classes != config.model.num_classes:
    raise ValueError(f'data set {config.dataset.name!r} has {classes} classes but '
                     f'model.num_classes={config.model.num_classes}; set '
                     f'--config.model.num_classes={classes}')
  if len(train_source) < config.batch_size:
    raise ValueError(f'the training split has {len(train_source)} examples, fewer than one batch '
                     f'of {config.batch_size}; lower --config.batch_size')


def _mean(history: list[dict[str, Any]]) -> dict[str, float]:
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final
  validation metrics."""
  towers = config.model.get('towers', 1)
  mesh = sharding.make_mesh(config.mesh, towers=towers)
  hybrid = bool(config.model.get('hybrid'))
  sharding.check_batch(config.batch_size, mesh, split_over_model=hybrid)
  sharding.check_batch(config.eval_batch_size, mesh, 'eval_batch_size', split_over_model=hybrid)
  inp = config.input
  resize_to = inp.get('resize_to')
  train_source = sources.open_source(config.dataset, config.dataset.train_split, min_side=resize_to)
  eval_source = sources.open_source(config.dataset, config.dataset.eval_split, min_side=resize_to)
  _check_data(config, train_source)
  stats = input_statistics(config, train_source)
  steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
  total_steps = int(config.num_epochs * steps_per_epoch)
  prog = program_lib.build_program(config, steps_per_epoch=steps_per_epoch, mesh=mesh,
                                   input_stats=stats)
  logging.info('mesh %s, %s parameters, %d steps per epoch, %d steps',
               dict(mesh.shape), f'{prog.param_count:,}', steps_per_epoch, total_steps)

  eval_ds = pipeline.eval_dataset(  # iterated afresh at every evaluation
      eval_source, global_batch_size=config.eval_batch_size, crop_size=config.model.image_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      workers=inp.workers, resize_to=resize_to, views=inp.get('eval_views', 'center'))
  train_iter = train_batches(config, train_source, mesh)

  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), config.checkpoint,
                                       steps_per_epoch)
  keep_epochs = set(config.checkpoint.get('keep_epochs', ()) or ())
  plateau = optim.PlateauController(
      factor=config.optim.plateau_factor, patience=config.optim.plateau_patience,
      threshold=config.optim.plateau_threshold, max_drops=config.optim.max_drops)
  restored = checkpointing.restore_latest(manager, prog.abstract_state, train_iter)
  if restored is None:
    state = prog.init_state()
    val = {}
  else:
    state = restored.state
    plateau.load_state_dict(restored.meta['plateau'])
    val = restored.meta.get('val', {})
  step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if step >= total_steps:
    logging.info('already trained for %d steps', step)

  # Checkpoint metadata: read when called, so it carries the loop's current step and metrics.
  meta = lambda epoch: dict(epoch=epoch, step=step, plateau=plateau.state_dict(), val=val)
  history: list[dict[str, Any]] = []
  window_start, window_step = time.perf_counter(), step
  run_start, run_start_step = window_start, step
  while step < total_steps:
    state, step_metrics = prog.train_step(state, next(train_iter))
    history.append(step_metrics)
    step += 1
    epoch = step / steps_per_epoch
    if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
      train_metrics = _mean(history)  # waits for the step: the only host sync of the loop
      history = []
      now = time.perf_counter()
      images_per_s = (step - window_step) * config.batch_size / (now - window_start)
      train_metrics['images_per_second'] = images_per_s
      eta = (total_steps - step) * (now - run_start) / max(step - run_start_step, 1)
      logging.info('step %d/%d  epoch %.2f  loss %.4f  top-1 err %.4f  top-5 err %.4f  lr %.3g  '
                   '%.1f img/s  ETA %s', step, total_steps, epoch, train_metrics['loss'],
                   train_metrics['top1_error'], train_metrics['top5_error'],
                   train_metrics['learning_rate'], images_per_s, _hms(eta))
      writer.write(step, 'train', dict(epoch=epoch, **train_metrics))
      window_start, window_step = time.perf_counter(), step
    if step % steps_per_epoch == 0:
      epoch_done = step // steps_per_epoch
      last = step == total_steps
      if epoch_done % config.eval_every_epochs == 0 or last:
        val = evaluate(prog, state, eval_ds)
        logging.info('epoch %d  validation: loss %.4f  top-1 error %.4f  top-5 error %.4f',
                     epoch_done, val['loss'], val['top1_error'], val['top5_error'])
        writer.write(step, 'val', dict(epoch=epoch_done, **val))
        if config.optim.schedule == 'plateau' and plateau.update(val['top1_error']):
          logging.info('validation error stopped improving: learning rate x %.3g',
                       plateau.scale)
          state = state.replace(opt_state=optim.with_lr_scale(state.opt_state, plateau.scale))
      every = config.get('visualize', {}).get('every_epochs', 0)
      if every and epoch_done % every == 0 and jax.process_count() == 1:
        _visualize(config, prog, state, eval_source, workdir, epoch_done, writer, step, stats)
      if (epoch_done % config.checkpoint.every_epochs == 0 or epoch_done in keep_epochs or last
          or manager.reached_preemption(step)):
        metrics = {checkpointing.BEST_METRIC: val['top1_error']} if val else None
        checkpointing.save(manager, step, state, train_iter, meta(epoch_done), metrics=metrics)
      window_start = time.perf_counter()  # evaluation and saving are not training throughput
    elif manager.reached_preemption(step):
      checkpointing.save(manager, step, state, train_iter, meta(epoch))
      manager.wait_until_finished()
      raise SystemExit(f'preempted: checkpoint saved at step {step}')

  train_iter.close()  # its worker processes and their shared-memory buffers
  manager.wait_until_finished()
  manager.close()
  writer.close()
  if not val:
    val = evaluate(prog, state, eval_ds)
  if jax.process_index() == 0:
    metrics_lib.plot_training_curves(workdir)
  return val


def _visualize(config, prog, state, eval_source, workdir, epoch, writer, step, stats) -> None:
  """First-layer filters and a few deconvnet projections, to watch the features form. ``stats``:
  the input statistics the steps normalise with (their mean image, if the config subtracts it)."""
  from alexnet_jax.visualize import commands, loading  # pylint: disable=g-import-not-at-top
  crop = pipeline.EvalTransform(config.model.image_size)
  count = min(int(config.visualize.images), len(eval_source))
  images = np.stack([crop.map(eval_source[i])['image'] for i in range(count)])
  mean_image = stats.mean_image if stats is not None and config.input.get('mean_image') else None
  net = loading.network_from_state(config, prog.graphdef, state, step=step, epoch=epoch,
                                   mean_image=mean_image)
  pictures = commands.training_snapshot(net, images, os.path.join(workdir, 'visualize'), epoch)
  for name, picture in pictures.items():
    writer.image(step, f'visualize/{name}', picture)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
