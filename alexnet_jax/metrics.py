"""Where metrics go: a JSONL file and TensorBoard event files in the workdir, a PNG at the end.

The workdir is a local directory or a ``gs://`` URL (``storage``). A local workdir is written in
place; for a URL both files are written in a local staging directory and uploaded whole, through
epath, at most every ``SYNC_SECONDS`` and when the writer closes (``MetricWriter`` says why).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from typing import Mapping

import numpy as np
from absl import logging
from matplotlib.figure import Figure

from alexnet_jax import storage
from alexnet_jax.errors import DirectoryError

JSONL = 'metrics.jsonl'
PLOT = 'training_curves.png'
TENSORBOARD = 'tensorboard'
# How often a writer with a non-local workdir uploads its files (at most; and when it closes).
SYNC_SECONDS = 60.0


def _tensorboardx():
  """tensorboardX, imported without PyTorch where that is not loaded yet.

  tensorboardX imports torch, if installed, only to accept torch tensors in its methods (this
  project passes numpy): about 2 s of every start of every process of every run. Hiding torch
  for the length of the import makes that import fail, which tensorboardX handles; torch itself
  imports normally afterwards."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return importlib.import_module('tensorboardX')
  sys.modules['torch'] = None  # `import torch` now raises ImportError
  try:
    return importlib.import_module('tensorboardX')
  finally:
    del sys.modules['torch']


class EventFile:
  """One TensorBoard event file, written in the caller's thread.

  tensorboardX's ``SummaryWriter`` writes from a thread of its own, fed through a
  multiprocessing queue, and flushes again from an ``atexit`` hook: a disk that fills up then
  fails in that thread and at exit, after the run has reported what ended it, with tracebacks
  nobody can act on. Here each event is one TFRecord (a little-endian uint64 length, the masked
  CRC-32C of it, the serialized ``Event``, the masked CRC-32C of that) appended unbuffered, whole
  or not at all (``_append_whole``), so a failure is raised where the event is written and the
  file only ever holds whole records. tensorboardX builds the summaries."""

  def __init__(self, logdir: str):
    self._tbx = _tensorboardx()
    os.makedirs(logdir, exist_ok=True)
    # Two processes of one run (a resume) never share a file: TensorBoard reads them all.
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = os.path.join(logdir, name)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    self._write(self._tbx.proto.event_pb2.Event(wall_time=time.time(),
                                                file_version='brain.Event:2'))

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._add(self._tbx.summary.scalar(tag, value), step)

  def image(self, tag: str, picture: np.ndarray, step: int) -> None:
    self._add(self._tbx.summary.image(tag, picture, dataformats='HWC'), step)

  def close(self) -> None:
    os.close(self._fd)

  def _add(self, summary, step: int) -> None:
    self._write(
        self._tbx.proto.event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def _write(self, event) -> None:
    crc = self._tbx.record_writer.masked_crc32c
    data = event.SerializeToString()
    header = struct.pack('<Q', len(data))
    _append_whole(self._fd,
                  header + struct.pack('<I', crc(header)) + data + struct.pack('<I', crc(data)))


def _append_whole(fd: int, data: bytes) -> None:
  """Appends all of ``data`` to the open file or none of it: a write the disk refuses part-way
  is cut back off, so the file never ends in part of a line or a record that a resumed run
  would append after."""
  start = os.lseek(fd, 0, os.SEEK_END)
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
  except OSError:
    os.ftruncate(fd, start)
    raise


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **values}`` lines and mirrors them to TensorBoard.

  A local workdir gets both as it always did: lines appended, events written by tensorboardX.
  For a URL they are written to a local staging directory and uploaded from there, each file
  whole, because object storage appends to nothing (each line would cost a download and an
  upload of the whole file) and tensorboardX writes only local files or, with its own gs://
  writer, uploads from its writer thread, where a failure goes unseen, not through epath.
  (Events are written by ``EventFile``, which says why not by tensorboardX's own writer.)
  Uploads happen in the caller's thread, so a failure is raised where it happens, in the
  training loop, as a failed write to a local disk is: when ``SYNC_SECONDS`` have passed since
  the last one (checked at each write; far below the rate at which GCS takes new versions of an
  object) and on ``close``, which the training loop runs whatever ended it. A process killed
  outright loses what it wrote since the last upload. A run resumed in the same workdir first
  downloads its metrics.jsonl and appends to it; its TensorBoard events go to a new event file,
  as they do locally.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, JSONL)
    self._workdir = workdir
    self._staging = None
    self._tb = None
    if not enabled:
      return
    if storage.is_local(workdir):
      storage.makedirs(workdir)
      local = workdir
    else:
      self._staging = tempfile.mkdtemp(prefix='alexnet_jax_metrics_')
      local = self._staging
      if storage.path(self.path).exists():  # a resumed run: its history continues
        storage.copy_file(self.path, os.path.join(local, JSONL))
    self._jsonl = os.path.join(local, JSONL)
    self._tb = EventFile(os.path.join(local, TENSORBOARD))
    self._synced = time.monotonic()
    self._uploaded = {}  # remote path → bytes uploaded

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with self._storage_errors():
      line = json.dumps(dict(step=int(step), split=split, **values)) + '\n'
      fd = os.open(self._jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        _append_whole(fd, line.encode())
      finally:
        os.close(fd)
      for k, v in values.items():
        self._tb.scalar(f'{split}/{k}', v, step)
    self._sync_when_due()

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    """A uint8 ``(H, W, 3)`` picture to TensorBoard."""
    if self.enabled:
      with self._storage_errors():
        self._tb.image(tag, picture, step)
      self._sync_when_due()

  def sync(self) -> None:
    """Uploads the staged files now (nothing to do for a local workdir)."""
    if self._staging is None:
      return
    self._upload()

  def close(self) -> None:
    if self._tb is None:
      return
    tb, self._tb = self._tb, None
    tb.close()
    if self._staging is not None:
      try:
        self._upload()
      except BaseException:
        logging.warning('the metrics could not be uploaded to %s: they are kept in %s',
                        self._workdir, self._staging)
        raise
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None

  @contextlib.contextmanager
  def _storage_errors(self):
    """A local disk that refuses a write (full, over quota, read-only, failing) is the user's to
    fix: one line saying so. Any other ``OSError`` is raised as it is."""
    try:
      yield
    except OSError as e:
      if e.errno not in storage.REFUSED_WRITE_ERRNOS:
        raise
      raise DirectoryError(
          f'cannot write the metrics in {self._workdir}: {os.strerror(e.errno)} — free space (or '
          'fix the storage) and rerun the same command: it resumes from the newest checkpoint'
      ) from None

  def _sync_when_due(self) -> None:
    if self._staging is not None and time.monotonic() - self._synced >= SYNC_SECONDS:
      self.sync()

  def _upload(self) -> None:
    files = [(self._jsonl, self.path)]
    events = os.path.join(self._staging, TENSORBOARD)
    files += [(os.path.join(events, name), os.path.join(self._workdir, TENSORBOARD, name))
              for name in sorted(os.listdir(events))]
    for local, remote in files:
      if not os.path.exists(local):
        continue
      data = _read(local)
      if self._uploaded.get(remote) != len(data):  # both files only grow
        storage.write_bytes(remote, data)
        self._uploaded[remote] = len(data)
    self._synced = time.monotonic()


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_training_curves(workdir: str) -> str | None:
  """Loss, top-1 / top-5 error and learning rate against epochs, from the workdir's JSONL."""
  path = os.path.join(workdir, JSONL)
  if not storage.path(path).exists():
    return None
  rows = read_jsonl(path)
  series = lambda split, key: np.array([(r['epoch'], r[key])
                                        for r in rows
                                        if r['split'] == split and key in r and 'epoch' in r])
  fig = Figure(figsize=(15, 4))  # no pyplot: renders with Agg when saved, no global state
  axes = fig.subplots(1, 3)
  panels = [('loss', 'cross-entropy loss'), ('top1_error', 'top-1 error'),
            ('top5_error', 'top-5 error')]
  for ax, (key, title) in zip(axes, panels):
    for split, style in (('train', '-'), ('val', 'o-')):
      s = series(split, key)
      if len(s):
        ax.plot(s[:, 0], s[:, 1], style, label=split, markersize=3)
    ax.set_title(title)
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend()
  lr = series('train', 'learning_rate')
  if len(lr):
    twin = axes[0].twinx()
    twin.plot(lr[:, 0], lr[:, 1], color='grey', alpha=0.5, linewidth=1)
    twin.set_ylabel('learning rate', color='grey')
  fig.tight_layout()
  out = os.path.join(workdir, PLOT)
  buffer = io.BytesIO()  # savefig writes to local files or file objects, not to epath paths
  fig.savefig(buffer, format='png', dpi=100)
  storage.write_bytes(out, buffer.getvalue())
  return out
