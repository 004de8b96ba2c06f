"""The trained networks other frameworks released, read from their own files: Caffe's model-zoo
``.caffemodel`` files and mean ``.binaryproto`` (``caffe_format``), and torchvision's ``.pth`` /
``.safetensors`` state dicts (``tensor_files``). The modules here know the file formats only:
each turns a file into named numpy arrays in the source's own layout, and which array becomes
which parameter of this project's models is decided elsewhere.
"""

import os

from alexnet_jax import storage
from alexnet_jax.errors import UserError


class WeightFileError(UserError, ValueError):
  """A weight file to import that is missing, unreadable, or not in the format named."""


def read_bytes(path: storage.PathLike) -> bytes:
  """The bytes of the weight file ``path`` (local or a URL, see ``storage``)."""
  try:
    return storage.path(path).read_bytes()
  except FileNotFoundError:
    raise WeightFileError(f'no such file: {os.fspath(path)}') from None
  except OSError as e:
    raise WeightFileError(f'cannot read {os.fspath(path)}: {e}') from None
