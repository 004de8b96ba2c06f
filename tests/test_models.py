"""AlexNet against the paper: shapes, neuron and parameter counts, LRN, initialisation, towers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alexnet_jax.errors import ConfigError, UnknownModelError
from alexnet_jax.models import create_model, layers
from alexnet_jax.models.alexnet import AlexNet, AlexNetSpec

from helpers import PAPER_NEURONS


def _abstract(spec: AlexNetSpec):
  return nnx.eval_shape(lambda: AlexNet(spec, rngs=nnx.Rngs(0)))


def _param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('towers, expected', [(2, 60_965_224), (1, 62_378_344)])
def test_parameter_count(towers, expected):
  assert _param_count(_abstract(AlexNetSpec(towers=towers))) == expected


@pytest.mark.parametrize('towers', [1, 2])
def test_neurons_and_maps_at_227(towers):
  model = _abstract(AlexNetSpec(towers=towers))
  x = jax.ShapeDtypeStruct((3, 227, 227, 3), jnp.float32)
  logits, _, acts = jax.eval_shape(lambda m, x: m(x, capture=True), model, x)
  assert logits.shape == (3, 1000)
  neurons = {k: int(np.prod(v.shape[2:])) * v.shape[0] for k, v in acts.items()}
  assert neurons == PAPER_NEURONS
  assert [acts[k].shape[2] for k in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')
         ] == [55, 27, 13, 13, 13]
  assert AlexNetSpec().map_sizes()['pool5'] == 6
  assert 227 * 227 * 3 == 154_587


def test_paper_224_gives_54():
  assert AlexNetSpec(image_size=224).map_sizes()['conv1'] == 54


def test_initialisation():
  model = AlexNet(AlexNetSpec(width=0.25, image_size=67, num_classes=10), rngs=nnx.Rngs(0))
  for name in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8'):
    layer = getattr(model, name)
    expected_bias = 1.0 if name in ('conv2', 'conv4', 'conv5', 'fc6', 'fc7') else 0.0
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), expected_bias)
    kernel = np.asarray(layer.kernel[...])
    assert abs(kernel.mean()) < 2e-3 and abs(kernel.std() - 0.01) < 1.5e-3, name


def _lrn_reference(a, k, n, alpha, beta):
  out = np.empty_like(a)
  c = a.shape[-1]
  for i in range(c):
    lo, hi = max(0, i - n // 2), min(c - 1, i + n // 2)
    out[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo:hi + 1]**2, axis=-1))**beta
  return out


@pytest.mark.parametrize('divided', [False, True])
@pytest.mark.parametrize('beta', [0.75, 0.5])
def test_lrn_matches_numpy(divided, beta):
  a = np.random.default_rng(0).normal(scale=30.0, size=(2, 3, 4, 11)).astype(np.float32)
  got = layers.local_response_norm(jnp.asarray(a), beta=beta, alpha_divided_by_n=divided)
  alpha = 1e-4 / 5 if divided else 1e-4
  np.testing.assert_allclose(np.asarray(got), _lrn_reference(a, 2.0, 5, alpha, beta), rtol=1e-5)


def test_lrn_is_per_tower():
  model = AlexNet(AlexNetSpec(width=0.125, image_size=67, num_classes=10), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 67, 67, 3)), jnp.float32)
  acts = jax.jit(lambda x: model(x, capture=True).activations)(
      x)  # one compile beats ~300 eager ops
  # LRN of the tower-split maps equals LRN of each tower alone, not of the concatenation.
  towered = layers.local_response_norm(acts['conv1'])
  joined = layers.local_response_norm(jnp.concatenate(list(acts['conv1']), -1))
  assert not np.allclose(np.concatenate(list(towered), -1), joined)


def test_max_pool_matches_numpy():
  a = np.random.default_rng(0).normal(size=(2, 13, 13, 3)).astype(np.float32)
  got = np.asarray(layers.max_pool(jnp.asarray(a)))
  assert got.shape == (2, 6, 6, 3)
  ref = np.array([[[[a[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c].max()
                     for c in range(3)]
                    for j in range(6)]
                   for i in range(6)]
                  for b in range(2)])
  np.testing.assert_array_equal(got, ref)


def test_own_tower_layers_ignore_the_other_tower():
  model = AlexNet(AlexNetSpec(width=0.125, image_size=67, num_classes=10), rngs=nnx.Rngs(0))
  x = jnp.asarray(
      np.random.default_rng(2).normal(size=(2, 2, 7, 7, model.conv1.kernel.shape[-1])), jnp.float32)
  y = model.conv2(x)
  x_changed = x.at[1].add(5.0)
  y_changed = model.conv2(x_changed)
  np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(y_changed[0]))
  assert not np.allclose(y[1], y_changed[1])
  # conv3 reads both towers: changing tower 1's maps changes tower 0's output.
  x3 = jnp.asarray(
      np.random.default_rng(3).normal(size=(2, 2, 5, 5, model.conv2.kernel.shape[-1])), jnp.float32)
  assert not np.allclose(model.conv3(x3)[0], model.conv3(x3.at[1].add(5.0))[0])


def test_dropout_only_in_training():
  model = AlexNet(AlexNetSpec(width=0.125, image_size=67, num_classes=10), rngs=nnx.Rngs(0))
  x = jnp.ones((2, 67, 67, 3))
  np.testing.assert_array_equal(model(x).logits, model(x).logits)
  key = jax.random.key(0)
  assert not np.allclose(model(x, train=True, dropout_key=key).logits, model(x).logits)


def test_bad_model_configs():
  with pytest.raises(UnknownModelError, match='unknown model'):
    create_model(dict(name='alexnett'), nnx.Rngs(0))
  with pytest.raises(ConfigError, match='divisible'):
    create_model(dict(name='alexnet', towers=2, num_classes=11), nnx.Rngs(0))
  with pytest.raises(ConfigError, match='too small'):
    create_model(dict(name='alexnet', image_size=50), nnx.Rngs(0))
  with pytest.raises(ConfigError, match="config.model has no field 'colour'"):
    create_model(dict(name='alexnet', colour=3), nnx.Rngs(0))


@pytest.mark.parametrize('stride, padding', [(4, 0), (2, 1), (1, 2)])
def test_conv_as_matmul_equals_xla_convolution(stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 23, 23, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(5, 5, 3, 4)), jnp.float32)
  ref = jax.lax.conv_general_dilated(x, k, (stride, stride), [(padding, padding)] * 2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(layers.conv2d_as_matmul(x, k, stride, padding), ref, rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('window, stride, size', [(3, 2, 13), (3, 2, 14), (2, 2, 9), (3, 1, 7),
                                                  (3, 3, 11)])
def test_max_pool_gradient_matches_reduce_window_with_ties(window, stride, size):
  # After a ReLU many windows hold several equal maxima (zeros): the gradient must go to the
  # first of them, as XLA's own select-and-scatter gradient of reduce_window does.
  rng = np.random.default_rng(window * 100 + stride * 10 + size)
  a = np.maximum(rng.normal(size=(2, 3, size, size, 4)), 0).round(1).astype(np.float32)
  reduce_window = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                                                  (1, 1, window, window, 1),
                                                  (1, 1, stride, stride, 1), 'VALID')
  y, vjp = jax.vjp(lambda x: layers.max_pool(x, window, stride), jnp.asarray(a))
  y_ref, vjp_ref = jax.vjp(reduce_window, jnp.asarray(a))
  np.testing.assert_array_equal(y, y_ref)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)  # summation order


def test_max_pool_gradient_goes_to_each_window_maximum():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
  g = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  _, vjp = jax.vjp(layers.max_pool, jnp.asarray(a))
  (got,) = vjp(jnp.asarray(g))
  ref = np.zeros_like(a)
  for b in range(2):
    for i in range(4):
      for j in range(4):
        for c in range(3):
          win = a[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c]
          di, dj = np.unravel_index(np.argmax(win), win.shape)
          ref[b, 2 * i + di, 2 * j + dj, c] += g[b, i, j, c]
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)
