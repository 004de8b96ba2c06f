"""The paper's update rule, the learning-rate schedules and the plateau controller."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import optim
from alexnet_jax.configs import base_config


def _optim_cfg(**kw):
  c = base_config().optim
  c.update(kw)
  return c


def _params():
  return {'fc': {'kernel': jnp.array([[0.5, -1.0], [2.0, 0.25]]), 'bias': jnp.array([1.0, -0.5])}}


def test_two_steps_match_the_paper_by_hand():
  tx = optim.make_optimizer(_optim_cfg(), steps_per_epoch=10, num_epochs=1)
  params = _params()
  g1 = {'fc': {'kernel': jnp.array([[0.1, 0.2], [-0.3, 0.4]]), 'bias': jnp.array([0.5, -0.6])}}
  g2 = {'fc': {'kernel': jnp.array([[-0.2, 0.1], [0.0, 0.3]]), 'bias': jnp.array([0.1, 0.2])}}
  state = tx.init(params)
  upd, state = tx.update(g1, state, params)
  p1 = optax.apply_updates(params, upd)
  upd, state = tx.update(g2, state, p1)
  p2 = optax.apply_updates(p1, upd)
  eps, wd, mu = 0.01, 0.0005, 0.9
  for leaf in ('kernel', 'bias'):
    w0 = np.asarray(params['fc'][leaf], np.float64)
    v1 = -wd * eps * w0 - eps * np.asarray(g1['fc'][leaf])
    w1 = w0 + v1
    v2 = mu * v1 - wd * eps * w1 - eps * np.asarray(g2['fc'][leaf])
    w2 = w1 + v2
    np.testing.assert_allclose(np.asarray(p1['fc'][leaf]), w1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p2['fc'][leaf]), w2, rtol=1e-6)


def test_learning_rate_drop_keeps_the_old_velocity():
  # v ← 0.9 v − ε' (g + wd w): velocity gathered at ε is not rescaled when ε drops to ε'.
  tx = optim.make_optimizer(_optim_cfg(weight_decay=0.0), steps_per_epoch=10, num_epochs=1)
  params = {'w': {'kernel': jnp.array([1.0])}}
  g = {'w': {'kernel': jnp.array([1.0])}}
  state = tx.init(params)
  u1, state = tx.update(g, state, params)
  state = optim.with_lr_scale(state, 0.1)
  u2, state = tx.update(g, state, params)
  np.testing.assert_allclose(float(u1['w']['kernel'][0]), -0.01, rtol=1e-6)
  np.testing.assert_allclose(float(u2['w']['kernel'][0]), 0.9 * -0.01 - 0.001, rtol=1e-6)
  assert float(optim.current_learning_rate(state)) == pytest.approx(0.001)


def test_biases_can_be_left_undecayed():
  tx = optim.make_optimizer(_optim_cfg(decay_biases=False), steps_per_epoch=1, num_epochs=1)
  params = _params()
  zeros = {'fc': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}}
  upd, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(upd['fc']['bias']), 0.0)
  np.testing.assert_allclose(np.asarray(upd['fc']['kernel']),
                             -0.01 * 0.0005 * np.asarray(params['fc']['kernel']), rtol=1e-6)


def test_schedules():
  step = optim.learning_rate_schedule(_optim_cfg(schedule='step', step_epochs=(2, 4)), 10, 6)
  assert [float(step(s)) for s in (0, 19, 20, 39, 40)
         ] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4])
  cos = optim.learning_rate_schedule(_optim_cfg(schedule='cosine'), 10, 5)
  assert float(cos(0)) == pytest.approx(0.01) and float(cos(50)) == pytest.approx(0.0, abs=1e-9)
  warm = optim.learning_rate_schedule(_optim_cfg(schedule='cosine', warmup_epochs=1), 10, 5)
  assert float(warm(5)) == pytest.approx(0.005)
  assert float(optim.learning_rate_schedule(_optim_cfg(), 10, 5)(1000)) == pytest.approx(0.01)
  with pytest.raises(ValueError, match='unknown optim.schedule'):
    optim.learning_rate_schedule(_optim_cfg(schedule='linear'), 10, 5)


def test_plateau_divides_by_ten_at_most_three_times():
  ctl = optim.PlateauController(patience=1, max_drops=3)
  assert not ctl.update(0.5) and not ctl.update(0.4)
  drops = [ctl.update(0.4) for _ in range(6)]
  assert drops == [True, True, True, False, False, False]
  assert ctl.scale == pytest.approx(1e-3)
  restored = optim.PlateauController()
  restored.load_state_dict(ctl.state_dict())
  assert restored.state_dict() == ctl.state_dict()
