"""Caffe's binary files: a trained net (``.caffemodel``, a ``NetParameter``) and a lone blob (the
``.binaryproto`` mean image, a ``BlobProto``), read without Caffe.

The schema is the part of Caffe's ``caffe.proto`` that holds weights, with Caffe's own field
numbers, built here at import time (no ``protoc``, no generated code); whatever else a real file
holds (``convolution_param``, learning-rate multipliers, ...) is an unknown field to it, which
protobuf skips. Both generations of the format are read: the ``layer`` list of current Caffe
and the ``layers`` list of ``V1LayerParameter`` with its enum types and 4-D
(num, channels, height, width) blob shapes, which old model-zoo files such as
``bvlc_alexnet.caffemodel`` use.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf import unknown_fields as unknown_fields_lib

from alexnet_jax import storage
from alexnet_jax.weights import WeightFileError, read_bytes

# V1LayerParameter.LayerType of caffe.proto, with the type string Caffe's own upgrade
# (UpgradeV1LayerType in upgrade_proto.cpp) gives each.
V1_LAYER_TYPES = {
    'NONE': (0, ''),
    'ACCURACY': (1, 'Accuracy'),
    'BNLL': (2, 'BNLL'),
    'CONCAT': (3, 'Concat'),
    'CONVOLUTION': (4, 'Convolution'),
    'DATA': (5, 'Data'),
    'DROPOUT': (6, 'Dropout'),
    'EUCLIDEAN_LOSS': (7, 'EuclideanLoss'),
    'FLATTEN': (8, 'Flatten'),
    'HDF5_DATA': (9, 'HDF5Data'),
    'HDF5_OUTPUT': (10, 'HDF5Output'),
    'IM2COL': (11, 'Im2col'),
    'IMAGE_DATA': (12, 'ImageData'),
    'INFOGAIN_LOSS': (13, 'InfogainLoss'),
    'INNER_PRODUCT': (14, 'InnerProduct'),
    'LRN': (15, 'LRN'),
    'MULTINOMIAL_LOGISTIC_LOSS': (16, 'MultinomialLogisticLoss'),
    'POOLING': (17, 'Pooling'),
    'RELU': (18, 'ReLU'),
    'SIGMOID': (19, 'Sigmoid'),
    'SOFTMAX': (20, 'Softmax'),
    'SOFTMAX_LOSS': (21, 'SoftmaxWithLoss'),
    'SPLIT': (22, 'Split'),
    'TANH': (23, 'TanH'),
    'WINDOW_DATA': (24, 'WindowData'),
    'ELTWISE': (25, 'Eltwise'),
    'POWER': (26, 'Power'),
    'SIGMOID_CROSS_ENTROPY_LOSS': (27, 'SigmoidCrossEntropyLoss'),
    'HINGE_LOSS': (28, 'HingeLoss'),
    'MEMORY_DATA': (29, 'MemoryData'),
    'ARGMAX': (30, 'ArgMax'),
    'THRESHOLD': (31, 'Threshold'),
    'DUMMY_DATA': (32, 'DummyData'),
    'SLICE': (33, 'Slice'),
    'MVN': (34, 'MVN'),
    'ABSVAL': (35, 'AbsVal'),
    'SILENCE': (36, 'Silence'),
    'CONTRASTIVE_LOSS': (37, 'ContrastiveLoss'),
    'EXP': (38, 'Exp'),
    'DECONVOLUTION': (39, 'Deconvolution'),
}
_V1_TYPE_NAME = {number: name for number, name in V1_LAYER_TYPES.values()}
_V1_TYPE_NUMBER = {name: number for number, name in V1_LAYER_TYPES.values() if name}
_V1_TYPE_FIELD = 5
# V1LayerParameter.layer: the whole layer of the V0 format, nested.
_V0_LAYER_FIELD = 1

# What ``write_caffemodel`` takes of a layer: (name, type, blobs).
LayerSpec = tuple[str, str, list[np.ndarray]]

_HINT = 'give the .caffemodel file itself, not its .prototxt'


def _schema():
  """The message classes of the weight-holding subset of caffe.proto (package ``caffe``), in a
  pool of their own so that a real ``caffe_pb2`` imported beside them does not clash."""
  F = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(name='alexnet_jax/caffe_weights.proto',
                                             package='caffe', syntax='proto2')

  def add(msg, name, number, kind, *, repeated=False, packed=False, type_name=None):
    field = msg.field.add(name=name, number=number, type=kind,
                          label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
    if type_name:
      field.type_name = type_name
    if packed:
      field.options.packed = True

  shape = proto.message_type.add(name='BlobShape')
  add(shape, 'dim', 1, F.TYPE_INT64, repeated=True, packed=True)

  blob = proto.message_type.add(name='BlobProto')
  add(blob, 'shape', 7, F.TYPE_MESSAGE, type_name='.caffe.BlobShape')
  add(blob, 'data', 5, F.TYPE_FLOAT, repeated=True, packed=True)
  add(blob, 'diff', 6, F.TYPE_FLOAT, repeated=True, packed=True)
  add(blob, 'double_data', 8, F.TYPE_DOUBLE, repeated=True, packed=True)
  for name, number in (('num', 1), ('channels', 2), ('height', 3), ('width', 4)):
    add(blob, name, number, F.TYPE_INT32)

  layer = proto.message_type.add(name='LayerParameter')
  add(layer, 'name', 1, F.TYPE_STRING)
  add(layer, 'type', 2, F.TYPE_STRING)
  add(layer, 'bottom', 3, F.TYPE_STRING, repeated=True)
  add(layer, 'top', 4, F.TYPE_STRING, repeated=True)
  add(layer, 'blobs', 7, F.TYPE_MESSAGE, repeated=True, type_name='.caffe.BlobProto')

  v1 = proto.message_type.add(name='V1LayerParameter')
  enum = v1.enum_type.add(name='LayerType')
  for name, (number, _) in V1_LAYER_TYPES.items():
    enum.value.add(name=name, number=number)
  add(v1, 'bottom', 2, F.TYPE_STRING, repeated=True)
  add(v1, 'top', 3, F.TYPE_STRING, repeated=True)
  add(v1, 'name', 4, F.TYPE_STRING)
  add(v1, 'type', _V1_TYPE_FIELD, F.TYPE_ENUM, type_name='.caffe.V1LayerParameter.LayerType')
  add(v1, 'blobs', 6, F.TYPE_MESSAGE, repeated=True, type_name='.caffe.BlobProto')

  net = proto.message_type.add(name='NetParameter')
  add(net, 'name', 1, F.TYPE_STRING)
  add(net, 'layers', 2, F.TYPE_MESSAGE, repeated=True, type_name='.caffe.V1LayerParameter')
  add(net, 'input', 3, F.TYPE_STRING, repeated=True)
  add(net, 'input_dim', 4, F.TYPE_INT32, repeated=True)
  add(net, 'layer', 100, F.TYPE_MESSAGE, repeated=True, type_name='.caffe.LayerParameter')

  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  return {
      m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'caffe.{m.name}'))
      for m in proto.message_type
  }


_MESSAGES = _schema()
BlobShape = _MESSAGES['BlobShape']
BlobProto = _MESSAGES['BlobProto']
LayerParameter = _MESSAGES['LayerParameter']
V1LayerParameter = _MESSAGES['V1LayerParameter']
NetParameter = _MESSAGES['NetParameter']


@dataclasses.dataclass(frozen=True)
class CaffeLayer:
  """One layer of a Caffe net: its name, its type in current Caffe's spelling ('Convolution',
  'InnerProduct', 'LRN', ..., V1 files' enum types translated), and its blobs (weights first,
  then bias) as float32 arrays of the shape the file stores."""
  name: str
  type: str
  blobs: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class CaffeNet:
  """The layers of a ``.caffemodel``, in file order, those without weights included."""
  name: str
  layers: tuple[CaffeLayer, ...]

  def with_blobs(self) -> tuple[CaffeLayer, ...]:
    """The layers that hold weights, in file order."""
    return tuple(l for l in self.layers if l.blobs)

  def layer(self, name: str) -> CaffeLayer:
    """The layer called ``name``. A name used twice (a net's TRAIN and TEST data layers) gives
    the first that holds weights, else the first."""
    found = [l for l in self.layers if l.name == name]
    if not found:
      names = ', '.join(l.name for l in self.with_blobs())
      raise WeightFileError(f'the Caffe net {self.name!r} has no layer {name!r} (its layers '
                            f'with weights: {names})')
    return next((l for l in found if l.blobs), found[0])


class _BadBlob(ValueError):
  """A blob whose shape and values disagree (said in the file's terms by the caller)."""


def _blob_shape(blob) -> tuple[int, ...]:
  # Caffe's Blob::FromProto: the 4-D legacy fields where any is set, else ``shape``.
  if any(blob.HasField(f) for f in ('num', 'channels', 'height', 'width')):
    shape = (blob.num, blob.channels, blob.height, blob.width)
  else:
    shape = tuple(blob.shape.dim)
  if any(d < 0 for d in shape):
    raise _BadBlob(f'a negative dimension in shape {shape}')
  return shape


def _blob_array(blob) -> np.ndarray:
  shape = _blob_shape(blob)
  if len(blob.double_data):
    values = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
  else:
    values = np.array(blob.data, dtype=np.float32)
  if values.size != math.prod(shape):
    raise _BadBlob(f'{values.size} values for shape {shape}')
  return values.reshape(shape)


def _unknown(msg, number: int) -> list:
  return [f.data for f in unknown_fields_lib.UnknownFieldSet(msg) if f.field_number == number]


def _v1_type(layer) -> str:
  if layer.HasField('type'):
    return _V1_TYPE_NAME[layer.type]
  # proto2 keeps an enum value it does not know (a fork's own layer) as an unknown field.
  values = [v for v in _unknown(layer, _V1_TYPE_FIELD) if isinstance(v, int)]
  return f'V1LayerParameter.LayerType {values[-1]}' if values else ''


def read_caffemodel(path: storage.PathLike) -> CaffeNet:
  """The net of a ``.caffemodel`` (local or a URL, see ``storage``), current or V1 format."""
  data = read_bytes(path)
  where = os.fspath(path)
  if not data:
    raise WeightFileError(f'{where} is empty, not a Caffe model (a NetParameter protobuf)')
  net = NetParameter()
  try:
    net.ParseFromString(data)
  except message.DecodeError as e:
    raise WeightFileError(f'{where} is not a Caffe model (a NetParameter protobuf): {e}; '
                          f'{_HINT}') from None
  # Caffe reads whichever of the two lists is filled; a file with both does not load there.
  if len(net.layer):
    entries = [(l.name, l.type, l.blobs) for l in net.layer]
  else:
    entries = [(l.name, _v1_type(l), l.blobs) for l in net.layers]
  layers = []
  for name, kind, blobs in entries:
    try:
      arrays = tuple(_blob_array(b) for b in blobs)
    except _BadBlob as e:
      raise WeightFileError(f'{where} is damaged or not a Caffe model: layer {name!r} has a '
                            f'blob with {e}') from None
    if arrays and not name:
      raise WeightFileError(f'{where} is damaged or not a Caffe model: a layer with weights '
                            'has no name')
    layers.append(CaffeLayer(name=name, type=kind, blobs=arrays))
  result = CaffeNet(name=net.name, layers=tuple(layers))
  if not result.with_blobs():
    if any(_unknown(l, _V0_LAYER_FIELD) for l in net.layers):
      raise WeightFileError(f'{where} is in the V0 Caffe format of early 2014, not read here: '
                            "upgrade it with Caffe's upgrade_net_proto_binary")
    raise WeightFileError(f'{where} is not a trained Caffe model: it has {len(layers)} '
                          f'layer(s), none with weights; {_HINT}')
  return result


def _legacy_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
  # Old Caffe kept every blob 4-D, the leading axes 1: an InnerProduct weight (out, in) is
  # (1, 1, out, in), a bias (n,) is (1, 1, 1, n).
  if len(shape) > 4:
    raise ValueError(f'a legacy Caffe blob has at most 4 axes, not shape {shape}')
  return (1,) * (4 - len(shape)) + tuple(shape)


def _fill_blob(blob, array: np.ndarray, *, legacy: bool) -> None:
  array = np.asarray(array, dtype=np.float32)
  if legacy:
    blob.num, blob.channels, blob.height, blob.width = _legacy_shape(array.shape)
  else:
    blob.shape.dim.extend(array.shape)
  blob.data.extend(array.ravel().tolist())


def write_caffemodel(path: storage.PathLike, net_name: str, layers: list[LayerSpec], *,
                     legacy: bool = False) -> None:
  """Writes a ``.caffemodel`` of ``layers`` ((name, type, blobs), type in current Caffe's
  spelling): the current format, or with ``legacy`` the V1 one (enum types, 4-D blob shapes) of
  old model-zoo files. For tests: files in the exact layout of the sources."""
  net = NetParameter(name=net_name)
  for name, kind, blobs in layers:
    if legacy:
      if kind not in _V1_TYPE_NUMBER:
        raise ValueError(f'V1 Caffe has no layer type {kind!r}')
      layer = net.layers.add(name=name, type=_V1_TYPE_NUMBER[kind])
    else:
      layer = net.layer.add(name=name, type=kind)
    for array in blobs:
      _fill_blob(layer.blobs.add(), array, legacy=legacy)
  storage.write_bytes(path, net.SerializeToString())


def read_blob_proto(path: storage.PathLike) -> np.ndarray:
  """The array of a lone ``BlobProto`` file, e.g. Caffe's ``imagenet_mean.binaryproto`` (shape
  (1, 3, 256, 256), BGR, 0-255), as float32 of the shape stored."""
  data = read_bytes(path)
  where = os.fspath(path)
  if not data:
    raise WeightFileError(f'{where} is empty, not a Caffe blob (a BlobProto protobuf)')
  blob = BlobProto()
  try:
    blob.ParseFromString(data)
    array = _blob_array(blob)
  except (message.DecodeError, _BadBlob) as e:
    raise WeightFileError(f'{where} is not a Caffe blob (a BlobProto protobuf such as '
                          f'imagenet_mean.binaryproto): {e}') from None
  if not array.size:
    raise WeightFileError(f'{where} is not a Caffe blob (a BlobProto protobuf such as '
                          'imagenet_mean.binaryproto): it holds no values')
  return array


def write_blob_proto(path: storage.PathLike, array: np.ndarray, *, legacy: bool = True) -> None:
  """Writes ``array`` as a lone ``BlobProto`` (``legacy``: the 4-D fields, as Caffe's own
  mean files do). For tests."""
  blob = BlobProto()
  _fill_blob(blob, array, legacy=legacy)
  storage.write_bytes(path, blob.SerializeToString())
