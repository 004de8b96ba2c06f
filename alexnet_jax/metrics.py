"""Where metrics go: a JSONL file and TensorBoard event files in the workdir, a PNG at the end."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

JSONL = 'metrics.jsonl'
PLOT = 'training_curves.png'


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **values}`` lines and mirrors them to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, JSONL)
    self._tb = None
    if enabled:
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(dict(step=int(step), split=split, **values)) + '\n')
    for k, v in values.items():
      self._tb.add_scalar(f'{split}/{k}', v, int(step))

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    """A uint8 ``(H, W, 3)`` picture to TensorBoard."""
    if self.enabled:
      self._tb.add_image(tag, picture, int(step), dataformats='HWC')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(workdir: str) -> str | None:
  """Loss, top-1 / top-5 error and learning rate against epochs, from the workdir's JSONL."""
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
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
  fig.savefig(out, dpi=100)
  return out
