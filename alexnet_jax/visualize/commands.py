"""One function per analysis: compute (``analyses``), draw (``render``), write PNG + .npz + index.

Each ``run_<analysis>(config, checkpoint, options, out_dir)`` returns the figure files it wrote.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import matplotlib
import numpy as np
from matplotlib import patches

from alexnet_jax import storage
from alexnet_jax.errors import ConfigError
from alexnet_jax.visualize import analyses, render
from alexnet_jax.visualize import images as images_lib
from alexnet_jax.visualize.checkpoints import checkpoint_steps, load_network
from alexnet_jax.visualize.images import Images, load_images
from alexnet_jax.visualize.network import CompiledFunctions, Network, device_count

ANALYSES = ('filters', 'deconv', 'top9', 'evolution', 'invariance', 'occlusion', 'correspondence',
            'predictions', 'neighbours')


@dataclasses.dataclass
class Options:
  images: str | None = None  # dataset (default) | skimage | files / folders
  num_images: int | None = None  # default: per analysis
  layers: list[str] | None = None  # default: per analysis
  maps: list[int] | None = None  # top9 / evolution: these maps instead of random ones
  num_maps: int = 9
  top: int = 9  # activations per map (top9), maps per image (deconv)
  step: int | None = None  # checkpoint step (default: the latest)
  epochs: list[float] | None = None  # evolution: the checkpoints' epochs to show (default: all)
  occluder_size: int | None = None  # default: a fifth of the image
  occluder_stride: int | None = None  # default: image size / 56 (4 at 224)
  parts: dict | None = None  # correspondence: name → boxes (top, left, height, width)
  random_draws: int = 10
  seed: int = 0
  num_train: int | None = None  # neighbours: the first N training images (default: all)
  chunk_size: int = 256  # neighbours: training images per chunk through the devices


DEFAULT_IMAGES = dict(deconv=4, top9=256, evolution=256, invariance=4, occlusion=3,
                      correspondence=5, predictions=8, neighbours=5)


def _images(net_config, options: Options, analysis: str) -> Images:
  count = options.num_images or DEFAULT_IMAGES[analysis]
  return load_images(net_config, options.images, count, options.seed)


def _npz(out_dir: str, name: str, **arrays) -> str:
  buffer = io.BytesIO()  # numpy writes local files or file objects, not epath paths
  np.savez_compressed(buffer, **arrays)
  storage.write_bytes(os.path.join(out_dir, name), buffer.getvalue())
  return name


def _finish(out_dir, analysis, figures, data):
  render.record(out_dir, analysis, figures, data)
  return [os.path.join(out_dir, f) for f, _ in figures]


def run(analysis: str, config, checkpoint: str, options: Options, out_dir: str,
        functions: CompiledFunctions | None = None) -> list[str]:
  """Runs ``analysis`` on the checkpoint, writing into ``out_dir``; returns the figure files.
  ``functions``: compiled functions shared with other analyses of the same network in this process
  (default: compiled afresh)."""
  functions = functions or CompiledFunctions()
  if analysis not in ANALYSES:
    raise ConfigError(f'unknown analysis {analysis!r}; choose one of {", ".join(ANALYSES)}')
  storage.makedirs(out_dir)
  if analysis == 'evolution':
    return run_evolution(config, checkpoint, options, out_dir, functions)
  net = load_network(config, checkpoint, options.step, functions=functions)
  return globals()[f'run_{analysis}'](net, options, out_dir)


def _where(net: Network) -> str:
  epoch = '' if net.epoch is None else f', epoch {net.epoch:g}'
  return f'{net.config.model.name} at step {net.step}{epoch}'


# --- filters --------------------------------------------------------------------------------------


def run_filters(net: Network, options: Options, out_dir: str) -> list[str]:
  filters = analyses.first_layer_filters(net)
  tiles = [render.zoom_to(render.filter_image(f), 33) for f in filters]
  render.save_png(os.path.join(out_dir, 'filters.png'), render.square_grid(tiles, pad=2))
  data = _npz(out_dir, 'filters.npz', filters=filters)
  return _finish(out_dir, 'filters', [('filters.png', f'The {len(filters)} first-layer filters of '
                                       f'{_where(net)}, each stretched to its own value range.')],
                 [data])


# --- deconv ---------------------------------------------------------------------------------------


def run_deconv(net: Network, options: Options, out_dir: str) -> list[str]:
  images = _images(net.config, options, 'deconv')
  layers = analyses.check_layers(net, options.layers or analyses.spatial_layers(net))
  result = analyses.strongest_maps(net, images.pixels, layers, options.top)
  figures, arrays = [], {}
  for layer, proj in result.items():
    k = len(proj.maps) // len(images.pixels)
    rows = []
    for i, image in enumerate(images.pixels):
      row = [image] + [render.projection_image(p) for p in proj.projections[i * k:(i + 1) * k]]
      rows.append([render.zoom_to(t, 96) for t in row])
    name = f'deconv_{layer}.png'
    render.save_png(os.path.join(out_dir, name), render.grid(rows))
    figures.append((name, f'{layer}: each image (left) and the deconvnet projections of its {k} '
                    f"strongest {layer} maps' strongest activations, strongest first "
                    f'({_where(net)}; images: {", ".join(images.names)}).'))
    arrays.update(
        {f'{layer}/{k_}': v for k_, v in dataclasses.asdict(proj).items() if k_ != 'layer'})
  data = _npz(out_dir, 'deconv.npz', images=images.pixels, **arrays)
  return _finish(out_dir, 'deconv', figures, [data])


# --- top9 -----------------------------------------------------------------------------------------


def _crop_tiles(net: Network, proj: analyses.Projections, images: np.ndarray):
  """Per entry the receptive-field crop of the projection and of the image, on equal canvases."""
  extent = proj.boxes[:, 2:] - proj.boxes[:, :2] + 1
  shape = tuple(int(x) for x in extent.max(axis=0))
  s = net.image_size
  projections, patches = [], []
  for n, box in enumerate(proj.boxes):
    projections.append(
        render.fit(render.projection_image(analyses.crop(proj.projections[n], box)), box, s, shape))
    patches.append(render.fit(analyses.crop(images[proj.images[n]], box), box, s, shape))
  return projections, patches


def _top_figure(net, proj, images, k):
  projections, patches = _crop_tiles(net, proj, images)
  side = int(np.ceil(np.sqrt(k)))
  blocks = []
  for m in range(len(proj.maps) // k):
    left = render.square_grid(projections[m * k:(m + 1) * k], cols=side)
    right = render.square_grid(patches[m * k:(m + 1) * k], cols=side)
    blocks.append(render.grid([[left, right]], pad=1, background=200))
  blocks = [render.zoom_to(b, 160) for b in blocks]
  return render.square_grid(blocks, cols=min(3, len(blocks)), pad=6)


def run_top9(net: Network, options: Options, out_dir: str) -> list[str]:
  images = _images(net.config, options, 'top9')
  layers = analyses.check_layers(net, options.layers or analyses.spatial_layers(net))
  maps = analyses.choose_maps(net, layers, options.num_maps, options.seed, options.maps)
  result = analyses.top_activations(net, images.pixels, maps, options.top)
  figures, arrays = [], {}
  for layer, proj in result.items():
    name = f'top9_{layer}.png'
    render.save_png(os.path.join(out_dir, name), _top_figure(net, proj, images.pixels, options.top))
    figures.append((name, f'{layer}, maps {", ".join(map(str, maps[layer]))}: for each map the '
                    f'{options.top} strongest activations over {len(images.pixels)} images, '
                    'their deconvnet projections (left) beside the image patches of their '
                    f'receptive fields (right) ({_where(net)}).'))
    arrays.update({
        f'{layer}/{k}': v
        for k, v in dataclasses.asdict(proj).items()
        if k not in ('layer', 'projections')
    })
  data = _npz(out_dir, 'top9.npz', **arrays)
  return _finish(out_dir, 'top9', figures, [data])


# --- evolution ------------------------------------------------------------------------------------


def run_evolution(config, checkpoint: str, options: Options, out_dir: str,
                  functions: CompiledFunctions) -> list[str]:
  steps = checkpoint_steps(config, checkpoint)
  # One set of compiled functions: each analysis compiles once for every checkpoint.
  nets = [load_network(config, checkpoint, s, functions=functions) for s in steps]
  if options.epochs:
    wanted = set(float(e) for e in options.epochs)
    nets = [n for n in nets if n.epoch is not None and float(n.epoch) in wanted]
    if not nets:
      raise ConfigError(f'no checkpoint at epochs {sorted(wanted)}; train with '
                        '--config.checkpoint.keep_epochs listing them')
  images = _images(config, options, 'evolution')
  first = nets[0]
  layers = analyses.check_layers(first, options.layers or analyses.spatial_layers(first))
  maps = analyses.choose_maps(first, layers, options.num_maps, options.seed, options.maps)
  columns = {layer: [] for layer in layers}
  arrays = {}
  for net in nets:
    result = analyses.top_activations(net, images.pixels, maps, k=1)
    for layer, proj in result.items():
      projections, _ = _crop_tiles(net, proj, images.pixels)
      columns[layer].append(projections)
      arrays[f'step{net.step}/{layer}/values'] = proj.values
      arrays[f'step{net.step}/{layer}/images'] = proj.images
  labels = ', '.join(
      f'epoch {n.epoch:g}' if n.epoch is not None else f'step {n.step}' for n in nets)
  figures = []
  for layer in layers:
    shape = max((t.shape for col in columns[layer] for t in col))
    rows = [[render.zoom_to(_pad_to(col[m], shape), 64)
             for col in columns[layer]]
            for m in range(len(maps[layer]))]
    name = f'evolution_{layer}.png'
    render.save_png(os.path.join(out_dir, name), render.grid(rows))
    figures.append((name, f'{layer}, maps {", ".join(map(str, maps[layer]))} (rows): the strongest '
                    f'activation over {len(images.pixels)} images projected to pixels, at '
                    f'each checkpoint (columns: {labels}).'))
  data = _npz(out_dir, 'evolution.npz', steps=np.array([n.step for n in nets]),
              epochs=np.array([np.nan if n.epoch is None else n.epoch for n in nets]), **arrays)
  return _finish(out_dir, 'evolution', figures, [data])


def _pad_to(tile, shape):
  out = np.full(shape, render.GREY, np.uint8)
  out[:tile.shape[0], :tile.shape[1]] = tile
  return out


# --- invariance -----------------------------------------------------------------------------------


def _default_invariance_layers(net):
  names = list(analyses.all_layers(net))
  return [names[0], names[-2]] if len(names) > 2 else names[:1]


def run_invariance(net: Network, options: Options, out_dir: str) -> list[str]:
  images = _images(net.config, options, 'invariance')
  layers = analyses.check_layers(net, options.layers or _default_invariance_layers(net))
  result = analyses.invariance(net, images.pixels, images.labels, layers)
  cols = len(layers) + 1
  fig, axes = render.subplots(len(result), cols, figsize=(4 * cols, 3.2 * len(result)),
                              squeeze=False)
  for r, (kind, res) in enumerate(result.items()):
    x = res['values'] * (net.image_size if kind == 'translation' else 1)
    xlabel = dict(translation='vertical shift (pixels)', scale='scale',
                  rotation='rotation (°)')[kind]
    for c, layer in enumerate(layers):
      for i, d in enumerate(res['distance'][layer]):
        axes[r, c].plot(x, d, 'o-', markersize=3, label=images.names[i])
      axes[r, c].set_title(f'{layer}: distance to the original')
    for i, p in enumerate(res['probability']):
      axes[r, -1].plot(x, p, 'o-', markersize=3, label=images.names[i])
    axes[r, -1].set_title('P(true class)')
    axes[r, -1].set_ylim(0, 1)
    for ax in axes[r]:
      ax.set_xlabel(xlabel)
      ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  render.save_figure(fig, os.path.join(out_dir, 'invariance.png'))
  arrays = {f'{kind}/values': res['values'] for kind, res in result.items()}
  arrays.update({f'{kind}/probability': res['probability'] for kind, res in result.items()})
  arrays.update({
      f'{kind}/distance/{l}': d for kind, res in result.items() for l, d in res['distance'].items()
  })
  data = _npz(out_dir, 'invariance.npz', images=images.pixels, **arrays)
  truth = 'labels' if images.labels is not None else 'the class predicted for the original image'
  caption = (
      f'Invariance of {_where(net)} to vertical translation, scale and rotation (rows): '
      f'Euclidean distance of the {", ".join(layers)} features to those of the untransformed '
      f'image, and the probability of the true class ({truth}); one curve per image.')
  return _finish(out_dir, 'invariance', [('invariance.png', caption)], [data])


# --- occlusion ------------------------------------------------------------------------------------


def run_occlusion(net: Network, options: Options, out_dir: str) -> list[str]:
  images = _images(net.config, options, 'occlusion')
  layer = analyses.check_layers(net, options.layers or analyses.spatial_layers(net)[-1:])[0]
  s = net.image_size
  size = options.occluder_size or max(1, s // 5)
  stride = options.occluder_stride or max(1, s // 56)
  figures, arrays = [], {}
  for i, image in enumerate(images.pixels):
    label = None if images.labels is None else int(images.labels[i])
    res = analyses.occlusion(net, image, label, layer, size, stride)
    extent = (size / 2 - stride / 2, res['corners'][-1, 1] + size / 2 + stride / 2,
              res['corners'][-1, 0] + size / 2 + stride / 2, size / 2 - stride / 2)
    fig, axes = render.subplots(1, 5, figsize=(20, 4.4))
    shown = image.copy()
    shown[:size, :size] = np.asarray(net.config.input.mean_rgb, np.uint8)
    axes[0].imshow(shown)
    axes[0].set_title(f'{images.names[i]}\ntrue: {images.class_name(res["true_class"])}')
    for ax, key, title, cmap in ((axes[1], 'feature',
                                  f'total activation of {layer} map {res["map"]}', 'jet'),
                                 (axes[3], 'probability', 'P(true class)', 'jet')):
      ax.imshow(image)
      im = ax.imshow(res[key], cmap=cmap, alpha=0.6, extent=extent, interpolation='nearest')
      render.colorbar(fig, im, ax)
      ax.set_title(title)
    axes[2].imshow(render.projection_image(res['projection']))
    axes[2].set_title(f'projection of {layer} map {res["map"]}')
    classes = np.unique(res['predicted'])
    index = np.searchsorted(classes, res['predicted'])
    axes[4].imshow(image)
    cmap = matplotlib.colormaps['tab20'].resampled(max(len(classes), 2))
    axes[4].imshow(index, cmap=cmap, vmin=-0.5, vmax=max(len(classes), 2) - 0.5, alpha=0.6,
                   extent=extent, interpolation='nearest')
    handles = [patches.Rectangle((0, 0), 1, 1, color=cmap(j)) for j in range(len(classes))]
    axes[4].legend(handles, [images.class_name(int(c)) for c in classes], fontsize=7,
                   loc='upper left', bbox_to_anchor=(1, 1))
    axes[4].set_title('most probable class')
    for ax in axes:
      ax.axis('off')
    fig.tight_layout()
    name = f'occlusion_{i}.png'
    render.save_figure(fig, os.path.join(out_dir, name))
    figures.append((name, f'Occlusion of {images.names[i]} by a grey {size}x{size} square with '
                    f'stride {stride} (top-left: the square), {_where(net)}: each map value is '
                    'measured with the square centred there.'))
    arrays.update({f'{i}/{k}': np.asarray(v) for k, v in res.items()})
  data = _npz(out_dir, 'occlusion.npz', images=images.pixels, **arrays)
  return _finish(out_dir, 'occlusion', figures, [data])


# --- correspondence -------------------------------------------------------------------------------


def run_correspondence(net: Network, options: Options, out_dir: str) -> list[str]:
  images = _images(net.config, options, 'correspondence')
  names = list(analyses.all_layers(net))
  spatial = analyses.spatial_layers(net)
  layers = analyses.check_layers(net, options.layers or [spatial[-1], names[-2]])
  s = net.image_size
  parts = options.parts or {'centre': [s * 2 // 5, s * 2 // 5, s // 5, s // 5]}
  table = analyses.correspondence(net, images.pixels, parts, layers, options.random_draws,
                                  options.seed)
  lines = [
      '| part | ' + ' | '.join(f'{l} Δ part | {l} Δ random' for l in layers) + ' |',
      '|---|' + '---|---|' * len(layers)
  ]
  for part, row in table.items():
    lines.append(f'| {part} | ' + ' | '.join(
        f'{row[l]["part"]:.4f} | {row[l]["random_mean"]:.4f} ± {row[l]["random_std"]:.4f}'
        for l in layers) + ' |')
  storage.write_text(os.path.join(out_dir, 'correspondence.md'), '\n'.join(lines) + '\n')
  storage.write_text(
      os.path.join(out_dir, 'correspondence.json'),
      json.dumps(
          dict(images=images.names, parts={k: np.asarray(v).tolist() for k, v in parts.items()},
               table=table), indent=1))
  fig, axes = render.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.5), squeeze=False)
  for ax, layer in zip(axes[0], layers):
    x = np.arange(len(table))
    ax.bar(x - 0.2, [row[layer]['part'] for row in table.values()], 0.4, label='part')
    ax.bar(x + 0.2, [row[layer]['random_mean'] for row in table.values()], 0.4,
           yerr=[row[layer]['random_std'] for row in table.values()], label='random')
    ax.set_xticks(x, list(table))
    ax.set_title(f'{layer}: Δ (lower = more consistent)')
    ax.legend()
  fig.tight_layout()
  render.save_figure(fig, os.path.join(out_dir, 'correspondence.png'))
  caption = (f'Correspondence ({_where(net)}, {len(images.pixels)} images): '
             'Δ = Σ_{i≠j} Hamming(sign ε_i, sign ε_j) (fraction of features), ε the feature change '
             f'when the part is occluded, against random boxes of the same size '
             f'({options.random_draws} draws). Table: correspondence.md.')
  return _finish(out_dir, 'correspondence', [('correspondence.png', caption)],
                 ['correspondence.md', 'correspondence.json'])


# --- predictions (AlexNet's Fig. 4, left) --------------------------------------------------------

TOP_CLASSES = 5
PREDICTIONS_PER_FIGURE = 8


def _short(name: str, width: int = 22) -> str:
  """A class name for a label: its first synonym ('tabby, tabby cat' → 'tabby'), shortened."""
  name = name.split(',')[0].strip()
  return name if len(name) <= width else name[:width - 1] + '…'


def _class_names(config, images: Images) -> Images:
  """``images`` with the data set's class names where they carry none (photographs, files)."""
  if images.class_names:
    return images
  return dataclasses.replace(images, class_names=images_lib.dataset_class_names(config))


def _predictions_figure(images: Images, classes, probabilities, labels, cols: int = 4):
  n = len(classes)
  cols = min(cols, n)
  rows = -(-n // cols)
  fig = render.figure(figsize=(3.3 * cols, 4.9 * rows))
  grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1.7] * rows)
  for i in range(n):
    r, c = divmod(i, cols)
    ax = fig.add_subplot(grid[2 * r, c])
    ax.imshow(images.pixels[i])
    truth = '' if labels[i] < 0 else f'\n{_short(images.class_name(int(labels[i])), 30)}'
    ax.set_title(f'{images.names[i]}{truth}', fontsize=9)
    ax.axis('off')
    bars = fig.add_subplot(grid[2 * r + 1, c])
    y = np.arange(len(classes[i]))
    colours = ['tab:red' if k == labels[i] else 'tab:blue' for k in classes[i]]
    bars.barh(y, probabilities[i], color=colours)
    bars.set_yticks(y, [_short(images.class_name(int(k))) for k in classes[i]], fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.tick_params(axis='x', labelsize=7)
  return fig


def run_predictions(net: Network, options: Options, out_dir: str) -> list[str]:
  images = _class_names(net.config, _images(net.config, options, 'predictions'))
  result = analyses.top_predictions(net, images.pixels, TOP_CLASSES)
  classes, probabilities = result['classes'], result['probabilities']
  k = classes.shape[1]
  labels = (np.full(len(classes), -1) if images.labels is None else np.asarray(images.labels))
  truth = ''
  if images.labels is not None:
    top1 = int(np.sum(classes[:, 0] == labels))
    topk = int(np.sum(np.any(classes == labels[:, None], axis=1)))
    truth = (f' The true class (under each image) is red where it is among them: top-1 correct '
             f'{top1} of {len(labels)}, top-{k} {topk} of {len(labels)}.')
  figures = []
  for page, start in enumerate(range(0, len(classes), PREDICTIONS_PER_FIGURE)):
    part = slice(start, start + PREDICTIONS_PER_FIGURE)
    shown = dataclasses.replace(images, pixels=images.pixels[part], names=images.names[part])
    fig = _predictions_figure(shown, classes[part], probabilities[part], labels[part])
    name = f'predictions_{page}.png'
    render.save_figure(fig, os.path.join(out_dir, name))
    figures.append((name, f'The {k} most probable classes of {_where(net)} for each image '
                    f'({", ".join(shown.names)}), most probable on top, with their softmax '
                    f'probabilities.{truth}'))
  data = _npz(out_dir, 'predictions.npz', images=images.pixels, classes=classes,
              probabilities=probabilities, labels=labels, names=np.array(images.names))
  return _finish(out_dir, 'predictions', figures, [data])


# --- neighbours (AlexNet's Fig. 4, right) ---------------------------------------------------------

NEIGHBOURS = 6
QUERIES_PER_FIGURE = 10


def _training_count(config, train, options: Options) -> int:
  split = config.dataset.train_split
  count = len(train) if options.num_train is None else options.num_train
  if count > len(train):
    raise ConfigError(f'--num_train={count}: the {split} split holds {len(train)} images')
  if count < NEIGHBOURS:
    given = '' if options.num_train is None else f', --num_train={count}'
    raise ConfigError(f'neighbours shows the {NEIGHBOURS} nearest training images: it needs at '
                      f'least {NEIGHBOURS} (the {split} split holds {len(train)}{given})')
  return count


def _neighbours_figure(queries: Images, pixels, labels, distances):
  n, k = distances.shape
  fig = render.figure(figsize=(1.6 * (k + 1.2), 1.95 * n))
  grid = fig.add_gridspec(n, k + 2, width_ratios=[1, 0.2] + [1] * k)
  for q in range(n):
    label = -1 if queries.labels is None else int(queries.labels[q])
    ax = fig.add_subplot(grid[q, 0])
    ax.imshow(queries.pixels[q])
    truth = '' if label < 0 else f'\n{_short(queries.class_name(label), 16)}'
    ax.set_title(f'{queries.names[q]}{truth}', fontsize=8)
    ax.axis('off')
    for j in range(k):
      ax = fig.add_subplot(grid[q, j + 2])
      ax.imshow(pixels[q, j])
      same = label >= 0 and labels[q, j] == label
      ax.set_title(
          f'd = {distances[q, j]:.3g}\n{_short(queries.class_name(int(labels[q, j])), 16)}',
          fontsize=8, color='tab:green' if same else 'black')
      ax.axis('off')
  return fig


def run_neighbours(net: Network, options: Options, out_dir: str) -> list[str]:
  config = net.config
  layers = analyses.check_layers(net, options.layers or [analyses.feature_layer(net)])
  train = images_lib.open_split(config, config.dataset.train_split)
  count = _training_count(config, train, options)
  queries = _images(config, options, 'neighbours')
  if not queries.class_names:  # photographs, files: the names of the classes the network knows
    queries = dataclasses.replace(queries, class_names=tuple(train.class_names))
  devices = device_count()
  chunk = -(-options.chunk_size // devices) * devices
  stream = images_lib.chunks(config, train, count, chunk)
  found = analyses.nearest_neighbours(net, queries.pixels, stream, layers, NEIGHBOURS,
                                      total=-(-count // chunk))
  shapes = analyses.all_layers(net)
  figures, arrays = [], {}
  for layer, (indices, distances) in found.items():
    pixels, labels = images_lib.read_examples(config, train, indices.reshape(-1))
    pixels = pixels.reshape(*indices.shape, *pixels.shape[1:])
    labels = labels.reshape(indices.shape)
    shape = shapes[layer]
    vector = (f'{shape[-1]} maps averaged over their {shape[0]}x{shape[1]} positions'
              if len(shape) == 3 else f'{shape[-1]} values')
    searched = f'all {count}' if count == len(train) else f'the first {count}'
    pages = range(0, len(indices), QUERIES_PER_FIGURE)
    for page, start in enumerate(pages):
      part = slice(start, start + QUERIES_PER_FIGURE)
      shown = dataclasses.replace(queries, pixels=queries.pixels[part], names=queries.names[part],
                                  labels=None if queries.labels is None else queries.labels[part])
      name = f'neighbours_{layer}.png' if len(pages) == 1 else f'neighbours_{layer}_{page}.png'
      render.save_figure(_neighbours_figure(shown, pixels[part], labels[part], distances[part]),
                         os.path.join(out_dir, name))
      figures.append((name, f'{layer} ({vector}) of {_where(net)}: each query image (left; '
                      f'{", ".join(shown.names)}) and the {NEIGHBOURS} of {searched} images of '
                      f'the {config.dataset.train_split} split whose {layer} vectors are nearest '
                      'to its own in Euclidean distance, nearest first; above each its distance '
                      "and class (green: the query's class)."))
    arrays.update({
        f'{layer}/indices': indices, f'{layer}/distances': distances, f'{layer}/images': pixels,
        f'{layer}/labels': labels
    })
  query_labels = (np.full(len(queries.pixels), -1)
                  if queries.labels is None else np.asarray(queries.labels))
  data = _npz(out_dir, 'neighbours.npz', queries=queries.pixels, query_labels=query_labels,
              query_names=np.array(queries.names), num_train=np.int64(count), **arrays)
  return _finish(out_dir, 'neighbours', figures, [data])


# --- during training ------------------------------------------------------------------------------
