"""A configured network's layers as a table: output shape, neurons, parameters, which maps each
layer reads and where its towers live on the mesh's model axis.

Everything comes from ``jax.eval_shape``: nothing is allocated, so the full-size network is
described in a second on any machine (``python -m alexnet_jax.tools.summary`` prints it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alexnet_jax.models import create_model, spec_from_config

_READS = {'input': 'the image', 'own': 'own tower', 'all': 'both towers'}


def _reads(layer, towers: int) -> str:
  reads = getattr(layer, 'reads', '')
  kernel = getattr(layer, 'kernel', None)
  if reads == 'input' and kernel is not None and kernel.ndim == 3:
    return 'all features'  # a dense layer after untowered maps (the hybrid AlexNet's fc6)
  if reads == 'all' and towers > 2:
    return 'all towers'
  return _READS.get(reads, reads)


def layer_table(config) -> dict:
  """Rows per layer and totals, for ``config.model`` placed on ``config.mesh.model`` devices."""
  model = nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(0)))
  size = config.model.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  acts = jax.eval_shape(lambda m, x: m(x, capture=True), model, images).activations
  towers = spec_from_config(config.model).towers
  model_devices = int(config.mesh.model)
  per_device = towers // model_devices if towers % model_devices == 0 else None
  count = lambda module: sum(
      int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
  # One row per layer, with its batch norm ``<layer>_bn`` where it has one. Layers that are not run
  # at evaluation (GoogLeNet's auxiliary classifiers) have no row but count in the total.
  rows = []
  for name in model.layer_names:
    act = acts[name]
    layer = getattr(model, name)
    params = count(layer) + (count(getattr(model, name + '_bn')) if hasattr(model, name +
                                                                            '_bn') else 0)
    local_towers, _, *dims, per_tower = act.shape
    shape = (*dims, local_towers * per_tower)
    kernel = getattr(layer, 'kernel', None)
    if towers == 1:
      placement = 'one tower (dense)'
    elif kernel is not None and kernel.shape[0] == 1:  # the hybrid AlexNet's convolutions
      placement = 'replicated, the batch split over the model-axis devices'
    elif per_device is None:
      placement = f'{towers} towers'
    else:
      placement = ', '.join(f'tower {t}: model device {t // per_device}' for t in range(towers))
    rows.append(
        dict(layer=name, output_shape=list(shape), neurons=int(np.prod(shape)), parameters=params,
             towers=towers, reads=_reads(layer, towers), placement=placement))
  return dict(model=config.model.name, image_size=size, input_neurons=size * size * 3,
              towers=towers, mesh_model_axis=model_devices, layers=rows,
              total_neurons=sum(r['neurons'] for r in rows), total_parameters=count(model))
