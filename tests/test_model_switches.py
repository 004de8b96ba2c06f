"""The switches that let the zoo hold the original releases exactly: LRN's k (Caffe's 1), AlexNet's
LRN across the towers (Caffe's bvlc_alexnet), torchvision's alexnet, GoogLeNet's Caffe LRN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import inference, program, sharding, steps
from alexnet_jax.configs import model_config
from alexnet_jax.errors import ConfigError
from alexnet_jax.models import create_model, layers, spec_defaults
from alexnet_jax.models.alexnet import AlexNet, AlexNetSpec
from alexnet_jax.models.googlenet import GoogLeNet, GoogLeNetSpec

from helpers import tiny_config

# The zoo's small programs compile at XLA's optimisation level 0 (same programs, same results).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
N, ALPHA, BETA = 5, 1e-4, 0.75


def _lrn_reference(a, k, alpha):
  """Krizhevsky's LRN over the last axis in NumPy (float64), maps beyond the edges absent."""
  a = np.asarray(a, np.float64)
  out = np.empty_like(a)
  c = a.shape[-1]
  for i in range(c):
    lo, hi = max(0, i - N // 2), min(c - 1, i + N // 2)
    out[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo:hi + 1]**2, axis=-1))**BETA
  return out


def _maps(*shape, seed=0):
  """Maps large enough (ReLU outputs of raw pixels) that LRN's window sum weighs next to k."""
  return np.abs(np.random.default_rng(seed).normal(scale=60.0, size=shape)).astype(np.float32)


def _abstract(model_cls, spec):
  """The model without its parameters: enough to call its LRN, which reads only the spec."""
  return nnx.eval_shape(lambda: model_cls(spec, rngs=nnx.Rngs(0)))


def _towers(a):
  return np.concatenate(list(np.asarray(a)), -1)  # (towers, ..., c) → (..., towers * c)


TINY = dict(width=0.125, image_size=67, num_classes=10)

# ---- lrn_k and the defaults -------------------------------------------------------------------


def test_alexnet_lrn_k_one_with_alpha_over_n_is_caffes_lrn():
  model = _abstract(AlexNet, AlexNetSpec(lrn_k=1.0, lrn_alpha_divided_by_n=True, **TINY))
  x = _maps(2, 2, 5, 5, 6)  # (towers, batch, h, w, maps per tower)
  got = np.asarray(model._lrn(jnp.asarray(x), layers.LOCAL_TOWERS))
  ref = np.stack([_lrn_reference(t, 1.0, ALPHA / N) for t in x])
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
  assert not np.allclose(got, np.stack([_lrn_reference(t, 2.0, ALPHA / N) for t in x]), rtol=1e-3)


def test_alexnet_defaults_are_the_papers_network():
  assert {k: spec_defaults('alexnet')[k] for k in ('lrn_k', 'lrn_across_towers', 'variant')} == \
      dict(lrn_k=2.0, lrn_across_towers=False, variant='paper')
  model = _abstract(AlexNet, AlexNetSpec(**TINY))
  x = jnp.asarray(_maps(2, 2, 5, 5, 6))
  got = model._lrn(x, layers.LOCAL_TOWERS)
  # Bit for bit the call the model made before the switches, each tower alone.
  np.testing.assert_array_equal(got, layers.local_response_norm(x))
  np.testing.assert_allclose(got, np.stack([_lrn_reference(t, 2.0, ALPHA) for t in np.asarray(x)]),
                             rtol=2e-5, atol=1e-6)


# ---- lrn_across_towers ------------------------------------------------------------------------


@pytest.fixture(scope='module')
def caffe_alexnet():
  """bvlc_alexnet's LRN (k=1, alpha/n, across the towers) on the tiny two-tower AlexNet: its
  program for a 1x2 mesh, parameters, a batch, and a local (LocalTowers) run of it."""
  c = tiny_config(data=1, model=2)
  c.model.update(lrn_across_towers=True, lrn_k=1.0, lrn_alpha_divided_by_n=True)
  c.input.std_rgb = (0.25,) * 3  # large inputs: LRN's window sum weighs next to k
  prog = program.build_program(c, steps_per_epoch=1)
  params = prog.init_state.lower().compile(FAST_COMPILE)().params
  rng = np.random.default_rng(0)
  host = dict(image=rng.integers(0, 256, (4, 67, 67, 3), dtype=np.uint8),
              label=rng.integers(0, 10, 4).astype(np.int32))
  images = steps.normalize_batch(host, prog.norm, jnp.float32, train=False)

  def local(params, images):
    model = nnx.merge(prog.graphdef, params)
    out = model(images, capture=True)
    normalised = model._lrn(out.activations['conv1'], layers.LOCAL_TOWERS)
    return out, normalised, jax.nn.relu(model.conv2(layers.max_pool(normalised)))

  local_params = jax.device_get(params)
  run = jax.jit(local).lower(local_params, images).compile(FAST_COMPILE)
  return prog, params, host, run(local_params, images)


def test_lrn_across_towers_windows_cross_the_boundary(caffe_alexnet):
  *_, (out, normalised, conv2) = caffe_alexnet
  conv1 = np.asarray(out.activations['conv1'])  # (2 towers, batch, 15, 15, 3)
  c = conv1.shape[-1]
  ref = _lrn_reference(_towers(conv1), 1.0, ALPHA / N)  # windows over the concatenated 2c maps
  np.testing.assert_allclose(_towers(normalised), ref, rtol=2e-5, atol=1e-6)
  # Only the n//2 maps either side of the boundary see the other tower.
  alone = np.concatenate([_lrn_reference(t, 1.0, ALPHA / N) for t in conv1], -1)
  differs = ~np.isclose(ref, alone, rtol=1e-6, atol=0).all(axis=(0, 1, 2))
  assert list(np.flatnonzero(differs)) == [c - 2, c - 1, c, c + 1]
  # The forward pass normalises so: conv2 reads the pooled cross-tower maps.
  np.testing.assert_allclose(out.activations['conv2'], conv2, rtol=1e-5, atol=1e-5)
  # conv2's LRN crosses the boundary too.
  model = _abstract(
      AlexNet, AlexNetSpec(lrn_across_towers=True, lrn_k=1.0, lrn_alpha_divided_by_n=True, **TINY))
  x = _maps(2, 2, 3, 3, 8)
  np.testing.assert_allclose(_towers(model._lrn(jnp.asarray(x), layers.LOCAL_TOWERS)),
                             _lrn_reference(_towers(x), 1.0, ALPHA / N), rtol=2e-5, atol=1e-6)


def test_lrn_across_towers_on_a_mesh_equals_local_towers(caffe_alexnet):
  prog, params, host, (out, *_) = caffe_alexnet
  # The features command's step: the model under MeshContext, fc8 gathered over the towers.
  step = inference.make_outputs_step(prog.graphdef, sharding.MeshContext(), layers=('fc8',),
                                     probabilities=False, **prog.norm)
  specs = (prog.state_specs.params, prog.state_specs.batch_stats, P(sharding.DATA))
  on_mesh = jax.jit(
      sharding.shard_step(step, prog.mesh, in_specs=specs, out_specs=P(sharding.DATA),
                          gathered=True))
  batch = sharding.put_batch(host, prog.mesh)
  mesh_logits = on_mesh.lower(params, {}, batch).compile(FAST_COMPILE)(params, {}, batch)['fc8']
  np.testing.assert_allclose(mesh_logits, out.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('local_towers', [1, 2])
def test_mesh_own_maps_undoes_gather(caffe_alexnet, local_towers):
  mesh = caffe_alexnet[0].mesh  # 1x2
  ctx = sharding.MeshContext()
  x = jax.device_put(_maps(2 * local_towers, 3, 4), NamedSharding(mesh, P(sharding.MODEL)))
  round_trip = jax.jit(
      sharding.shard_step(lambda x: ctx.own_maps(ctx.gather(x), local_towers), mesh,
                          in_specs=P(sharding.MODEL), out_specs=P(sharding.MODEL)))
  np.testing.assert_array_equal(round_trip(x), x)
  np.testing.assert_array_equal(
      layers.LOCAL_TOWERS.own_maps(layers.LOCAL_TOWERS.gather(x), 2 * local_towers), x)


# ---- torchvision's alexnet --------------------------------------------------------------------


def _torchvision(**kw):
  return dict(name='alexnet', variant='torchvision', towers=1, **kw)


def test_torchvision_alexnet_parameters_and_maps_at_224():
  model = nnx.eval_shape(lambda: create_model(_torchvision(image_size=224), nnx.Rngs(0)))
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == \
      61_100_840
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(lambda m, x: m(x, capture=True), model, x)
  assert {k: v.shape[2:] for k, v in out.activations.items()
         } == dict(conv1=(55, 55, 64), conv2=(27, 27, 192), conv3=(13, 13, 384),
                   conv4=(13, 13, 256), conv5=(13, 13, 256), fc6=(4096,), fc7=(4096,), fc8=(1000,))
  sizes = model.spec.map_sizes()
  assert (sizes['conv2'], sizes['pool5'], sizes['avgpool']) == (27, 6, 6)  # pool1 27, pool5 6x6
  assert model.fc6.kernel.shape == (1, 4096, 6 * 6 * 256)
  assert out.logits.shape == (2, 1000)


def test_torchvision_alexnet_refuses_towers():
  with pytest.raises(ConfigError, match=r"variant='torchvision'.*model\.towers=1") as e:
    create_model(_torchvision(image_size=224) | dict(towers=2), nnx.Rngs(0))
  assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match="unknown model.variant 'caffe'"):
    create_model(dict(name='alexnet', variant='caffe'), nnx.Rngs(0))


@pytest.mark.parametrize('size', [13, 7, 6, 4, 1])
def test_adaptive_avg_pool_is_torchs(size):
  torch = pytest.importorskip('torch')
  a = np.random.default_rng(size).normal(size=(2, size, size + 3, 5)).astype(np.float32)
  got = layers.adaptive_avg_pool(jnp.asarray(a), 6)
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(a).permute(0, 3, 1, 2), (6, 6))
  np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_tiny_torchvision_alexnet_trains_a_step():
  c = tiny_config(data=1, model=1)
  # 67 px: pool5 is 1x1, which the adaptive pool spreads over 6x6 as torch's does.
  c.model = model_config('alexnet', variant='torchvision', towers=1, width=0.0625, image_size=67,
                         num_classes=10, init='he')
  c.batch_size = 8
  prog = program.build_program(c, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = sharding.put_batch(
      dict(image=rng.integers(0, 256, (8, 67, 67, 3), dtype=np.uint8),
           label=rng.integers(0, 10, 8).astype(np.int32)), prog.mesh)
  init = jax.device_get(prog.init_state.lower().compile(FAST_COMPILE)())
  state = jax.device_put(init, prog.state_shardings)
  train = prog.train_step.lower(state, batch).compile(FAST_COMPILE)
  new, metrics = jax.device_get(train(state, batch))
  assert np.isfinite(metrics['loss']) and 0 < metrics['loss'] < 50
  assert set(new.params) == {'conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'}
  assert all(
      jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), init.params, new.params)))


# ---- GoogLeNet --------------------------------------------------------------------------------


@pytest.mark.parametrize('caffe', [False, True], ids=['default', 'caffe'])
def test_googlenet_lrn_switches(caffe, monkeypatch):
  k, alpha = (1.0, ALPHA / N) if caffe else (2.0, ALPHA)
  switches = dict(lrn_k=1.0, lrn_alpha_divided_by_n=True) if caffe else {}
  spec = GoogLeNetSpec(width=0.125, image_size=32, num_classes=10, aux_heads=False, **switches)
  model = _abstract(GoogLeNet, spec)
  x = jnp.asarray(_maps(1, 2, 3, 3, 8))
  got = model._lrn(x)
  np.testing.assert_allclose(got, _lrn_reference(x, k, alpha), rtol=2e-5, atol=1e-6)
  other = (2.0, ALPHA) if caffe else (1.0, ALPHA / N)
  assert not np.allclose(got, _lrn_reference(x, *other), rtol=1e-3)
  if not caffe:  # bit for bit the call the model made before the switches
    np.testing.assert_array_equal(got, layers.local_response_norm(x))
  # The forward pass normalises through it, after pool1 and after conv2 (Caffe's norm1, norm2).
  seen = []
  lrn = GoogLeNet._lrn
  monkeypatch.setattr(GoogLeNet, '_lrn', lambda self, x: seen.append(x.shape[2:]) or lrn(self, x))
  jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert seen == [(8, 8, spec.scale(64)), (8, 8, spec.scale(192))]
