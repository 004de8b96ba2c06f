"""The training loop: config → mesh → data → program → restore → train / evaluate / checkpoint.

What else happens at the end of an epoch (the visualisation snapshots, say) is a hook the caller
hands in: ``train_and_evaluate(config, workdir, hooks=[...])``, each called with an ``EpochEnd``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from alexnet_jax import checkpointing, configs, distributed, optim, preemption, sharding, warm_start
from alexnet_jax import metrics as metrics_lib
from alexnet_jax import program as program_lib
from alexnet_jax.data import inputs as inputs_lib
from alexnet_jax.data import pipeline
from alexnet_jax.errors import CheckpointError, ConfigError, DivergedError


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


@dataclasses.dataclass(frozen=True)
class EpochEnd:
  """What an end-of-epoch hook sees: the run after ``epoch`` epochs (``step`` steps), its program,
  state and data, and the run's metric writer (for images and scalars of its own)."""
  config: Any
  workdir: str
  epoch: int
  step: int
  program: program_lib.Program
  state: Any
  inputs: inputs_lib.Inputs
  writer: metrics_lib.MetricWriter


Hook = Callable[[EpochEnd], None]


def _mean(history: list[dict[str, float]]) -> dict[str, float]:
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def _check_finite(history: list[dict[str, float]], first_step: int, config, manager) -> None:
  """Raises ``DivergedError`` at the first step of ``history`` (host values of steps
  ``first_step``, ``first_step + 1``, …) whose loss is NaN or infinite."""
  for i, h in enumerate(history):
    if not np.isfinite(h['loss']):
      raise _diverged(first_step + i, 'the training loss is ' + str(h['loss']), config, manager)


def _diverged(step: int, what: str, config, manager) -> DivergedError:
  checkpointing.wait(manager)
  kept = manager.latest_step()
  kept = (f'checkpoint {kept} is intact and a rerun resumes from it'
          if kept is not None else 'no checkpoint had been saved')
  lr = float(config.optim.learning_rate)
  hints = [f'a lower --config.optim.learning_rate (it is {lr:g}; try {lr / 10:g})']
  if not config.optim.warmup_epochs:
    hints.append('a warm-up (--config.optim.warmup_epochs=1)')
  if config.compute_dtype != 'float32':
    hints.append('--config.compute_dtype=float32')
  return DivergedError(f'training diverged at step {step}: {what}; nothing from that step on was '
                       f'saved ({kept}); try {" or ".join(hints)}')


def _data_identity(config, num_examples: int) -> dict[str, int]:
  """What a checkpoint's data position is a position in: saved with it, compared on resume."""
  return dict(batch_size=int(config.batch_size), seed=int(config.seed), examples=int(num_examples))


def _check_data_position(meta: dict, config, num_examples: int) -> None:
  """A checkpoint's data position carries over to any process count and mesh, but not to another
  batch size, seed or training set: refuses those with what to do instead."""
  data = meta.get('data')
  if data is None:  # written before positions were recorded
    return
  step = meta.get('step')
  why = dict(
      batch_size=('its steps, epochs and learning-rate schedule count batches of that size',
                  f'--config.batch_size={data["batch_size"]}'),
      seed=('the order of the examples is drawn from the seed', f'--config.seed={data["seed"]}'),
      examples=('the order of the examples is a permutation of that many',
                'the training set it was trained on'))
  now = _data_identity(config, num_examples)
  for key, (reason, fix) in why.items():
    if int(data[key]) != now[key]:
      raise ConfigError(
          f'the checkpoint at step {step} was trained with {key}={data[key]} and this run has '
          f'{key}={now[key]}: {reason}, so its position in the data cannot be carried over; '
          f'resume with {fix}, or use a new --workdir')


def train_and_evaluate(config, workdir: str, hooks: Sequence[Hook] = ()) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its newest intact checkpoint) and returns the
  final validation metrics. ``hooks`` run after every epoch, before its checkpoint is saved.

  Raises:
    DivergedError: the loss or the parameters became NaN or inf (no such state is saved).
    preemption.Preempted: SIGTERM or SIGINT arrived; a checkpoint was saved at the next step.
  """
  configs.check_fields(config)
  mesh = program_lib.make_mesh(config)
  logging.info('%s', distributed.describe_layout(mesh))
  program_lib.check_batch(config, mesh)
  program_lib.check_batch(config, mesh, 'eval_batch_size')
  data = inputs_lib.open_inputs(config)
  steps_per_epoch = pipeline.steps_per_epoch(len(data.train_source), config.batch_size)
  total_steps = int(config.num_epochs * steps_per_epoch)
  prog = program_lib.build_program(config, steps_per_epoch=steps_per_epoch, mesh=mesh,
                                   input_stats=data.stats)
  logging.info('mesh %s, %s parameters, %d steps per epoch, %d steps', dict(mesh.shape),
               f'{prog.param_count:,}', steps_per_epoch, total_steps)

  # The workdir, a local path or a gs:// URL (alexnet_jax.storage), is created where it is local
  # by what writes into it: the checkpoint manager (with its parents) and the metric writer.
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), config.checkpoint,
                                       steps_per_epoch)
  try:
    val = _train(config, workdir, hooks, data, prog, manager, steps_per_epoch, total_steps)
    checkpointing.wait(manager)
    return val
  except BaseException:
    try:  # a save in flight is finished, whatever ended the run; what ended it is reported
      checkpointing.wait(manager)
    except CheckpointError as e:
      logging.warning('%s', e)
    raise
  finally:
    manager.close()


def _train(config, workdir, hooks, data, prog, manager, steps_per_epoch: int,
           total_steps: int) -> dict[str, float]:
  keep_epochs = set(config.checkpoint.keep_epochs)
  plateau = optim.PlateauController(factor=config.optim.plateau_factor,
                                    patience=config.optim.plateau_patience,
                                    threshold=config.optim.plateau_threshold,
                                    max_drops=config.optim.max_drops)
  restored = checkpointing.restore_latest(manager, prog.abstract_state)
  if restored is None:
    # A new run: from another run's weights where config.init names a checkpoint (fine-tuning);
    # a run resuming from its own checkpoints never reads that one again.
    state, started = warm_start.warm_start(config, prog, prog.init_state())
    if started is not None:
      logging.info('%s', started.line())
    val = {}
  else:
    _check_data_position(restored.meta, config, len(data.train_source))
    state = restored.state
    plateau.load_state_dict(restored.meta['plateau'])
    val = restored.meta.get('val', {})
  step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if step >= total_steps:
    logging.info('already trained for %d steps', step)
  # Iterated afresh at every evaluation.
  eval_ds = inputs_lib.eval_batches(config, data.eval_source, prog.mesh)
  train_iter = inputs_lib.train_batches(config, data.train_source, prog.mesh, start_step=step)
  data_position = _data_identity(config, len(data.train_source))

  def save(epoch: float, metrics=None) -> None:
    # The config goes with every checkpoint: the commands that use a trained network
    # (evaluate, features, transfer, visualize) read it instead of asking for the training flags.
    meta = dict(epoch=epoch, step=step, plateau=plateau.state_dict(), val=val,
                data=dict(data_position, position=step), config=configs.to_dict(config))
    try:
      checkpointing.save(manager, step, state, meta, metrics=metrics)
    except checkpointing.NonFiniteState as e:
      raise _diverged(step, str(e), config, manager) from None

  history: list[dict[str, Any]] = []
  window_start, window_step = time.perf_counter(), step
  run_start, run_start_step = window_start, step
  try:
    with preemption.StopSignals() as stop:
      while step < total_steps:
        state, step_metrics = prog.train_step(state, next(train_iter))
        history.append(step_metrics)
        step += 1
        epoch = step / steps_per_epoch
        saved = False
        if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
          window_start, window_step = _log_window(history, step, total_steps, epoch, config,
                                                  manager, writer, window_start, window_step,
                                                  run_start, run_start_step)
          history = []
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
          for hook in hooks:
            hook(
                EpochEnd(config=config, workdir=workdir, epoch=epoch_done, step=step, program=prog,
                         state=state, inputs=data, writer=writer))
          if (epoch_done % config.checkpoint.every_epochs == 0 or epoch_done in keep_epochs or
              last):
            save(epoch_done, {checkpointing.BEST_METRIC: val['top1_error']} if val else None)
            saved = True
          window_start = time.perf_counter()  # evaluation and saving are not training throughput
        if stop.requested(step):
          stop.saving()
          if not saved:
            _check_finite(jax.device_get(history), step - len(history) + 1, config, manager)
            save(epoch)
          checkpointing.wait(manager)
          raise preemption.Preempted(step, stop.signal_name)
  except BaseException:
    # What ended the run (a stop, a divergence, a bug) is what it reports: an upload of the
    # metrics that fails on the way out is logged (the writer keeps them), not raised over it.
    train_iter.close()
    try:
      writer.close()
    except OSError as e:  # the storage (a full disk, say), which the report names already
      logging.warning('the metrics could not be written on the way out: %s', e)
    except Exception:  # noqa: BLE001
      logging.exception('the metrics could not be written on the way out')
    raise
  train_iter.close()  # its worker processes and their shared-memory buffers
  writer.close()
  if not val:
    val = evaluate(prog, state, eval_ds)
  if jax.process_index() == 0:
    metrics_lib.plot_training_curves(workdir)
  return val


def _log_window(history, step, total_steps, epoch, config, manager, writer, window_start,
                window_step, run_start, run_start_step):
  """Fetches the window's step metrics (the loop's only host sync), checks them and logs their
  mean; returns the next window's start time and step."""
  history = jax.device_get(history)  # waits for the step
  _check_finite(history, step - len(history) + 1, config, manager)
  train_metrics = _mean(history)
  now = time.perf_counter()
  images_per_s = (step - window_step) * config.batch_size / (now - window_start)
  train_metrics['images_per_second'] = images_per_s
  eta = (total_steps - step) * (now - run_start) / max(step - run_start_step, 1)
  logging.info(
      'step %d/%d  epoch %.2f  loss %.4f  top-1 err %.4f  top-5 err %.4f  lr %.3g  '
      '%.1f img/s  ETA %s', step, total_steps, epoch, train_metrics['loss'],
      train_metrics['top1_error'], train_metrics['top5_error'], train_metrics['learning_rate'],
      images_per_s, _hms(eta))
  writer.write(step, 'train', dict(epoch=epoch, **train_metrics))
  return time.perf_counter(), step


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
