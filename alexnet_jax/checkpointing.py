"""All of orbax in one place: save and restore the train state, verified.

A checkpoint holds two items: ``state`` (parameters, optimiser state with the injected learning
rate, step, RNG) and ``meta`` (epoch, the plateau controller, the last metrics, the data position,
and a checksum of every array of ``state``); orbax adds ``metrics`` (the validation top-1 error)
when there is one. There is no iterator state to store: the training data is a function of the
seed and the step (``data.pipeline.train_dataset``), so a run resumes with any number of
processes.

Saving is asynchronous. The manager keeps the last ``keep`` checkpoints, those of
``keep_epochs``, and the one with the best validation top-1 error, which orbax reads back from
each checkpoint's ``metrics`` after a restart. Restoring goes through an abstract state carrying
the target shardings, so a run can resume on a different mesh, and every array is checked against
its checksum: a damaged newest checkpoint is moved out of the way (never deleted) and the newest
intact one is restored instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from alexnet_jax import storage
from alexnet_jax.errors import CheckpointError

BEST_METRIC = 'val_top1_error'
ITEMS = ('state', 'meta')
# Where damaged checkpoints are moved, beside the checkpoint directory.
DAMAGED_DIR = 'damaged_checkpoints'


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict


class NonFiniteState(Exception):
  """``save`` was handed a state holding NaN or inf (the loop reports it as divergence)."""


class DamagedCheckpoint(Exception):
  """A checkpoint's files do not hold what was written (internal: ``restore_latest`` falls back
  to an older checkpoint, or turns it into a ``CheckpointError`` when none is intact)."""


def _state_dict(state) -> dict:
  d = dict(step=state.step, params=state.params, opt_state=state.opt_state, rng=state.rng)
  if state.batch_stats:  # batch norm's running averages (models without BN have none)
    d['batch_stats'] = state.batch_stats
  return d


def make_manager(directory: str, checkpoint_cfg,
                 steps_per_epoch: int | None = None) -> ocp.CheckpointManager:
  """``directory``: a local path (made absolute) or a ``gs://`` URL (see ``storage``).
  ``steps_per_epoch``: converts ``checkpoint_cfg.keep_epochs`` to the steps kept for good."""
  policies = [ocp.checkpoint_managers.LatestN(n=int(checkpoint_cfg.keep))]
  best = {}
  if checkpoint_cfg.keep_best:
    policies.append(
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False))
    # best_fn makes orbax write each step's metrics into the checkpoint and read them back when a
    # manager opens the directory: without it BestN knows only the steps saved by this process,
    # and a restarted run would delete the best checkpoint as one "without metrics".
    best = dict(best_fn=lambda m: m[BEST_METRIC], best_mode='min')
  keep_steps = []
  if steps_per_epoch:
    keep_steps = [int(e * steps_per_epoch) for e in checkpoint_cfg.keep_epochs]
  if keep_steps:
    policies.append(ocp.checkpoint_managers.CustomSteps(steps=sorted(set(keep_steps))))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=bool(checkpoint_cfg.async_save), create=True, **best)
  return ocp.CheckpointManager(storage.absolute(directory), options=options, item_names=ITEMS)


# -- integrity ---------------------------------------------------------------------------------

_MIX1, _MIX2 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 of the same shape (a trailing axis for 64-bit types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if unsigned is None:  # 8 bytes: two 32-bit words per element
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Two position-weighted sums of the bit patterns modulo 2³² (exact integer arithmetic, so the
  same for any sharding and reduction order) and whether every value is finite.

  A change of any one word changes the first sum (its weight is odd, hence invertible modulo
  2³²); the second, with other weights and mixed bits, makes a change that cancels in both
  vanishingly unlikely (about 2⁻⁶⁴)."""
  bits = _bits(x)
  index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
  h1 = jnp.sum(bits * (index * _MIX1 | 1), dtype=jnp.uint32)
  h2 = jnp.sum((bits ^ (bits >> 15)) * ((index ^ np.uint32(0x5BD1E995)) * _MIX2 | 1),
               dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
  return h1, h2, finite


_digests = jax.jit(lambda leaves: [_digest(x) for x in leaves])


def fingerprint(state_dict: dict) -> tuple[dict[str, str], list[str]]:
  """``({array path: checksum}, [paths of arrays holding NaN or inf])`` of a state dict, computed
  on the devices where the arrays live (one small transfer to the host)."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state_dict)[0])
  sums, non_finite = {}, []
  for path, (h1, h2, finite) in zip(paths, jax.device_get(_digests(list(leaves)))):
    name = jax.tree_util.keystr(path)
    sums[name] = f'{int(h1):08x}{int(h2):08x}'
    if not bool(finite):
      non_finite.append(name)
  return sums, non_finite


def _verify(state_dict: dict, meta: dict, directory: str) -> None:
  sums, non_finite = fingerprint(state_dict)
  expected = meta.get('checksums')
  if expected is None:
    logging.warning('checkpoint %s has no checksums (written by an older version): not verified',
                    directory)
  else:
    for name, value in sums.items():
      if expected.get(name) != value:
        raise DamagedCheckpoint(
            f'array {name} does not match its checksum (stored {expected.get(name)}, read {value})')
    missing = sorted(set(expected) - set(sums))
    if missing:
      raise DamagedCheckpoint(f'array {missing[0]} is missing')
  if non_finite:
    raise DamagedCheckpoint(f'array {non_finite[0]} holds NaN or inf')


# -- saving and restoring ----------------------------------------------------------------------


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves ``state`` with ``meta`` and the checksums of its arrays (asynchronously where the
  manager is).

  Raises:
    NonFiniteState: an array of ``state`` holds NaN or inf; nothing is written (such a state
      would restore as if intact, and retention could delete good checkpoints for it).
  """
  sd = _state_dict(state)
  sums, non_finite = fingerprint(sd)
  if non_finite:
    raise NonFiniteState(f'{non_finite[0]} holds NaN or inf')
  if metrics is not None and not all(math.isfinite(float(v)) for v in metrics.values()):
    metrics = None  # a NaN metric would sort as "best"
  args = dict(state=ocp.args.StandardSave(sd), meta=ocp.args.JsonSave(dict(meta, checksums=sums)))
  with _write_errors(manager):
    manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; a write that failed (a full disk, a lost mount) ends in one
  ``CheckpointError``."""
  with _write_errors(manager):
    manager.wait_until_finished()


# What the operating system says when the storage, not our code, refuses a write: matched in
# the text, as orbax passes the errors of its writer threads on wrapped, without their errno.
_STORAGE_FAILURES = tuple(os.strerror(e) for e in storage.REFUSED_WRITE_ERRNOS)


@contextlib.contextmanager
def _write_errors(manager: ocp.CheckpointManager):
  try:
    yield
  except Exception as e:  # orbax wraps the OSError of its writer threads in ValueError
    text = ''.join(f'{x}' for x in _chain(e))
    reason = next((f for f in _STORAGE_FAILURES if f in text), None)
    if reason is None:
      raise
    # From the directory: the manager also counts the step whose write just failed.
    written = [int(p.name) for p in manager.directory.iterdir() if p.name.isdigit()]
    kept = max(written, default=None)
    kept = (f'the newest checkpoint written is step {kept}, and a rerun resumes from it'
            if kept is not None else 'no checkpoint has been written yet')
    raise CheckpointError(
        f'cannot write a checkpoint in {manager.directory}: {reason}; {kept} — free space (or fix '
        'the storage) first') from None


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> Restored:
  """Checkpoint ``step`` onto ``abstract_state``'s shardings, every array verified.

  Raises:
    CheckpointError: the checkpoint is damaged (a file missing, unreadable or not matching its
      checksum), or its arrays do not have the shapes this config needs.
  """
  try:
    return _restore_step(manager, step, abstract_state)
  except DamagedCheckpoint as e:
    raise CheckpointError(
        f'cannot restore the checkpoint {os.path.join(str(manager.directory), str(step))}: {e} '
        '— it is damaged; choose another step, or restore it from a backup') from e


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state) -> Restored:
  """``restore``, raising ``DamagedCheckpoint`` for damage."""
  path = os.path.join(str(manager.directory), str(step))
  args = dict(state=ocp.args.StandardRestore(_state_dict(abstract_state)),
              meta=ocp.args.JsonRestore())
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files
    raise DamagedCheckpoint(f'{type(e).__name__}: {_first_line(e)}') from e
  sd, meta = restored['state'], restored['meta']
  if not isinstance(meta, dict):
    raise DamagedCheckpoint('its meta item is not a JSON object')
  for name, got, want in _shapes(sd, _state_dict(abstract_state)):
    if got != want:
      raise CheckpointError(
          f'the checkpoint {path} does not fit the config: {name} has shape {got} where the '
          f'config needs {want}; run with the config it was trained with, or use a new --workdir')
  _verify(sd, meta, path)
  logging.info('restored checkpoint at step %d from %s (checksums verified)', step,
               manager.directory)
  return Restored(step=step, state=abstract_state.replace(**sd), meta=dict(meta))


def _shapes(restored: dict, target: dict):
  paths = jax.tree_util.tree_flatten_with_path(target)[0]
  for (path, want), got in zip(paths, jax.tree.leaves(restored)):
    yield jax.tree_util.keystr(path), tuple(got.shape), tuple(want.shape)


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> Restored | None:
  """The newest intact checkpoint (``None`` when the directory has none).

  Newer checkpoints that turn out damaged are reported in one line each and moved to
  ``damaged_checkpoints/`` beside the checkpoint directory, so that retention never deletes an
  intact checkpoint to make room next to them and the next save of their step finds its place
  free. When none is intact nothing is moved and ``CheckpointError`` names the newest.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      restored = _restore_step(manager, step, abstract_state)
    except DamagedCheckpoint as e:
      damaged.append((step, str(e)))
      continue
    if damaged:
      _move_aside(manager, [s for s, _ in damaged])
      for s, why in damaged:
        logging.warning('checkpoint %d is damaged (%s): moved to %s; resuming from step %d', s, why,
                        os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR), step)
    return restored
  if not damaged:
    return None
  step, why = damaged[0]
  older = (f'; the {len(damaged) - 1} older ones are damaged too' if len(damaged) > 1 else '')
  raise CheckpointError(
      f'cannot restore the checkpoint {os.path.join(str(manager.directory), str(step))}: {why}'
      f'{older} — restore the checkpoints from a backup, or use a new --workdir')


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  root = os.path.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
  if jax.process_index() == 0:
    storage.makedirs(root)
    for step in steps:
      target = os.path.join(root, str(step))
      if storage.path(target).exists():  # damaged twice at the same step: keep both
        target = f'{target}-{time.strftime("%Y%m%d-%H%M%S")}'
      storage.move(os.path.join(str(manager.directory), str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('alexnet_jax:damaged_checkpoints_moved')
  manager.reload()


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else '(no message)'
