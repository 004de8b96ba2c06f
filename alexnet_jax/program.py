"""config → mesh → model → train state → compiled steps: everything one run executes.

``build_program`` is shared by the training loop and by the tools (``comm_map``, ``bench``,
``summary``), so what they inspect and measure is the very step that trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from alexnet_jax import configs, models, optim, sharding, steps
from alexnet_jax.data import inputs, statistics
from alexnet_jax.errors import ConfigError
from alexnet_jax.models import create_model
from alexnet_jax.steps import TrainState

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# config.compute_dtype='bfloat16' is mixed precision, by this policy (tests/test_precision.py
# checks each line):
# - parameters, their gradients, the optimiser's state and batch norm's running statistics are
#   float32 (the state is built and updated in float32; layers cast a parameter to the dtype of
#   their input where they use it, so its gradient arrives back in float32);
# - images are normalised to the compute dtype on the device, and every activation, convolution
#   and matmul runs in it (XLA accumulates bfloat16 products in float32);
# - logits are cast to float32 before the softmax, the cross-entropy and the ranks; the loss and
#   the metrics are float32;
# - LRN's sum of squares and its power, and batch norm's moments, are computed in float32: in
#   bfloat16 every term of the sum would be rounded (layers.local_response_norm).


@dataclasses.dataclass
class Program:
  config: Any
  mesh: jax.sharding.Mesh
  # Abstract (shapes only): the capabilities it declares, and its hyper-parameters (model.spec).
  model: models.Classifier
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_specs: TrainState  # PartitionSpecs
  state_shardings: TrainState  # NamedShardings
  abstract_state: TrainState  # ShapeDtypeStructs carrying the shardings (for restoring)
  init_state: Callable[[], TrainState]
  train_step: Callable  # jitted, donates the state
  eval_step: Callable  # jitted
  # The input normalisation the steps apply (steps.normalize's arguments: colours, dtype, and the
  # mean image and PCA basis where config.input uses them), for other programs of this network.
  norm: dict = dataclasses.field(default_factory=dict)

  def abstract_batch(self) -> dict:
    """A training batch of ``config.batch_size`` as ShapeDtypeStructs on the mesh (uint8 images,
    int32 labels, split over the data axis): what ``train_step.lower`` needs to compile without
    data."""
    n, size = self.config.batch_size, self.config.model.image_size
    on_mesh = sharding.batch_sharding(self.mesh)
    return dict(image=jax.ShapeDtypeStruct((n, size, size, 3), np.uint8, sharding=on_mesh),
                label=jax.ShapeDtypeStruct((n,), np.int32, sharding=on_mesh))

  @property
  def param_count(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state.params))


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """``config.mesh`` over ``devices`` (default: all), its model axis holding whole towers of
  ``config.model``."""
  spec = models.spec_from_config(config.model)
  return sharding.make_mesh(config.mesh, towers=spec.towers, devices=devices)


def check_batch(config, mesh: jax.sharding.Mesh, what: str = 'batch_size') -> None:
  """``config.<what>`` splits over ``mesh`` as ``config.model`` needs (``sharding.check_batch``)."""
  spec = models.spec_from_config(config.model)
  sharding.check_batch(config[what], mesh, what, split_over_model=spec.splits_batch_over_towers)


def _model_and_params(config, seed: int):
  """The graph definition, parameters and batch-norm statistics of a freshly initialised model."""
  model = create_model(config.model, nnx.Rngs(seed))
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def _opt_state_specs(tx, abstract_params, param_specs):
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  is_spec = lambda x: isinstance(x, P)
  return optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, param_specs,
                               transform_non_params=lambda _: P(), is_leaf=is_spec)


def input_constants(config, stats=None) -> dict:
  """The device-side constants of the paper's input recipe that ``config.input`` switches on: the
  mean image and the PCA basis (eigenvectors scaled by the square roots of the eigenvalues).

  ``stats``: the training set's ``data.statistics.Statistics``. Without them (the tools, which
  measure or inspect the step rather than train) neutral ones of the same shapes stand in.
  """
  inp = config.input
  if not inputs.uses_statistics(inp):
    return {}
  if stats is None:
    side = max(config.model.image_size, inp.resize_to or 0)
    stats = statistics.neutral(side, inp.mean_rgb, inp.std_rgb)
  out = {}
  if inp.mean_image:
    out['mean_image'] = np.asarray(stats.mean_image, np.float32)
  if inp.pca_lighting_std > 0:
    out['pca_basis'] = np.asarray(stats.eigvecs * np.sqrt(np.maximum(stats.eigvals, 0)), np.float32)
  return out


def build_program(config, *, steps_per_epoch: int, mesh: jax.sharding.Mesh | None = None,
                  input_stats=None) -> Program:
  """``input_stats``: the training set's statistics, needed when ``config.input`` switches on the
  mean image or PCA lighting (see ``input_constants``)."""
  configs.check_fields(config)
  if mesh is None:
    mesh = make_mesh(config)
  check_batch(config, mesh)
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f'unknown compute_dtype {config.compute_dtype!r}; '
                      f'choose one of {", ".join(COMPUTE_DTYPES)}')
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  tx = optim.make_optimizer(config.optim, steps_per_epoch, config.num_epochs,
                            frozen=optim.frozen_layers(config.model, config.init.freeze_through)[1])

  abstract_model = nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(0)))
  graphdef, abstract_vars, abstract_stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  param_specs = sharding.param_specs(abstract_vars)
  stats_specs = sharding.param_specs(abstract_stats)
  abstract_params = nnx.to_pure_dict(abstract_vars)
  state_specs = TrainState(step=P(), params=param_specs,
                           opt_state=_opt_state_specs(tx, abstract_params, param_specs), rng=P(),
                           batch_stats=stats_specs)
  state_shardings = sharding.named(state_specs, mesh)

  def init_fn():
    _, params, stats = _model_and_params(config, config.seed)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(config.seed + 1)),
                      batch_stats=nnx.to_pure_dict(stats))

  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(init_fn), state_shardings)
  ctx = sharding.MeshContext()
  norm = dict(mean_rgb=tuple(config.input.mean_rgb), std_rgb=tuple(config.input.std_rgb),
              channel_order=config.input.channel_order, compute_dtype=dtype,
              **input_constants(config, input_stats))
  # Every array of a batch (image, label, and the pipeline's crop / alpha / mask) is split over
  # the data axis along its first dimension: one spec, a prefix of whatever keys the batch has.
  batch_specs = P(sharding.DATA)
  train = sharding.shard_step(
      steps.make_train_step(graphdef, tx, ctx, aux_loss_weight=abstract_model.aux_loss_weight,
                            **norm), mesh, in_specs=(state_specs, batch_specs),
      out_specs=(state_specs, P()))
  evaluate = sharding.shard_step(steps.make_eval_step(graphdef, ctx, **norm), mesh,
                                 in_specs=(param_specs, stats_specs, batch_specs), out_specs=P())
  train_step = jax.jit(train, donate_argnums=0)
  return Program(config=config, mesh=mesh, model=abstract_model, graphdef=graphdef, tx=tx,
                 state_specs=state_specs, state_shardings=state_shardings,
                 abstract_state=abstract_state, init_state=jax.jit(init_fn,
                                                                   out_shardings=state_shardings),
                 train_step=train_step, eval_step=jax.jit(evaluate), norm=norm)
