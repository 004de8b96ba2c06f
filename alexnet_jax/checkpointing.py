"""All of orbax in one place: save and restore the train state with the data iterator's position.

A checkpoint holds three items: ``state`` (parameters, optimiser state with the injected learning
rate, step, RNG), ``data`` (grain's iterator state, so a resumed run sees exactly the batches the
uninterrupted run would have) and ``meta`` (epoch, the plateau controller, the last metrics).
Saving is asynchronous. The manager keeps the last ``keep`` checkpoints and the one with the best
validation top-1 error. Restoring always goes through an abstract state carrying the target
shardings, so a run can resume on a different mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax.errors import CheckpointError

BEST_METRIC = 'val_top1_error'


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict


def _state_dict(state) -> dict:
  d = dict(step=state.step, params=state.params, opt_state=state.opt_state, rng=state.rng)
  if state.batch_stats:  # batch norm's running averages (models without BN have none)
    d['batch_stats'] = state.batch_stats
  return d


def make_manager(directory: str, checkpoint_cfg,
                 steps_per_epoch: int | None = None) -> ocp.CheckpointManager:
  """``steps_per_epoch``: converts ``checkpoint_cfg.keep_epochs`` to the steps kept for good."""
  policies = [ocp.checkpoint_managers.LatestN(n=int(checkpoint_cfg.keep))]
  if checkpoint_cfg.keep_best:
    policies.append(
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False))
  keep_steps = []
  if steps_per_epoch:
    keep_steps = [int(e * steps_per_epoch) for e in checkpoint_cfg.keep_epochs]
  if keep_steps:
    policies.append(ocp.checkpoint_managers.CustomSteps(steps=sorted(set(keep_steps))))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=bool(checkpoint_cfg.async_save), create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict,
         metrics: dict | None = None) -> None:
  args = dict(state=ocp.args.StandardSave(_state_dict(state)), meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   data_iterator) -> Restored | None:
  """The newest checkpoint, restored onto ``abstract_state``'s shardings, with the iterator's
  position set; ``None`` when the directory has none."""
  step = manager.latest_step()
  if step is None:
    return None
  return restore(manager, step, abstract_state, data_iterator)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator) -> Restored:
  target = _state_dict(abstract_state)
  args = dict(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    state = abstract_state.replace(**restored['state'])
    jax.tree.map(_check_shape, jax.tree.leaves(state), jax.tree.leaves(abstract_state))
  except Exception as e:  # orbax raises many types; the user needs the one line below
    path = os.path.join(str(manager.directory), str(step))
    raise CheckpointError(
        f'cannot restore the checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]} '
        f'— it is damaged or from an incompatible config; move it out of the workdir to start from '
        f'the previous checkpoint, or use a new --workdir') from e
  logging.info('restored checkpoint at step %d from %s', step, manager.directory)
  return Restored(step=step, state=state, meta=dict(restored['meta']))


def _check_shape(restored, expected) -> None:
  if restored.shape != expected.shape:
    raise ValueError(f'array of shape {restored.shape} where the config needs {expected.shape}')
