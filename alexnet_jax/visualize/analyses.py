"""The numbers behind Zeiler & Fergus's figures, computed for any network (``network.Network``).

Every function returns plain numpy arrays (saved as ``.npz`` by the command line, drawn by
``render``). Images are uint8-valued ``(N, S, S, 3)`` arrays at the network's input size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from alexnet_jax.errors import ConfigError
from alexnet_jax.visualize import deconvnet
from alexnet_jax.visualize.network import Network, replicated


def spatial_layers(net: Network) -> list[str]:
  """The layers with feature maps (not the dense ones), in forward order."""
  size = net.image_size
  _, acts = jax.eval_shape(lambda p, x: deconvnet.features(net.apply, p, x), net.params,
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return [name for name, a in acts.items() if deconvnet.is_spatial(a)]


def all_layers(net: Network) -> dict[str, tuple[int, ...]]:
  """Every captured layer's untowered activation shape per image, in forward order."""
  size = net.image_size
  _, acts = jax.eval_shape(lambda p, x: deconvnet.features(net.apply, p, x), net.params,
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {name: tuple(a.shape[1:]) for name, a in acts.items()}


def check_layers(net: Network, layers: list[str]) -> list[str]:
  known = all_layers(net)
  for layer in layers:
    if layer not in known:
      raise ConfigError(f'unknown layer {layer!r}; this network has {", ".join(known)}')
  return layers


# --- First-layer filters --------------------------------------------------------------------------


def first_layer_filters(net: Network) -> np.ndarray:
  """``(maps, kh, kw, 3)``: the filters that read the image, towers concatenated, their colour
  channels R, G, B whatever order the network reads them in (``config.input.channel_order``)."""
  first = next(iter(all_layers(net)))
  candidates = []
  for path, x in jax.tree.flatten_with_path(net.params)[0]:
    name = jax.tree_util.keystr(path)
    if x.ndim >= 4 and x.shape[-2] == 3 and 'kernel' in name:
      candidates.append((first not in name, name, x))
  if not candidates:
    raise ValueError('found no convolution kernel reading 3 colour channels in the parameters')
  kernel = np.asarray(min(candidates, key=lambda c: c[:2])[2])
  if kernel.ndim == 5:  # (towers, kh, kw, 3, per_tower) → (kh, kw, 3, maps), tower-major
    kernel = np.concatenate(list(kernel), axis=-1)
  if net.config.input.channel_order == 'bgr':
    kernel = kernel[..., ::-1, :]
  return np.moveaxis(kernel, -1, 0)


# --- Deconvnet projections of the strongest maps of given images ----------------------------------


@dataclasses.dataclass
class Projections:
  layer: str
  images: np.ndarray  # (n,) index into the analysed images
  maps: np.ndarray  # (n,)
  positions: np.ndarray  # (n, 2)
  values: np.ndarray  # (n,)
  projections: np.ndarray  # (n, S, S, 3), in normalised-input units
  boxes: np.ndarray  # (n, 4) receptive field top, left, bottom, right (inclusive)


def _boxes(net: Network, layer: str, positions: np.ndarray) -> np.ndarray:
  fields = net.receptive_fields
  if layer not in fields:  # dense layers see the whole image
    s = net.image_size - 1
    return np.tile(np.array([0, 0, s, s]), (len(positions), 1))
  return np.array([fields[layer].box(int(r), int(c)) for r, c in positions]).reshape(-1, 4)


def project_examples(net: Network, images: np.ndarray, layer: str, image_index: np.ndarray,
                     maps: np.ndarray, positions: np.ndarray | None = None,
                     desc: str | None = None) -> Projections:
  image_index, maps = np.asarray(image_index), np.asarray(maps)
  proj, pos, values = net.project(images[image_index], layer, maps, positions, desc=desc)
  return Projections(layer=layer, images=image_index, maps=maps, positions=pos, values=values,
                     projections=proj, boxes=_boxes(net, layer, pos))


def strongest_maps(net: Network, images: np.ndarray, layers: list[str], k: int) -> dict:
  """Per layer, each image's ``k`` maps with the largest activation, projected: ``Projections``
  with ``n = images × k`` entries, image-major, strongest first."""
  _, acts = net.features(images)
  out = {}
  for layer in layers:
    act = acts[layer]
    peak = act.reshape(len(act), -1, act.shape[-1]).max(axis=1)  # (N, maps)
    top = np.argsort(-peak, axis=1, kind='stable')[:, :k]  # (N, k)
    index = np.repeat(np.arange(len(images)), top.shape[1])
    out[layer] = project_examples(net, images, layer, index, top.reshape(-1),
                                  desc=f'deconv {layer}')
  return out


# --- Top-9 over a data set ------------------------------------------------------------------------


def peak_activations(net: Network, images: np.ndarray, layers: list[str]):
  """Per layer, ``(values (N, maps), positions (N, maps, 2))`` of each map's strongest activation
  in each image, computed in batches (the full activations never leave the devices)."""
  apply, normalize = net.apply, net.normalize

  def make():
    return lambda params, x: _peaks(apply, params, normalize(x), layers)

  peaks = net.function(('peaks', tuple(layers)), make)
  return net.map_batches(peaks, images, desc='activations over the images')


def _peaks(apply, params, x, layers):
  _, acts = deconvnet.features(apply, params, x)
  out = {}
  for layer in layers:
    a = acts[layer]
    if not deconvnet.is_spatial(a):
      out[layer] = (a, jnp.zeros((*a.shape, 2), jnp.int32))
      continue
    flat = a.reshape(a.shape[0], -1, a.shape[-1])
    arg = jnp.argmax(flat, axis=1)
    out[layer] = (jnp.max(flat, axis=1), jnp.stack([arg // a.shape[2], arg % a.shape[2]], -1))
  return out


def choose_maps(net: Network, layers: list[str], count: int, seed: int,
                maps: list[int] | None = None) -> dict[str, np.ndarray]:
  """The given maps, or ``count`` random maps per layer (sorted)."""
  shapes = all_layers(net)
  chosen = {}
  for layer in layers:
    width = shapes[layer][-1]
    if maps:
      bad = [m for m in maps if not 0 <= m < width]
      if bad:
        raise ConfigError(f'layer {layer} has maps 0..{width - 1}; got {bad}')
      chosen[layer] = np.array(maps)
    else:
      rng = np.random.default_rng(seed + sum(map(ord, layer)))
      chosen[layer] = np.sort(rng.choice(width, min(count, width), replace=False))
  return chosen


def top_activations(net: Network, images: np.ndarray, maps: dict[str, np.ndarray],
                    k: int = 9) -> dict[str, Projections]:
  """For each layer's chosen maps, the ``k`` strongest activations over ``images`` (at most one per
  image, as the paper's figure), projected by the deconvnet. ``n = maps × k``, map-major."""
  peaks = peak_activations(net, images, list(maps))
  out = {}
  for layer, chosen in maps.items():
    values, positions = peaks[layer]
    top = np.argsort(-values[:, chosen], axis=0, kind='stable')[:k].T  # (maps, k)
    kk = top.shape[1]
    index = top.reshape(-1)
    map_ids = np.repeat(chosen, kk)
    pos = positions[index, map_ids]
    out[layer] = project_examples(net, images, layer, index, map_ids, pos,
                                  desc=f'top-{k} projections {layer}')
  return out


def crop(image: np.ndarray, box) -> np.ndarray:
  top, left, bottom, right = (int(b) for b in box)
  return image[top:bottom + 1, left:right + 1]


# --- Invariance -----------------------------------------------------------------------------------

TRANSFORMS = {
    # name: (parameter values as fractions of the paper's ranges, unit); the paper: vertical shifts
    # of -60..60 pixels at 224, scale 1..1.8, rotation 0..350 degrees.
    'translation': (np.linspace(-60 / 224, 60 / 224, 13), 'vertical shift (fraction of the size)'),
    'scale': (np.linspace(1.0, 1.8, 9), 'scale'),
    'rotation': (np.arange(0, 360, 30, dtype=np.float64), 'rotation (degrees)'),
}


def transform(image: np.ndarray, kind: str, value: float, fill) -> np.ndarray:
  """``image`` shifted vertically by ``value`` × its height, scaled by ``value`` about its centre,
  or rotated by ``value`` degrees; the uncovered area is ``fill`` (the mean colour)."""
  h, w = image.shape[:2]
  fill = tuple(int(round(f)) for f in fill)
  pil = Image.fromarray(image)
  if kind == 'translation':
    dy = int(round(value * h))
    out = Image.new('RGB', (w, h), fill)
    out.paste(pil, (0, dy))
  elif kind == 'scale':
    cx, cy = w / 2, h / 2  # output pixel (x, y) reads input (cx + (x - cx) / s, cy + (y - cy) / s)
    a = 1.0 / value
    out = pil.transform((w, h), Image.AFFINE, (a, 0, cx - a * cx, 0, a, cy - a * cy),
                        resample=Image.BILINEAR, fillcolor=fill)
  elif kind == 'rotation':
    out = pil.rotate(value, resample=Image.BILINEAR, fillcolor=fill)
  else:
    raise ConfigError(f'unknown transform {kind!r}; choose from {", ".join(TRANSFORMS)}')
  return np.asarray(out)


def true_classes(net: Network, images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
  """The labels, or where images carry none, the class the network predicts for each."""
  if labels is not None:
    return np.asarray(labels)
  logits, _ = net.features(images)
  return np.argmax(logits, axis=-1)


def invariance(net: Network, images: np.ndarray, labels: np.ndarray | None, layers: list[str],
               transforms: dict | None = None) -> dict:
  """Per transform: its values ``(T,)``, the Euclidean distance of each layer's features to those
  of the untransformed image ``{layer: (N, T)}``, and the true class's probability ``(N, T)``."""
  transforms = transforms or {k: v for k, (v, _) in TRANSFORMS.items()}
  classes = true_classes(net, images, labels)
  # All layers' features through the one compiled ``features`` function the other analyses use.
  _, reference = net.features(images)
  out = {}
  for kind, values in transforms.items():
    moved = np.stack([
        transform(im, kind, v, net.config.input.mean_rgb) for im in images for v in values
    ])  # (N * T, S, S, 3)
    logits, feats = net.features(moved, desc=f'invariance: {kind}')
    n, t = len(images), len(values)
    out[kind] = dict(
        values=np.asarray(values), distance={
            l: np.linalg.norm(feats[l].reshape(n, t, -1) - reference[l].reshape(n, 1, -1), axis=-1)
            for l in layers
        }, probability=softmax(logits).reshape(n, t, -1)[np.arange(n), :, classes])
  return out


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


# --- Predictions (AlexNet's Fig. 4, left) ---------------------------------------------------------


def top_predictions(net: Network, images: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
  """Each image's ``k`` most probable classes, most probable first (of equal probabilities the
  lower class), and their softmax probabilities: ``classes (N, k)``, ``probabilities (N, k)``,
  computed on the devices. ``k`` is at most the number of classes."""
  k = min(int(k), int(net.config.model.num_classes))
  apply, normalize = net.apply, net.normalize

  def make():

    def top(params, x):
      logits, _ = apply(params, normalize(x), False)
      probabilities, classes = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32)), k)
      return dict(classes=classes, probabilities=probabilities)

    return top

  fn = net.function(('top_predictions', k), make)
  return net.map_batches(fn, np.asarray(images, np.float32), desc='predictions')


# --- Nearest neighbours (AlexNet's Fig. 4, right) -------------------------------------------------


def feature_layer(net: Network) -> str:
  """The last hidden layer, the one before the classifier (the model's ``layer_names[-2]``): fc7
  for AlexNet, ZFNet and VGG, the last block for ResNet, the last inception module for GoogLeNet."""
  names = list(all_layers(net))
  return names[-2] if len(names) > 1 else names[-1]


def pooled(act: jax.Array) -> jax.Array:
  """A layer's activations as one vector per image: feature maps averaged over their positions."""
  act = act.astype(jnp.float32)
  return jnp.mean(act, axis=(1, 2)) if deconvnet.is_spatial(act) else act.reshape(len(act), -1)


def layer_vectors(net: Network, images: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
  """Per layer the images' vectors (``pooled``), ``(N, D)``."""
  apply, normalize = net.apply, net.normalize

  def make():
    return lambda params, x: {
        layer: pooled(a)
        for layer, a in deconvnet.features(apply, params, normalize(x))[1].items()
        if layer in layers
    }

  fn = net.function(('vectors', tuple(layers)), make)
  return net.map_batches(fn, np.asarray(images, np.float32))


def merge_nearest(best, queries: jax.Array, vectors: jax.Array, index: jax.Array):
  """The running ``k`` nearest vectors of each query, merged with one more chunk of them.

  ``best``: ``(squared distances (Q, k), indices (Q, k))``, nearest first (+inf and -1 where
  nothing is known yet); ``queries (Q, D)``; ``vectors (C, D)`` with their indices ``index (C,)``
  (-1: padding, never chosen). Exact: ``jax.lax.top_k`` over the running best followed by the
  chunk keeps, of equal distances, the earlier; chunks given in increasing index therefore keep
  the lowest indices, as a stable sort of all distances would."""
  best_d, best_i = best
  d = jnp.sum(jnp.square(queries[:, None, :] - vectors[None, :, :]), axis=-1)  # fused: no Q×C×D
  d = jnp.where(index[None, :] >= 0, d, jnp.inf)
  all_d = jnp.concatenate([best_d, d], axis=1)
  all_i = jnp.concatenate([best_i, jnp.broadcast_to(index[None, :], d.shape)], axis=1)
  neg, position = jax.lax.top_k(-all_d, best_d.shape[1])
  return -neg, jnp.take_along_axis(all_i, position, axis=1)


def nearest_neighbours(net: Network, queries: np.ndarray, chunks, layers: list[str], k: int = 6, *,
                       total: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """For each query image the ``k`` images of a stream whose ``layers`` vectors (``pooled``) are
  nearest in Euclidean distance, found exactly: per layer ``(indices (Q, k), distances (Q, k))``,
  nearest first (of equal distances the lower index).

  ``chunks``: ``(pixels (C, S, S, 3), index (C,))`` with ``C`` a multiple of the local devices and
  index -1 for padding, in increasing index (as ``images.chunks`` yields them; ``total`` of them,
  for the progress bar). Each chunk's vectors, their distances to the queries and the merge into
  the running nearest (``merge_nearest``) are computed on the devices: the stream's vectors are
  never all held, on the devices or the host."""
  layers = list(layers)
  query_vectors = layer_vectors(net, queries, layers)
  apply, normalize = net.apply, net.normalize

  def make():

    def step(params, q, best, pixels, index):
      _, acts = deconvnet.features(apply, params, normalize(pixels))
      merged = {}
      for layer in layers:
        merged[layer] = merge_nearest(best[layer], q[layer], pooled(acts[layer]), index)
      return jax.lax.with_sharding_constraint(merged, replicated())

    return step

  fn = net.function(('nearest', tuple(layers)), make)
  n = len(queries)
  nothing = (np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int32))
  start = {layer: nothing for layer in layers}
  best = net.fold_batches(fn, start, chunks, shared=(query_vectors,), desc='nearest neighbours',
                          total=total)
  return {
      layer: (np.asarray(i), np.sqrt(np.maximum(np.asarray(d, np.float64), 0)).astype(np.float32))
      for layer, (d, i) in best.items()
  }


# --- Occlusion ------------------------------------------------------------------------------------


def occluder_positions(image_size: int, size: int, stride: int) -> np.ndarray:
  """Top-left corners ``(P, 2)`` of a ``size`` square slid with ``stride`` inside the image."""
  if not 0 < size <= image_size or stride <= 0:
    raise ConfigError(f'occluder size must be in 1..{image_size} and stride positive; got size '
                      f'{size}, stride {stride}')
  starts = np.arange(0, image_size - size + 1, stride)
  return np.stack(np.meshgrid(starts, starts, indexing='ij'), -1).reshape(-1, 2)


def occlude(images, corners, size: int, fill):
  """``images[i]`` with a ``size`` square of ``fill`` at ``corners[i]`` (jax or numpy; ``size`` may
  be a traced scalar)."""
  s = images.shape[1]
  rows = jnp.arange(s)[None, :, None]
  cols = jnp.arange(s)[None, None, :]
  r0, c0 = corners[:, 0, None, None], corners[:, 1, None, None]
  inside = (rows >= r0) & (rows < r0 + size) & (cols >= c0) & (cols < c0 + size)
  return jnp.where(inside[..., None], jnp.asarray(fill, jnp.float32), images)


def occlusion(net: Network, image: np.ndarray, label: int | None, layer: str, size: int,
              stride: int) -> dict:
  """Zeiler & Fergus's occlusion sensitivity for one image: a grey (mean-colour) square slid over
  it; per position the total activation of ``layer``'s strongest map in the unoccluded image, the
  true class's probability and the most probable class, as ``(rows, cols)`` maps."""
  corners = occluder_positions(net.image_size, size, stride)
  logits, acts = net.features(image[None])
  act = acts[layer][0]
  strongest = int(np.argmax(act.reshape(-1, act.shape[-1]).max(axis=0)))
  true = int(np.argmax(logits[0])) if label is None else int(label)
  apply, normalize, fill = net.apply, net.normalize, net.config.input.mean_rgb

  def make():  # the size is an argument: one compile per layer serves every occluder

    def measure(params, base, size_, map_, true_, corner):
      occluded = occlude(jnp.broadcast_to(base, (len(corner), *base.shape)), corner, size_, fill)
      logits, acts = deconvnet.features(apply, params, normalize(occluded))
      probs = jax.nn.softmax(logits.astype(jnp.float32))
      a = jnp.take(acts[layer], map_, axis=-1)
      return dict(feature=a.reshape(len(corner), -1).sum(-1), probability=probs[:, true_],
                  predicted=jnp.argmax(probs, -1), predicted_probability=jnp.max(probs, -1))

    return measure

  measure = net.function(('occlusion', layer), make)
  shared = (np.asarray(image, np.float32), np.int32(size), np.int32(strongest), np.int32(true))
  out = net.map_batches(measure, corners, batch_size=128, desc='occlusion', shared=shared)
  side = int(round(np.sqrt(len(corners))))
  grid = {k: v.reshape(side, side) for k, v in out.items()}
  proj = project_examples(net, image[None], layer, np.array([0]), np.array([strongest]))
  return dict(corners=corners, size=size, stride=stride, map=strongest, true_class=true,
              unoccluded_feature=float(act[..., strongest].sum()),
              unoccluded_probability=float(softmax(logits[0])[true]),
              projection=proj.projections[0], **grid)


# --- Correspondence -------------------------------------------------------------------------------


def sign_consistency(eps: np.ndarray) -> float:
  """Δ = Σ_{i≠j} H(sign ε_i, sign ε_j), H the Hamming distance as a fraction of the features.

  ``eps``: ``(images, features)``. Lower means the occlusion changed the images' features in the
  same way: the network has an implicit correspondence between their occluded parts.
  """
  s = np.sign(eps)
  n = len(s)
  return float(sum(np.mean(s[i] != s[j]) for i in range(n) for j in range(n) if i != j))


def correspondence(net: Network, images: np.ndarray, parts: dict[str, np.ndarray],
                   layers: list[str], random_draws: int = 10, seed: int = 0) -> dict:
  """Δ per layer for each part (``boxes (N, 4)``: top, left, height, width in each image) and for
  random boxes of the same size placed at the same random place in every image."""
  fill = np.asarray(net.config.input.mean_rgb, np.float32)
  _, base = net.features(images)
  n, s = len(images), net.image_size

  def occluded_features(boxes):
    occluded = np.asarray(images, np.float32).copy()
    for i, (t, l, h, w) in enumerate(boxes):
      occluded[i, t:t + h, l:l + w] = fill
    _, acts = net.features(occluded)
    return acts

  def deltas(boxes):
    acts = occluded_features(boxes)
    return {l: sign_consistency((base[l] - acts[l]).reshape(n, -1)) for l in layers}

  rng = np.random.default_rng(seed)
  out = {}
  for name, boxes in parts.items():
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(boxes) == 1:
      boxes = np.repeat(boxes, n, axis=0)
    if len(boxes) != n:
      raise ConfigError(
          f'part {name!r} has {len(boxes)} boxes for {n} images: give one box for all '
          'images or one per image')
    for t, l, h, w in boxes:
      if not (0 <= t and 0 <= l and h > 0 and w > 0 and t + h <= s and l + w <= s):
        raise ConfigError(
            f'part {name!r}: box top={t} left={l} height={h} width={w} does not fit a '
            f'{s}x{s} image')
    part = deltas(boxes)
    random = []
    for _ in range(random_draws):
      h, w = boxes[0, 2], boxes[0, 3]
      t, l = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
      random.append(deltas(np.tile([t, l, h, w], (n, 1))))
    out[name] = {
        l: dict(part=part[l], random_mean=float(np.mean([r[l] for r in random])),
                random_std=float(np.std([r[l] for r in random]))) for l in layers
    }
  return out
