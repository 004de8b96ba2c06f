"""Pictures from the analyses' arrays: image grids, curves, overlays, the folder's index.html."""

from __future__ import annotations

import html
import io
import json
import os

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from PIL import Image

from alexnet_jax import storage

MANIFEST = 'index.json'
GREY = 128


def to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> str:
  """Writes ``image`` as a PNG file at ``path``, local or a URL (``storage``)."""
  buffer = io.BytesIO()  # PIL and matplotlib write local files or file objects, not epath paths
  Image.fromarray(to_uint8(image)).save(buffer, format='PNG')
  storage.write_bytes(path, buffer.getvalue())
  return path


def projection_image(p: np.ndarray) -> np.ndarray:
  """A deconvnet projection as a picture: zero is grey, contrast stretched to its largest value."""
  scale = np.abs(p).max()
  return to_uint8(GREY + 127 * (p / scale if scale > 0 else p))


def filter_image(f: np.ndarray) -> np.ndarray:
  """A filter as a picture, its values stretched to 0..255."""
  lo, hi = f.min(), f.max()
  return to_uint8(255 * (f - lo) / (hi - lo) if hi > lo else np.full_like(f, GREY))


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def grid(tiles: list[list[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
  """Rows of equally sized uint8 tiles, separated by ``pad`` pixels of ``background``."""
  h, w = tiles[0][0].shape[:2]
  rows, cols = len(tiles), max(len(r) for r in tiles)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
  for i, row in enumerate(tiles):
    for j, tile in enumerate(row):
      out[pad + i * (h + pad):pad + i * (h + pad) + h,
          pad + j * (w + pad):pad + j * (w + pad) + w] = tile
  return out


def fit(tile: np.ndarray, box, image_size: int, shape: tuple[int, int]) -> np.ndarray:
  """A crop clipped by the image border, placed on a grey canvas of the full receptive field's
  ``shape`` on the side away from the border it was clipped at."""
  h, w = shape
  out = np.full((h, w, 3), GREY, np.uint8)
  top, left, bottom, right = box
  th, tw = tile.shape[:2]
  r = h - th if top == 0 and bottom < image_size - 1 else 0
  c = w - tw if left == 0 and right < image_size - 1 else 0
  out[r:r + th, c:c + tw] = tile[:h, :w]
  return out


def square_grid(tiles: list[np.ndarray], cols: int | None = None, pad: int = 1) -> np.ndarray:
  cols = cols or int(np.ceil(np.sqrt(len(tiles))))
  rows = [tiles[i:i + cols] for i in range(0, len(tiles), cols)]
  blank = np.full_like(tiles[0], 255)
  rows[-1] = rows[-1] + [blank] * (cols - len(rows[-1]))
  return grid(rows, pad=pad)


def zoom_to(image: np.ndarray, min_side: int) -> np.ndarray:
  """Nearest-neighbour enlargement so that small tiles stay visible."""
  return upscale(image, max(1, -(-min_side // max(image.shape[:2]))))


def subplots(rows: int, cols: int, *, figsize, squeeze: bool = True):
  """``(figure, axes)`` as ``pyplot.subplots`` gives them, without pyplot: a bare ``Figure``
  renders with the Agg canvas when saved, and no backend or global figure list is involved."""
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(rows, cols, squeeze=squeeze)


def figure(*, figsize) -> Figure:
  """A bare ``Figure`` (see ``subplots``) that lays its axes out itself when saved."""
  return Figure(figsize=figsize, layout='constrained')


def colorbar(fig, mappable, ax):
  """A colour bar whose ticks carry their whole values: matplotlib's default moves a common offset
  or exponent into a text above the bar, where it overlaps the axes' title."""
  bar = fig.colorbar(mappable, ax=ax, fraction=0.046)
  plain = ticker.ScalarFormatter(useOffset=False)
  plain.set_scientific(False)
  bar.formatter = plain
  bar.update_ticks()
  return bar


def save_figure(fig, path: str) -> str:
  """Writes ``fig`` as a PNG file at ``path``, local or a URL (``storage``)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  storage.write_bytes(path, buffer.getvalue())
  return path


# --- The index ------------------------------------------------------------------------------------


def record(out_dir: str, analysis: str, figures: list[tuple[str, str]], data: list[str]) -> str:
  """Adds ``(file, caption)`` figures of one analysis to the folder's manifest (replacing that
  analysis's earlier entries) and rewrites index.html; returns its path."""
  path = os.path.join(out_dir, MANIFEST)
  entries = []
  if storage.path(path).exists():
    entries = [e for e in json.loads(storage.read_text(path)) if e['analysis'] != analysis]
  entries.append(
      dict(analysis=analysis, figures=[dict(file=f, caption=c) for f, c in figures], data=data))
  storage.write_text(path, json.dumps(entries, indent=1), atomic=True)
  return write_index(out_dir, entries)


def write_index(out_dir: str, entries: list[dict]) -> str:
  parts = [
      '<!doctype html><html><head><meta charset="utf-8"><title>alexnet_jax: understanding '
      'the network</title><style>body{font-family:sans-serif;max-width:1400px;margin:auto}'
      'figure{margin:1em 0}img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}'
      'figcaption{color:#333}</style></head><body>', '<h1>Understanding the network</h1>'
  ]
  for entry in entries:
    parts.append(f'<h2 id="{html.escape(entry["analysis"])}">{html.escape(entry["analysis"])}</h2>')
    for fig in entry['figures']:
      parts.append(
          f'<figure><a href="{html.escape(fig["file"])}"><img src="{html.escape(fig["file"])}" '
          f'alt="{html.escape(fig["caption"])}"></a><figcaption>{html.escape(fig["caption"])}'
          '</figcaption></figure>')
    if entry['data']:
      links = ', '.join(f'<a href="{html.escape(d)}">{html.escape(d)}</a>' for d in entry['data'])
      parts.append(f'<p>Arrays: {links}</p>')
  parts.append('</body></html>')
  path = os.path.join(out_dir, 'index.html')
  storage.write_text(path, '\n'.join(parts))
  return path
