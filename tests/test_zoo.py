"""The model zoo against its papers: exact parameter counts, map sizes, and training through the
same program as AlexNet (batch norm statistics over the data axis, GoogLeNet's auxiliary heads,
ZFNet's ablations and feature-scale clipping)."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alexnet_jax import checkpointing, errors, optim, program, sharding
from alexnet_jax.configs import IMAGENET_STD_RGB, base_config
from alexnet_jax.models import contract, create_model, describe
from alexnet_jax.models.zfnet import ZFNetSpec
from alexnet_jax.tools import comm_map
from alexnet_jax.visualize import deconvnet

# Compiling the zoo's many small convolutions with XLA's full CPU optimisation takes minutes on a
# small machine; the tests compile at optimisation level 0 (same programs, same results).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)

COUNTS = [
    (dict(name='zfnet'), 62_357_608),
    (dict(name='vgg', variant='A'), 132_863_336),
    (dict(name='vgg', variant='A-LRN'), 132_863_336),
    (dict(name='vgg', variant='B'), 133_047_848),
    (dict(name='vgg', variant='C'), 133_638_952),
    (dict(name='vgg', variant='D'), 138_357_544),
    (dict(name='vgg', variant='E'), 143_667_240),
    # Batch norm adds a scale and a shift per map (torchvision's vgg*_bn counts).
    (dict(name='vgg', variant='A', batch_norm=True), 132_868_840),
    (dict(name='vgg', variant='D', batch_norm=True), 138_365_992),
    (dict(name='vgg', variant='E', batch_norm=True), 143_678_248),
    (dict(name='googlenet', aux_heads=False), 6_998_552),
    (dict(name='googlenet'), 13_378_280),
    (dict(name='resnet', depth=18), 11_689_512),
    (dict(name='resnet', depth=34), 21_797_672),
    (dict(name='resnet', depth=50), 25_557_032),
    (dict(name='resnet', depth=101), 44_549_160),
    (dict(name='resnet', depth=152), 60_192_808),
]


def _abstract(model_cfg):
  return nnx.eval_shape(lambda: create_model(model_cfg, nnx.Rngs(0)))


def _param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('model_cfg, expected', COUNTS, ids=lambda x: str(x))
def test_parameter_counts(model_cfg, expected):
  assert _param_count(_abstract(model_cfg)) == expected


def test_zfnet_maps_are_the_papers():
  model = _abstract(dict(name='zfnet'))
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  logits, _, acts = jax.eval_shape(lambda m, x: m(x, capture=True), model, x)
  assert logits.shape == (2, 1000)
  sizes = ZFNetSpec().map_sizes()
  assert [sizes[k] for k in ('conv1', 'pool1', 'conv2', 'pool2', 'conv3', 'conv5', 'pool5')] == \
      [110, 55, 26, 13, 13, 13, 6]
  assert {k: v.shape[2] for k, v in acts.items() if k.startswith('conv')} == \
      dict(conv1=110, conv2=26, conv3=13, conv4=13, conv5=13)


@pytest.mark.parametrize('model_cfg, size, layers', [
    (dict(name='zfnet'), 67, 8),
    (dict(name='vgg', variant='C', batch_norm=True), 32, 16),
    (dict(name='googlenet'), 80, 13),
    (dict(name='resnet', depth=101), 32, 35),
], ids=['zfnet', 'vgg', 'googlenet', 'resnet'])
def test_output_shapes_at_small_resolution(model_cfg, size, layers):
  model = _abstract(dict(model_cfg, num_classes=10, image_size=size, width=0.125))
  x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
  logits, _, acts = jax.eval_shape(lambda m, x: m(x, capture=True), model, x)
  assert logits.shape == (3, 10) and len(acts) == layers
  assert jax.eval_shape(lambda m, x: m(x, gather_logits=False), model, x).logits.shape == (1, 3, 10)
  assert all(a.shape[:2] == (1, 3) for a in acts.values())  # one tower, then the batch


# The contract every model declares (models.contract): capabilities, layer order, output.
CONTRACT = [
    # model config, size, supports_deconv, has_aux_heads, has_batch_stats
    (dict(name='alexnet'), 67, True, False, False),
    (dict(name='alexnet', towers=4, hybrid=True), 67, True, False, False),
    (dict(name='zfnet'), 67, True, False, False),
    (dict(name='vgg', variant='A-LRN'), 32, True, False, False),
    (dict(name='vgg', variant='B', batch_norm=True), 32, True, False, True),
    (dict(name='googlenet'), 80, False, True, False),
    (dict(name='googlenet', aux_heads=False), 80, False, False, False),
    (dict(name='resnet', depth=18), 32, False, False, True),
]


@pytest.mark.parametrize('model_cfg, size, deconv, aux, batch_stats', CONTRACT, ids=lambda x: str(x)
                         if isinstance(x, dict) else None)
def test_every_model_declares_its_contract(model_cfg, size, deconv, aux, batch_stats):
  model = _abstract(dict(model_cfg, num_classes=12, image_size=size, width=0.125))
  assert isinstance(model, contract.Classifier)
  assert (model.supports_deconv, model.has_aux_heads, model.has_batch_stats) == (deconv, aux,
                                                                                 batch_stats)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  key = jax.random.key(0)
  for train in (False, True):
    out = jax.eval_shape(lambda m, x: m(x, train=train, dropout_key=key, capture=True), model, x)
    assert isinstance(out, contract.ModelOutput) and out.logits.shape == (2, 12)
    # The layers capture records, in the order they run, are the ones the model declares.
    assert tuple(out.activations) == model.layer_names
    assert len(out.aux_logits) == (2 if aux and train else 0)
    assert all(a.shape == (2, 12) for a in out.aux_logits)
  plain = jax.eval_shape(lambda m, x: m(x), model, x)
  assert plain.activations == {} and plain.aux_logits == ()
  if not deconv:  # asking anyway is a caller's bug, never silently ignored
    with pytest.raises(TypeError, match='does not support deconv=True'):
      jax.eval_shape(lambda m, x: m(x, deconv=True), model, x)


def test_deconvnet_of_a_model_without_one_is_refused_in_one_sentence():
  model = _abstract(dict(name='resnet', depth=18, num_classes=10, image_size=32, width=0.0625))
  graphdef, params = nnx.split(model)
  apply = deconvnet.make_apply(graphdef)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  with pytest.raises(errors.ConfigError, match='ResNet has no deconvnet'):
    jax.eval_shape(lambda p, x: apply(p, x, True), params, x)


@pytest.mark.parametrize(
    'remove, widths, expected', [
        ((3, 4), {}, 62_357_608 - 885_120 - 1_327_488 - 884_992 + 590_080),
        ((7,), {}, 62_357_608 - 16_781_312),
        ((6, 7), {}, 9_216 * 1000 + 1000 + 3_726_464),
        ((3, 4, 6, 7), {}, 14_208 + 614_656 + 590_080 + 9_216 * 1000 + 1000),
        ((), dict(fc_width=2048), None),
        ((), dict(fc_width=8192), None),
        ((), dict(conv_widths=(512, 1024, 512)), None),
    ], ids=['no3-4', 'no7', 'no6-7', 'no3-4-6-7', 'fc2048', 'fc8192', 'conv512-1024-512'])
def test_zfnet_ablations(remove, widths, expected):
  model = _abstract(dict(name='zfnet', remove=remove, **widths))
  if expected is not None:
    assert _param_count(model) == expected
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  acts = jax.eval_shape(lambda m, x: m(x, capture=True), model, x).activations
  assert not any(f'{n}' in acts for n in ('conv3', 'conv4', 'fc6', 'fc7') if int(n[-1]) in remove)
  if 'fc_width' in widths:
    assert acts['fc6'].shape[-1] == widths['fc_width'] == acts['fc7'].shape[-1]
  if 'conv_widths' in widths:
    assert [acts[f'conv{i}'].shape[-1] for i in (3, 4, 5)] == [512, 1024, 512]


def test_bad_zoo_configs():
  with pytest.raises(ValueError, match='only layers'):
    create_model(dict(name='zfnet', remove=(5,)), nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown model.variant'):
    create_model(dict(name='vgg', variant='F'), nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown model.depth'):
    create_model(dict(name='resnet', depth=20), nnx.Rngs(0))
  with pytest.raises(ValueError, match='at least 79'):
    create_model(dict(name='googlenet', image_size=64), nnx.Rngs(0))
  with pytest.raises(ValueError, match='smallest input'):
    create_model(dict(name='zfnet', image_size=40), nnx.Rngs(0))


# ---- training through the program -------------------------------------------------------------


def zoo_config(model: dict, size: int, *, data: int = 2):
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(model, num_classes=10, image_size=size, width=0.0625))
  c.input.std_rgb = IMAGENET_STD_RGB  # unit-variance inputs for the scaled-down He-initialised nets
  c.mesh.update(data=data, model=1)
  c.batch_size = 8
  c.eval_batch_size = 8
  return c


class Trained:
  """A program compiled once, its initial state, one training step's result, and an evaluation."""

  def __init__(self, config, *, evaluate: bool = True):
    self.prog = program.build_program(config, steps_per_epoch=10)
    size = config.model.image_size
    rng = np.random.default_rng(0)
    host = dict(image=rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
                label=rng.integers(0, 10, 8).astype(np.int32))
    self.batch = sharding.put_batch(host, self.prog.mesh)
    self.eval_batch = sharding.put_batch(dict(host, mask=np.ones(8, np.int32)), self.prog.mesh)
    self.init = jax.device_get(self.prog.init_state.lower().compile(FAST_COMPILE)())
    state = jax.device_put(self.init, self.prog.state_shardings)
    self.train = self.prog.train_step.lower(state, self.batch).compile(FAST_COMPILE)
    self.state, self.metrics = jax.device_get(self.train(state, self.batch))
    if evaluate:
      self.evaluate = self.prog.eval_step.lower(state.params, state.batch_stats,
                                                self.eval_batch).compile(FAST_COMPILE)

  def eval_metrics(self, params, batch_stats):
    return jax.device_get(self.evaluate(params, batch_stats, self.eval_batch))


ZOO = dict(zfnet=(dict(name='zfnet', init='he'), 67), vgg_bn=(dict(name='vgg', variant='A',
                                                                   batch_norm=True, init='he'), 32),
           googlenet=(dict(name='googlenet',
                           init='he'), 80), resnet18=(dict(name='resnet', depth=18), 32))


@functools.cache
def trained_zoo(name: str) -> Trained:
  """One compiled program per model, shared by the tests of this module."""
  return Trained(zoo_config(*ZOO[name]))


@pytest.fixture(params=list(ZOO))
def trained(request):
  return request.param, trained_zoo(request.param)


def test_one_training_step_per_model(trained):
  name, t = trained
  assert np.isfinite(t.metrics['loss']) and 0 < t.metrics['loss'] < 50
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), t.init.params, t.state.params)
  assert all(jax.tree.leaves(changed)), name
  has_bn = name in ('vgg_bn', 'resnet18')
  assert bool(t.init.batch_stats) == has_bn
  for a, b in zip(jax.tree.leaves(t.init.batch_stats), jax.tree.leaves(t.state.batch_stats)):
    assert not np.array_equal(a, b)  # running averages moved towards the batch's moments
  out = t.eval_metrics(t.state.params, t.state.batch_stats)
  assert out['count'] == 8 and np.isfinite(out['loss'])
  if has_bn:  # evaluation normalises with the running averages, not the batch's own moments
    other = jax.tree.map(lambda v: v * 2.0, t.state.batch_stats)
    assert t.eval_metrics(t.state.params, other)['loss'] != pytest.approx(out['loss'])


def test_comm_map_names_every_collective_of_a_zoo_model():
  """comm_map attributes ResNet's collectives to its own layers: batch norm's forward moments are
  reduced over the data axis in the layers that hold them, nothing is left unattributed."""
  t = trained_zoo('resnet18')
  scopes = comm_map.layer_scopes(t.prog.config)
  assert scopes[:2] == ('conv1', 'conv2_1') and scopes[-3:] == comm_map.STEP_SCOPES
  colls = comm_map.parse_collectives(t.train.as_text(), dict(t.prog.mesh.shape), scopes)
  assert colls and all(c.layer in scopes for c in colls), {
      c.op_name for c in colls if c.layer not in scopes
  }
  forward = {c.layer for c in colls if c.direction == 'forward' and c.axis == 'data'}
  assert {'conv1', 'conv2_1', 'conv5_2'} <= forward
  rows = comm_map.summarize(colls, scopes)
  assert rows[0]['layer'] == 'conv1' and 'conv5_2' in comm_map.format_table(rows, {'data': 2})


def test_batch_norm_statistics_agree_across_data_shards():
  """The same batch on 4 data shards and on 1: identical running statistics and updates."""
  model, size = ZOO['vgg_bn']
  model = dict(model, dropout=0.0)  # dropout masks depend on the shard
  four, one = Trained(zoo_config(model, size, data=4)), Trained(zoo_config(model, size, data=1))
  for a, b in zip(jax.tree.leaves(four.state.batch_stats), jax.tree.leaves(one.state.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(four.state.params), jax.tree.leaves(one.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
  assert four.metrics['loss'] == pytest.approx(one.metrics['loss'], rel=1e-5)


def test_googlenet_auxiliary_heads_count_in_training_only():
  t = trained_zoo('googlenet')
  # Training: the objective is the loss plus 0.3 x each head's loss, and the heads learn.
  assert t.metrics['objective'] > t.metrics['loss'] + 0.3 * 2 * 1.0
  for head in ('aux1', 'aux2'):
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(t.init.params[head]),
                                                        jax.tree.leaves(t.state.params[head])))
  # Evaluation: the heads are not run — poisoning their weights changes nothing.
  out = t.eval_metrics(t.state.params, t.state.batch_stats)
  poisoned = dict(t.state.params, aux1=jax.tree.map(lambda p: p * np.nan, t.state.params['aux1']),
                  aux2=jax.tree.map(lambda p: p * np.nan, t.state.params['aux2']))
  assert t.eval_metrics(poisoned, t.state.batch_stats) == out
  with_nan_heads = jax.device_put(t.init.replace(params=poisoned), t.prog.state_shardings)
  _, metrics = t.train(with_nan_heads, t.batch)
  assert np.isnan(float(metrics['objective']))


@pytest.mark.parametrize('remove', [(3, 4), (7,), (6, 7), (3, 4, 6, 7)])
def test_zfnet_ablations_train(remove):
  t = Trained(zoo_config(dict(name='zfnet', init='he', remove=remove), 67), evaluate=False)
  assert np.isfinite(t.metrics['loss'])
  assert set(t.state.params) == {
      n for i, n in enumerate(('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'), 1)
      if i not in remove
  }


# ---- feature-scale clipping -------------------------------------------------------------------


def _filter_rms(kernel):
  return np.sqrt(np.mean(np.square(kernel), axis=(1, 2, 3)))


def test_filter_rms_clipping():
  rng = np.random.default_rng(0)
  kernel = rng.normal(scale=0.05, size=(2, 3, 3, 4, 6)).astype(np.float32)
  kernel[0, ..., 1] *= 10.0  # one filter far above RMS 0.1, one just above
  kernel[1, ..., 4] *= 2.5
  params = {
      'conv': {'kernel': jnp.asarray(kernel), 'bias': jnp.full((2, 6), 5.0)},
      'fc': {'kernel': jnp.full((1, 4, 3), 5.0)}
  }
  tx = optim.clip_filter_rms(0.1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = jax.device_get(optax.apply_updates(params, updates))
  rms_before, rms_after = _filter_rms(kernel), _filter_rms(new['conv']['kernel'])
  over = rms_before > 0.1
  assert over.sum() == 2 and over[0, 1] and over[1, 4]
  np.testing.assert_allclose(rms_after[over], 0.1, rtol=1e-5)
  assert np.all(rms_after <= 0.1 + 1e-6)
  np.testing.assert_array_equal(
      new['conv']['kernel'][~over.reshape(2, 1, 1, 1, 6).repeat(3, 1).repeat(3, 2).repeat(4, 3)],
      kernel[~over.reshape(2, 1, 1, 1, 6).repeat(3, 1).repeat(3, 2).repeat(4, 3)])
  # Direction kept; biases and fc weights are not filters.
  np.testing.assert_allclose(new['conv']['kernel'][0, ..., 1] / kernel[0, ..., 1],
                             0.1 / rms_before[0, 1], rtol=1e-5)
  np.testing.assert_array_equal(new['conv']['bias'], 5.0)
  np.testing.assert_array_equal(new['fc']['kernel'], 5.0)


def test_clipping_in_the_optimiser_chain():
  c = base_config().optim
  c.update(filter_rms_clip=0.1, weight_decay=0.0)
  tx = optim.make_optimizer(c, steps_per_epoch=1, num_epochs=1)
  params = {'conv': {'kernel': jnp.full((1, 3, 3, 2, 2), 0.05)}}
  grads = {'conv': {'kernel': jnp.full((1, 3, 3, 2, 2), -100.0)}}  # pushes the weights to 1.05
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(_filter_rms(np.asarray(new['conv']['kernel'])), 0.1, rtol=1e-5)
  assert float(optim.current_learning_rate(tx.init(params))) == pytest.approx(0.01)


@pytest.mark.parametrize('model_cfg, total',
                         [(dict(name='googlenet'), 13_378_280),
                          (dict(name='resnet', depth=152), 60_192_808),
                          (dict(name='vgg', variant='D', batch_norm=True), 138_365_992)])
def test_summary_lists_every_model(model_cfg, total):
  c = base_config()
  c.model = ml_collections.ConfigDict(model_cfg)
  c.model.image_size = 224
  c.mesh.model = 1
  table = describe.layer_table(c)
  assert table['total_parameters'] == total
  names = [r['layer'] for r in table['layers']]
  assert names[0] in ('conv1', 'conv1_1') and names[-1] in ('fc', 'fc8')
  if model_cfg['name'] != 'googlenet':  # every parameter sits in a row but the auxiliary heads'
    assert sum(r['parameters'] for r in table['layers']) == total
  else:
    assert total - sum(r['parameters'] for r in table['layers']) == 13_378_280 - 6_998_552


# ---- "one weird trick" ------------------------------------------------------------------------


def _hybrid_config(data, model):
  c = zoo_config({}, 67, data=data)
  c.model = base_config().model
  c.model.update(towers=2, hybrid=True, dropout=0.0, init='he', num_classes=10, image_size=67,
                 width=0.125)
  c.mesh.update(data=data, model=model)
  return c


def test_hybrid_batch_must_split_over_the_model_axis_before_anything_compiles():
  c = _hybrid_config(2, 2)
  c.batch_size = 6  # 3 examples per data shard cannot split over 2 model devices
  with pytest.raises(errors.MeshError, match='multiple of mesh.data x mesh.model = 4'):
    program.build_program(c, steps_per_epoch=1)
  c.model.hybrid = False  # the two-tower model shares every example between its towers
  program.build_program(c, steps_per_epoch=1)


def test_hybrid_parallelism_computes_the_unsplit_update():
  """Data-parallel convs + neuron-split fcs over 2 devices == the same net on one device."""
  split, whole = Trained(_hybrid_config(1, 2),
                         evaluate=False), Trained(_hybrid_config(1, 1), evaluate=False)
  assert split.metrics['loss'] == pytest.approx(whole.metrics['loss'], rel=1e-5)
  for a, b in zip(jax.tree.leaves(split.state.params), jax.tree.leaves(whole.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # Conv weights are one replicated tower; fc weights are split over the model axis.
  specs = split.prog.state_specs.params
  assert 'model' not in specs['conv3']['kernel'] and specs['fc6']['kernel'] == P(
      'model', None, None)
  colls = comm_map.parse_collectives(split.train.as_text(), dict(split.prog.mesh.shape))
  model_axis = {(c.layer, c.direction, c.kind) for c in colls if c.axis == 'model'}
  # The switch from batch-split to neuron-split is fc6's all-gather of the examples' features.
  assert ('fc6', 'forward', 'all-gather') in model_axis
  assert not any(layer.startswith('conv') for layer, _, kind in model_axis if kind != 'all-reduce')


def test_compare_parallelism_bytes():
  c = base_config()
  c.model.update(num_classes=16, image_size=67, width=0.0625)
  c.batch_size = 16
  rows = comm_map.compare_parallelism(c, compiler_options=FAST_COMPILE)
  assert [r['mesh'] for r in rows] == ['8 x 1', '4 x 2', '1 x 8']
  data, towers, hybrid = (r['bytes_per_step'] for r in rows)
  assert hybrid < towers < data
  assert rows[0]['activation_bytes_per_device'] == 0 < rows[2]['activation_bytes_per_device']
  assert 'hybrid (one weird trick)' in comm_map.format_comparison(rows, c)


# ---- configs and checkpoints ------------------------------------------------------------------


def _load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name, params', [('zfnet', 62_357_608), ('vgg', 138_357_544),
                                          ('googlenet', 13_378_280), ('resnet', 25_557_032),
                                          ('owt', 62_378_344)])
def test_configs(name, params):
  c = _load_config(name)
  assert _param_count(_abstract(c.model)) == params
  assert c.mesh.model == (8 if name == 'owt' else 1)
  if name == 'resnet':
    assert (c.batch_size, c.optim.momentum, c.optim.weight_decay, c.optim.learning_rate,
            c.optim.schedule) == (256, 0.9, 1e-4, 0.1, 'plateau')
    assert 'dropout' not in c.model
  if name == 'zfnet':
    assert c.optim.filter_rms_clip == 0.1 and c.model.weight_std == 0.01


def test_batch_norm_statistics_are_checkpointed(tmp_path):
  t = trained_zoo('vgg_bn')
  cfg = base_config().checkpoint
  cfg.async_save = False
  manager = checkpointing.make_manager(str(tmp_path), cfg)
  state = jax.device_put(t.state, t.prog.state_shardings)
  checkpointing.save(manager, 1, state, dict(epoch=1))
  manager.wait_until_finished()
  restored = checkpointing.restore_latest(manager, t.prog.abstract_state).state
  for a, b in zip(jax.tree.leaves(t.state.batch_stats), jax.tree.leaves(restored.batch_stats)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert len(jax.tree.leaves(restored.batch_stats)) == 16
