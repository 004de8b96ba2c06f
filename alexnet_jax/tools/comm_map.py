"""Which layers make devices talk: the cross-device collectives of the compiled training step.

    python -m alexnet_jax.tools.comm_map --config=configs/two_gpu.py [--json]
    python -m alexnet_jax.tools.comm_map --config=configs/owt.py --compare  # 3 placements, 8 GPUs

Compiles the real training step for the configured mesh (``jax.jit(...).lower(...).compile()``, no
data, no training) and lists every collective in the optimised HLO with the layer whose
``jax.named_scope`` it came from, forward or backward, the mesh axis it spans, and its bytes.
XLA merges small all-reduces into one tuple-shaped op; its ``op_name`` lists the merged ops in
tuple order, so each element is attributed to its own layer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re

import numpy as np
from absl import flags
from flax import nnx

from alexnet_jax import cli, distributed, models, program

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')
# The step's own named scopes (steps.py), after the model's layers.
STEP_SCOPES = ('loss', 'metrics', 'optimizer')
SCOPES = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8') + STEP_SCOPES  # AlexNet
_DTYPE_BYTES = {
    'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1, 'f64': 8,
    's64': 8, 'u64': 8
}
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+ = (?P<shape>.+?) (?P<kind>' + '|'.join(KINDS) +
                 r')(?:-start)?\((?P<rest>.*)$')
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')


@dataclasses.dataclass(frozen=True)
class Collective:
  layer: str  # the named scope (conv3, fc6, loss, metrics, ...) or '?'
  direction: str  # forward | backward
  kind: str  # all-gather | all-reduce | reduce-scatter | ...
  axis: str  # the mesh axis the replica groups span ('data', 'model', 'data+model')
  bytes: int  # per device: the buffer the op produces
  op_name: str


def _array_bytes(text: str) -> list[int]:
  return [
      _DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(',') if x] or
                                    [1])) for d, dims in _ARRAY.findall(text)
  ]


def _replica_groups(rest: str) -> list[list[int]]:
  m = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', rest)
  if m:
    return [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([\d,]*)\}', m.group(1))]
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', rest)
  if m:  # iota form: arange(prod(dims)).reshape(dims).transpose(perm).reshape(groups, size)
    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(x) for x in m.group(3).split(',')]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(',')])
    return ids.reshape(groups, size).tolist()
  m = re.search(r'source_target_pairs=\{(.*?)\}\}', rest)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)\}', m.group(0))]
  return []


def _axis_of(groups: list[list[int]], mesh_shape: dict[str, int]) -> str:
  """The mesh axes a collective spans: logical ids are row-major positions in the mesh."""
  names = list(mesh_shape)
  coords = lambda i: np.unravel_index(i, tuple(mesh_shape.values()))
  varying = set()
  for group in groups:
    cs = [coords(i) for i in group]
    for a, name in enumerate(names):
      if len({c[a] for c in cs}) > 1:
        varying.add(name)
  return '+'.join(n for n in names if n in varying) or 'none'


def layer_scopes(config) -> tuple[str, ...]:
  """The named scopes a collective of ``config``'s training step can belong to: the model's
  layers in network order (each model runs every layer under ``jax.named_scope(name)``), then the
  step's own."""
  model = nnx.eval_shape(lambda: models.create_model(config.model, nnx.Rngs(0)))
  return model.layer_names + STEP_SCOPES


def _layer_of(op_name: str, scopes) -> tuple[str, str]:
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  for token in re.split(r'[/()]', op_name):
    if token in scopes:
      return token, direction
  return '?', direction


def parse_collectives(hlo_text: str, mesh_shape: dict[str, int], scopes=SCOPES) -> list[Collective]:
  """Every collective of an optimised HLO module, one entry per (merged) element, attributed to
  the first of ``scopes`` (see ``layer_scopes``) in its op name."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m or '-done(' in line:
      continue
    rest = m.group('rest')
    groups = _replica_groups(rest)
    axis = _axis_of(groups, mesh_shape)
    if axis == 'none':
      continue  # a group of one device: nothing crosses a device boundary
    op = re.search(r'op_name="([^"]*)"', rest)
    op_name = op.group(1) if op else ''
    sizes = _array_bytes(m.group('shape'))
    if m.group('kind') != 'all-reduce' and len(sizes) > 1:
      sizes = sizes[-1:]  # async start ops: (operand, result) — count the result
    names = _split_merged(op_name, len(sizes))
    for name, size in zip(names, sizes):
      layer, direction = _layer_of(name, scopes)
      out.append(Collective(layer, direction, m.group('kind'), axis, size, name))
  return out


def _split_merged(op_name: str, n: int) -> list[str]:
  m = re.match(r'^(.*?/)\((.*)\)$', op_name)
  if n > 1 and m:
    parts = [m.group(1) + p for p in m.group(2).split(':')]
    if len(parts) == n:
      return parts
  return [op_name] * n


def summarize(colls: list[Collective], scopes=SCOPES) -> list[dict]:
  """One row per (layer, direction, kind, axis), bytes and ops added up, in ``scopes``' order."""
  rows = collections.OrderedDict()
  order = {s: i for i, s in enumerate(scopes)}
  for c in sorted(colls, key=lambda c: (order.get(c.layer, 99), c.direction != 'forward')):
    key = (c.layer, c.direction, c.kind, c.axis)
    row = rows.setdefault(
        key, dict(layer=c.layer, direction=c.direction, kind=c.kind, axis=c.axis, ops=0, bytes=0))
    row['ops'] += 1
    row['bytes'] += c.bytes
  return list(rows.values())


def compiled_train_step_hlo(config, compiler_options=None) -> tuple[str, dict[str, int]]:
  """The optimised HLO of the configured training step, and the mesh shape it was compiled for."""
  prog = program.build_program(config, steps_per_epoch=1)
  lowered = prog.train_step.lower(prog.abstract_state, prog.abstract_batch())
  hlo = lowered.compile(compiler_options).as_text()
  return hlo, dict(prog.mesh.shape)


def format_table(rows: list[dict], mesh_shape: dict[str, int]) -> str:
  lines = [
      'cross-device collectives per training step, mesh ' +
      ' x '.join(f'{k}={v}' for k, v in mesh_shape.items()),
      f'{"layer":<14}{"pass":<10}{"collective":<20}{"axis":<12}{"ops":>4}{"bytes/device":>16}'
  ]
  for r in rows:
    lines.append(f'{r["layer"]:<14}{r["direction"]:<10}{r["kind"]:<20}{r["axis"]:<12}'
                 f'{r["ops"]:>4}{r["bytes"]:>16,}')
  total = collections.Counter()
  for r in rows:
    total[r['axis']] += r['bytes']
  lines.append('total: ' + ', '.join(f'{axis} {b:,} bytes' for axis, b in sorted(total.items())))
  return '\n'.join(lines)


def compare_parallelism(config, devices: int = 8, compiler_options=None) -> list[dict]:
  """Bytes communicated per training step by AlexNet (``config``'s sizes and batch) under three
  placements over the same ``devices``: pure data parallelism (one dense tower, mesh N × 1), the
  paper's two towers × data (N/2 × 2), and the "one weird trick" hybrid (1 × N: data-parallel
  convolutions, fc layers split over all N)."""
  schemes = [('data parallel', dict(towers=1, hybrid=False), (devices, 1)),
             ('two towers x data', dict(towers=2, hybrid=False), (devices // 2, 2)),
             ('hybrid (one weird trick)', dict(towers=devices, hybrid=True), (1, devices))]
  rows = []
  for label, model, (data, model_axis) in schemes:
    c = config.copy_and_resolve_references()
    c.model.update(model)
    c.mesh.update(data=data, model=model_axis)
    hlo, mesh_shape = compiled_train_step_hlo(c, compiler_options)
    colls = parse_collectives(hlo, mesh_shape)
    per_device = sum(x.bytes for x in colls)
    activations = sum(
        x.bytes for x in colls if x.layer in SCOPES[:-len(STEP_SCOPES)] and x.kind != 'all-reduce')
    rows.append(
        dict(scheme=label, mesh=f'{data} x {model_axis}', bytes_per_device=per_device,
             activation_bytes_per_device=activations,
             bytes_per_step=per_device * data * model_axis))
  return rows


def format_comparison(rows: list[dict], config) -> str:
  lines = [
      f'AlexNet {config.model.image_size}x{config.model.image_size}, width '
      f'{config.model.width}, batch {config.batch_size}: bytes communicated per training step',
      f'{"scheme":<26}{"mesh":<8}{"per device":>16}{"activations":>16}{"all devices":>18}'
  ]
  for r in rows:
    lines.append(f'{r["scheme"]:<26}{r["mesh"]:<8}{r["bytes_per_device"]:>16,}'
                 f'{r["activation_bytes_per_device"]:>16,}{r["bytes_per_step"]:>18,}')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = cli.config_or_usage_error()
  distributed.initialize(config)
  if flags.FLAGS.compare:
    rows = compare_parallelism(config)
    print(json.dumps(rows, indent=1) if flags.FLAGS.json else format_comparison(rows, config))
    return
  hlo, mesh_shape = compiled_train_step_hlo(config)
  scopes = layer_scopes(config)
  rows = summarize(parse_collectives(hlo, mesh_shape, scopes), scopes)
  if flags.FLAGS.json:
    print(json.dumps(dict(mesh=mesh_shape, collectives=rows), indent=1))
  else:
    print(format_table(rows, mesh_shape))


if __name__ == '__main__':
  cli.define_tool_flags()
  flags.DEFINE_bool(
      'compare', False, 'Compare the bytes per step of data parallelism, two towers x '
      'data, and the one-weird-trick hybrid for the configured AlexNet on 8 devices.')
  cli.run(main)
