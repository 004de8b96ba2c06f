"""``python -m alexnet_jax.visualize <analysis> --checkpoint=DIR --out=DIR [--config=…]``

Analyses: filters, deconv, top9, evolution, invariance, occlusion, correspondence, predictions,
neighbours (see ``alexnet_jax.visualize``). Writes PNG figures and .npz arrays into --out, and an
index.html that shows every figure written there with its caption. Without ``--config`` the config
stored with the checkpoint is used (``--config.field=value`` overrides its fields).
"""

from __future__ import annotations

from absl import app, flags

from alexnet_jax import cli, configs, distributed, storage, trained
from alexnet_jax.errors import ConfigError
from alexnet_jax.visualize import commands


def _define_flags():
  cli.define_config_flag_from_checkpoint()
  cli.define_huge_pages_flag()
  flags.DEFINE_string(
      'checkpoint', None, 'The training --workdir (or its checkpoints/ folder); '
      'a local path or a gs:// URL.')
  flags.DEFINE_string(
      'out', None, 'Output folder for the figures, arrays and index.html; a '
      'local path or a gs:// URL.')
  flags.DEFINE_string(
      'images', None, "'dataset' (the config's evaluation split; default), "
      "'skimage' (scikit-image's photographs) or comma-separated files / folders.")
  # Bounds: absl refuses a value outside them in one line (cli._parse_flags).
  flags.DEFINE_integer('num_images', None, 'How many images (default: per analysis).',
                       lower_bound=1)
  flags.DEFINE_list('layers', None, 'Layers to analyse (default: per analysis).')
  flags.DEFINE_list('maps', None, 'top9 / evolution: these feature maps (default: random ones).')
  flags.DEFINE_integer('num_maps', 9, 'top9 / evolution: how many random maps per layer.',
                       lower_bound=1)
  flags.DEFINE_integer('top', 9, 'top9: activations per map; deconv: maps per image.',
                       lower_bound=1)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', lower_bound=0)
  flags.DEFINE_list('epochs', None, 'evolution: the epochs to show (default: every checkpoint).')
  flags.DEFINE_integer('occluder_size', None, 'occlusion: side of the grey square (default S/5).',
                       lower_bound=1)
  flags.DEFINE_integer('occluder_stride', None, 'occlusion: its stride (default S/56).',
                       lower_bound=1)
  flags.DEFINE_string(
      'parts', None, "correspondence: 'name=top,left,height,width;...', one box for "
      "all images or one per image separated by '/' (default: a central box).")
  flags.DEFINE_integer('random_draws', 10, 'correspondence: random boxes per part.', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Seed for the choice of images, maps and random boxes.',
                       lower_bound=0)
  flags.DEFINE_integer(
      'num_train', None, 'neighbours: search the first N training images '
      '(default: the whole training split).', lower_bound=1)
  flags.DEFINE_integer(
      'chunk_size', 256, 'neighbours: training images per chunk through the '
      'devices (rounded up to a multiple of them).', lower_bound=1)


def parse_parts(text: str | None) -> dict | None:
  if not text:
    return None
  parts = {}
  for item in text.split(';'):
    if not item.strip():
      continue
    name, _, boxes = item.partition('=')
    try:
      parts[name.strip()] = [[int(v) for v in box.split(',')] for box in boxes.split('/')]
    except ValueError:
      raise ConfigError(
          f'--parts: cannot read {item!r}; write name=top,left,height,width') from None
    if not name.strip() or any(len(b) != 4 for b in parts[name.strip()]):
      raise ConfigError(f'--parts: cannot read {item!r}; write name=top,left,height,width')
  return parts


def _numbers(values: list[str] | None, kind, flag: str) -> list | None:
  if not values:
    return None
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise ConfigError(f'{flag}={",".join(values)}: write comma-separated '
                      f'{"integers" if kind is int else "numbers"}') from None


def main(argv):
  if len(argv) != 2 or argv[1] not in commands.ANALYSES:
    raise app.UsageError(f'name one analysis: {" | ".join(commands.ANALYSES)}')
  f = flags.FLAGS
  if not f.checkpoint or not f.out:
    raise app.UsageError('--checkpoint=the training workdir and --out=a folder are required')
  if not storage.is_local(f.checkpoint):
    storage.check_url(f.checkpoint, '--checkpoint')
  # --config: a file given, else the checkpoint's stored config (cli reads it before parsing);
  # where that could not be read, config_for says why (or reads it through orbax).
  config = trained.config_for(f.checkpoint, f.step, f.config)
  configs.check_fields(config)
  options = commands.Options(images=f.images, num_images=f.num_images, layers=f.layers,
                             maps=_numbers(f.maps, int, '--maps'), num_maps=f.num_maps, top=f.top,
                             step=f.step, epochs=_numbers(f.epochs, float, '--epochs'),
                             occluder_size=f.occluder_size, occluder_stride=f.occluder_stride,
                             parts=parse_parts(f.parts), random_draws=f.random_draws, seed=f.seed,
                             num_train=f.num_train, chunk_size=f.chunk_size)
  cli.writable_directory(f.out, '--out')
  distributed.initialize(config)
  cli.quiet_orbax_info()
  written = commands.run(argv[1], config, f.checkpoint, options, f.out)
  for path in written:
    print(path)
  print(f'index: {f.out}/index.html', flush=True)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
