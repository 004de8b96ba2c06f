"""Process start-up: CPU device emulation and multi-host initialisation.

Both must happen before JAX touches a backend, so entry points call ``initialize`` first thing.

Which launcher started the processes decides how they find each other:

* ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``launch/
  local_multiprocess.sh``, or any launcher of your own): used as given.
* SLURM (``launch/slurm_gpu.sh``): JAX reads the job's variables itself. The GPUs each process
  drives follow from the tasks per node and the GPUs each task sees (``slurm_local_devices``).
* TPU VMs (``launch/tpu_pod.sh`` sets ``ALEXNET_JAX_DISTRIBUTED=auto``): ``jax.distributed
  .initialize()`` without arguments, as JAX recommends there; it asks the TPU metadata server.
* Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1): detected by JAX itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax

from alexnet_jax.errors import MeshError

_COUNT_FLAG = '--xla_force_host_platform_device_count'
# Set by launchers (tpu_pod.sh) whose processes JAX finds by itself although no variable says so.
AUTO_VARIABLE = 'ALEXNET_JAX_DISTRIBUTED'


def emulate_cpu_devices(count: int) -> None:
  """Splits the host CPU into ``count`` XLA devices (only the CPU backend reads this flag, so it is
  harmless where accelerators exist). An explicit setting in ``XLA_FLAGS`` wins."""
  if count <= 0:
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if re.search(_COUNT_FLAG + r'=\d+', flags):
    return
  os.environ['XLA_FLAGS'] = f'{flags} {_COUNT_FLAG}={count}'.strip()


def _slurm_job(env: Mapping[str, str]) -> bool:
  return 'SLURM_JOB_ID' in env and 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1


def multi_host_environment(env: Mapping[str, str]) -> bool:
  if 'JAX_COORDINATOR_ADDRESS' in env or env.get(AUTO_VARIABLE) == 'auto':
    return True
  if _slurm_job(env):
    return True
  if 'TPU_WORKER_HOSTNAMES' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env:
    return True
  return int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1


def _tasks_per_node(env: Mapping[str, str]) -> int:
  """This node's task count: SLURM_TASKS_PER_NODE reads e.g. '8(x4)' or '2,1' (one entry per
  group of nodes, in node order)."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  if not spec:
    nodes = int(env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_NNODES') or 1)
    return max(1, int(env['SLURM_NTASKS']) // nodes)
  node, counts = int(env.get('SLURM_NODEID', '0')), []
  for part in spec.split(','):
    m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if not m:
      raise MeshError(f'cannot read the tasks per node SLURM gives ({spec!r}); launch one task per '
                      'node or one per GPU with --ntasks-per-node')
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts[min(node, len(counts) - 1)]


def _visible_gpus(env: Mapping[str, str]) -> int | None:
  """GPUs this task sees: CUDA_VISIBLE_DEVICES (SLURM sets it from the allocation); None where it
  does not say (no GPU job, e.g. a CPU rehearsal, or GPUs SLURM does not manage)."""
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if visible is None or visible.strip() in ('', 'NoDevFiles'):
    return None
  return len([d for d in visible.split(',') if d.strip()])


def _node_gpus(env: Mapping[str, str]) -> int | None:
  count = env.get('SLURM_GPUS_ON_NODE', '')
  return int(count) if count.isdigit() and int(count) > 0 else None


def slurm_local_devices(env: Mapping[str, str]) -> list[int] | None:
  """The local device ids a SLURM task drives, for ``jax.distributed.initialize``.

  Every layout that uses each GPU once is taken: one task per node driving all of the node's GPUs
  (``launch/slurm_gpu.sh``'s default); one task per GPU (``--ntasks-per-node`` = GPUs per node;
  each task drives GPU ``SLURM_LOCALID`` of those it sees); and tasks bound to GPUs of their own
  (``--gpus-per-task``: each drives all it sees). Left to itself, JAX would give every task only
  GPU ``SLURM_LOCALID``: on a node with 8 GPUs and one task, GPU 0 alone. A layout that would share
  GPUs or leave some idle is refused. None: no GPUs named (JAX's own choice stands)."""
  visible, on_node = _visible_gpus(env), _node_gpus(env)
  if visible is None and on_node is None:
    return None
  tasks = _tasks_per_node(env)
  seen = visible if visible is not None else on_node
  if tasks == 1:
    return list(range(seen))
  if visible is not None and on_node is not None and visible * tasks == on_node:
    return list(range(visible))  # each task bound to its own GPUs
  if seen == tasks:
    return [int(env.get('SLURM_LOCALID', '0'))]
  if visible == 1 and on_node is None:
    return [0]  # bound to one GPU each, as far as can be told
  raise MeshError(f'SLURM runs {tasks} tasks on this node and each sees {seen} GPUs, so GPUs would '
                  f'be shared or left idle: use --ntasks-per-node=1 (one process drives all '
                  f'{seen} GPUs) or --ntasks-per-node={seen} (one process per GPU)')


def initialize(config) -> None:
  """Emulated CPU devices as configured; ``jax.distributed.initialize`` when several processes run
  (see the module docstring for the launchers it recognises)."""
  emulate_cpu_devices(int(config.emulate_cpu_devices))
  env = os.environ
  if not multi_host_environment(env):
    return
  if 'JAX_COORDINATOR_ADDRESS' in env:
    # Where only the address is given (say, pinned inside a SLURM job), JAX finds the rest.
    count, index = env.get('JAX_NUM_PROCESSES'), env.get('JAX_PROCESS_ID')
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(count) if count else None,
                               process_id=int(index) if index else None)
  elif _slurm_job(env):
    jax.distributed.initialize(local_device_ids=slurm_local_devices(env))
  else:
    jax.distributed.initialize()


def describe_layout(mesh) -> str:
  """One line, logged by every process at start-up, that shows a wrong layout at once: the
  processes, this process's and all devices, and the mesh."""
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  return (f'process {jax.process_index()} of {jax.process_count()}: {len(local)} local '
          f'{"/".join(kinds)} device(s) (ids {",".join(str(d.id) for d in local)}) of '
          f'{jax.device_count()} in all; mesh {mesh.shape["data"]}x{mesh.shape["model"]} '
          f'(data x model) over {mesh.devices.size} devices')
