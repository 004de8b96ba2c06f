"""Where metrics go: a JSONL file and TensorBoard event files in the workdir, a PNG at the end.

The workdir is a local directory or a ``gs://`` URL (``storage``). A local workdir is written in
place; for a URL both files are written in a local staging directory and uploaded whole, through
epath, at most every ``SYNC_SECONDS`` and when the writer closes (``MetricWriter`` says why).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Mapping

import numpy as np
from absl import logging
from matplotlib.figure import Figure

from alexnet_jax import storage

JSONL = 'metrics.jsonl'
PLOT = 'training_curves.png'
TENSORBOARD = 'tensorboard'
# How often a writer with a non-local workdir uploads its files (at most; and when it closes).
SYNC_SECONDS = 60.0


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch where that is not loaded yet.

  tensorboardX imports torch, if installed, only to accept torch tensors in its methods (this
  project passes numpy): about 2 s of every start of every process of every run. Hiding torch
  for the length of the import makes that import fail, which tensorboardX handles; torch itself
  imports normally afterwards."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return importlib.import_module('tensorboardX').SummaryWriter
  sys.modules['torch'] = None  # `import torch` now raises ImportError
  try:
    return importlib.import_module('tensorboardX').SummaryWriter
  finally:
    del sys.modules['torch']


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **values}`` lines and mirrors them to TensorBoard.

  A local workdir gets both as it always did: lines appended, events written by tensorboardX.
  For a URL they are written to a local staging directory and uploaded from there, each file
  whole, because object storage appends to nothing (each line would cost a download and an
  upload of the whole file) and tensorboardX writes only local files or, with its own gs://
  writer, uploads from its writer thread, where a failure goes unseen, not through epath.
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
    self._tb = _summary_writer_class()(os.path.join(local, TENSORBOARD))
    self._synced = time.monotonic()
    self._uploaded = {}  # remote path → bytes uploaded

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with open(self._jsonl, 'a') as f:
      f.write(json.dumps(dict(step=int(step), split=split, **values)) + '\n')
    for k, v in values.items():
      self._tb.add_scalar(f'{split}/{k}', v, int(step))
    self._sync_when_due()

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    """A uint8 ``(H, W, 3)`` picture to TensorBoard."""
    if self.enabled:
      self._tb.add_image(tag, picture, int(step), dataformats='HWC')
      self._sync_when_due()

  def sync(self) -> None:
    """Uploads the staged files now (nothing to do for a local workdir)."""
    if self._staging is None:
      return
    self._tb.flush()
    self._upload()

  def close(self) -> None:
    if self._tb is None:
      return
    self._tb.flush()
    self._tb.close()  # its writer thread has written every event when this returns
    self._tb = None
    if self._staging is not None:
      try:
        self._upload()
      except BaseException:
        logging.warning('the metrics could not be uploaded to %s: they are kept in %s',
                        self._workdir, self._staging)
        raise
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None

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
      if remote != self.path:
        # tensorboardX's writer thread may be in the middle of a record: send the whole ones.
        data = _whole_records(data)
      if self._uploaded.get(remote) != len(data):  # both files only grow
        storage.write_bytes(remote, data)
        self._uploaded[remote] = len(data)
    self._synced = time.monotonic()


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _whole_records(data: bytes) -> bytes:
  """The complete TFRecords at the start of an event file's bytes: each is a little-endian
  uint64 length, a 4-byte CRC of it, the data and a 4-byte CRC of the data."""
  end = 0
  while end + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[end:end + 8])
    if end + 12 + length + 4 > len(data):
      break
    end += 12 + length + 4
  return data[:end]


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
