"""The two-GPU split on a mesh: same numbers on every mesh, communication only where the paper's
GPUs talked (from the compiled HLO), and clear errors for impossible meshes."""

import jax
import ml_collections
import numpy as np
import pytest

from alexnet_jax import errors, program, sharding
from alexnet_jax.tools import comm_map

from helpers import tiny_config


def _batch(n=16, size=67, seed=0):
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
              label=rng.integers(0, 10, n).astype(np.int32))


@pytest.fixture(scope='module')
def two_steps_per_mesh():
  """Params after two training steps (dropout off) for several meshes."""
  out = {}
  for data, model in [(1, 1), (4, 2), (8, 1)]:
    c = tiny_config(data=data, model=model)
    c.model.dropout = 0.0
    prog = program.build_program(c, steps_per_epoch=10)
    state = prog.init_state()
    batch = sharding.put_batch(_batch(), prog.mesh)
    for _ in range(2):
      state, metrics = prog.train_step(state, batch)
    out[(data, model)] = (jax.device_get(state.params), jax.device_get(metrics), prog)
  return out


def test_every_mesh_computes_the_same_step(two_steps_per_mesh):
  ref_params, ref_metrics, _ = two_steps_per_mesh[(1, 1)]
  for mesh, (params, metrics, _) in two_steps_per_mesh.items():
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=str(mesh))
    assert metrics['loss'] == pytest.approx(ref_metrics['loss'], rel=1e-5)


def test_towers_live_on_their_own_devices(two_steps_per_mesh):
  _, _, prog = two_steps_per_mesh[(4, 2)]
  state = prog.init_state()
  kernel = state.params['conv2']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('model', None, None, None, None)
  shards = kernel.addressable_shards
  assert all(s.data.shape[0] == 1 for s in shards)  # one tower per device
  model_index = {d: idx[1] for idx, d in np.ndenumerate(prog.mesh.devices)}
  assert {s.index[0].start for s in shards if model_index[s.device] == 1} == {1}


@pytest.fixture(scope='module')
def collectives_4x2():
  c = tiny_config(data=4, model=2)
  hlo, mesh_shape = comm_map.compiled_train_step_hlo(c)
  return comm_map.parse_collectives(hlo, mesh_shape)


def test_model_axis_talks_only_at_conv3_fc6_fc7_fc8_and_the_loss(collectives_4x2):
  model_layers = {c.layer for c in collectives_4x2 if 'model' in c.axis}
  assert model_layers == {'conv3', 'fc6', 'fc7', 'fc8', 'loss'}
  for layer in ('conv3', 'fc6', 'fc7', 'fc8'):
    kinds = {
        (c.direction, c.kind) for c in collectives_4x2 if c.layer == layer and c.axis == 'model'
    }
    assert kinds == {('forward', 'all-gather'), ('backward', 'reduce-scatter')}, layer


def test_data_axis_talks_only_to_reduce_gradients_and_metrics(collectives_4x2):
  data = [c for c in collectives_4x2 if 'data' in c.axis]
  assert data and all(c.axis == 'data' for c in data)
  for c in data:
    assert c.kind == 'all-reduce'
    assert c.layer == 'metrics' or c.direction == 'backward', c
  grad_layers = {c.layer for c in data if c.direction == 'backward'}
  assert grad_layers == {'conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'}
  # The gradient all-reduces carry every parameter once: bytes = parameter bytes.
  c = tiny_config(data=4, model=2)
  params = program.build_program(c, steps_per_epoch=1).abstract_state.params
  local_param_bytes = sum(
      4 * x.size // (2 if x.shape[0] == 2 else 1) for x in jax.tree.leaves(params))
  assert sum(c.bytes for c in data if c.direction == 'backward') == local_param_bytes


def test_parse_iota_replica_groups():
  line = ('  %ar = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %x), channel_id=3, '
          'replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true, to_apply=%add, '
          'metadata={op_name="jit(train_step)/shard_map/transpose(jvp(conv4))/psum_invariant"}')
  (c,) = comm_map.parse_collectives(line, {'data': 4, 'model': 2})
  assert (c.layer, c.direction, c.kind, c.axis, c.bytes) == ('conv4', 'backward', 'all-reduce',
                                                             'data', 128)


def test_comm_map_table_lists_layers(collectives_4x2):
  rows = comm_map.summarize(collectives_4x2)
  lines = comm_map.format_table(rows, {'data': 4, 'model': 2}).splitlines()
  assert lines[0].endswith('mesh data=4 x model=2')
  # One line per summarised row, every column as summarised, in network order (forward first).
  body = [line.split() for line in lines[2:-1]]
  assert [(l[0], l[1], l[2], l[3], int(l[4]), int(l[5].replace(',', ''))) for l in body] == [
      (r['layer'], r['direction'], r['kind'], r['axis'], r['ops'], r['bytes']) for r in rows
  ]
  order = [comm_map.SCOPES.index(l[0]) for l in body]
  assert order == sorted(order)
  # conv2 reads only its own tower: its one row is the gradient all-reduce over the data axis.
  assert [l[1:4] for l in body if l[0] == 'conv2'] == [['backward', 'all-reduce', 'data']]
  # The closing line adds the bytes up per axis.
  totals = {}
  for c in collectives_4x2:
    totals[c.axis] = totals.get(c.axis, 0) + c.bytes
  assert lines[-1] == 'total: ' + ', '.join(f'{a} {b:,} bytes' for a, b in sorted(totals.items()))


def test_mesh_errors():
  cfg = lambda d, m: ml_collections.ConfigDict(dict(data=d, model=m))
  assert sharding.mesh_shape(cfg(-1, 2), num_devices=8, towers=2) == (4, 2)
  assert sharding.mesh_shape(cfg(-1, 1), num_devices=8, towers=2) == (8, 1)
  with pytest.raises(errors.MeshError, match='needs 16 devices but only 8'):
    sharding.mesh_shape(cfg(8, 2), num_devices=8, towers=2)
  with pytest.raises(errors.MeshError, match='must divide model.towers'):
    sharding.mesh_shape(cfg(1, 2), num_devices=8, towers=1)
  mesh = sharding.make_mesh(cfg(4, 2), towers=2)
  with pytest.raises(errors.MeshError, match='not divisible by the mesh data axis'):
    sharding.check_batch(18, mesh)
