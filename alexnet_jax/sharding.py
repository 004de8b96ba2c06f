"""Where things live: the device mesh, parameter placement, and the collectives between devices.

The mesh has two axes. ``data`` splits the batch; ``model`` carries AlexNet's towers (the paper's
two GPUs). Parameters declare logical axes in flax's sharding metadata (``out_sharding=('tower',
...)``); ``LOGICAL_RULES`` maps them onto mesh axes. The training and evaluation steps run as one
``jax.shard_map`` program per device, so every cross-device transfer is one that this module's
``MeshContext`` performs explicitly:

* ``gather`` — the towers' maps, all-gathered over ``model`` (conv3, fc6, fc7, fc8 only;
  the backward pass is its reduce-scatter; with ``model.lrn_across_towers`` also conv1's and
  conv2's maps for their response normalisation, whose ``own_maps`` then takes this device's
  share back without a transfer);
* ``own_examples`` / ``all_examples`` — the hybrid AlexNet's switch from data to model parallelism:
  each model-axis device convolves its share of the batch, and the shares are all-gathered before
  fc6 (backward: reduce-scattered);
* ``tower_sum`` / ``tower_max`` — the softmax denominator of logits split over the towers
  (the loss);
* ``data_mean`` — batch norm's per-device moments averaged over ``data`` (global-batch statistics);
* ``data_sum`` — metrics summed over ``data``; parameter gradients are summed over ``data`` by the
  transpose of the replication of parameters into the per-device program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.errors import MeshError

DATA, MODEL = 'data', 'model'
LOGICAL_RULES = (('tower', MODEL),)


def mesh_shape(mesh_cfg, *, num_devices: int, towers: int) -> tuple[int, int]:
  """(data, model) sizes; ``data=-1`` takes every device not used by the model axis."""
  model = int(mesh_cfg.model)
  if model < 1:
    raise MeshError(f'mesh.model must be at least 1, got {model}')
  if towers % model:
    raise MeshError(f'mesh.model={model} must divide model.towers={towers}: each device of the '
                    'model axis holds whole towers (use mesh.model=1 or 2 for the two-tower net)')
  data = int(mesh_cfg.data)
  if data == -1:
    data = max(1, num_devices // model)
  if data < 1:
    raise MeshError(f'mesh.data must be -1 (all devices) or at least 1, got {data}')
  if data * model > num_devices:
    raise MeshError(f'the mesh {data}x{model} (data x model) needs {data * model} devices but only '
                    f'{num_devices} are available; lower mesh.data / mesh.model (mesh.data=-1 uses '
                    'all devices), or on a CPU emulate more with '
                    f'XLA_FLAGS=--xla_force_host_platform_device_count={data * model}')
  return data, model


def make_mesh(mesh_cfg, *, towers: int, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  data, model = mesh_shape(mesh_cfg, num_devices=len(devices), towers=towers)
  check_every_process_takes_part(devices[:data * model], data, model)
  return jax.make_mesh((data, model), (DATA, MODEL), devices=devices[:data * model],
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def check_every_process_takes_part(mesh_devices, data: int, model: int) -> None:
  """Refuses (the same line on every process) a mesh that leaves a process without a device: that
  process would have nothing to compute and hang the others at their first collective."""
  processes = jax.process_count()
  missing = sorted(set(range(processes)) - {d.process_index for d in mesh_devices})
  if missing:
    raise MeshError(
        f'the mesh {data}x{model} (data x model) takes {len(mesh_devices)} of the '
        f'{jax.device_count()} devices of the {processes} processes, none of process {missing[0]}; '
        'every process must take part: use --config.mesh.data=-1 (every device) or a mesh of '
        f'{jax.device_count()} devices')


def check_batch(global_batch: int, mesh: jax.sharding.Mesh, what: str = 'batch_size', *,
                split_over_model: bool = False) -> None:
  """The batch splits evenly over the data axis (and so over the hosts, which supply whole data
  shards), and with ``split_over_model`` (the
  hybrid AlexNet's data-parallel convolutions) each data shard's examples over the model axis."""
  data = mesh.shape[DATA]
  if global_batch % data or global_batch < data:
    raise MeshError(f'{what}={global_batch} is not divisible by the mesh data axis ({data}); use a '
                    f'multiple of {data} or change mesh.data')
  both = data * mesh.shape[MODEL]
  if split_over_model and global_batch % both:
    raise MeshError(f"{what}={global_batch}: the hybrid model splits every data shard's examples "
                    f'over the {mesh.shape[MODEL]} devices of the model axis; use a multiple of '
                    f'mesh.data x mesh.model = {both}')


def param_specs(variables: nnx.State) -> dict:
  """PartitionSpecs, as a pure dict, of an NNX State of Variables: their logical axes mapped onto
  the mesh by ``LOGICAL_RULES``; variables without sharding metadata are replicated."""
  with nnx.logical_axis_rules(LOGICAL_RULES):
    return nnx.to_pure_dict(nnx.get_partition_spec(variables))


def named(tree_of_specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda p: NamedSharding(mesh, p), tree_of_specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def host_shards(mesh: jax.sharding.Mesh, process_index: int | None = None) -> tuple[int, ...]:
  """The data shards (indices along the mesh's ``data`` axis) whose batch rows ``process_index``
  (default: this process) supplies: those its devices hold.

  The batch is split over ``data`` and replicated over ``model``, so where the model axis crosses
  hosts several processes hold the same rows and must supply identical data, and where it stays
  within a host a process holds whole data shards. A process's shards need not be contiguous
  (a TPU mesh follows the chips' topology); the rows go to the devices in shard order."""
  process = jax.process_index() if process_index is None else process_index
  shards = sorted({
      i for i, row in enumerate(mesh.devices.reshape(mesh.shape[DATA], -1))
      if any(d.process_index == process for d in row)
  })
  if not shards:
    raise MeshError(f'process {process} holds no device of the mesh {dict(mesh.shape)}')
  return tuple(shards)


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This host's rows of the global batch (those of its ``host_shards``, in shard order) → global
  arrays sharded over ``data``, replicated over ``model``."""
  sharding = batch_sharding(mesh)
  held = len(host_shards(mesh))
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] % held:
      raise ValueError(f'{k}: {v.shape[0]} rows do not split over the {held} data shards this '
                       'process holds')
    # The global shape says how many rows there are in all: inferring it would take every process
    # for the owner of distinct rows, which is wrong where the model axis crosses hosts.
    global_shape = (v.shape[0] // held * mesh.shape[DATA],) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


@dataclasses.dataclass(frozen=True)
class MeshContext:
  """The collectives available to the per-device program; also the models' tower exchange."""
  data_axis: str = DATA
  model_axis: str = MODEL

  def gather(self, x: jax.Array) -> jax.Array:
    """``(local_towers, *dims, c)`` → ``(*dims, towers * c)``: the other devices' towers too."""
    # Gathered along a new leading axis, each device's maps arrive as one contiguous block; the
    # concatenation along the channels is then a local copy. Gathering straight into the channel
    # axis made XLA's CPU backend lay the maps out channel-major around the collective: transposed
    # writes in both directions (conv3 of the two-tower AlexNet, 1x2 mesh: ~0.1 s a step).
    towers = jax.lax.all_gather(x, self.model_axis, axis=0, tiled=True)
    return jnp.concatenate(list(towers), axis=-1)

  def own_examples(self, x: jax.Array) -> jax.Array:
    """This device's share of a batch that all devices of the model axis hold (no transfer)."""
    devices = jax.lax.axis_size(self.model_axis)
    if x.shape[0] % devices:
      raise MeshError(f'the per-data-shard batch of {x.shape[0]} does not split over the '
                      f'{devices} devices of the model axis; use a batch_size divisible by '
                      f'mesh.data x mesh.model')
    share = x.shape[0] // devices
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(self.model_axis) * share, share)

  def all_examples(self, x: jax.Array) -> jax.Array:
    """The model axis' batch shares gathered back into the data shard's batch."""
    return jax.lax.all_gather(x, self.model_axis, axis=0, tiled=True)

  def own_maps(self, x_all: jax.Array, local_towers: int) -> jax.Array:
    """``(*dims, towers * c)`` → ``(local_towers, *dims, c)``: this device's towers' maps out of
    all towers' (tower-major, as ``gather`` lays them out; no transfer)."""
    per_device = x_all.shape[-1] // jax.lax.axis_size(self.model_axis)
    mine = jax.lax.dynamic_slice_in_dim(x_all,
                                        jax.lax.axis_index(self.model_axis) * per_device,
                                        per_device, axis=-1)
    return jnp.stack(jnp.split(mine, local_towers, axis=-1))

  def first_tower(self, local_towers: int) -> jax.Array:
    """Global index of this device's first tower."""
    return jax.lax.axis_index(self.model_axis) * local_towers

  def tower_sum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.model_axis)

  def tower_max(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmax(x, self.model_axis)

  def data_sum(self, x: Any) -> Any:
    return jax.lax.psum(x, self.data_axis)

  def data_mean(self, x: jax.Array) -> jax.Array:
    """Per-shard statistics averaged over the data shards (batch norm's global-batch moments)."""
    return jax.lax.pmean(x, self.data_axis)

  def device_key(self, key: jax.Array) -> jax.Array:
    """A key of its own for each device (dropout masks differ across examples and towers)."""
    key = jax.random.fold_in(key, jax.lax.axis_index(self.data_axis))
    return jax.random.fold_in(key, jax.lax.axis_index(self.model_axis))


def shard_step(fn, mesh: jax.sharding.Mesh, in_specs, out_specs, *, gathered: bool = False):
  """Runs ``fn`` as one program per device of ``mesh``. ``gathered``: outputs replicated over the
  model axis by ``MeshContext.gather`` (an all-gather, which JAX's replication check does not
  count as making a value the same on every device of the axis, though it does)."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=not gathered)
