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

try:
  # libjpeg-turbo's TurboJPEG interface: the decoder PIL uses, straight into a numpy array, without
  # PIL's marker parsing in Python and its copies (about 1.7x PIL on 256-pixel photos). Without it
  # every JPEG goes through PIL, which decodes the same pixels, only slower.
  import simplejpeg
except ImportError:
  simplejpeg = None

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


def decode_record(record: bytes, *, fast: bool = True) -> tuple[np.ndarray, int]:
  """Inverse of `encode_record`. Raises `CorruptRecordError` on any inconsistency. ``fast``: as
  `decode_image_bytes`'s."""
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
    image = decode_image_bytes(bytes(payload), fast=fast)
    if image.shape[:2] != (height, width):
      raise CorruptRecordError(f'decoded image is {image.shape[:2]}, header says {(height, width)}')
  return image, int(label)


def decode_label(record: bytes) -> int:
  """The label of an `encode_record` record, from its header alone (the image is not decoded).
  Raises `CorruptRecordError` where the header is not one."""
  if len(record) < HEADER_SIZE:
    raise CorruptRecordError(f'record of {len(record)} bytes is shorter than the header')
  magic, label, _, _, codec = _HEADER.unpack_from(record)
  if magic != RECORD_MAGIC:
    raise CorruptRecordError(f'bad magic {magic!r} (expected {RECORD_MAGIC!r})')
  if codec not in _CODEC_NAMES:
    raise CorruptRecordError(f'unknown codec id {codec}')
  return int(label)


def decode_image_bytes(data: bytes, min_side: int | None = None, *,
                       fast: bool = True) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 RGB (H, W, 3) (no TensorFlow).

  With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  several times faster) as long as its shorter side stays at least ``min_side``.

  JPEGs go through libjpeg-turbo's own interface (`fast_jpeg`) where it decodes them cleanly, with
  the pixels PIL gives; everything else (other formats, CMYK, damaged data, ...), and everything
  with ``fast=False``, through PIL (`load_rgb`), whose verdict on bad data is final. Raises
  `CorruptRecordError` on bad data.
  """
  image = fast_jpeg(data, min_side) if fast else None
  if image is not None:
    return image
  try:
    with Image.open(io.BytesIO(data)) as img:
      image = np.asarray(load_rgb(img, min_side), dtype=np.uint8)
  except Exception as e:  # PIL raises a zoo of exception types on bad data.
    raise CorruptRecordError(f'undecodable image ({type(e).__name__}: {e})') from e
  if image.ndim != 3 or image.shape[2] != 3:
    raise CorruptRecordError(f'decoded image has shape {image.shape}')
  return image


def read_image_file(path: str, min_side: int | None = None, *, fast: bool = True) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3), as `decode_image_bytes` decodes it, but raising what PIL
  raises (so callers can tell a decompression bomb from a damaged file)."""
  with open(path, 'rb') as f:
    data = f.read()
  image = fast_jpeg(data, min_side) if fast else None
  if image is not None:
    return image
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(load_rgb(img, min_side), dtype=np.uint8)


# The colour spaces whose conversion to RGB libjpeg does itself, as it does for PIL. PIL converts
# CMYK and YCCK (Adobe's inverted CMYK) with its own formula, which simplejpeg's differs from.
_FAST_COLORSPACES = ('YCbCr', 'Gray', 'RGB')


def fast_jpeg(data: bytes, min_side: int | None = None) -> np.ndarray | None:
  """``decode_image_bytes(data, min_side)`` through libjpeg-turbo's TurboJPEG interface where the
  result is certain to be PIL's, else None (the caller then asks PIL).

  The pixels are PIL's exactly: both use libjpeg-turbo with its default (accurate integer) inverse
  DCT and smooth chroma upsampling, and the same DCT scale (`draft_scale`). None for: no simplejpeg,
  not a JPEG, a colour space PIL converts itself (CMYK, YCCK), more pixels than PIL's
  ``Image.MAX_IMAGE_PIXELS`` (PIL warns or refuses), a multi-picture file PIL reads as MPO (it does
  not scale those), a scale TurboJPEG would pick differently, and any data libjpeg reports even a
  recoverable error on (truncated, damaged, stray bytes): strict decoding never returns the grey
  fill or garbage of a damaged stream, and PIL decides what such data is.
  """
  if simplejpeg is None or data[:3] != b'\xff\xd8\xff':  # PIL's own JPEG test
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None
  limit = Image.MAX_IMAGE_PIXELS
  if colorspace not in _FAST_COLORSPACES or (limit is not None and height * width > limit):
    return None
  scale = draft_scale(width, height, min_side)
  min_height = min_width = 0
  if scale > 1:
    if b'MPF\x00' in data or not _turbo_scales_by(scale, width, height):
      return None
    min_height, min_width = -(-height // scale), -(-width // scale)
  try:
    image = simplejpeg.decode_jpeg(data, 'rgb', fastdct=False, fastupsample=False,
                                   min_height=min_height, min_width=min_width, strict=True)
  except ValueError:
    return None
  if image.shape != (-(-height // scale), -(-width // scale), 3):
    return None
  return image


def draft_scale(width: int, height: int, min_side: int | None) -> int:
  """The DCT scale divisor (1, 2, 4 or 8) `load_rgb` decodes a width x height JPEG at: PIL's
  ``draft`` rule for the smallest size whose shorter side is at least ``min_side``."""
  if min_side is None or min(width, height) <= 0:
    return 1
  scale = min_side / min(width, height)
  if scale >= 1:
    return 1
  fits = min(width // math.ceil(width * scale), height // math.ceil(height * scale))
  return next(s for s in (8, 4, 2, 1) if fits >= s)


def _turbo_scales_by(scale: int, width: int, height: int) -> bool:
  """Whether TurboJPEG, asked for at least ceil(side / scale) pixels a side, picks 1/scale: it
  takes the smallest of its factors n/8 that meets both minimums, and for tiny images a smaller one
  than 1/scale can."""
  min_width, min_height = -(-width // scale), -(-height // scale)
  return all(-(-width * n // 8) < min_width or -(-height * n // 8) < min_height
             for n in range(1, 8 // scale))


def load_rgb(img: Image.Image, min_side: int | None = None) -> Image.Image:
  """Loads an opened PIL image as 8-bit RGB, at reduced JPEG scale when ``min_side`` allows it.

  16-bit samples are scaled to 0..255 (``round(v * 255 / 65535)``), not clipped as PIL's
  ``convert('RGB')`` does (it stores every value above 255 as 255): greyscale in modes 'I;16*'
  and 'I' (16-bit PNG, TIFF, PGM), and 16-bit RGB, RGBA and grey+alpha PNGs, which PIL itself
  reduces to their high bytes (``v // 256``, up to 1 below the rounded value), re-decoded here for
  the exact value. Other 16-bit colour formats (e.g. TIFF) keep PIL's high bytes. Raises
  ValueError for pixels without a known range: 32-bit float ('F') images and 'I' images with
  values outside 0..65535.
  """
  if min_side is not None and img.format == 'JPEG':
    w, h = img.size
    scale = min_side / min(w, h)
    if scale < 1:
      # draft keeps both sides >= the requested ones, so the shorter one stays >= min_side.
      img.draft('RGB', (math.ceil(w * scale), math.ceil(h * scale)))
  png16 = _png16_samples(img)  # before load(): it re-reads the file
  if png16 is not None:
    return Image.fromarray(_scale16(png16))
  img.load()
  if img.mode == 'RGB':
    return img
  if img.mode == 'I' or img.mode.startswith('I;16'):
    grey = np.asarray(img)
    if img.mode == 'I' and grey.size and (grey.min() < 0 or grey.max() > 65535):
      raise ValueError(f'32-bit integer pixels from {grey.min()} to {grey.max()}, outside the '
                       '16-bit range 0..65535: no known scale to 8 bits')
    return Image.fromarray(_scale16(grey)).convert('RGB')
  if img.mode == 'F':
    raise ValueError('32-bit float pixels have no known range to scale to 8 bits; store the '
                     'image with 8 or 16 bits per sample')
  return img.convert('RGB')


def _scale16(samples: np.ndarray) -> np.ndarray:
  """0..65535 → uint8 0..255, rounded (no ties: v * 255 / 65535 = v / 257 is never k + 1/2)."""
  return ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


# The rawmodes PIL decodes 16-bit colour PNGs with (to the high bytes) → the rawmodes of the same
# pixel size that decode them to the low bytes. A grey+alpha pixel's four bytes are those of one
# 8-bit RGBA pixel.
_PNG16_LOW_BYTES = {'RGB;16B': 'RGB;16L', 'RGBA;16B': 'RGBA;16L', 'LA;16B': 'RGBA'}


def _png16_samples(img: Image.Image) -> np.ndarray | None:
  """The uint16 (H, W, 3) RGB samples of a not yet loaded 16-bit RGB, RGBA or grey+alpha PNG
  (alpha dropped, as ``convert('RGB')`` does), else None.

  PIL has no 16-bit colour modes, so the file is decoded again with rawmodes that keep the bytes
  per pixel (the PNG filters work on those) but pick the low bytes.
  """
  if img.format != 'PNG' or len(img.tile) != 1 or getattr(img, 'fp', None) is None:
    return None
  codec, _, _, rawmode = img.tile[0]
  if codec != 'zip' or rawmode not in _PNG16_LOW_BYTES:
    return None
  img.fp.seek(0)
  data = img.fp.read()

  def decode(as_rawmode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as again:
      again.tile = [again.tile[0][:3] + (as_rawmode,)]
      again.load()
      return np.asarray(again, np.uint16)

  if rawmode == 'LA;16B':
    b = decode('RGBA')  # grey high, grey low, alpha high, alpha low
    return np.repeat((b[..., 0] * 256 + b[..., 1])[..., None], 3, axis=-1)
  return (decode(rawmode) * 256 + decode(_PNG16_LOW_BYTES[rawmode]))[..., :3]
