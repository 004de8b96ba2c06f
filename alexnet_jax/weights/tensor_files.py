"""PyTorch state dicts (torchvision's released weights): ``.safetensors`` files, read without
PyTorch, and ``.pth`` / ``.pt`` / ``.bin`` pickles, read with it.

A pickle can name any Python callable to run while it loads, so one is only ever opened with
``torch.load(..., weights_only=True)``, which builds tensors and plain containers and refuses
everything else; nothing here unpickles any other way.
"""

from __future__ import annotations

import collections.abc
import importlib
import io
import os
import pickle

import numpy as np

from alexnet_jax import storage
from alexnet_jax.weights import WeightFileError, read_bytes

SAFETENSORS_SUFFIXES = ('.safetensors',)
PICKLE_SUFFIXES = ('.pth', '.pt', '.bin')
# Training scripts save {'state_dict': ..., 'epoch': ..., 'optimizer': ...} (or 'model'); the
# weights are the one entry.
_WRAPPER_KEYS = ('state_dict', 'model')
_DATA_PARALLEL_PREFIX = 'module.'
# safetensors dtypes numpy holds as such (little-endian by the format's definition).
_SAFETENSORS_DTYPES = {
    'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4', 'I16': '<i2', 'I8': 'i1',
    'U64': '<u8', 'U32': '<u4', 'U16': '<u2', 'U8': 'u1', 'BOOL': '?'
}


def _importable(name: str, where: str, how: str):
  try:
    return importlib.import_module(name)
  except ImportError:
    raise WeightFileError(f'reading {where} needs the {name} package: {how}') from None


def _float32(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _from_safetensors(where: str, data: bytes) -> dict[str, np.ndarray]:
  safetensors = _importable('safetensors', where, 'pip install safetensors')
  try:
    entries = safetensors.deserialize(data)
  except safetensors.SafetensorError as e:
    raise WeightFileError(f'{where} is not a safetensors file: {e}') from None
  tensors = {}
  for name, entry in entries:
    dtype, shape, raw = entry['dtype'], entry['shape'], entry['data']
    # safetensors.numpy cannot read BF16 (numpy has no such type); its bits are the upper half
    # of a float32's.
    if dtype == 'BF16':
      array = (np.frombuffer(raw, '<u2').astype(np.uint32) << 16).view(np.float32)
    elif dtype in _SAFETENSORS_DTYPES:
      array = np.frombuffer(raw, _SAFETENSORS_DTYPES[dtype])
    else:
      raise WeightFileError(f'{where}: tensor {name!r} has dtype {dtype}, which is not read '
                            f'here (only {", ".join(["BF16", *_SAFETENSORS_DTYPES])})')
    # The format checks each tensor's byte range against its shape and dtype.
    tensors[name] = _float32(array.reshape(shape))
  return tensors


def _unpickler_reason(e: Exception) -> str:
  # torch's refusal is a page of advice (including to switch the check off); the line saying
  # what it refused is the one before its pointer to the documentation.
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith('Check the documentation')]
  return lines[-1].split('. ')[0].rstrip('.') if lines else type(e).__name__


def _from_pickle(where: str, data: bytes):
  torch = _importable('torch', where,
                      'pip install torch, or convert the file to .safetensors where torch is')
  try:
    loaded = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise WeightFileError(f'{where} is not a PyTorch state dict of tensors (torch.load with '
                          f'weights_only=True refused it: {_unpickler_reason(e)})') from None
  except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:
    raise WeightFileError(f'{where} is not a PyTorch file (torch.load: '
                          f'{_unpickler_reason(e)})') from None

  def to_numpy(name, value):
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      return (value.float() if value.is_floating_point() else value).numpy()
    raise WeightFileError(f'{where} is not a flat state dict of tensors: {name!r} holds a '
                          f'{type(value).__name__}')

  if not isinstance(loaded, collections.abc.Mapping):
    raise WeightFileError(f'{where} is not a state dict: it holds a {type(loaded).__name__}, '
                          'not a mapping of names to tensors')
  for key in _WRAPPER_KEYS:
    if isinstance(loaded.get(key), collections.abc.Mapping):
      loaded = loaded[key]
      break
  return {name: to_numpy(name, value) for name, value in loaded.items()}


def read_state_dict(path: storage.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch state dict file, by name: floating ones as float32 numpy arrays,
  integer ones (BatchNorm's ``num_batches_tracked``) as stored. A checkpoint wrapping the state
  dict (under 'state_dict' or 'model') is unwrapped, DataParallel's 'module.' prefix dropped."""
  where = os.fspath(path)
  suffix = os.path.splitext(where)[1].lower()
  if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
    raise WeightFileError(f'{where}: a state dict is read from a file named '
                          f'{", ".join("*" + s for s in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)},'
                          f' not {suffix or "one without a suffix"}')
  data = read_bytes(path)
  if not data:
    raise WeightFileError(f'{where} is empty, not a state dict')
  if suffix in SAFETENSORS_SUFFIXES:
    tensors = _from_safetensors(where, data)
  else:
    tensors = _from_pickle(where, data)
  if not tensors:
    raise WeightFileError(f'{where} holds no tensors')
  if any(not isinstance(name, str) for name in tensors):
    raise WeightFileError(f'{where} is not a state dict: its keys are not all names')
  if all(name.startswith(_DATA_PARALLEL_PREFIX) for name in tensors):
    tensors = {name[len(_DATA_PARALLEL_PREFIX):]: t for name, t in tensors.items()}
  return tensors


def write_safetensors(path: storage.PathLike, tensors: dict[str, np.ndarray]) -> None:
  """Writes ``tensors`` as a ``.safetensors`` file. For tests."""
  safetensors_numpy = importlib.import_module('safetensors.numpy')
  arrays = {name: np.array(t, order='C') for name, t in tensors.items()}
  storage.write_bytes(path, safetensors_numpy.save(arrays))


def write_pth(path: storage.PathLike, tensors) -> None:
  """Writes ``tensors`` with ``torch.save``, a mapping's numpy arrays as torch tensors and
  anything else as it is (tests write wrong files too). For tests; needs torch."""
  torch = importlib.import_module('torch')
  if isinstance(tensors, collections.abc.Mapping):
    tensors = {
        name: torch.from_numpy(np.array(t)) if isinstance(t, np.ndarray) else t
        for name, t in tensors.items()
    }
  buffer = io.BytesIO()
  torch.save(tensors, buffer)
  storage.write_bytes(path, buffer.getvalue())
