"""Prepares a folder of labelled images once, the paper's way, for training.

  python -m alexnet_jax.tools.prepare --source=DIR --name=NAME [--val_fraction=F | --val_dir=DIR] \\
      [--data_dir=D]

See ``alexnet_jax.data.prepare`` for what it writes; bad input (a missing folder, an empty class
folder, a name taken, a numeric flag out of range) ends in one ``error:`` line and exit status 2,
before anything is written.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from alexnet_jax import cli
from alexnet_jax.data.prepare import CODECS, DEFAULT_MAX_PIXELS, REPORT, prepare


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f.source or not f.name:
    raise app.UsageError('--source and --name are required')
  directory = prepare(f.source, f.name, data_dir=f.data_dir, val_fraction=f.val_fraction,
                      val_dir=f.val_dir, image_size=f.image_size, jpeg_quality=f.jpeg_quality,
                      examples_per_shard=f.examples_per_shard, workers=f.workers, seed=f.seed,
                      max_pixels=f.max_pixels, codec=f.codec)
  with open(os.path.join(directory, REPORT)) as fh:
    report = json.load(fh)
  counts = ', '.join(f'{k} {v:,}' for k, v in report['num_examples'].items())
  print(f'prepared {directory}: {counts} images; {report["num_skipped"]} files skipped '
        f'(listed in {os.path.join(directory, REPORT)})')
  once = report.get('counted_once', {})
  repeated = sum(len(v['files']) + len(v['folders']) for v in once.values())
  if repeated:
    print(f'note: {repeated} files or folders reached again through links were counted once '
          f'(listed in {os.path.join(directory, REPORT)})')
  if report.get('classes_without_training_images'):
    print(f'warning: no readable training image for the classes '
          f'{", ".join(report["classes_without_training_images"])}')
  print(f'train with --config.dataset.name={f.name} '
        f'--config.dataset.data_dir={os.path.dirname(directory)}')


def _define_flags() -> None:
  flags.DEFINE_string('source', None, 'Folder with one subfolder of images per class.')
  flags.DEFINE_string('name', None, 'Name of the prepared set (as in --config.dataset.name).')
  flags.DEFINE_string('data_dir', None, "Where prepared sets live (default: TFDS's data dir).")
  flags.DEFINE_float(
      'val_fraction', None, 'Fraction of each class held out for validation '
      '(default 0.1 when no --val_dir).')
  flags.DEFINE_string('val_dir', None, 'A separate folder of class subfolders for validation.')
  flags.DEFINE_integer('image_size', 256, 'Side of the stored square images.')
  flags.DEFINE_integer('jpeg_quality', 90, 'JPEG quality of the stored images.')
  flags.DEFINE_enum(
      'codec', 'jpeg', CODECS,
      'How the squares are stored: jpeg (small, decoded every epoch) or raw '
      '(their pixels: about 1.35x the training images per host core, ~196 KB per 256² image).')
  flags.DEFINE_integer('examples_per_shard', 1024, 'Images per ArrayRecord shard.')
  flags.DEFINE_integer('workers', None, 'Decoding processes (default: all cores).')
  flags.DEFINE_integer('seed', 0, 'Seed of the validation split.')
  flags.DEFINE_integer('max_pixels', DEFAULT_MAX_PIXELS,
                       'Refuse images with more pixels (decompression bombs).')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
