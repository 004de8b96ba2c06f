"""The switches of the papers' ablation experiments: AlexNet's pooling (overlapping or not), its
units (ReLU or tanh), its one-GPU net, its fc widths and removed layers (Zeiler & Fergus's Table 3),
and ResNet's plain networks. Each changes the network as its paper describes, leaves the default
network as it was, is refused in one line where it cannot apply, and trains."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alexnet_jax import configs, inference, optim, program, sharding, steps
from alexnet_jax.configs import base_config, model_config
from alexnet_jax.errors import ConfigError
from alexnet_jax.models import create_model, describe, layers
from alexnet_jax.models.resnet import Block, ResNetSpec
from alexnet_jax.tools import comm_map
from alexnet_jax.visualize import deconvnet

from helpers import conv_transpose, tiny_config

# The zoo's small programs compile at XLA's optimisation level 0 (same programs, same results).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
ALL_LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')


def _abstract(model_cfg):
  return nnx.eval_shape(lambda: create_model(model_cfg, nnx.Rngs(0)))


def _param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _activations(model, size: int, batch: int = 1):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda m, x: m(x, capture=True), model, x).activations


def _refused(match: str, model_cfg) -> None:
  with pytest.raises(ConfigError, match=match) as e:
    create_model(model_cfg, nnx.Rngs(0))
  assert '\n' not in str(e.value)


# Parameters of a layer from its shape: a k x k convolution, a dense layer (both with biases).
conv = lambda k, cin, cout: k * k * cin * cout + cout
dense = lambda fin, fout: fin * fout + fout
PAPER = 60_965_224  # two towers, 1000 classes (tests/test_models.py)
ONE_TOWER = 62_378_344
FC_PAPER = dense(6 * 6 * 256, 4096) + dense(4096, 4096) + dense(4096, 1000)

# ---- training: one compiled program per knob ---------------------------------------------------

# model fields, mesh model axis (the towers), image size. He initialisation: the paper's fixed
# N(0, 0.01) trains the tiny nets too slowly for a few steps to show. The knobs that only change
# widths share a program with another knob: fc_width the pools', the one-GPU net the tanh units'
# (each program compiles for ~10 s on a small CPU).
KNOBS = dict(
    pool_2x2_fc_2048=(dict(name='alexnet', pool_window=2, pool_stride=2, fc_width=2048,
                           init='he'), 2, 67),
    tanh_one_gpu=(dict(name='alexnet', activation='tanh', variant='one_gpu', towers=1,
                       init='he'), 1, 67),
    remove_3_4_6_7=(dict(name='alexnet', remove=(3, 4, 6, 7), towers=1, init='he'), 1, 67),
    plain_18=(dict(name='resnet', depth=18, residual=False), 1, 32),
)
STEPS = 3


class Trained:
  """A tiny network of one knob: its program, initial parameters, a batch, and ``STEPS`` training
  steps on that batch (their losses and the final state)."""

  def __init__(self, model: dict, towers: int, size: int):
    c = tiny_config(data=1, model=towers)
    c.model = model_config(model['name'], **{k: v for k, v in model.items() if k != 'name'},
                           num_classes=10, image_size=size, width=0.125)
    c.batch_size = 8
    self.prog = program.build_program(c, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    self.host = dict(image=rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
                     label=rng.integers(0, 10, 8).astype(np.int32))
    batch = sharding.put_batch(self.host, self.prog.mesh)
    self.init = jax.device_get(self.prog.init_state.lower().compile(FAST_COMPILE)())
    state = jax.device_put(self.init, self.prog.state_shardings)
    train = self.prog.train_step.lower(state, batch).compile(FAST_COMPILE)
    self.losses = []
    for _ in range(STEPS):
      state, metrics = train(state, batch)
      self.losses.append(float(metrics['loss']))
    self.state = jax.device_get(state)

  def images(self) -> jax.Array:
    """The batch as the network reads it."""
    return steps.normalize_batch(self.host, self.prog.norm, jnp.float32, train=False)


@functools.cache
def trained(name: str) -> Trained:
  return Trained(*KNOBS[name])


def _run(fn, *args):
  """``jax.jit(fn)(*args)`` compiled as the programs are (``FAST_COMPILE``)."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


@pytest.mark.parametrize('knob', list(KNOBS))
def test_each_knob_trains(knob):
  t = trained(knob)
  assert all(np.isfinite(t.losses)) and 0 < t.losses[0] < 50, t.losses
  assert t.losses[-1] < t.losses[0], t.losses  # the same batch, fitted a little
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), t.init.params, t.state.params)
  assert all(jax.tree.leaves(changed)), knob
  if KNOBS[knob][0]['name'] == 'alexnet':
    assert set(t.state.params) == set(t.prog.model.layer_names)


# ---- pool_window, pool_stride ------------------------------------------------------------------


def _pools(monkeypatch, model, size):
  """(input size, window, stride, output size) of every max-pool of a forward pass."""
  seen, pool = [], layers.max_pool

  def recording(x, window=3, stride=2):
    y = pool(x, window, stride)
    seen.append((x.shape[-2], window, stride, y.shape[-2]))
    return y

  monkeypatch.setattr(layers, 'max_pool', recording)
  return seen, _activations(model, size)


@pytest.mark.parametrize('window, stride', [(3, 2), (2, 2)], ids=['overlapping', 'disjoint'])
def test_non_overlapping_pools_give_the_same_sizes(monkeypatch, window, stride):
  spec = dict(name='alexnet', pool_window=window, pool_stride=stride)
  model = _abstract(spec)
  seen, acts = _pools(monkeypatch, model, 227)
  # The paper: 2x2 windows at stride 2 give the same output sizes as its 3x3 ones.
  assert seen == [(55, window, stride, 27), (27, window, stride, 13), (13, window, stride, 6)]
  assert model.spec.map_sizes() == dict(conv1=55, conv2=27, conv3=13, conv4=13, conv5=13, pool5=6)
  assert [acts[n].shape[2] for n in ALL_LAYERS[:5]] == [55, 27, 13, 13, 13]
  assert _param_count(model) == PAPER


@functools.cache
def disjoint_pool_net():
  """The tiny two-tower AlexNet with 2x2 pools at stride 2 (and 2048-unit fc layers): its
  program, apply, parameters, two images, every layer's (tower-split) activations and what pool1
  reads."""
  t = trained('pool_2x2_fc_2048')
  apply = deconvnet.make_apply(t.prog.graphdef)
  params, images = t.init.params, t.images()[:2]

  def forward(params, images):
    acts = apply(params, images, False)[1]
    model = nnx.merge(t.prog.graphdef, params)
    return acts, model._lrn(acts['conv1'], layers.LOCAL_TOWERS)  # what pool1 reads

  acts, normalised = jax.device_get(_run(forward, params, images))
  return t, apply, params, images, acts, normalised


def test_disjoint_pools_take_each_2x2_blocks_maximum():
  t, _, params, _, acts, normalised = disjoint_pool_net()  # (2 towers, n, 15, 15, c)
  model = nnx.merge(t.prog.graphdef, params)
  rows = normalised.shape[2] // 2  # 15 → 7: the last row and column are in no window
  blocks = normalised[:, :, :2 * rows, :2 * rows].reshape(*normalised.shape[:2], rows, 2, rows, 2,
                                                          -1)
  pooled = blocks.max(axis=(3, 5))
  np.testing.assert_allclose(acts['conv2'], jax.nn.relu(model.conv2(jnp.asarray(pooled))),
                             rtol=1e-5, atol=1e-5)
  overlapping = np.lib.stride_tricks.sliding_window_view(normalised, (3, 3), axis=(2, 3))
  assert not np.allclose(pooled, overlapping[:, :, ::2, ::2].max(axis=(-2, -1)), atol=1e-3)
  assert all(np.asarray(a).min() >= 0 for n, a in acts.items() if n != 'fc8')  # ReLU units


def test_deconvnet_unpools_through_disjoint_pools():
  """conv2's projection through 2x2 pools at stride 2, by hand: conv2's transposed filters, the
  signal back to each block's (first) maximum of pool1's input, rectified, conv1's transposed
  filters."""
  _, apply, params, images, acts, normalised = disjoint_pool_net()
  normalised = normalised.astype(np.float64)
  k1, k2 = (np.asarray(params[n]['kernel'], np.float64) for n in ('conv1', 'conv2'))
  per_tower = acts['conv2'].shape[-1]
  maps = [per_tower - 1, per_tower]  # the last map of tower 0, the first of tower 1
  proj, pos, values = _run(lambda p, x, m: deconvnet.project(apply, p, x, 'conv2', m), params,
                           images, jnp.array(maps))
  for n, m in enumerate(maps):
    tower, c = divmod(m, per_tower)
    row, col = (int(p) for p in pos[n])
    top = np.zeros(acts['conv2'].shape[2:])
    top[row, col, c] = values[n]
    into_pool1 = conv_transpose(top, k2[tower], 1, 2, 7)
    unpooled = np.zeros(normalised.shape[2:])
    for i in range(7):
      for j in range(7):
        block = normalised[tower, n, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        for ch in range(block.shape[-1]):
          a, b = np.unravel_index(np.argmax(block[..., ch]), (2, 2))
          unpooled[2 * i + a, 2 * j + b, ch] += into_pool1[i, j, ch]
    expected = conv_transpose(np.maximum(unpooled, 0), k1[tower], 4, 0, 67)
    assert values[n] > 0 and np.abs(expected).max() > 0
    np.testing.assert_allclose(proj[n], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_pool_sizes_set_the_smallest_image():
  _refused('smallest input with a 1x1 pool5 is 39',
           dict(name='alexnet', pool_window=2, pool_stride=2, image_size=38))
  _refused('smallest input with a 1x1 pool5 is 67', dict(name='alexnet', image_size=66))
  assert _abstract(dict(name='alexnet', pool_window=2, pool_stride=2,
                        image_size=39)).spec.map_sizes()['pool5'] == 1


@pytest.mark.parametrize('field', ['pool_window', 'pool_stride'])
def test_bad_pools_are_refused(field):
  _refused(f'model.{field}=0', {'name': 'alexnet', field: 0})
  c = base_config()
  c.model[field] = 0
  with pytest.raises(ConfigError, match=rf'config\.model\.{field}=0 is out of range: must be >= 1'):
    configs.check_values(c)


# ---- activation --------------------------------------------------------------------------------


def test_tanh_units_after_every_conv_and_fc_layer():
  t = trained('tanh_one_gpu')
  images = t.images()
  model = nnx.merge(t.prog.graphdef, t.init.params)

  def forward(x):
    acts = model(x, capture=True).activations
    return acts, model.conv1(x), model.fc7(acts['fc6'])  # and two layers' inputs to their units

  acts, conv1, fc7 = _run(forward, images)
  np.testing.assert_allclose(acts['conv1'], np.tanh(conv1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acts['fc7'], np.tanh(fc7), rtol=1e-5, atol=1e-6)
  for name in ALL_LAYERS[:-1]:
    a = np.asarray(acts[name])
    # In [-1, 1] (float32 rounds tanh of large inputs to ±1), and negative where ReLUs are not
    # (disjoint_pool_net's, in test_disjoint_pools_take_each_2x2_blocks_maximum).
    assert np.abs(a).max() <= 1 and a.min() < 0 and np.mean(np.abs(a) < 1) > 0.9, name


def test_tanh_has_no_deconvnet():
  spec = dict(name='alexnet', width=0.125, image_size=67, num_classes=10)
  relu, tanh = _abstract(spec), _abstract(dict(spec, activation='tanh'))
  assert relu.supports_deconv and not tanh.supports_deconv
  x = jax.ShapeDtypeStruct((1, 67, 67, 3), jnp.float32)
  with pytest.raises(ConfigError, match='the deconvnet needs ReLU units') as e:
    jax.eval_shape(lambda m, x: m(x, deconv=True), tanh, x)
  assert '\n' not in str(e.value)
  graphdef, params = nnx.split(tanh)
  apply = deconvnet.make_apply(graphdef)
  with pytest.raises(ConfigError, match="AlexNet has no deconvnet.*activation='relu'"):
    jax.eval_shape(lambda p, x: apply(p, x, True), params, x)
  jax.eval_shape(lambda p, x: apply(p, x, False), params, x)  # its features still come


def test_unknown_activation_is_refused():
  _refused(r"unknown model.activation 'sigmoid' for AlexNet; choose one of 'relu', 'tanh'",
           dict(name='alexnet', activation='sigmoid'))


# ---- variant='one_gpu' -------------------------------------------------------------------------


def test_one_gpu_net_parameters_and_widths(monkeypatch):
  model = _abstract(dict(name='alexnet', variant='one_gpu', towers=1))
  # One dense tower: conv1-conv4 at half the paper's kernels, conv5 and the fc layers kept.
  expected = (
      conv(11, 3, 48)  # conv1: 17,472
      + conv(5, 48, 128)  # conv2: 153,728
      + conv(3, 128, 192)  # conv3: 221,376
      + conv(3, 192, 192)  # conv4: 331,968
      + conv(3, 192, 256)  # conv5: 442,624
      + dense(6 * 6 * 256, 4096)  # fc6: 37,752,832
      + dense(4096, 4096)  # fc7: 16,781,312
      + dense(4096, 1000))  # fc8: 4,097,000
  assert expected == 59_798_312 == _param_count(model)
  assert abs(expected - PAPER) / PAPER < 0.02  # "approximately the same number of parameters"
  seen, norm = [], layers.local_response_norm
  monkeypatch.setattr(layers, 'local_response_norm',
                      lambda x, **kw: seen.append(x.shape[-1]) or norm(x, **kw))
  acts = _activations(model, 227)
  assert {k: v.shape[0] for k, v in acts.items()} == dict.fromkeys(ALL_LAYERS, 1)  # one tower
  widths = dict(conv1=48, conv2=128, conv3=192, conv4=192, conv5=256, fc6=4096, fc7=4096, fc8=1000)
  assert {k: v.shape[-1] for k, v in acts.items()} == widths
  assert [acts[n].shape[2] for n in ALL_LAYERS[:5]] == [55, 27, 13, 13, 13]
  assert seen == [48, 128]  # LRN after conv1 and conv2, as the paper's
  assert model.conv2.kernel.shape == (1, 5, 5, 48, 128)  # dense: every map reads all maps
  half = _abstract(dict(name='alexnet', variant='one_gpu', towers=1, width=0.5))
  assert half.spec.widths() == dict(conv1=24, conv2=64, conv3=96, conv4=96, conv5=128, fc6=2048,
                                    fc7=2048)


@pytest.mark.parametrize('fields', [dict(), dict(towers=1, hybrid=True)], ids=['towers', 'hybrid'])
def test_one_gpu_net_is_one_tower(fields):
  _refused(r"variant='one_gpu'.*set model\.towers=1 and model\.hybrid=False",
           dict(name='alexnet', variant='one_gpu', **fields))


def test_unknown_variant_names_the_choices():
  _refused("choose one of 'paper', 'torchvision', 'one_gpu'", dict(name='alexnet', variant='gpu'))


# ---- fc_width ----------------------------------------------------------------------------------


@pytest.mark.parametrize('fc, towers', [(2048, 2), (8192, 2), (2048, 1), (8192, 1)])
def test_fc_width_parameters(fc, towers):
  convs = (PAPER if towers == 2 else ONE_TOWER) - FC_PAPER
  model = _abstract(dict(name='alexnet', fc_width=fc, towers=towers))
  assert _param_count(model) == convs + dense(6 * 6 * 256, fc) + dense(fc, fc) + dense(fc, 1000)
  acts = _activations(model, 227)
  assert acts['fc6'].shape == acts['fc7'].shape == (towers, 1, fc // towers)


def test_fc_width_is_scaled_and_split_over_any_towers():
  model = _abstract(dict(name='alexnet', fc_width=2048, width=0.5, towers=4, num_classes=12))
  assert model.fc6.kernel.shape == (4, 256, 6 * 6 * 128)  # 1024 neurons, 256 per tower
  assert model.fc7.kernel.shape == (4, 256, 1024) and model.fc8.kernel.shape == (4, 3, 1024)


# ---- remove ------------------------------------------------------------------------------------

# Zeiler & Fergus's Table 3 on the one-tower AlexNet: the layer after a removed one reads the last
# one left (conv5 reads conv2's 256 maps, fc7 or fc8 pool5's 6x6x256).
REMOVALS = {
    (3, 4): ONE_TOWER - conv(3, 256, 384) - conv(3, 384, 384) - conv(3, 384, 256) +
            conv(3, 256, 256),
    (7,): ONE_TOWER - dense(4096, 4096),
    (6, 7): ONE_TOWER - FC_PAPER + dense(6 * 6 * 256, 1000),
    (3, 4, 6, 7):
        (conv(11, 3, 96) + conv(5, 96, 256) + conv(3, 256, 256) + dense(6 * 6 * 256, 1000)),
}


@pytest.mark.parametrize('remove', list(REMOVALS), ids=str)
def test_removed_layers(remove):
  model = _abstract(dict(name='alexnet', towers=1, remove=remove))
  assert _param_count(model) == REMOVALS[remove]
  kept = tuple(n for i, n in enumerate(ALL_LAYERS, 1) if i not in remove)
  assert model.layer_names == kept
  assert all(hasattr(model, n) != (int(n[-1]) in remove) for n in ALL_LAYERS)
  acts = _activations(model, 227)
  assert tuple(acts) == kept  # capture records exactly the layers it runs, in order
  assert acts['conv5'].shape == (1, 1, 13, 13, 256)
  if 3 in remove:
    assert model.conv5.kernel.shape == (1, 3, 3, 256, 256)
  assert model.fc8.kernel.shape[-1] == (6 * 6 * 256 if 7 in remove and 6 in remove else 4096)


def test_tools_follow_the_removed_layers():
  """What iterates ``layer_names`` (summary, freeze_through, features, comm_map) sees only the
  layers the network has."""
  c = base_config()
  c.model = model_config('alexnet', towers=1, remove=(3, 4), num_classes=10, width=0.125,
                         image_size=67)
  c.mesh.model = 1
  names = ('conv1', 'conv2', 'conv5', 'fc6', 'fc7', 'fc8')
  table = describe.layer_table(c)
  assert tuple(r['layer'] for r in table['layers']) == names
  assert sum(r['parameters'] for r in table['layers']) == table['total_parameters']
  assert optim.frozen_layers(c.model, 'conv5') == (('conv1', 'conv2', 'conv5'),
                                                   frozenset({'conv1', 'conv2', 'conv5'}))
  with pytest.raises(ConfigError, match="freeze_through='conv3' is not a layer"):
    optim.frozen_layers(c.model, 'conv3')
  model = _abstract(c.model)
  assert inference.penultimate_layer(model) == 'fc7'
  with pytest.raises(ConfigError, match="no layer 'conv4'"):
    inference.check_layers(model, ['conv4'])
  assert comm_map.layer_scopes(c) == names + comm_map.STEP_SCOPES
  without_fc = _abstract(dict(name='alexnet', towers=1, remove=(6, 7), image_size=67))
  assert inference.penultimate_layer(without_fc) == 'conv5'


@pytest.mark.parametrize('fields', [dict(towers=2), dict(towers=1, hybrid=True)],
                         ids=['towers', 'hybrid'])
def test_removing_layers_needs_one_tower(fields):
  _refused('Zeiler & Fergus removed layers from a one-tower AlexNet; set model.towers=1',
           dict(name='alexnet', remove=(3, 4), **fields))


def test_only_zeiler_and_fergus_layers_can_be_removed():
  _refused(r'model\.remove=\(5,\): only layers \(3, 4, 6, 7\)',
           dict(name='alexnet', towers=1, remove=(5,)))
  c = base_config()
  c.model.update(towers=1, remove=(0,))
  with pytest.raises(ConfigError, match=r'config\.model\.remove=\(0,\) is out of range'):
    configs.check_values(c)


# ---- ResNet's plain networks -------------------------------------------------------------------


@pytest.mark.parametrize('depth, plain', [(18, 11_515_688), (34, 21_623_848)])
def test_plain_networks_lack_exactly_the_projection_shortcuts(depth, plain):
  residual = _abstract(dict(name='resnet', depth=depth))
  without = _abstract(dict(name='resnet', depth=depth, residual=False))
  shortcuts = 0
  for name in residual.block_names:
    block = getattr(residual, name)
    if block.shortcut is not None:  # a 1x1 convolution without bias and its batch norm
      _, kh, kw, cin, cout = block.shortcut.kernel.shape
      shortcuts += kh * kw * cin * cout + 2 * cout
    assert getattr(without, name).shortcut is None
  # conv3_1, conv4_1, conv5_1: 64·128 + 2·128 + 128·256 + 2·256 + 256·512 + 2·512.
  assert shortcuts == 173_824
  assert _param_count(without) == _param_count(residual) - shortcuts == plain
  assert not any('shortcut' in jax.tree_util.keystr(p)
                 for p, _ in jax.tree.flatten_with_path(nnx.state(without))[0])
  assert [a.shape for a in _activations(without, 224).values()
         ] == [a.shape for a in _activations(residual, 224).values()]


def _block(residual: bool, cin: int, width: int, stride: int, *, zero_f: bool = False) -> Block:
  """A basic block with random weights, running statistics and affine terms of both signs (drawn
  in NumPy: eager JAX initialisers compile once per shape); ``zero_f``: its residual function F
  is 0, its last batch norm's scale and shift zero."""
  spec = ResNetSpec(depth=18, width=0.125, image_size=32, num_classes=10, residual=residual)
  graphdef, state = nnx.split(
      nnx.eval_shape(lambda: Block(cin, width, stride, 'basic', spec, nnx.Rngs(0))))
  rng = np.random.default_rng(1)
  pure = nnx.to_pure_dict(state)
  last = len(pure['bns']) - 1

  def draw(path, x):
    keys = [getattr(k, 'key', None) for k in path]
    if zero_f and keys[:2] == ['bns', last] and keys[-1] in ('scale', 'bias'):
      return np.zeros(x.shape, np.float32)
    if keys[-1] == 'kernel':
      return rng.normal(size=x.shape).astype(np.float32) / np.sqrt(np.prod(x.shape[1:-1]))
    if keys[-1] == 'var':
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    return rng.normal(size=x.shape).astype(np.float32)

  return nnx.merge(graphdef, jax.tree.map_with_path(draw, pure))


def _maps(cin: int) -> jax.Array:  # a block's input: the ReLU output of the block before it
  return jnp.asarray(np.maximum(np.random.default_rng(2).normal(size=(2, 8, 8, cin)), 0),
                     jnp.float32)


@pytest.mark.parametrize('stride, width', [(1, 8), (2, 16)], ids=['identity', 'halving'])
def test_plain_block_is_relu_of_its_stack(stride, width):
  block, x = _block(False, 8, width, stride), _maps(8)
  assert block.shortcut is None

  def by_hand(y, conv, bn, stride):
    y = jax.lax.conv_general_dilated(y, conv.kernel[...][0], (stride, stride), [(1, 1)] * 2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return (y - bn.mean[...]) / jnp.sqrt(bn.var[...] + bn.epsilon) * bn.scale[...] + bn.bias[...]

  def both(x):
    h = jax.nn.relu(by_hand(x, block.convs[0], block.bns[0], stride))
    expected = jax.nn.relu(by_hand(h, block.convs[1], block.bns[1], 1))
    return block(x[None], train=False, exchange=layers.LOCAL_TOWERS)[0], expected

  got, expected = _run(both, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert np.asarray(got).min() == 0 and np.asarray(got).max() > 0


def test_with_a_zero_residual_function_blocks_pass_their_input_or_nothing():
  x = _maps(8)
  for residual in (True, False):
    block = _block(residual, 8, 8, 1, zero_f=True)
    out = np.asarray(_run(lambda x: block(x[None], train=False, exchange=layers.LOCAL_TOWERS)[0],
                          x))
    # y = ReLU(0 + x) = x for the residual block's non-negative input; the plain one's ReLU(0) = 0.
    np.testing.assert_array_equal(out, x if residual else np.zeros_like(x))
