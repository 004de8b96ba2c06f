"""Snapshots during training: every N epochs the first-layer filters and a few deconvnet
projections, written to ``<workdir>/visualize/`` and TensorBoard, to watch the features form.

``every_epochs(n, images)`` is a hook for the training loop (``train.Hook``); ``main`` hands it in
when ``config.visualize.every_epochs`` asks for it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from alexnet_jax.data import pipeline
from alexnet_jax.visualize import analyses, render
from alexnet_jax.visualize.checkpoints import network_from_state
from alexnet_jax.visualize.network import CompiledFunctions, Network


def every_epochs(every: int, images: int):
  """A hook that snapshots the network after every ``every``-th epoch, on the first ``images``
  images of the evaluation split (single-process runs: the analyses run on local devices)."""
  functions = CompiledFunctions()  # the run's snapshots share their compiled functions

  def hook(end) -> None:
    if end.epoch % every or jax.process_count() > 1:
      return
    crop = pipeline.EvalTransform(end.config.model.image_size)
    source = end.inputs.eval_source
    count = min(int(images), len(source))
    pixels = np.stack([crop.map(source[i])['image'] for i in range(count)])
    net = network_from_state(end.config, end.program.graphdef, end.state, step=end.step,
                             epoch=end.epoch, mean_image=end.inputs.mean_image, functions=functions)
    pictures = training_snapshot(net, pixels, os.path.join(end.workdir, 'visualize'), end.epoch)
    for name, picture in pictures.items():
      end.writer.image(end.step, f'visualize/{name}', picture)

  return hook


def training_snapshot(net: Network, images: np.ndarray, out_dir: str, epoch: int,
                      maps: int = 4) -> dict[str, np.ndarray]:
  """The first-layer filters and the deconvnet projections of ``images``' strongest ``maps`` maps
  of the last conv layer, written as ``filters_epochN.png`` / ``deconv_epochN.png``; returns the
  pictures (for TensorBoard)."""
  filters = analyses.first_layer_filters(net)
  pictures = {
      'filters': render.square_grid([render.zoom_to(render.filter_image(f), 33) for f in filters],
                                    pad=2)
  }
  layer = analyses.spatial_layers(net)[-1]
  proj = analyses.strongest_maps(net, images, [layer], maps)[layer]
  k = len(proj.maps) // len(images)
  rows = [[images[i]] + [render.projection_image(p)
                         for p in proj.projections[i * k:(i + 1) * k]]
          for i in range(len(images))]
  pictures[f'deconv_{layer}'] = render.grid([[render.zoom_to(t, 96) for t in row] for row in rows])
  for name, picture in pictures.items():
    render.save_png(os.path.join(out_dir, f'{name.split("_")[0]}_epoch{epoch}.png'), picture)
  return pictures
