"""The file formats of released weights (``alexnet_jax.weights``): Caffe's ``.caffemodel`` and
``.binaryproto``, PyTorch's ``.safetensors`` and ``.pth``, written and read back exactly, files
encoded by hand in Caffe's wire format (so a wrong field number or enum value of the schema
fails, which a round trip through our own writer would not show), and damaged or mistaken files.
"""

import builtins
import json
import struct
import sys

import numpy as np
import pytest

from alexnet_jax.errors import UserError
from alexnet_jax.weights import WeightFileError
from alexnet_jax.weights import caffe_format as cf
from alexnet_jax.weights import tensor_files as tf

RNG = np.random.default_rng(0)

# Protobuf's wire format, by hand.


def varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def key(field: int, wire_type: int) -> bytes:
  return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
  return key(field, 2) + varint(len(payload)) + payload


def string(field: int, text: str) -> bytes:
  return length_delimited(field, text.encode())


def integer(field: int, n: int) -> bytes:
  return key(field, 0) + varint(n)


def packed_floats(field: int, values) -> bytes:
  return length_delimited(field, np.asarray(values, '<f4').tobytes())


def legacy_blob(array: np.ndarray) -> bytes:
  """A BlobProto with num (1), channels (2), height (3), width (4) and packed data (5)."""
  n, c, h, w = array.shape
  return (integer(1, n) + integer(2, c) + integer(3, h) + integer(4, w) +
          packed_floats(5, array.ravel()))


def v1_layer(name: str, type_number: int, *blobs: bytes, extra: bytes = b'') -> bytes:
  """A V1LayerParameter: bottom (2), top (3), name (4), type (5), blobs (6)."""
  body = string(2, 'in') + string(3, name) + string(4, name) + integer(5, type_number)
  return body + b''.join(length_delimited(6, b) for b in blobs) + extra


def sample(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def write(path, data: bytes):
  path.write_bytes(data)
  return path


def assert_names_file(excinfo, path):
  assert str(path) in str(excinfo.value)
  assert isinstance(excinfo.value, UserError)


# .caffemodel


def alexnet_like_layers():
  return [
      ('data', 'Input', []),
      ('conv1', 'Convolution', [sample(4, 3, 3, 3), sample(4)]),
      ('relu1', 'ReLU', []),
      ('norm1', 'LRN', []),
      ('pool1', 'Pooling', []),
      ('fc6', 'InnerProduct', [sample(5, 36), sample(5)]),
      ('drop6', 'Dropout', []),
      ('prob', 'Softmax', []),
  ]


def test_modern_caffemodel_round_trip(tmp_path):
  layers = alexnet_like_layers()
  path = tmp_path / 'net.caffemodel'
  cf.write_caffemodel(path, 'AlexNet', layers)
  net = cf.read_caffemodel(path)
  assert net.name == 'AlexNet'
  assert [(l.name, l.type) for l in net.layers] == [(n, t) for n, t, _ in layers]
  for layer, (_, _, blobs) in zip(net.layers, layers):
    assert len(layer.blobs) == len(blobs)
    for got, want in zip(layer.blobs, blobs):
      assert got.dtype == np.float32 and got.shape == want.shape
      np.testing.assert_array_equal(got, want)
  assert [l.name for l in net.with_blobs()] == ['conv1', 'fc6']
  assert net.layer('relu1').blobs == ()
  np.testing.assert_array_equal(net.layer('fc6').blobs[1], layers[5][2][1])
  with pytest.raises(WeightFileError, match="no layer 'fc7'.*conv1, fc6"):
    net.layer('fc7')


def test_legacy_caffemodel_keeps_the_4d_shapes(tmp_path):
  layers = [(n, t, b) for n, t, b in alexnet_like_layers() if t != 'Input']
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  cf.write_caffemodel(path, 'CaffeNet', layers, legacy=True)
  net = cf.read_caffemodel(path)
  # Types come back in current Caffe's spelling, shapes exactly as old Caffe stored them.
  assert [(l.name, l.type) for l in net.layers] == [(n, t) for n, t, _ in layers]
  conv_w, conv_b = net.layer('conv1').blobs
  fc_w, fc_b = net.layer('fc6').blobs
  assert conv_w.shape == (4, 3, 3, 3) and conv_b.shape == (1, 1, 1, 4)
  assert fc_w.shape == (1, 1, 5, 36) and fc_b.shape == (1, 1, 1, 5)
  np.testing.assert_array_equal(conv_w, layers[0][2][0])
  np.testing.assert_array_equal(conv_b.reshape(-1), layers[0][2][1])
  np.testing.assert_array_equal(fc_w[0, 0], layers[4][2][0])
  # The writer used the V1 list, with num/channels/height/width and no shape message.
  raw = cf.NetParameter.FromString(path.read_bytes())
  assert len(raw.layers) == len(layers) and not len(raw.layer)
  assert raw.layers[0].type == 4 and raw.layers[0].blobs[1].height == 1
  assert not raw.layers[0].blobs[0].HasField('shape')


# caffe.proto's V1LayerParameter.LayerType, and Caffe's upgrade of each to a type string.
V1_TYPES = [(1, 'Accuracy'), (3, 'Concat'), (4, 'Convolution'), (5, 'Data'), (6, 'Dropout'),
            (14, 'InnerProduct'), (15, 'LRN'), (17, 'Pooling'), (18, 'ReLU'), (20, 'Softmax'),
            (21, 'SoftmaxWithLoss'), (22, 'Split'), (23, 'TanH'), (25, 'Eltwise'), (33, 'Slice'),
            (35, 'AbsVal'), (39, 'Deconvolution')]


def test_hand_encoded_v1_file(tmp_path):
  weight, bias = sample(2, 3, 2, 3), sample(1, 1, 1, 2)
  # Fields the schema lacks, as real files have them: convolution_param (10), blobs_lr (7,
  # unpacked floats), and on the net input_shape (8) and force_backward (5).
  unknown = length_delimited(10, integer(1, 2)) + key(7, 5) + struct.pack('<f', 1.0)
  layers = [v1_layer('conv1', 4, legacy_blob(weight), legacy_blob(bias), extra=unknown)]
  layers += [v1_layer(f'layer{number}', number) for number, _ in V1_TYPES]
  layers.append(v1_layer('fork_layer', 50))  # an enum value of no caffe.proto
  data = (string(1, 'CaffeNet') + string(3, 'data') +
          b''.join(integer(4, d) for d in (10, 3, 227, 227)) + length_delimited(8, integer(1, 1)) +
          integer(5, 1) + b''.join(length_delimited(2, l) for l in layers))
  net = cf.read_caffemodel(write(tmp_path / 'old.caffemodel', data))
  assert net.name == 'CaffeNet'
  conv = net.layer('conv1')
  assert conv.type == 'Convolution'
  np.testing.assert_array_equal(conv.blobs[0], weight)
  np.testing.assert_array_equal(conv.blobs[1], bias)
  assert [(l.name, l.type) for l in net.layers[1:-1]] == [(f'layer{n}', t) for n, t in V1_TYPES]
  assert net.layers[-1].type == 'V1LayerParameter.LayerType 50'


def test_hand_encoded_modern_file(tmp_path):
  weight = sample(3, 4)
  bias = RNG.standard_normal(3)  # float64: stored as double_data
  blob_w = length_delimited(7, length_delimited(1,
                                                varint(3) + varint(4))) + packed_floats(
                                                    5, weight.ravel())
  # double_data (8), and the shape's dims unpacked (parsers accept both encodings).
  blob_b = length_delimited(7, integer(1, 3)) + length_delimited(8, bias.astype('<f8').tobytes())
  # An element-wise (unpacked) float list, the way a writer without [packed] emits it.
  scalar = length_delimited(7, integer(1, 2)) + key(5, 5) + struct.pack('<f', 1.5) + key(
      5, 5) + struct.pack('<f', -2.0)
  fc = (string(1, 'fc8') + string(2, 'InnerProduct') + string(3, 'fc7') + string(4, 'fc8') +
        length_delimited(7, blob_w) + length_delimited(7, blob_b) +
        length_delimited(106, b'\x08\x03\x10\x01'))  # 106: an unknown message field
  relu = string(1, 'relu') + string(2, 'ReLU') + length_delimited(106, b'')
  scale = string(1, 'scale') + string(2, 'Scale') + length_delimited(7, scalar)
  data = string(1, 'net') + b''.join(length_delimited(100, l) for l in (fc, relu, scale))
  net = cf.read_caffemodel(write(tmp_path / 'new.caffemodel', data))
  assert [(l.name, l.type) for l in net.layers] == [('fc8', 'InnerProduct'), ('relu', 'ReLU'),
                                                    ('scale', 'Scale')]
  w, b = net.layer('fc8').blobs
  np.testing.assert_array_equal(w, weight)
  assert b.dtype == np.float32 and b.shape == (3,)
  np.testing.assert_array_equal(b, bias.astype(np.float32))
  assert net.layer('relu').blobs == ()
  np.testing.assert_array_equal(net.layer('scale').blobs[0], [1.5, -2.0])


def test_modern_list_wins_over_v1(tmp_path):
  modern = string(1, 'fc') + string(2, 'InnerProduct') + length_delimited(
      7,
      length_delimited(7, integer(1, 1)) + packed_floats(5, [1.0]))
  old = v1_layer('old', 14, legacy_blob(np.ones((1, 1, 1, 1), np.float32)))
  data = length_delimited(2, old) + length_delimited(100, modern)
  net = cf.read_caffemodel(write(tmp_path / 'both.caffemodel', data))
  assert [l.name for l in net.layers] == ['fc']


def test_binaryproto_mean(tmp_path):
  mean = RNG.uniform(0, 255, (1, 3, 256, 256)).astype(np.float32)
  path = tmp_path / 'imagenet_mean.binaryproto'
  cf.write_blob_proto(path, mean)
  got = cf.read_blob_proto(path)
  assert got.shape == (1, 3, 256, 256) and got.dtype == np.float32
  np.testing.assert_array_equal(got, mean)
  # Caffe's own file: the legacy 4-D fields, by hand.
  small = sample(1, 3, 2, 2)
  np.testing.assert_array_equal(
      cf.read_blob_proto(write(tmp_path / 'hand.binaryproto', legacy_blob(small))), small)
  cf.write_blob_proto(path, small[0], legacy=False)
  assert cf.read_blob_proto(path).shape == (3, 2, 2)


def caffemodel_bytes(tmp_path):
  path = tmp_path / 'good.caffemodel'
  cf.write_caffemodel(path, 'AlexNet', alexnet_like_layers())
  return path.read_bytes()


def safetensors_bytes(tmp_path):
  path = tmp_path / 'x.safetensors'
  tf.write_safetensors(path, {'w': sample(4, 4)})
  return path.read_bytes()


BAD_CAFFEMODELS = {
    'truncated': lambda tmp: caffemodel_bytes(tmp)[:len(caffemodel_bytes(tmp)) // 2],
    'empty': lambda tmp: b'',
    'safetensors': safetensors_bytes,
    'prototxt': lambda tmp:
                b'name: "AlexNet"\nlayer {\n  name: "conv1"\n  type: "Convolution"\n}\n',
    'no_weights': lambda tmp: length_delimited(100,
                                               string(1, 'relu') + string(2, 'ReLU')),
    'count_mismatch': lambda tmp: length_delimited(
        2,
        v1_layer(
            'conv1', 4,
            legacy_blob(np.ones(
                (1, 1, 2, 2), np.float32))[:-4 * 4 - 2] + packed_floats(5, [1.0, 2.0, 3.0]))),
    # A V0 file (2014): each whole layer nested in V1LayerParameter.layer (1).
    'v0': lambda tmp: length_delimited(
        2,
        length_delimited(
            1,
            string(1, 'conv1') + string(2, 'conv') + length_delimited(
                50, legacy_blob(np.ones((1, 1, 1, 1), np.float32))))),
    'unnamed': lambda tmp: length_delimited(
        100,
        string(2, 'InnerProduct') + length_delimited(
            7,
            length_delimited(7, integer(1, 1)) + packed_floats(5, [1.0]))),
}


@pytest.mark.parametrize('kind', sorted(BAD_CAFFEMODELS))
def test_damaged_caffemodel(tmp_path, kind):
  path = write(tmp_path / f'{kind}.caffemodel', BAD_CAFFEMODELS[kind](tmp_path))
  with pytest.raises(WeightFileError) as excinfo:
    cf.read_caffemodel(path)
  assert_names_file(excinfo, path)
  expected = {
      'truncated': 'is not a Caffe model (a NetParameter protobuf): ',
      'safetensors': 'is not a Caffe model', 'prototxt': 'not its .prototxt', 'empty': 'is empty',
      'no_weights': 'none with weights', 'count_mismatch': '3 values for shape (1, 1, 2, 2)',
      'v0': 'V0 Caffe format', 'unnamed': 'has no name'
  }
  assert expected[kind] in str(excinfo.value)


def test_random_bytes_are_not_a_caffemodel(tmp_path):
  for seed in range(20):
    data = np.random.default_rng(seed).bytes(4096)
    path = write(tmp_path / f'random{seed}.caffemodel', data)
    with pytest.raises(WeightFileError) as excinfo:
      cf.read_caffemodel(path)
    assert_names_file(excinfo, path)
    with pytest.raises(WeightFileError):
      cf.read_blob_proto(path)


def test_missing_caffe_files(tmp_path):
  for read in (cf.read_caffemodel, cf.read_blob_proto):
    with pytest.raises(WeightFileError, match='no such file.*nowhere.caffemodel'):
      read(tmp_path / 'nowhere.caffemodel')
  with pytest.raises(WeightFileError, match='holds no values'):
    cf.read_blob_proto(write(tmp_path / 'empty.binaryproto', legacy_blob(np.ones((0, 3, 1, 1)))))
  with pytest.raises(WeightFileError, match='nothing.binaryproto is empty'):
    cf.read_blob_proto(write(tmp_path / 'nothing.binaryproto', b''))
  no_data = length_delimited(7, length_delimited(1, varint(2) + varint(2)))
  with pytest.raises(WeightFileError, match=r'0 values for shape \(2, 2\)'):
    cf.read_blob_proto(write(tmp_path / 'no_data.binaryproto', no_data))


# State dicts


def test_safetensors_round_trip(tmp_path):
  tensors = {
      'features.0.weight': sample(8, 3, 3, 3), 'features.0.bias': sample(8),
      'bn.num_batches_tracked': np.array(7, np.int64)
  }
  path = tmp_path / 'w.safetensors'
  tf.write_safetensors(path, tensors)
  got = tf.read_state_dict(path)
  assert got.keys() == tensors.keys()
  for name, want in tensors.items():
    assert got[name].dtype == want.dtype and got[name].shape == want.shape
    np.testing.assert_array_equal(got[name], want)


def test_safetensors_half_precision_and_prefix(tmp_path):
  half = sample(2, 3).astype(np.float16)
  bf16_values = np.array([1.0, -2.5, 3.140625], np.float32)  # exact in bfloat16
  bf16 = (bf16_values.view(np.uint32) >> 16).astype('<u2').tobytes()
  # A file built by hand (the format is a JSON header and raw bytes), as torch writes BF16.
  header = {
      'module.a': dict(dtype='F16', shape=[2, 3], data_offsets=[0, 12]),
      'module.b': dict(dtype='BF16', shape=[3], data_offsets=[12, 18])
  }
  header_bytes = json.dumps(header).encode()
  data = struct.pack('<Q', len(header_bytes)) + header_bytes + half.tobytes() + bf16
  got = tf.read_state_dict(write(tmp_path / 'half.safetensors', data))
  assert sorted(got) == ['a', 'b']
  assert got['a'].dtype == np.float32 and got['b'].dtype == np.float32
  np.testing.assert_array_equal(got['a'], half.astype(np.float32))
  np.testing.assert_array_equal(got['b'], bf16_values)


def test_pth_round_trip_and_unwrapping(tmp_path):
  torch = pytest.importorskip('torch')
  weight = sample(4, 3)
  plain = {'fc.weight': weight, 'bn.num_batches_tracked': np.array(3, np.int64)}
  path = tmp_path / 'w.pth'
  tf.write_pth(path, plain)
  got = tf.read_state_dict(path)
  np.testing.assert_array_equal(got['fc.weight'], weight)
  assert got['bn.num_batches_tracked'].dtype == np.int64 and got['bn.num_batches_tracked'] == 3

  halves = {
      'module.h': torch.tensor([1.5, 2.0], dtype=torch.float16),
      'module.b': torch.tensor([1.0, -2.5], dtype=torch.bfloat16)
  }
  for suffix, wrapped in (('.pt', {'state_dict': halves, 'epoch': 90, 'best_acc1': 0.57}),
                          ('.bin', {'model': halves}), ('.pth', halves)):
    path = tmp_path / f'wrapped{suffix}'
    tf.write_pth(path, wrapped)
    got = tf.read_state_dict(path)
    assert sorted(got) == ['b', 'h']
    assert got['h'].dtype == np.float32 and got['b'].dtype == np.float32
    np.testing.assert_array_equal(got['h'], [1.5, 2.0])
    np.testing.assert_array_equal(got['b'], [1.0, -2.5])


class RunsCode:
  """A pickle that, unpickled, would call ``open(marker, 'w')``: creates a file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return builtins.open, (str(self.marker), 'w')


def test_pth_never_runs_code(tmp_path):
  pytest.importorskip('torch')
  marker = tmp_path / 'marker'
  path = tmp_path / 'evil.pth'
  tf.write_pth(path, {'fc.weight': sample(2), 'payload': RunsCode(marker)})
  with pytest.raises(WeightFileError, match='weights_only=True refused it') as excinfo:
    tf.read_state_dict(path)
  assert_names_file(excinfo, path)
  assert not marker.exists()
  assert 'weights_only` set to `False' not in str(excinfo.value)


def test_pth_that_is_not_a_flat_state_dict(tmp_path):
  torch = pytest.importorskip('torch')
  cases = {
      'nested': {'fc': {'weight': torch.ones(2)}},
      'list': [torch.ones(2)],
      'number': {'fc.weight': torch.ones(2), 'lr': 0.1},
      'empty': {},
  }
  for name, content in cases.items():
    path = tmp_path / f'{name}.pth'
    tf.write_pth(path, content)
    with pytest.raises(WeightFileError) as excinfo:
      tf.read_state_dict(path)
    assert_names_file(excinfo, path)


def test_pth_without_torch(tmp_path, monkeypatch):
  path = write(tmp_path / 'w.pth', b'whatever')
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch → ImportError
  with pytest.raises(WeightFileError, match=r'pip install torch.*\.safetensors') as excinfo:
    tf.read_state_dict(path)
  assert_names_file(excinfo, path)


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_damaged_state_dicts(tmp_path, suffix):
  if suffix == '.pth':
    pytest.importorskip('torch')
  good = tmp_path / f'good{suffix}'
  (tf.write_safetensors if suffix == '.safetensors' else tf.write_pth)(good, {'w': sample(64)})
  contents = {
      'caffemodel': caffemodel_bytes(tmp_path),
      'empty': b'',
      'random': np.random.default_rng(1).bytes(4096),
      'truncated': good.read_bytes()[:-100],
  }
  for name, data in contents.items():
    path = write(tmp_path / f'{name}{suffix}', data)
    with pytest.raises(WeightFileError) as excinfo:
      tf.read_state_dict(path)
    assert_names_file(excinfo, path)
  with pytest.raises(WeightFileError, match='no such file'):
    tf.read_state_dict(tmp_path / f'nowhere{suffix}')


def test_unknown_suffix(tmp_path):
  path = write(tmp_path / 'bvlc_alexnet.caffemodel', b'')
  with pytest.raises(WeightFileError, match=r'\*\.safetensors, \*\.pth, \*\.pt, \*\.bin') as e:
    tf.read_state_dict(path)
  assert_names_file(e, path)
