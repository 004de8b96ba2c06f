"""Per-layer table of a configured network: ``python -m alexnet_jax.summary --config=... [--json]``.

Output shape (per image, towers side by side), neurons, parameters and where the towers live on the
configured mesh's model axis. Everything comes from ``jax.eval_shape``: nothing is allocated, so the
full-size network is summarised in a second on any machine.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags

from alexnet_jax import cli


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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from alexnet_jax.models import create_model  # pylint: disable=g-import-not-at-top

  model = nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(0)))
  size = config.model.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  order = []  # the layers in the order the network runs them (eval_shape sorts the dict it returns)

  def forward(m, x):
    out = m(x, capture=True)
    order.extend(out[1])
    return out

  _, acts = jax.eval_shape(forward, model, images)
  towers = int(config.model.get('towers', 1))
  model_devices = int(config.mesh.model)
  per_device = towers // model_devices if towers % model_devices == 0 else None
  count = lambda module: sum(int(np.prod(p.shape))
                             for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
  # One row per layer, with its batch norm ``<layer>_bn`` where it has one. Layers that are not run
  # at evaluation (GoogLeNet's auxiliary classifiers) have no row but count in the total.
  rows = []
  for name in order:
    act = acts[name]
    layer = getattr(model, name)
    params = count(layer) + (count(getattr(model, name + '_bn')) if hasattr(model, name + '_bn')
                             else 0)
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
    rows.append(dict(layer=name, output_shape=list(shape), neurons=int(np.prod(shape)),
                     parameters=params, towers=towers,
                     reads=_reads(layer, towers),
                     placement=placement))
  return dict(model=config.model.name, image_size=size, input_neurons=size * size * 3,
              towers=towers, mesh_model_axis=model_devices, layers=rows,
              total_neurons=sum(r['neurons'] for r in rows), total_parameters=count(model))


def format_table(table: dict) -> str:
  head = (f'{table["model"]}  input {table["image_size"]}x{table["image_size"]}x3 '
          f'({table["input_neurons"]:,} values), {table["towers"]} tower(s) over '
          f'{table["mesh_model_axis"]} model-axis device(s)')
  lines = [head, f'{"layer":<12}{"output":<16}{"neurons":>12}{"parameters":>14}  '
                 f'{"reads":<14}placement']
  for r in table['layers']:
    shape = 'x'.join(map(str, r['output_shape']))
    lines.append(f'{r["layer"]:<12}{shape:<16}{r["neurons"]:>12,}{r["parameters"]:>14,}  '
                 f'{r["reads"]:<14}{r["placement"]}')
  lines.append(f'{"total":<12}{"":<16}{table["total_neurons"]:>12,}{table["total_parameters"]:>14,}')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = cli.config_or_usage_error()
  table = layer_table(config)
  print(json.dumps(table, indent=1) if flags.FLAGS.json else format_table(table))


if __name__ == '__main__':
  cli.define_tool_flags()
  cli.run(main)
