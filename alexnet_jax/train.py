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

from alexnet_jax import checkpointing, configs, optim, sharding
from alexnet_jax import metrics as metrics_lib
from alexnet_jax import program as program_lib
from alexnet_jax.data import inputs as inputs_lib
from alexnet_jax.data import pipeline


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


def _mean(history: list[dict[str, Any]]) -> dict[str, float]:
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def train_and_evaluate(config, workdir: str, hooks: Sequence[Hook] = ()) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final
  validation metrics. ``hooks`` run after every epoch, before its checkpoint is saved."""
  configs.check_fields(config)
  mesh = program_lib.make_mesh(config)
  program_lib.check_batch(config, mesh)
  program_lib.check_batch(config, mesh, 'eval_batch_size')
  data = inputs_lib.open_inputs(config)
  steps_per_epoch = pipeline.steps_per_epoch(len(data.train_source), config.batch_size)
  total_steps = int(config.num_epochs * steps_per_epoch)
  prog = program_lib.build_program(config, steps_per_epoch=steps_per_epoch, mesh=mesh,
                                   input_stats=data.stats)
  logging.info('mesh %s, %s parameters, %d steps per epoch, %d steps', dict(mesh.shape),
               f'{prog.param_count:,}', steps_per_epoch, total_steps)

  eval_ds = inputs_lib.eval_batches(config, data.eval_source)  # iterated afresh at every evaluation
  train_iter = inputs_lib.train_batches(config, data.train_source, mesh)

  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), config.checkpoint,
                                       steps_per_epoch)
  keep_epochs = set(config.checkpoint.keep_epochs)
  plateau = optim.PlateauController(factor=config.optim.plateau_factor,
                                    patience=config.optim.plateau_patience,
                                    threshold=config.optim.plateau_threshold,
                                    max_drops=config.optim.max_drops)
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
      logging.info(
          'step %d/%d  epoch %.2f  loss %.4f  top-1 err %.4f  top-5 err %.4f  lr %.3g  '
          '%.1f img/s  ETA %s', step, total_steps, epoch, train_metrics['loss'],
          train_metrics['top1_error'], train_metrics['top5_error'], train_metrics['learning_rate'],
          images_per_s, _hms(eta))
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
          logging.info('validation error stopped improving: learning rate x %.3g', plateau.scale)
          state = state.replace(opt_state=optim.with_lr_scale(state.opt_state, plateau.scale))
      for hook in hooks:
        hook(
            EpochEnd(config=config, workdir=workdir, epoch=epoch_done, step=step, program=prog,
                     state=state, inputs=data, writer=writer))
      if (epoch_done % config.checkpoint.every_epochs == 0 or epoch_done in keep_epochs or last or
          manager.reached_preemption(step)):
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


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
