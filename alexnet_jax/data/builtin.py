"""`builtin_shapes`: a deterministic 10-class image set generated on first use.

Each image shows one shape (the class) drawn in a random foreground colour on a
random background colour; both colours come from the same distribution (uniform
RGB, resampled as a pair until they differ enough to be visible), so colour carries
no class information. Scale, aspect, position and rotation are random; the
background holds clutter (thin lines, small blobs, a couple of lines over the shape),
a brightness gradient and pixel noise. Telling the classes apart needs spatial
features: outline (disc / square / triangle / hexagon), concavities (star, cross,
arrow), holes (ring) and texture (stripes, checkerboard).

Every example is generated from its own seed `np.random.default_rng([seed, split_id,
index])`, so the set is identical whatever the order or number of worker processes.
The label of example `index` is `index % 10` (classes balanced to within one).

Layout on disk (`ensure_builtin` returns the directory)::

    {data_dir}/builtin_shapes/{image_size}px_{num_train}_{num_val}_s{seed}/
        train.array_record-00000-of-0000N ...   records: see records.encode_record
        validation.array_record-00000-of-0000M ...
        metadata.json                           written last; marks the set complete
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from alexnet_jax.data import records

NAME = 'builtin_shapes'
FORMAT_VERSION = 1
CLASS_NAMES = ('disc', 'square', 'triangle', 'star', 'cross', 'ring', 'hexagon', 'arrow', 'stripes',
               'checkerboard')
NUM_CLASSES = len(CLASS_NAMES)
SPLIT_IDS = {'train': 0, 'validation': 1}
CODEC = 'png'
_SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing
_MIN_COLOUR_DISTANCE = 100.0  # Euclidean RGB distance between foreground and background

# ---------------------------------------------------------------------------
# Shapes, in unit coordinates (they fit the unit disc); each returns a list of
# (polygon vertices (N, 2), fill) where fill 255 paints the shape, 0 cuts a hole.
# ---------------------------------------------------------------------------


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
  angles = phase + 2.0 * np.pi * np.arange(n) / n
  return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
  return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _shape_polygons(label: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
  name = CLASS_NAMES[label]
  if name == 'disc':
    return [(_regular_polygon(64), 255)]
  if name == 'square':
    return [(_rect(-0.7, -0.7, 0.7, 0.7), 255)]
  if name == 'triangle':
    return [(_regular_polygon(3, phase=np.pi / 2), 255)]
  if name == 'star':
    outer = _regular_polygon(5, 1.0, np.pi / 2)
    inner = _regular_polygon(5, rng.uniform(0.35, 0.45), np.pi / 2 + np.pi / 5)
    star = np.empty((10, 2))
    star[0::2], star[1::2] = outer, inner
    return [(star, 255)]
  if name == 'cross':
    w = rng.uniform(0.22, 0.32)
    cross = np.array([[w, w], [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w], [-w, -1],
                      [w, -1], [w, -w], [1, -w], [1, w]], dtype=np.float64)
    return [(cross, 255)]
  if name == 'ring':
    return [(_regular_polygon(64), 255), (_regular_polygon(64, rng.uniform(0.5, 0.65)), 0)]
  if name == 'hexagon':
    return [(_regular_polygon(6), 255)]
  if name == 'arrow':
    s, h = rng.uniform(0.14, 0.22), rng.uniform(0.45, 0.6)
    arrow = np.array([[-1, -s], [0.1, -s], [0.1, -h], [1, 0], [0.1, h], [0.1, s], [-1, s]],
                     dtype=np.float64)
    return [(arrow, 255)]
  if name == 'stripes':
    bars = 5 if rng.random() < 0.5 else 7  # odd: foreground bars at both ends
    edges = np.linspace(-0.75, 0.75, bars + 1)
    return [(_rect(edges[i], -0.75, edges[i + 1], 0.75), 255) for i in range(0, bars, 2)]
  if name == 'checkerboard':
    cells = int(rng.integers(3, 5))
    edges = np.linspace(-0.72, 0.72, cells + 1)
    return [(_rect(edges[i], edges[j], edges[i + 1], edges[j + 1]), 255)
            for i in range(cells)
            for j in range(cells)
            if (i + j) % 2 == 0]
  raise ValueError(f'unknown class {label}')


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _colour_pair(rng: np.random.Generator):
  """Foreground and background from the same distribution, visibly different."""
  while True:
    fg, bg = _random_colour(rng), _random_colour(rng)
    if np.linalg.norm(np.subtract(fg, bg)) >= _MIN_COLOUR_DISTANCE:
      return fg, bg


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, num_lines: int,
                  num_blobs: int) -> None:
  f = _SUPERSAMPLE
  for _ in range(num_lines):
    p = rng.uniform(0, size * f, size=4)
    draw.line([(p[0], p[1]), (p[2], p[3])], fill=_random_colour(rng),
              width=int(rng.integers(1, 3)) * f)
  for _ in range(num_blobs):
    cx, cy = rng.uniform(0, size * f, size=2)
    rx, ry = rng.uniform(0.012, 0.045, size=2) * size * f
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_random_colour(rng))


def generate_example(seed: int, split_id: int, index: int,
                     image_size: int) -> tuple[np.ndarray, int]:
  """Renders example `index` of a split: (uint8 (S, S, 3) image, label)."""
  rng = np.random.default_rng([seed, split_id, index])
  label = index % NUM_CLASSES
  s, f = image_size, _SUPERSAMPLE
  fg, bg = _colour_pair(rng)

  canvas = Image.new('RGB', (s * f, s * f), bg)
  draw = ImageDraw.Draw(canvas)
  _draw_clutter(draw, rng, s, num_lines=int(rng.integers(2, 7)), num_blobs=int(rng.integers(2, 9)))

  # Shape placement: radius 20-42% of the side, slightly anisotropic, rotated,
  # anywhere it fits.
  radius = rng.uniform(0.20, 0.42) * s
  stretch = rng.uniform(0.85, 1.15, size=2)
  theta = rng.uniform(0.0, 2.0 * np.pi)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  centre = rng.uniform(radius * 1.1, s - radius * 1.1, size=2)
  mask = Image.new('L', canvas.size, 0)
  mask_draw = ImageDraw.Draw(mask)
  for poly, fill in _shape_polygons(label, rng):
    pts = ((poly * stretch) @ rot.T * radius + centre) * f
    mask_draw.polygon([tuple(p) for p in pts], fill=fill)
  canvas.paste(fg, (0, 0, s * f, s * f), mask)
  # A little occlusion over the shape.
  _draw_clutter(draw, rng, s, num_lines=int(rng.integers(0, 3)), num_blobs=0)

  image = np.asarray(canvas.reduce(f), dtype=np.float32)
  # Illumination gradient along a random direction, then pixel noise.
  phi = rng.uniform(0.0, 2.0 * np.pi)
  coords = (np.arange(s, dtype=np.float32) - (s - 1) / 2) / s
  ramp = np.cos(phi) * coords[None, :] + np.sin(phi) * coords[:, None]
  image += (rng.uniform(-50.0, 50.0) * ramp)[..., None]
  image += rng.normal(0.0, rng.uniform(2.0, 8.0), size=image.shape).astype(np.float32)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _encode_example(args: tuple[int, int, int, int]) -> bytes:
  seed, split_id, index, image_size = args
  image, label = generate_example(seed, split_id, index, image_size)
  return records.encode_record(image, label, CODEC, png_compress_level=1)


# ---------------------------------------------------------------------------
# Writing the set
# ---------------------------------------------------------------------------


def builtin_directory(data_dir: str, *, num_train: int = 10000, num_val: int = 2000,
                      image_size: int = 112, seed: int = 0) -> str:
  return os.path.join(os.path.expanduser(data_dir), NAME,
                      f'{image_size}px_{num_train}_{num_val}_s{seed}')


def is_complete(directory: str) -> bool:
  """True when `directory` holds a finished set of this format version."""
  try:
    with open(os.path.join(directory, 'metadata.json')) as f:
      meta = json.load(f)
  except (FileNotFoundError, ValueError):  # ValueError: damaged (not JSON, not UTF-8)
    return False
  if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
    return False
  return all(
      os.path.isfile(os.path.join(directory, shard))
      for split in meta['splits'].values()
      for shard in split['shards'])


def _shard_names(split: str, num_examples: int, examples_per_shard: int) -> list[str]:
  n = max(1, math.ceil(num_examples / examples_per_shard))
  return [f'{split}.array_record-{i:05d}-of-{n:05d}' for i in range(n)]


def ensure_builtin(data_dir: str, *, num_train: int = 10000, num_val: int = 2000,
                   image_size: int = 112, seed: int = 0, progress: bool = True,
                   examples_per_shard: int = 2500, num_workers: int | None = None) -> str:
  """Generates the built-in set unless already complete; returns its directory.

  Generation goes to a temporary sibling directory that is renamed into place only
  after every shard and, last, metadata.json are written; an interrupted run leaves
  nothing that looks complete. Safe to call from several processes at once (the
  first rename wins, the others discard their copy).

  Args:
    data_dir: root directory (the set goes to `{data_dir}/builtin_shapes/...`).
    num_train, num_val: split sizes. image_size: side of the square images.
    seed: generation seed. progress: show a tqdm bar.
    examples_per_shard: shard size (does not change the content).
    num_workers: generator processes; None = all cores for sets of 512+ images.
  """
  if num_train < 1 or num_val < 1 or image_size < 8:
    raise ValueError(f'need num_train, num_val >= 1 and image_size >= 8, got '
                     f'{num_train}, {num_val}, {image_size}')
  final = builtin_directory(data_dir, num_train=num_train, num_val=num_val, image_size=image_size,
                            seed=seed)
  if is_complete(final):
    return final
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(final)}.tmp-', dir=parent)
  try:
    start = time.time()
    meta = _write_set(tmp, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                      progress=progress, examples_per_shard=examples_per_shard,
                      num_workers=num_workers)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the set is meant to be shared
    if os.path.exists(final) and not is_complete(final):
      logging.warning('removing incomplete or outdated %s', final)
      shutil.rmtree(final, ignore_errors=True)
    try:
      os.replace(tmp, final)
    except OSError:
      if not is_complete(final):  # not a lost race: a real failure
        raise
      logging.info('%s was completed by another process meanwhile', final)
    else:
      logging.info('generated %s (%d + %d images) in %.1fs', final,
                   meta['splits']['train']['num_examples'],
                   meta['splits']['validation']['num_examples'],
                   time.time() - start)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def _write_set(directory: str, *, num_train: int, num_val: int, image_size: int, seed: int,
               progress: bool, examples_per_shard: int, num_workers: int | None) -> dict:

  sizes = {'train': num_train, 'validation': num_val}
  shards = {split: _shard_names(split, n, examples_per_shard) for split, n in sizes.items()}
  total = num_train + num_val
  if num_workers is None:
    num_workers = (os.cpu_count() or 1) if total >= 512 else 0
  num_workers = max(0, min(num_workers, total))

  tasks = ((seed, SPLIT_IDS[split], i, image_size) for split, n in sizes.items() for i in range(n))
  pool = None
  if num_workers > 1:
    # spawn, not fork: the caller may already run JAX (threads) and forking it is unsafe.
    pool = multiprocessing.get_context('spawn').Pool(num_workers)
    records = pool.imap(_encode_example, tasks, chunksize=32)
  else:
    records = map(_encode_example, tasks)
  bar = tqdm(total=total, desc=f'generating {NAME}', unit='img', disable=not progress)
  try:
    for split, n in sizes.items():
      names = shards[split]
      for k, shard in enumerate(names):
        count = n // len(names) + (1 if k < n % len(names) else 0)
        writer = ArrayRecordWriter(os.path.join(directory, shard), 'group_size:1')
        try:
          for _ in range(count):
            writer.write(next(records))
            bar.update(1)
        finally:
          writer.close()
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()
      pool.join()

  meta = {
      'name': NAME,
      'format_version': FORMAT_VERSION,
      'num_classes': NUM_CLASSES,
      'class_names': list(CLASS_NAMES),
      'image_size': image_size,
      'seed': seed,
      'codec': CODEC,
      'record_format': 'records.encode_record: 20-byte header (magic AXJ1, int64 label, '
                       'uint16 height, uint16 width, uint8 codec) + image payload',
      'splits': {split: {'num_examples': n, 'shards': shards[split]} for split, n in sizes.items()},
  }
  meta_tmp = os.path.join(directory, 'metadata.json.tmp')
  with open(meta_tmp, 'w') as f:
    json.dump(meta, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(meta_tmp, os.path.join(directory, 'metadata.json'))
  return meta
