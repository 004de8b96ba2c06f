"""The one file-system layer: every path of a workdir, of ``--out`` and of ``--checkpoint`` goes
through etils ``epath``, which orbax and tfds use too.

A local path is an ordinary file system path and is written as it always was. A ``gs://`` URL
(Google Cloud Storage, where pods and clusters keep their runs) goes through epath's fsspec
backend, which needs ``gcsfs`` (epath takes TensorFlow's gfile instead where TensorFlow is
installed); orbax asks ``google-cloud-storage`` whether the bucket is hierarchical before it
lists or deletes checkpoints there. Both are the ``gcs`` extra: ``pip install
'alexnet_jax[gcs]'``. Orbax writes checkpoints only to local paths
and ``gs://`` (tensorstore's ``file`` and ``gcs`` drivers), so that is the one URL scheme taken.

What object storage lacks and the writers here allow for: it has no directories (a "directory"
is a prefix of object names: nothing to create), no appending (an object is written whole), and
no rename (a move is a copy and a delete).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re

import fsspec
from etils import epath

from alexnet_jax.errors import DirectoryError

PathLike = str | os.PathLike
# The errors with which the storage, not our code, refuses a write: a full disk, a quota, a
# read-only or failing mount, a permission lost, an NFS handle gone stale.
REFUSED_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO,
                        errno.ESTALE)
# The URL schemes taken: the fsspec protocol epath opens each with and the package providing it,
# the modules orbax imports for it itself (module, package), and the extra installing them all.
SCHEMES = {
    'gs': dict(protocol='gcs', backend='gcsfs',
               modules=(('google.cloud.storage', 'google-cloud-storage'),), extra='gcs'),
}


def is_local(p: PathLike) -> bool:
  """Whether ``p`` is a local path (no ``scheme://``)."""
  return '://' not in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path``, a local one as given (relative stays relative)."""
  return epath.Path(p)


def absolute(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path``, a local one made absolute (``os.path.abspath``); a URL is one
  already (``os.path.abspath('gs://b/x')`` would be ``$PWD/gs:/b/x``)."""
  return epath.Path(os.path.abspath(p) if is_local(p) else p)


def makedirs(p: PathLike) -> None:
  """Creates the directory ``p`` with its parents where it is local. Object storage has no
  directories: there is nothing to create (and nothing to ask it)."""
  if is_local(p):
    path(p).mkdir(parents=True, exist_ok=True)


def write_bytes(p: PathLike, data: bytes, *, atomic: bool = False) -> None:
  """Writes ``data`` to the file ``p`` (its directory created where local). ``atomic``: readers
  see the old content or the new, never part of it; an object upload is atomic anyway, a local
  file is written beside (``p.tmp``) and renamed over."""
  if not is_local(p):
    path(p).write_bytes(data)
    return
  makedirs(os.path.dirname(os.fspath(p)) or '.')
  if not atomic:
    path(p).write_bytes(data)
    return
  tmp = f'{os.fspath(p)}.tmp'
  path(tmp).write_bytes(data)
  os.replace(tmp, p)


def write_text(p: PathLike, text: str, *, atomic: bool = False) -> None:
  write_bytes(p, text.encode('utf-8'), atomic=atomic)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file, from or to anywhere epath reaches, overwriting ``dst``."""
  path(src).copy(path(dst), overwrite=True)


def move(src: PathLike, dst: PathLike) -> None:
  """Moves the directory ``src`` to ``dst`` (which must not exist). Locally a rename, atomic; on
  object storage a copy of every object, then the deletion of the originals: an interrupted move
  leaves ``src`` whole (and part of ``dst``), never neither."""
  if is_local(src) and is_local(dst):
    os.rename(src, dst)
    return
  source, target = path(src), path(dst)
  _copy_tree(source, target)
  source.rmtree()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
  # iterdir, not walk: epath's walk over fsspec yields its roots without the gs:// prefix.
  for entry in source.iterdir():
    if entry.is_dir():
      _copy_tree(entry, target / entry.name)
    else:
      makedirs(target)
      entry.copy(target / entry.name, overwrite=True)


# -- what can be checked before a run starts ---------------------------------------------------


def check_url(url: str, flag: str) -> None:
  """Refuses (``DirectoryError``) a ``scheme://`` ``url`` named by ``flag`` whose scheme is not
  taken or whose storage library is not installed, in one line naming the extra to install.
  Nothing is read or written: credentials and the bucket are the storage library's to check."""
  scheme = url.split('://', 1)[0]
  if scheme not in SCHEMES:
    known = ', '.join(f'{s}://' for s in SCHEMES)
    raise DirectoryError(f'{flag}={url}: {scheme}:// is not a storage this program writes to; name '
                         f'a local directory or a {known} URL (orbax keeps checkpoints only there)')
  missing = missing_packages(scheme)
  if missing:
    extra = SCHEMES[scheme]['extra']
    raise DirectoryError(
        f'{flag}={url}: {scheme}:// needs {", ".join(missing)}, not installed; install the '
        f"{extra} extra: pip install 'alexnet_jax[{extra}]' (in a checkout: pip install -e "
        f"'.[{extra}]')")


def missing_packages(scheme: str) -> list[str]:
  """The packages that ``scheme://`` needs and this environment lacks."""
  needs = SCHEMES[scheme]
  missing = []
  if not _epath_uses_tensorflow():
    try:
      fsspec.get_filesystem_class(needs['protocol'])
    except ImportError:
      missing.append(needs['backend'])
  missing += [package for module, package in needs['modules'] if not _importable(module)]
  return missing


def _epath_uses_tensorflow() -> bool:
  """epath's own rule (``etils.epath.gpath._is_tf_installed``): gfile serves every URL where
  TensorFlow is installed, unless ``EPATH_USE_TF`` says no."""
  if os.environ.get('EPATH_USE_TF', '').lower() in ('false', 'no', 'f', '0'):
    return False
  return _importable('tensorflow')


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


# A local path starting with a URL scheme and one slash too few: "gs:/bucket" would create a
# local directory "gs:" (what a gs:// workdir did before paths went through epath).
_SCHEME_TYPO = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):/?(?!/)')


def check_local(p: str, flag: str) -> None:
  """Refuses (``DirectoryError``) a local path that is a mistyped URL, ``gs:/bucket`` say."""
  m = _SCHEME_TYPO.match(p)
  if m and m.group(1) in SCHEMES:
    rest = p[m.end():].lstrip('/')
    raise DirectoryError(f'{flag}={p} is a local path starting with a directory "{m.group(1)}:"; '
                         f'for storage write {m.group(1)}://{rest}')
