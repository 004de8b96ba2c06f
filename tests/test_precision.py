"""The mixed-precision policy of ``compute_dtype='bfloat16'`` (program.py): float32 state,
bfloat16 activations, float32 logits and loss, LRN's sums in float32, and a bfloat16 run of the
demo network's first steps tracking the float32 run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alexnet_jax import program, sharding
from alexnet_jax.models import create_model, layers

from helpers import tiny_config

STEPS = 12
# Measured on this CPU over the 12 steps (the loss falling from 3.57 to 2.07): the largest
# relative loss difference 4.8 % (the last step, bfloat16 ahead), the parameters after them
# |θ_bf16 - θ_f32| / |θ_f32| = 1.2 %, the cosine between the two runs' total updates 0.96.
LOSS_TOLERANCE = 0.08
PARAM_TOLERANCE = 0.03
UPDATE_COSINE = 0.9


def _config(dtype):
  c = tiny_config()
  c.model.update(width=0.125, init='he')
  c.batch_size = 32
  c.compute_dtype = dtype
  c.optim.update(learning_rate=0.01, schedule='cosine')
  return c


def _batches(config, n):
  """Batches a network can learn from its first steps: each class a colour, in noise."""
  rng = np.random.default_rng(0)
  size, classes = config.model.image_size, config.model.num_classes
  colours = rng.integers(0, 256, (classes, 3))
  out = []
  for _ in range(n):
    labels = rng.integers(0, classes, config.batch_size)
    noise = rng.normal(0, 40, (config.batch_size, size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    out.append(dict(image=images, label=labels.astype(np.int32)))
  return out


@pytest.fixture(scope='module')
def runs():
  """The same steps from the same initial state in float32 and in bfloat16."""
  out = {}
  start = None
  for dtype in ('float32', 'bfloat16'):
    config = _config(dtype)
    prog = program.build_program(config, steps_per_epoch=100)
    if start is None:
      start = jax.device_get(prog.init_state())
    state = jax.device_put(start, prog.state_shardings)
    losses = []
    for batch in _batches(config, STEPS):
      state, metrics = prog.train_step(state, sharding.put_batch(batch, prog.mesh))
      losses.append(metrics['loss'])
    out[dtype] = dict(state=jax.device_get(state), losses=np.array(jax.device_get(losses)),
                      loss_dtype=losses[0].dtype)
  out['start'] = start
  return out


def test_bfloat16_keeps_parameters_optimiser_state_and_loss_in_float32(runs):
  state = runs['bfloat16']['state']
  for tree in (state.params, state.opt_state):
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  assert runs['bfloat16']['loss_dtype'] == jnp.float32


def test_bfloat16_activations_and_float32_logits_in_the_loss():
  config = _config('bfloat16')
  model = create_model(config.model, nnx.Rngs(0))
  x = jnp.ones((2, 67, 67, 3), jnp.bfloat16)
  out = model(x, capture=True)
  assert {a.dtype for a in out.activations.values()} == {jnp.dtype(jnp.bfloat16)}
  assert out.logits.dtype == jnp.bfloat16  # cast to float32 by the loss (steps.py)
  # The parameters stay float32 inside the model too: each layer casts them where it uses them.
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_a_bfloat16_run_of_the_demo_network_tracks_the_float32_run(runs):
  f32, bf16 = runs['float32']['losses'], runs['bfloat16']['losses']
  assert f32[-1] < f32[0] - 0.1  # the run learns: the comparison is not of two flat lines
  assert np.max(np.abs(bf16 - f32) / f32) <= LOSS_TOLERANCE
  # The parameters after the steps, and the direction of the total update they took.
  flat = lambda tree: np.concatenate(
      [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])
  start = flat(runs['start'].params)
  p32, p16 = flat(runs['float32']['state'].params), flat(runs['bfloat16']['state'].params)
  assert 0.0 < np.linalg.norm(p16 - p32) / np.linalg.norm(p32) <= PARAM_TOLERANCE
  d32, d16 = p32 - start, p16 - start
  assert d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32)) >= UPDATE_COSINE


def _lrn_rounded_everywhere(x, k=2.0, n=5, alpha=1e-4):
  """LRN with every operation in x's dtype: what a bfloat16 sum of squares would give."""
  c = x.shape[-1]
  ch = jnp.arange(c)
  window = ((ch[None, :] - ch[:, None] <= n // 2) &
            (ch[:, None] - ch[None, :] <= n - 1 - n // 2)).astype(x.dtype)
  denom = jnp.asarray(k, x.dtype) + jnp.asarray(alpha, x.dtype) * jnp.einsum(
      '...c,cd->...d', jnp.square(x), window, preferred_element_type=x.dtype)
  return x * jax.lax.rsqrt(denom * jnp.sqrt(denom))


def test_lrn_in_bfloat16_is_the_float32_normalisation_rounded_once():
  rng = np.random.default_rng(0)
  # Responses from small to large (ReLU outputs of a conv layer span several decades).
  x = jnp.asarray(rng.lognormal(0.0, 1.5, (4, 6, 6, 48)), jnp.bfloat16)
  exact = layers.local_response_norm(x.astype(jnp.float32))
  ours = layers.local_response_norm(x)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(exact.astype(jnp.bfloat16)))
  # Rounding at every step instead is measurably further from the float32 result.
  naive = _lrn_rounded_everywhere(x)
  err = lambda y: float(jnp.max(jnp.abs(y.astype(jnp.float32) - exact) / exact))
  assert err(ours) <= 2**-8 < err(naive)
  # Large responses: their squares are far beyond float16's range; the float32 sum keeps them.
  big = jnp.full((1, 1, 1, 8), 3000.0, jnp.bfloat16)
  expected = 3000.0 / (2.0 + 1e-4 * 3 * 3000.0**2)**0.75  # an edge map sums 3 squares
  assert float(layers.local_response_norm(big)[0, 0, 0, 0]) == pytest.approx(expected, rel=2**-8)
