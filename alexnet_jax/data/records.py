"""The record format of prepared sets and the built-in set, and image decoding.

One record is one example::

    offset  size  field
    0       4     magic b"AXJ1"
    4       8     label, int64 little-endian
    12      2     height, uint16 little-endian
    14      2     width, uint16 little-endian
    16      1     codec: 0 = raw uint8 HxWx3 bytes, 1 = PNG, 2 = JPEG
    17      3     zero padding
    20      ...   the image payload
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
from PIL import Image

RECORD_MAGIC = b'AXJ1'
_HEADER = struct.Struct('<4sqHHB3x')
HEADER_SIZE = _HEADER.size  # 20 bytes
CODECS = {'raw': 0, 'png': 1, 'jpeg': 2}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}


class CorruptRecordError(ValueError):
  """A record that cannot be parsed or whose image cannot be decoded (sources count and skip it)."""


def encode_record(image: np.ndarray, label: int, codec: str = 'png', *, png_compress_level: int = 6,
                  jpeg_quality: int = 95) -> bytes:
  """Serialises one (uint8 HxWx3 image, int label) example; see the module doc."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}')
  height, width = image.shape[:2]
  if codec == 'raw':
    payload = np.ascontiguousarray(image).tobytes()
  elif codec == 'png':
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG', compress_level=png_compress_level)
    payload = buf.getvalue()
  elif codec == 'jpeg':
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=jpeg_quality)
    payload = buf.getvalue()
  else:
    raise ValueError(f'unknown codec {codec!r}; choose from {sorted(CODECS)}')
  return _HEADER.pack(RECORD_MAGIC, int(label), height, width, CODECS[codec]) + payload


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  """Inverse of `encode_record`. Raises `CorruptRecordError` on any inconsistency."""
  if len(record) < HEADER_SIZE:
    raise CorruptRecordError(f'record of {len(record)} bytes is shorter than the header')
  magic, label, height, width, codec = _HEADER.unpack_from(record)
  if magic != RECORD_MAGIC:
    raise CorruptRecordError(f'bad magic {magic!r} (expected {RECORD_MAGIC!r})')
  if codec not in _CODEC_NAMES:
    raise CorruptRecordError(f'unknown codec id {codec}')
  payload = memoryview(record)[HEADER_SIZE:]
  if _CODEC_NAMES[codec] == 'raw':
    if len(payload) != height * width * 3:
      raise CorruptRecordError(
          f'raw payload has {len(payload)} bytes, expected {height * width * 3}')
    image = np.frombuffer(payload, np.uint8).reshape(height, width, 3).copy()
  else:
    image = decode_image_bytes(bytes(payload))
    if image.shape[:2] != (height, width):
      raise CorruptRecordError(f'decoded image is {image.shape[:2]}, header says {(height, width)}')
  return image, int(label)


def decode_image_bytes(data: bytes, min_side: int | None = None) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 RGB (H, W, 3) with PIL (no TensorFlow).

  With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  several times faster) as long as its shorter side stays at least ``min_side``.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      image = np.asarray(load_rgb(img, min_side), dtype=np.uint8)
  except Exception as e:  # PIL raises a zoo of exception types on bad data.
    raise CorruptRecordError(f'undecodable image ({type(e).__name__}: {e})') from e
  if image.ndim != 3 or image.shape[2] != 3:
    raise CorruptRecordError(f'decoded image has shape {image.shape}')
  return image


def load_rgb(img: Image.Image, min_side: int | None = None) -> Image.Image:
  """Loads an opened PIL image as RGB, at reduced JPEG scale when ``min_side`` allows it."""
  if min_side is not None and img.format == 'JPEG':
    w, h = img.size
    scale = min_side / min(w, h)
    if scale < 1:
      # draft keeps both sides >= the requested ones, so the shorter one stays >= min_side.
      img.draft('RGB', (math.ceil(w * scale), math.ceil(h * scale)))
  img.load()
  return img if img.mode == 'RGB' else img.convert('RGB')
