"""The deconvnet against a direct NumPy construction, and receptive fields against the geometry."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from alexnet_jax.models import create_model, layers
from alexnet_jax.visualize import checkpoints, deconvnet

from helpers import conv_transpose, tiny_config


@pytest.fixture(scope='module')
def net():
  """A tiny two-tower AlexNet with random weights and biases of both signs (so ReLUs cut)."""
  config = tiny_config()
  # Only the shapes: every parameter is drawn below (no per-initialiser compiles).
  model = nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(1)

  def randomise(path, x):
    if path[-1].key == 'bias':
      return np.float32(0.1) * rng.standard_normal(x.shape, np.float32)
    return rng.standard_normal(x.shape, np.float32) / np.float32(np.sqrt(np.prod(x.shape[1:-1])))

  params = jax.tree.map_with_path(randomise, params)
  images = rng.standard_normal((3, 67, 67, 3), np.float32)
  apply = deconvnet.make_apply(graphdef)
  return config, jax.jit(apply, static_argnums=2), params, images


project = jax.jit(deconvnet.project, static_argnums=(0, 3))
features = jax.jit(deconvnet.features, static_argnums=0)


@pytest.fixture(scope='module')
def fields(net):
  _, apply, params, _ = net
  return deconvnet.receptive_fields(apply, params, 67)


# --- The deconvnet's steps, written out in NumPy --------------------------------------------------


def unpool(g, pooled_input, window=3, stride=2):
  """Each pooled value's signal goes back to the switch: its window's (first) maximum."""
  out = np.zeros_like(pooled_input)
  for i in range(g.shape[0]):
    for j in range(g.shape[1]):
      patch = pooled_input[i * stride:i * stride + window, j * stride:j * stride + window]
      for c in range(g.shape[2]):
        a, b = np.unravel_index(np.argmax(patch[..., c]), (window, window))
        out[i * stride + a, j * stride + b, c] += g[i, j, c]
  return out


def rectify(g):
  return np.maximum(g, 0)


def numpy_projection(params, acts, example, layer, mp, row, col):
  """Layer conv2 or conv3 of the two-tower AlexNet projected by hand, tower by tower. The switches
  come from the forward pass (pool1 and pool2 read the LRN of the captured conv1 / conv2)."""
  k = {name: np.asarray(p['kernel'], np.float64) for name, p in params.items()}
  a = {name: np.asarray(v[:, example], np.float64) for name, v in acts.items()}  # (towers, h, w, c)
  lrn = lambda x: np.asarray(jax.jit(layers.local_response_norm)(np.float32(x)), np.float64)
  towers, per_tower = a[layer].shape[0], a[layer].shape[-1]
  tower, channel = divmod(mp, per_tower)
  top = np.zeros(a[layer].shape[1:])
  top[row, col, channel] = a[layer][tower, row, col, channel]  # all other activations zeroed
  if layer == 'conv2':  # own tower: only its tower's pool1 maps receive a signal
    into_pool1 = {tower: conv_transpose(top, k['conv2'][tower], 1, 2, 7)}
  else:  # conv3 reads both towers: its transposed filters reach both towers' maps
    into_pool2 = np.split(conv_transpose(top, k['conv3'][tower], 1, 1, 3), towers, axis=-1)
    into_pool1 = {}
    for t in range(towers):
      g = rectify(unpool(into_pool2[t], lrn(a['conv2'][t])))  # LRN passes the signal unchanged
      into_pool1[t] = conv_transpose(g, k['conv2'][t], 1, 2, 7)
  image = 0
  for t, g in into_pool1.items():
    g = rectify(unpool(g, lrn(a['conv1'][t])))
    image = image + conv_transpose(g, k['conv1'][t], 4, 0, 67)
  return image


@pytest.mark.parametrize('layer', ['conv2', 'conv3'])
def test_projection_equals_unpool_rectify_transposed_filters(net, layer):
  _, apply, params, images = net
  _, acts = apply(params, images, False)
  per_tower = acts[layer].shape[-1]
  maps, positions, expected = [], [], []
  for n, tower in [(0, 0), (1, 1), (2, 0), (2, 1)]:  # maps of both towers
    for channel in range(per_tower):  # the first map whose projection is not rectified away
      act = np.asarray(acts[layer][tower, n, ..., channel])
      row, col = np.unravel_index(np.argmax(act), act.shape)
      e = numpy_projection(params, acts, n, layer, tower * per_tower + channel, row, col)
      if np.abs(e).max() > 0:
        break
    maps.append(tower * per_tower + channel)
    positions.append((row, col))
    expected.append(e)
  examples = jnp.array([0, 1, 2, 2])
  proj, pos, values = project(apply, params, images[examples], layer, jnp.array(maps))
  np.testing.assert_array_equal(pos, positions)  # the strongest activation of each map
  for n, e in enumerate(expected):
    assert np.abs(e).max() > 0, 'every map is dead: the test would test nothing'
    np.testing.assert_allclose(np.asarray(proj[n]), e, rtol=1e-4, atol=1e-5 * np.abs(e).max())
  assert np.all(np.asarray(values) > 0)


def test_chosen_positions_are_projected(net):
  _, apply, params, images = net
  maps, positions = jnp.array([0, 1, 2]), jnp.array([[0, 0], [1, 2], [2, 1]])
  _, acts = features(apply, params, images)
  _, pos, values = project(apply, params, images, 'conv3', maps, positions)
  np.testing.assert_array_equal(pos, positions)
  np.testing.assert_allclose(values, acts['conv3'][jnp.arange(3), positions[:, 0], positions[:, 1],
                                                   maps])


def test_deconvnet_rectifies_where_the_gradient_masks(net):
  """The projection is not the gradient: the two differ exactly by the ReLU rule."""
  _, apply, params, images = net
  maps = jnp.array([0, 3, 5])
  proj, pos, _ = project(apply, params, images, 'conv3', maps)

  def chosen(x):
    act = deconvnet.untower(apply(params, x, False)[1]['conv3'])
    return act[jnp.arange(3), pos[:, 0], pos[:, 1], maps]

  grad = jax.jit(jax.grad(lambda x: jnp.sum(chosen(x) * jax.lax.stop_gradient(chosen(x)))))(images)
  assert not np.allclose(proj, grad, atol=1e-6)


def test_strongest_position_is_the_argmax(net):
  _, apply, params, images = net
  _, acts = features(apply, params, images)
  maps = jnp.array([2, 2, 7])
  _, pos, values = project(apply, params, images, 'conv5', maps)
  for n in range(3):
    m = np.asarray(acts['conv5'][n, ..., int(maps[n])])
    assert values[n] == pytest.approx(m.max(), rel=1e-5)
    assert m[int(pos[n, 0]), int(pos[n, 1])] == m.max()


def test_receptive_fields_match_the_geometry(fields):
  conv1 = fields['conv1']
  np.testing.assert_array_equal(conv1.rows, [[4 * p, 4 * p + 10] for p in range(15)])
  np.testing.assert_array_equal(conv1.cols, conv1.rows)
  # conv2: 5x5 pad 2 over pool1 (3/2 over conv1): pool1 row q sees [8q, 8q + 18].
  expected = [[8 * max(p - 2, 0), min(8 * min(p + 2, 6) + 18, 66)] for p in range(7)]
  np.testing.assert_array_equal(fields['conv2'].rows, expected)
  assert set(fields) == {'conv1', 'conv2', 'conv3', 'conv4', 'conv5'}


@pytest.mark.parametrize('layer', ['conv1', 'conv2', 'conv4'])
def test_projection_lies_inside_the_receptive_field(net, fields, layer):
  _, apply, params, images = net
  field = fields[layer]
  width = 8  # the first maps' strongest activations in every example
  maps = jnp.tile(jnp.arange(width), 3)
  proj, pos, _ = project(apply, params, jnp.repeat(images, width, axis=0), layer, maps)
  reach = []
  for n in range(len(maps)):
    top, left, bottom, right = field.box(int(pos[n, 0]), int(pos[n, 1]))
    support = np.abs(np.asarray(proj[n])).sum(-1) > 0
    outside = support.copy()
    outside[top:bottom + 1, left:right + 1] = False
    assert not outside.any(), (layer, n, np.argwhere(outside)[:3], (top, left, bottom, right))
    if support.any():
      rows, cols = np.nonzero(support)
      reach.append(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)
  # Not vacuous: most projections survive, and some fill their receptive field's extent.
  assert len(reach) >= len(maps) // 2
  assert max(reach) >= min(field.rows[:, 1] - field.rows[:, 0] + 1)


@pytest.mark.parametrize('model', [
    dict(name='zfnet', image_size=67, width=0.0625, num_classes=10),
    dict(name='vgg', variant='A-LRN', batch_norm=True, image_size=32, width=0.0625, num_classes=10),
])
def test_zoo_networks_project_through_the_deconvnet(model):
  """ZFNet (pool then contrast normalisation) and VGG with batch norm (its running statistics come
  with the training state): projections of a mid layer are finite, non-zero, and inside the
  activation's receptive field."""
  config = tiny_config()
  config.model = ml_collections.ConfigDict(model)
  config.mesh.model = 1
  graphdef, params, batch_stats = nnx.split(create_model(config.model, nnx.Rngs(0)), nnx.Param,
                                            nnx.BatchStat)
  state = SimpleNamespace(params=nnx.to_pure_dict(params),
                          batch_stats=nnx.to_pure_dict(batch_stats))
  if model['name'] == 'vgg':  # running statistics that differ from the fresh ones
    state.batch_stats = jax.tree.map(lambda v: v * 0.5, state.batch_stats)
  net = checkpoints.network_from_state(config, graphdef, state)
  if model['name'] == 'vgg':
    np.testing.assert_array_equal(net.params['conv1_1_bn']['var'], 0.5)
  size = config.model.image_size
  images = np.random.default_rng(0).standard_normal((4, size, size, 3)).astype(np.float32)
  layer = 'conv2' if model['name'] == 'zfnet' else 'conv2_1'
  field = deconvnet.receptive_fields(net.apply, net.params, size)[layer]
  _, acts = features(net.apply, net.params, images)
  maps = jnp.argmax(acts[layer].max(axis=(1, 2)), axis=-1)  # each image's strongest map
  proj, pos, values = project(net.apply, net.params, images, layer, maps)
  assert np.all(np.isfinite(proj)) and np.all(np.asarray(values) > 0)
  for n in range(4):
    top, left, bottom, right = field.box(int(pos[n, 0]), int(pos[n, 1]))
    support = np.abs(np.asarray(proj[n])).sum(-1) > 0
    assert support.any()
    support[top:bottom + 1, left:right + 1] = False
    assert not support.any()
