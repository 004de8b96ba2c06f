"""Stopping a run cleanly when the scheduler asks: SIGTERM or SIGINT → checkpoint → exit 75.

Clusters announce the end of a job with SIGTERM and kill it a grace period later (SLURM's
``--signal=TERM@120`` and its preemption, Kubernetes, GCE and TPU maintenance events); a user
presses Ctrl-C (SIGINT). Either way the training loop finishes the step it is in, saves a
checkpoint at the next step boundary, waits for it to be written and ends with
``REQUEUE_STATUS``. A second signal aborts at once, without a checkpoint.

With one process the signal sets a flag the loop reads after every step (no communication). With
several, every process must save at the same step: JAX's preemption service (started by
``jax.distributed.initialize``) catches SIGTERM on any process and agrees on the step with the
others through the coordination service; SIGINT is forwarded to it as SIGTERM.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable

import jax
from absl import logging
from jax.experimental import multihost_utils

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry". launch/ scripts
# requeue the job when the run ends with it.
REQUEUE_STATUS = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint at ``step``."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f'stopped by {signal_name}: checkpoint saved at step {step}; run the same '
                     f'command to resume (exit status {REQUEUE_STATUS}: requeue)')
    self.step = step


class StopSignals:
  """Context manager: while inside, SIGTERM / SIGINT request a stop at the next step boundary
  (``requested(step)``, called after every step by every process) and a second one aborts.
  Outside the main thread (where Python cannot install handlers) it never requests a stop."""

  def __init__(self):
    self._received: str | None = None
    self._previous: dict[int, object] = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is not threading.main_thread():
      return self
    if self._multi_process:
      # SIGTERM stays with JAX's preemption service, which agrees on a step across processes.
      self._install(signal.SIGINT, self._forward_to_preemption_service)
    else:
      for sig in SIGNALS:
        self._install(sig, self._first_signal)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _install(self, sig: int, handler: Callable) -> None:
    self._previous.setdefault(sig, signal.getsignal(sig))
    signal.signal(sig, handler)

  def _first_signal(self, signum, frame) -> None:
    del frame
    self._received = signal.Signals(signum).name
    # Printed, not logged: logging from a signal handler can deadlock on the handler's lock.
    print(
        f'{self._received} received: saving a checkpoint after this step, then exiting '
        '(send it again to abort without one)', file=sys.stderr, flush=True)
    for sig in SIGNALS:
      signal.signal(sig, self._abort)

  def _forward_to_preemption_service(self, signum, frame) -> None:
    del frame
    self._received = signal.Signals(signum).name
    os.kill(os.getpid(), signal.SIGTERM)

  @staticmethod
  def _abort(signum, frame) -> None:
    del frame
    print(f'{signal.Signals(signum).name} received again: aborting without a checkpoint',
          file=sys.stderr, flush=True)
    _end_children()
    os._exit(128 + signum)

  def saving(self) -> None:
    """From now on (a stop agreed, its checkpoint being written) any signal aborts at once,
    on every process."""
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._install(sig, self._abort)

  def requested(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received is not None

  @property
  def signal_name(self) -> str:
    return self._received or 'SIGTERM'


def _end_children() -> None:
  """Terminates this process's children (the input workers) before an abort."""
  try:
    for child in multiprocessing.active_children():
      child.terminate()
  except Exception as e:  # best effort on the way out (the workers also watch for it)
    logging.warning('could not stop the input workers: %s', e)
