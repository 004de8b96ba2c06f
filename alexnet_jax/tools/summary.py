"""Per-layer table of a configured network (``models.describe``):

  python -m alexnet_jax.tools.summary --config=configs/two_gpu.py [--json]

Output shape (per image, towers side by side), neurons, parameters and where the towers live on the
configured mesh's model axis, from ``jax.eval_shape`` (nothing is allocated).
"""

from __future__ import annotations

import json

from absl import flags

from alexnet_jax import cli
from alexnet_jax.models.describe import layer_table


def format_table(table: dict) -> str:
  head = (f'{table["model"]}  input {table["image_size"]}x{table["image_size"]}x3 '
          f'({table["input_neurons"]:,} values), {table["towers"]} tower(s) over '
          f'{table["mesh_model_axis"]} model-axis device(s)')
  lines = [
      head, f'{"layer":<12}{"output":<16}{"neurons":>12}{"parameters":>14}  '
      f'{"reads":<14}placement'
  ]
  for r in table['layers']:
    shape = 'x'.join(map(str, r['output_shape']))
    lines.append(f'{r["layer"]:<12}{shape:<16}{r["neurons"]:>12,}{r["parameters"]:>14,}  '
                 f'{r["reads"]:<14}{r["placement"]}')
  lines.append(
      f'{"total":<12}{"":<16}{table["total_neurons"]:>12,}{table["total_parameters"]:>14,}')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = cli.config_or_usage_error()
  table = layer_table(config)
  print(json.dumps(table, indent=1) if flags.FLAGS.json else format_table(table))


if __name__ == '__main__':
  cli.define_tool_flags()
  cli.run(main)
