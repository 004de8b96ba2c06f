"""Building blocks shared by the models: tower-split layers, response normalisation, pooling.

Towers. AlexNet splits every layer's neurons into two "towers" (the paper's two GPUs). A tower-split
activation is an array with a leading tower axis, ``(towers, batch, ..., features_per_tower)``, and
a tower-split parameter has the same leading axis, tagged with the logical axis name ``'tower'``.
Layers either read only their own tower's maps (``reads='own'``) or all towers' maps
(``reads='all'``); the latter obtain the other towers' maps through an ``exchange`` object. The
models never know where the towers live: ``LOCAL_TOWERS`` keeps them all in one array, and
``alexnet_jax.sharding`` supplies an exchange that gathers them across the devices of a mesh axis.
Each tower is computed by its own plain convolution / matmul rather than one grouped convolution:
XLA's CPU backend runs ``feature_group_count`` convolutions several times slower than the same
work as separate convolutions, and on a mesh each device then holds exactly one tower anyway.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TOWER = 'tower'  # logical axis name of the tower dimension of parameters and activations


class TowerExchange(Protocol):
  """How layers that read both towers obtain the maps of all towers."""

  def gather(self, x: jax.Array) -> jax.Array:
    """``(local_towers, *dims, c)`` → ``(*dims, towers * c)``: all towers' maps, tower-major."""
    ...

  def data_mean(self, x: jax.Array) -> jax.Array:
    """The mean of per-shard statistics over all shards of the batch (batch norm)."""
    ...

  def own_examples(self, x: jax.Array) -> jax.Array:
    """This tower's share of a batch that every tower holds (hybrid parallelism's conv layers)."""
    ...

  def all_examples(self, x: jax.Array) -> jax.Array:
    """The towers' batch shares joined again, batch-major (the switch to model parallelism)."""
    ...

  def own_maps(self, x_all: jax.Array, local_towers: int) -> jax.Array:
    """``(*dims, towers * c)`` → ``(local_towers, *dims, c)``: the inverse of ``gather``, the maps
    of the towers held here from a computation over all towers' maps (``lrn_across_towers``)."""
    ...


class LocalTowers:
  """All towers are in the array at hand: gathering them is a concatenation; the whole batch is
  here too, so batch statistics and batch shares are those of the array itself."""

  def gather(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate(list(x), axis=-1)

  def data_mean(self, x: jax.Array) -> jax.Array:
    return x

  def own_examples(self, x: jax.Array) -> jax.Array:
    return x

  def all_examples(self, x: jax.Array) -> jax.Array:
    return x

  def own_maps(self, x_all: jax.Array, local_towers: int) -> jax.Array:
    return jnp.stack(jnp.split(x_all, local_towers, axis=-1))


LOCAL_TOWERS = LocalTowers()

# Keyword arguments of a dense layer (ZFNet, VGG, GoogLeNet, ResNet): one tower, whose parameters
# carry no tower axis name, so every device holds them and their statistics are the same everywhere.
ONE_TOWER = dict(towers=1, tower_axis=None)


def scaled_width(width: int, scale: float, multiple: int = 1) -> int:
  """The paper's layer ``width`` times ``scale``, rounded to a positive multiple of ``multiple``
  (the tower count, for layers split over towers)."""
  return max(multiple, int(round(width * scale / multiple)) * multiple)


def local_response_norm(x: jax.Array, *, k: float = 2.0, n: int = 5, alpha: float = 1e-4,
                        beta: float = 0.75, alpha_divided_by_n: bool = False) -> jax.Array:
  """Krizhevsky et al.'s response normalisation across adjacent maps (last axis).

  b_c = a_c / (k + alpha * sum_{c' = c - n//2}^{c + n//2} a_{c'}^2) ** beta, maps beyond the edges
  contributing nothing. The paper's alpha multiplies the plain sum; cuda-convnet, Caffe and PyTorch
  divide alpha by n (``alpha_divided_by_n=True``). The window sum is a product with a banded 0/1
  matrix: a matmul that every backend runs fast, forward and backward, where ``reduce_window`` or
  shifted slices are memory-bound passes (and ``reduce_window`` is slow on XLA's CPU backend).
  """
  if alpha_divided_by_n:
    alpha = alpha / n
  c = x.shape[-1]
  channel = jnp.arange(c)
  lo, hi = n // 2, n - 1 - n // 2  # the window of map c is [c - lo, c + hi]
  # The denominator in float32 whatever the compute dtype (the mixed-precision policy in
  # program.py): a bfloat16 result is then the float32 normalisation rounded once, where in
  # bfloat16 every square, every partial sum and k + alpha * sum would be rounded (the last drops
  # alpha * sum entirely while it is below k * 2^-8); float16's squares would overflow above 256.
  wide = x.astype(jnp.float32)
  window = ((channel[None, :] - channel[:, None] <= lo) &
            (channel[:, None] - channel[None, :] <= hi)).astype(jnp.float32)
  denom = k + alpha * jnp.einsum('...c,cd->...d', jnp.square(wide), window)
  if beta == 0.75:  # the paper's value: two square roots beat a general power on every backend
    scale = jax.lax.rsqrt(denom * jnp.sqrt(denom))
  else:
    scale = jnp.power(denom, -beta)
  return (wide * scale).astype(x.dtype)


def _pool_windows(x: jax.Array, window: int, stride: int):
  """``(i, j, slice)`` for every offset of a pooling window: ``slice[..., p, q, :]`` is the element
  at offset ``(i, j)`` of output ``(p, q)``'s window."""
  *_, h, w, _ = x.shape
  out_h = (h - window) // stride + 1
  out_w = (w - window) // stride + 1
  for i in range(window):
    for j in range(window):
      yield i, j, x[..., i:i + stride * (out_h - 1) + 1:stride,
                    j:j + stride * (out_w - 1) + 1:stride, :]


def _pool_by_slices(x: jax.Array, window: int, stride: int) -> jax.Array:
  out = None
  for _, _, patch in _pool_windows(x, window, stride):
    out = patch if out is None else jnp.maximum(out, patch)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """Max-pooling over the two spatial axes of NHWC maps (any leading axes), no padding.

  The forward pass is the maximum of the ``window**2`` strided slices, which XLA fuses into one
  pass. The backward pass gives each output's gradient to the first element of its window
  (row-major) that holds the maximum, as ``reduce_window``'s gradient does, from the argmax
  offsets saved by the forward pass. XLA's own gradient (``select_and_scatter``) expands on the
  CPU into an index-tracking ``reduce_window``, per-element iotas and a scatter; this one is a few
  dense passes (in the two-tower AlexNet's step at batch 64 on a 2-core CPU, the pooling layers'
  thread time fell from about 650 ms to under 100 ms).
  """
  return _pool_by_slices(x, window, stride)


def _first_max_offset(x: jax.Array, window: int, stride: int) -> jax.Array:
  """For each output, ``i * window + j`` of the first (row-major) window offset holding its maximum.

  An ``argmax`` reduction: XLA does not duplicate reductions into their consumers, so the offsets
  are computed once, where an elementwise search would be recomputed inside every use of it."""
  patches = jnp.stack([patch for _, _, patch in _pool_windows(x, window, stride)])
  return jnp.argmax(patches, axis=0).astype(jnp.int8 if window * window <= 127 else jnp.int32)


def _max_pool_fwd(x, window, stride):
  y = _pool_by_slices(x, window, stride)
  # The backward pass needs only the argmax offsets and the input's spatial size, which
  # travels as the shape of an empty array.
  return y, (_first_max_offset(x, window, stride), jnp.zeros((*x.shape[-3:-1], 0), jnp.int8))


def _max_pool_bwd(window, stride, residuals, g):
  first, input_size = residuals
  h, w = input_size.shape[:2]
  *lead, out_h, out_w, c = g.shape
  zero = jnp.zeros((), g.dtype)
  # Input row r = stride·a + e receives from window offset i = e + stride·q of output row a − q:
  # each residue ("phase") (e, f) of the input rows and columns is a sum of shifted arrays at the
  # output's resolution. Broadcasting the phases to the input's resolution and selecting by the
  # position's residue keeps the assembly one dense elementwise pass (no scatter, no strided pad).
  rows, cols = -(-h // stride), -(-w // stride)
  phases = {}
  for e in range(stride):
    for f in range(stride):
      acc = jnp.zeros((*lead, rows, cols, c), g.dtype)
      for i in range(e, window, stride):
        for j in range(f, window, stride):
          q, r = i // stride, j // stride
          shift = [(0, 0)] * len(lead) + [(q, rows - out_h - q), (r, cols - out_w - r), (0, 0)]
          acc = acc + jnp.pad(jnp.where(first == i * window + j, g, zero), shift)
      phases[e, f] = acc
  shape = (*lead, rows, stride, cols, stride, c)
  row_phase = jax.lax.broadcasted_iota(jnp.int32, shape, len(lead) + 1)
  col_phase = jax.lax.broadcasted_iota(jnp.int32, shape, len(lead) + 3)
  dx = jnp.zeros(shape, g.dtype)
  for (e, f), phase in phases.items():
    spread = jnp.broadcast_to(jnp.expand_dims(phase, (-4, -2)), shape)
    dx = jnp.where((row_phase == e) & (col_phase == f), spread, dx)
  dx = dx.reshape(*lead, rows * stride, cols * stride, c)
  return (dx[..., :h, :w, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def deconv_relu(x: jax.Array) -> jax.Array:
  """ReLU whose backward pass is Zeiler & Fergus's deconvnet rule: rectify the signal coming down.

  The gradient of ReLU masks the incoming signal by where the forward input was positive; the
  deconvnet instead passes ``relu(g)``, whatever the forward activation was. With this ReLU, the
  vector-Jacobian product of a network w.r.t. its input *is* the deconvnet: the vjp of max-pooling
  is unpooling with the forward switches, the vjp of a convolution w.r.t. its input is filtering
  with the transposed (flipped) filters, and biases drop out.
  """
  return jax.nn.relu(x)


def _deconv_relu_fwd(x):
  return jax.nn.relu(x), None


def _deconv_relu_bwd(_, g):
  return (jax.nn.relu(g),)


deconv_relu.defvjp(_deconv_relu_fwd, _deconv_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def backward_unchanged(fn, x: jax.Array) -> jax.Array:
  """``fn(x)`` forward; the signal coming down passes to ``x`` unchanged (identity backward).

  The deconvnet's handling of normalisation layers: Zeiler & Fergus give no inverse for their
  contrast normalisation and project through it as if it were absent.
  """
  return fn(x)


def _unchanged_fwd(fn, x):
  return fn(x), None


def _unchanged_bwd(fn, _, g):
  del fn
  return (g,)


backward_unchanged.defvjp(_unchanged_fwd, _unchanged_bwd)


def relu_for(deconv: bool):
  """The ReLU of a model's forward pass: the plain one, or the deconvnet's (``deconv=True``)."""
  return deconv_relu if deconv else jax.nn.relu


def normalize_for(norm, deconv: bool):
  """``norm`` itself, or (``deconv=True``) ``norm`` with the deconvnet's identity backward pass."""
  if not deconv:
    return norm
  return functools.partial(backward_unchanged, norm)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout: equivalent to the paper's halving of the outputs at test time."""
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """NHWC x HWIO convolution. Strided convolutions run as patches x matmul on XLA's CPU backend,
  whose strided-convolution kernels (and their weight gradients) are 2-3x slower than that."""
  if stride > 1 and jax.default_backend() == 'cpu':
    return conv2d_as_matmul(x, kernel, stride, padding)
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                      padding=[(padding, padding)] * 2,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv2d_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The same convolution as one matmul over explicitly gathered patches (im2col)."""
  kh, kw, cin, cout = kernel.shape
  if padding:
    x = jnp.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  patches = jnp.concatenate([
      x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
      for i in range(kh)
      for j in range(kw)
  ], axis=-1)
  return jnp.einsum('nhwk,ko->nhwo', patches, kernel.reshape(kh * kw * cin, cout))


def _normal(rngs: nnx.Rngs, shape, std: float | None, fan_in: int) -> jax.Array:
  """N(0, std²); ``std=None``: He et al.'s sqrt(2 / fan_in)."""
  if std is None:
    std = (2.0 / fan_in)**0.5
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _tower_sharding(tower_axis: str | None, ndim: int) -> dict:
  """Flax's sharding metadata of a parameter whose leading axis is the towers': the logical axis
  name, which ``sharding`` maps onto the mesh. Never sharded on creation (``eager_sharding``):
  models know no mesh."""
  return dict(out_sharding=(tower_axis,) + (None,) * (ndim - 1), eager_sharding=False)


class TowerConv(nnx.Module):
  """A convolution whose output maps are split into towers, each tower with its own kernel.

  ``reads='own'``: tower t sees only tower t's input maps (conv2, conv4, conv5 of AlexNet).
  ``reads='all'``: every tower sees all input maps (conv3); the input is gathered through the
  exchange. ``reads='input'``: the input is one untowered array (the image), read by every tower.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, towers: int,
               reads: str, stride: int = 1, padding: int = 0, weight_std: float | None = 0.01,
               bias_init: float = 0.0, use_bias: bool = True, tower_axis: str | None = TOWER,
               rngs: nnx.Rngs):
    if reads not in ('own', 'all', 'input'):
      raise ValueError(f'reads must be own, all or input, got {reads!r}')
    in_per_tower = in_features // towers if reads == 'own' else in_features
    shape = (towers, kernel_size, kernel_size, in_per_tower, out_features // towers)
    # tower_axis=None: a one-tower layer whose parameters every device of the model axis holds.
    self.kernel = nnx.Param(_normal(rngs, shape, weight_std, fan_in=int(np.prod(shape[1:-1]))),
                            **_tower_sharding(tower_axis, 5))
    self.bias = nnx.Param(jnp.full(
        (towers, out_features //
         towers), bias_init, jnp.float32), **_tower_sharding(tower_axis, 2)) if use_bias else None
    self.reads, self.stride, self.padding = reads, stride, padding

  def __call__(self, x: jax.Array, exchange: TowerExchange = LOCAL_TOWERS) -> jax.Array:
    kernel = self.kernel[...]
    local_towers = kernel.shape[0]
    if self.reads == 'all':
      x = exchange.gather(x)
    # Layers reading the input or all towers give every local tower the same maps. Still one
    # convolution per tower, not one with the towers' kernels side by side: splitting that output
    # into towers is a transpose, which XLA's CPU backend fuses into the backward pass as a
    # cache-hostile transposed write (conv1 of the two-tower AlexNet: ~0.1 s a step).
    tower_input = (lambda t: x[t]) if self.reads == 'own' else (lambda t: x)
    y = jnp.stack([
        conv2d(tower_input(t), kernel[t].astype(x.dtype), self.stride, self.padding)
        for t in range(local_towers)
    ])
    return y if self.bias is None else y + self.bias[...][:, None, None, None, :].astype(x.dtype)


class TowerDense(nnx.Module):
  """A fully connected layer whose outputs are split into towers; every tower reads all inputs.

  The input is tower-split ``(local_towers, batch, features_per_tower)`` and gathered through the
  exchange, or ``reads='input'`` for an untowered ``(batch, features)`` input. The kernel is
  ``(towers, out_per_tower, in)``, as ``torch.nn.Linear`` stores it: XLA's CPU matmuls read the
  right-hand operand in that layout, and with ``(in, out)`` kernels every step paid a transposed
  copy of each fc kernel and a transposed read of its gradient in the update, about 2.5x the
  layers' own time (fc6: 264 → 95 ms for forward, backward and update at batch 64).
  """

  def __init__(self, in_features: int, out_features: int, *, towers: int, reads: str = 'all',
               weight_std: float | None = 0.01, bias_init: float = 0.0,
               tower_axis: str | None = TOWER, rngs: nnx.Rngs):
    if reads not in ('all', 'input'):
      raise ValueError(f'reads must be all or input, got {reads!r}')
    self.kernel = nnx.Param(
        _normal(rngs, (towers, out_features // towers, in_features), weight_std,
                fan_in=in_features), **_tower_sharding(tower_axis, 3))
    self.bias = nnx.Param(jnp.full((towers, out_features // towers), bias_init, jnp.float32),
                          **_tower_sharding(tower_axis, 2))
    self.reads = reads

  def __call__(self, x: jax.Array, exchange: TowerExchange = LOCAL_TOWERS) -> jax.Array:
    kernel, bias = self.kernel[...], self.bias[...]
    if self.reads == 'all':
      x = exchange.gather(x)
    return jnp.einsum('nf,tof->tno', x, kernel.astype(x.dtype)) + bias[:, None, :].astype(x.dtype)


def ceil_pool_size(size: int, window: int, stride: int, padding: int = 0) -> int:
  """Caffe's rounded-up pooling output size ``ceil((size + 2·padding − window) / stride) + 1``
  (GoogLeNet, ZFNet's 110 → 55 and 26 → 13)."""
  return -(-(size + 2 * padding - window) // stride) + 1


def pad_for_ceil(size: int, window: int, stride: int, padding: int = 0) -> tuple[int, int]:
  """(low, high) padding that makes a pooling window/stride give ``ceil_pool_size``."""
  out = ceil_pool_size(size, window, stride, padding)
  return padding, max(0, (out - 1) * stride + window - size - padding)


def max_pool_padded(x: jax.Array, window: int, stride: int, pad: tuple[int, int]) -> jax.Array:
  """``max_pool`` of the maps padded with −∞ by ``pad`` = (low, high) on both spatial axes."""
  if pad == (0, 0):
    return max_pool(x, window, stride)
  widths = [(0, 0)] * (x.ndim - 3) + [pad, pad, (0, 0)]
  return max_pool(jnp.pad(x, widths, constant_values=-jnp.inf), window, stride)


def max_pool_ceil(x: jax.Array, window: int, stride: int) -> jax.Array:
  """``max_pool`` rounding its output size up (``ceil_pool_size``), as Caffe pools."""
  return max_pool_padded(x, window, stride, pad_for_ceil(x.shape[-2], window, stride))


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Average pooling over the two spatial axes of NHWC maps (any leading axes), no padding."""
  dims = (1,) * (x.ndim - 3) + (window, window, 1)
  strides = (1,) * (x.ndim - 3) + (stride, stride, 1)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, 'VALID') / (window * window)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """``torch.nn.AdaptiveAvgPool2d(size)`` of NHWC maps (any leading axes): output ``i`` averages
  input rows ``floor(i·h / size)`` to ``ceil((i + 1)·h / size)`` (exclusive), likewise columns;
  windows overlap where ``h`` is not a multiple of ``size`` and repeat rows where ``h < size``.
  Identity (and no work) where the maps already have that size."""
  *_, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x

  def weights(n: int) -> np.ndarray:
    # Row i of the matrix averages its window: the pooling is two small matmuls, whose gradient
    # is the same matmuls transposed.
    m = np.zeros((size, n), np.float32)
    for i in range(size):
      lo, hi = (i * n) // size, -(-((i + 1) * n) // size)
      m[i, lo:hi] = 1.0 / (hi - lo)
    return m

  rows, cols = (jnp.asarray(weights(n), x.dtype) for n in (h, w))
  return jnp.einsum('...hwc,ih,jw->...ijc', x, rows, cols)


class BatchNorm(nnx.Module):
  """Batch normalisation over all axes but the last, the batch statistics taken over the *global*
  batch: each device's mean and mean square are averaged over the data shards through
  ``exchange.data_mean`` (equal shards, so this is the global mean). The running averages are
  ``nnx.BatchStat`` variables (kept apart from the parameters, checkpointed, used at evaluation).
  ``momentum`` is the weight of the old running average (PyTorch's momentum 0.1 = 0.9 here)."""

  def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               scale_init: float = 1.0):
    self.scale = nnx.Param(jnp.full((features,), scale_init, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.momentum, self.epsilon = momentum, epsilon

  def __call__(self, x: jax.Array, *, train: bool, exchange: TowerExchange = LOCAL_TOWERS):
    if train:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = exchange.data_mean(jnp.mean(xf, axes))
      var = jnp.maximum(exchange.data_mean(jnp.mean(jnp.square(xf), axes)) - jnp.square(mean), 0.0)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var)
    else:
      mean, var = self.mean[...], self.var[...]
    mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    return (x * mul.astype(x.dtype) + (self.bias[...] - mean * mul).astype(x.dtype))
