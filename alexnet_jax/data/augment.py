"""The paper's image operations on the host, on uint8 arrays (pure numpy / PIL, no JAX).

The host only moves pixels (rescale, crop, flip); arithmetic that needs floats (subtracting the
mean image, the PCA colour shift) happens on the device in `steps.normalize`. For that the host
sends, beside each uint8 crop, where it came from and its random colour coefficients:

- ``crop``: int32 ``(3,)`` = (top, left, flipped) of the window in the stored S x S image, so the
  device subtracts the matching (and matchingly reflected) window of the S x S mean image;
- ``alpha``: float32 ``(3,)``, the PCA coefficients α ~ N(0, σ) of this presentation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from alexnet_jax.errors import ConfigError

TEN_VIEWS = 10


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def rescale_center_square(image: np.ndarray, size: int) -> np.ndarray:
  """The paper's preprocessing: shorter side to ``size``, then the central size x size square.

  Scales only the central square (PIL's ``box``), in one resampling step.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  return np.asarray(square_of(Image.fromarray(image), size))


def square_of(img: Image.Image, size: int) -> Image.Image:
  """PIL version of `rescale_center_square` (antialiased bilinear resampling of the central box)."""
  w, h = img.size
  side = min(w, h)
  left, top = (w - side) / 2, (h - side) / 2
  return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def fit_for_crop(image: np.ndarray, crop_size: int, resize_to: int | None) -> np.ndarray:
  """Optional paper-style rescale + centre square, then grow images smaller than a crop."""
  if resize_to is not None:
    image = rescale_center_square(image, resize_to)
  h, w = image.shape[:2]
  if h < crop_size or w < crop_size:
    scale = crop_size / min(h, w)
    image = resize(image, max(crop_size, round(h * scale)), max(crop_size, round(w * scale)))
  return image


def crop_flip(image: np.ndarray, top: int, left: int, size: int, flip: bool,
              out: np.ndarray | None = None) -> np.ndarray:
  """One window, reflected left-right if ``flip``: a contiguous copy (into ``out``, a
  C-contiguous array of the window's shape, where given: a row of a batch, say)."""
  window = image[top:top + size, left:left + size]
  if out is None:
    out = np.empty(window.shape, image.dtype)
  if not flip:
    out[...] = window
  elif window.ndim == 3:
    # numpy copies a reflected (h, w, 3) window one 3-byte pixel per inner loop, 5-6x slower
    # than channel by channel, where each inner loop runs along a whole row.
    mirrored = window[:, ::-1]
    for c in range(window.shape[2]):
      out[..., c] = mirrored[..., c]
  else:
    out[...] = window[:, ::-1]
  return out


def random_window(rng: np.random.Generator, height: int, width: int, size: int, *,
                  random_crop: bool = True, flip: bool = True) -> tuple[int, int, bool]:
  """(top, left, flipped) of a training window; centred when ``random_crop`` is off."""
  if random_crop:
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
  else:
    top, left = (height - size) // 2, (width - size) // 2
  flipped = bool(rng.random() < 0.5) if flip else False
  return top, left, flipped


def view_windows(height: int, width: int, size: int, views: str) -> list[tuple[int, int, bool]]:
  """Test-time windows: 'center', or 'ten' = 4 corners + centre, then the same reflected."""
  ct, cl = (height - size) // 2, (width - size) // 2
  if views == 'center':
    return [(ct, cl, False)]
  if views == 'ten':
    b, r = height - size, width - size
    five = [(0, 0), (0, r), (b, 0), (b, r), (ct, cl)]
    return [(t, l, f) for f in (False, True) for t, l in five]
  raise ConfigError(f"unknown eval views {views!r}; choose 'center' or 'ten'")


def pca_shift(alpha: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray) -> np.ndarray:
  """The RGB offset [p1 p2 p3]·[α1 s1, α2 s2, α3 s3]ᵀ with s_i = sqrt(λ_i) (numpy reference of
  the device code in steps.normalize).

  λ_i are variances of pixel values (0-255 units); their square roots are the standard deviations
  along the principal axes, which is what cuda-convnet2 and fb.resnet.torch / ChainerCV use
  (fb's 'eigval' 0.2175 on [0, 1] pixels is 55.5 on 0-255, a standard deviation), so with
  σ = 0.1 an image moves by about 10 % of the data set's colour spread along each axis.
  ``eigvecs`` holds the eigenvectors as columns.
  """
  return np.asarray(eigvecs) @ (np.asarray(alpha) * np.sqrt(np.maximum(eigvals, 0.0)))
