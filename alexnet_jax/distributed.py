"""Process start-up: CPU device emulation and multi-host initialisation.

Both must happen before JAX touches a backend, so entry points call ``initialize`` first thing.
"""

from __future__ import annotations

import os
import re

import jax
from absl import logging

_COUNT_FLAG = '--xla_force_host_platform_device_count'


def emulate_cpu_devices(count: int) -> None:
  """Splits the host CPU into ``count`` XLA devices (only the CPU backend reads this flag, so it is
  harmless where accelerators exist). An explicit setting in ``XLA_FLAGS`` wins."""
  if count <= 0:
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if re.search(_COUNT_FLAG + r'=\d+', flags):
    return
  os.environ['XLA_FLAGS'] = f'{flags} {_COUNT_FLAG}={count}'.strip()


def _multi_host_environment() -> bool:
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env:
    return True
  if int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in env:
    return True
  if 'TPU_WORKER_HOSTNAMES' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  return False


def initialize(config) -> None:
  """Emulated CPU devices as configured; ``jax.distributed.initialize`` when several processes run
  (SLURM, Open MPI and TPU pods are detected by JAX itself; elsewhere set
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``)."""
  emulate_cpu_devices(int(config.emulate_cpu_devices))
  if not _multi_host_environment():
    return
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env:
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
