"""Input pipeline throughput:

  python -m alexnet_jax.tools.bench_input --data=NAME --data_dir=DIR --workers=N


Measures, in one run and interleaved (so drift on a noisy machine hits all alike), training
images/s of:
  0. with ``--data``, the decoders compared (``--compare_decoders``): the grain pipeline on the
     prepared set as it was before the fast JPEG path (every record decoded by PIL, the reflected
     window copied in numpy's one pass, the windows stacked) and as it is (libjpeg-turbo's own
     interface, the window copied channel by channel straight into the batch), each with 1 and 2
     worker processes (``--compare_workers``; before, 4 read threads in each, now
     ``pipeline.default_read_threads``), and with ``--raw_data`` the same images prepared
     with ``prepare --codec=raw`` (no decoding), these runs interleaved among themselves:
     images/s, images per CPU-second of the input's processes (the main one and its workers:
     what one host core delivers, however busy the machine is with other work) and the ratio of
     each later path to the first per core, and how each scales from the first worker count to
     the last;
  1. the grain pipeline on a prepared set (``--data``): decode the stored 256² JPEG, random crop,
     reflection and PCA coefficients, uint8 batches;
  2. with ``--folder`` (the original JPEG folder the set was prepared from): the same pipeline
     reading the original files directly (reduced-scale JPEG decoding, rescale to 256, central
     square, crop, flip), and PyTorch's ``DataLoader`` over torchvision's ``ImageFolder`` with
     ``Resize(256), CenterCrop(256), RandomCrop(crop), RandomHorizontalFlip()`` on the same files
     with the same worker count (the ``bench`` extra; where torchvision cannot be imported, the
     same PIL transforms written out in a torch ``Dataset``, and the output says so).
With ``--overlap --config=configs/demo.py``: training images/s of the configured step fed by the
real pipeline (device prefetch included) ÷ fed one fixed in-memory batch; 1.0 means the devices
never wait for the host.

``--make_folder=DIR --images=N`` writes an ImageNet-like folder (10 classes of JPEG crops of
photos, 300-600 px sides) to benchmark with, then ``python -m alexnet_jax.tools.prepare`` prepares
it. Timing only — the figures never gate a test.
"""

from __future__ import annotations

import copy
import os
import random
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from alexnet_jax import cli, configs, distributed, program
from alexnet_jax.data import catalog, inputs, pipeline, records, sources

# ---------------------------------------------------------------------------
# A folder to benchmark with
# ---------------------------------------------------------------------------


def make_folder(directory: str, images: int, *, classes: int = 10, seed: int = 0) -> None:
  """ImageNet-like JPEGs: random crops of photos, rescaled so sides are 300-600 px, quality 90."""
  from skimage import data  # noqa: PLC0415  (optional: the test extra)
  photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
  rng = np.random.default_rng(seed)
  for c in range(classes):
    os.makedirs(os.path.join(directory, f'class_{c:03d}'), exist_ok=True)
  for i in range(images):
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    scale = rng.uniform(300, 600) / max(ch, cw)
    img = Image.fromarray(photo[top:top + ch, left:left + cw])
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    img.save(os.path.join(directory, f'class_{i % classes:03d}', f'{i:06d}.jpg'), quality=90)


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


def time_iterator(make_iter, batch_size: int, batches: int, warmup: int) -> float:
  """images/s of an iterator after `warmup` batches (worker start-up is not throughput)."""
  it = make_iter()
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - start)
  finally:
    close = getattr(it, 'close', None) or getattr(it, '_shutdown_workers', None)
    if close is not None:
      close()


def _tree_cpu_seconds() -> float | None:
  """CPU seconds (user + system) so far of this process and of every live process below it (the
  input's worker processes); None where there is no Linux /proc to read them from."""
  if not os.path.isdir('/proc/self/task'):
    return None
  parent, ticks = {}, {}
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat', 'rb') as f:
        stat = f.read()
    except OSError:  # gone meanwhile
      continue
    fields = stat[stat.rindex(b')') + 2:].split()  # after the command, which may hold spaces
    parent[int(name)], ticks[int(name)] = int(fields[1]), int(fields[11]) + int(fields[12])
  tree = {os.getpid()}
  while True:
    below = {pid for pid, ppid in parent.items() if ppid in tree} - tree
    if not below:
      break
    tree |= below
  return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf('SC_CLK_TCK')


def _time_with_cpu(make_iter, batch_size: int, batches: int,
                   warmup: int) -> tuple[float, float | None]:
  """(images/s, images per CPU-second of the process tree) of an iterator after ``warmup``
  batches."""
  it = make_iter()
  try:
    for _ in range(warmup):
      next(it)
    cpu, start = _tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      next(it)
    wall, cpu_end = time.perf_counter() - start, _tree_cpu_seconds()
  finally:
    close = getattr(it, 'close', None)
    if close is not None:
      close()
  images = batches * batch_size
  per_cpu = images / (cpu_end - cpu) if cpu is not None and cpu_end > cpu else None
  return images / wall, per_cpu


def grain_iterator(source, *, batch_size: int, crop: int, workers: int, seed: int = 0,
                   augment_cls: type[pipeline.TrainAugment] = pipeline.TrainAugment,
                   read_threads: int | None = None):
  return lambda: iter(
      pipeline.train_dataset(source, global_batch_size=batch_size, crop_size=crop, seed=seed,
                             workers=workers, resize_to=256, pca_std=0.1, augment_cls=augment_cls,
                             read_threads=read_threads))


class PreviousAugment(pipeline.TrainAugment):
  """TrainAugment with the copies it had before: each window copied per example by numpy's single
  copy of the reflected view (which moves one 3-byte pixel per inner loop), then stacked."""

  cut_in_batch = False

  def crop(self, image: np.ndarray, top: int, left: int, flipped: bool,
           out: np.ndarray | None = None) -> np.ndarray:
    window = image[top:top + self.crop_size, left:left + self.crop_size]
    window = np.ascontiguousarray(window[:, ::-1] if flipped else window)
    if out is not None:
      out[...] = window
      return out
    return window


# The prepared set's training input before and after the fast JPEG path: name → (the source's
# fast_jpeg, the TrainAugment class, the read threads per input process: 4 before, now
# pipeline.default_read_threads).
DECODER_PATHS = {
    'before: PIL': (False, PreviousAugment, 4),
    'now: libjpeg-turbo': (True, pipeline.TrainAugment, None),
}

RAW_PATH = 'raw pixels'  # a set prepared with --codec=raw: no decoding at all


def measure_decoders(*, data: str, data_dir: str | None, worker_counts=(1, 2), batch_size: int,
                     crop: int, batches: int, warmup: int, repeats: int,
                     raw_data: str | None = None) -> dict:
  """The prepared set's training input along each of ``DECODER_PATHS`` (and, with ``raw_data``,
  a set of the same images prepared with ``--codec=raw``: ``RAW_PATH``) with each worker count,
  interleaved, the best of ``repeats`` rounds: images/s, images per CPU-second (``per_core``),
  each later path's per-core figure over the first's (``ratios[path]``, per worker count;
  ``ratio`` is the fast decoder's) and each path's images/s with the last worker count over the
  first (``scaling``). At least two batches a worker are let pass untimed: the workers take
  turns, and the start-up of one that has not delivered yet is no throughput."""
  source = catalog.open_source(configs.dataset_config(name=data, data_dir=data_dir), 'train',
                               min_side=256)
  paths = {}
  for path, (fast, augment_cls, threads) in DECODER_PATHS.items():
    variant = copy.copy(source)
    variant.fast_jpeg = fast
    paths[path] = (variant, augment_cls, threads)
  if raw_data is not None:
    raw = catalog.open_source(configs.dataset_config(name=raw_data, data_dir=data_dir), 'train',
                              min_side=256)
    paths[RAW_PATH] = (raw, pipeline.TrainAugment, None)
  runs = {}
  for workers in worker_counts:
    for path, (variant, augment_cls, threads) in paths.items():
      runs[path,
           workers] = grain_iterator(variant, batch_size=batch_size, crop=crop, workers=workers,
                                     augment_cls=augment_cls, read_threads=threads)
  ips = {k: 0.0 for k in runs}
  per_core: dict = {k: None for k in runs}
  for _ in range(repeats):
    for key, make in runs.items():
      wall, per_cpu = _time_with_cpu(make, batch_size, batches, max(warmup, 2 * key[1]))
      ips[key] = max(ips[key], wall)
      if per_cpu is not None:
        per_core[key] = max(per_core[key] or 0.0, per_cpu)
  first = list(paths)[0]
  ratios = {
      path: {
          w: per_core[path, w] / per_core[first, w]
          for w in worker_counts
          if per_core[path, w] and per_core[first, w]
      } for path in list(paths)[1:]
  }
  scaling = {path: ips[path, worker_counts[-1]] / ips[path, worker_counts[0]] for path in paths
            } if len(worker_counts) > 1 else {}
  return dict(batch_size=batch_size, crop=crop, worker_counts=tuple(worker_counts),
              paths=tuple(paths), images_per_second=ips, per_core=per_core,
              ratio=ratios[list(DECODER_PATHS)[-1]], ratios=ratios, scaling=scaling,
              fast_decoder=records.simplejpeg is not None)


class _PilFolder:
  """torchvision's ImageFolder + Resize(256), CenterCrop(256), RandomCrop, RandomHorizontalFlip,
  PILToTensor, written out with PIL (for machines where torchvision cannot be imported)."""

  def __init__(self, root: str, crop: int):
    _, self.files = sources.list_class_folder(root)
    self.root, self.crop = root, crop

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    import torch  # noqa: PLC0415  (optional: the bench extra)
    path, label = self.files[i]
    with open(os.path.join(self.root, path), 'rb') as f:
      img = Image.open(f).convert('RGB')
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, int(w * s)), max(256, int(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - 256) / 2)), int(round((h - 256) / 2))
    img = img.crop((left, top, left + 256, top + 256))
    t, l = random.randint(0, 256 - self.crop), random.randint(0, 256 - self.crop)
    img = img.crop((l, t, l + self.crop, t + self.crop))
    if random.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


def torch_iterator(folder: str, *, batch_size: int, crop: int, workers: int):
  """(make_iter, what) for torch's DataLoader over the folder."""
  import torch  # noqa: PLC0415  (optional: the bench extra)
  try:
    from torchvision import datasets, transforms  # noqa: PLC0415  (optional dependency)
    dataset = datasets.ImageFolder(
        folder,
        transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(256),
            transforms.RandomCrop(crop),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor()
        ]))
    what = 'torchvision ImageFolder + DataLoader'
  except Exception as e:  # pylint: disable=broad-except  (ImportError, or a wheel that fails to load)
    dataset = _PilFolder(folder, crop)
    what = (f'torch DataLoader + the same PIL transforms (torchvision unavailable: '
            f'{type(e).__name__})')
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=False)

  def make_iter():
    # Endless, like the training pipeline: start the next epoch when one ends.
    def endless():
      while True:
        yield from loader

    return endless()

  return make_iter, what


def measure_pipelines(*, data: str | None, data_dir: str | None, folder: str | None, workers: int,
                      batch_size: int, crop: int, batches: int, warmup: int, repeats: int,
                      use_torch: bool) -> dict:
  runs = {}
  if data:
    cfg = configs.dataset_config(name=data, data_dir=data_dir)
    runs['grain, prepared set'] = grain_iterator(catalog.open_source(cfg, 'train', min_side=256),
                                                 batch_size=batch_size, crop=crop, workers=workers)
  labels = {}
  if folder:
    runs['grain, original JPEGs'] = grain_iterator(sources.FolderImageSource(folder, min_side=256),
                                                   batch_size=batch_size, crop=crop,
                                                   workers=workers)
    if use_torch:
      try:
        make, what = torch_iterator(folder, batch_size=batch_size, crop=crop, workers=workers)
        runs['torch, original JPEGs'] = make
        labels['torch, original JPEGs'] = what
      except ImportError:
        pass
  if not runs:
    raise app.UsageError('give --data (a prepared set) and/or --folder (a JPEG folder)')
  best = {k: 0.0 for k in runs}
  for _ in range(repeats):
    for name, make in runs.items():
      best[name] = max(best[name], time_iterator(make, batch_size, batches, warmup))
  result = dict(workers=workers, batch_size=batch_size, crop=crop, images_per_second=best,
                torch_baseline=labels.get('torch, original JPEGs'))
  base = best.get('torch, original JPEGs')
  if base:
    result['ratios_vs_torch'] = {
        k: v / base for k, v in best.items() if k != 'torch, original JPEGs'
    }
  return result


# ---------------------------------------------------------------------------
# Overlap: real pipeline vs a fixed in-memory batch, through the real training step
# ---------------------------------------------------------------------------


def measure_overlap(config, *, steps: int, warmup: int, repeats: int,
                    data: inputs.Inputs | None = None) -> dict:
  """``data``: the config's inputs where the caller has opened them already."""
  data = data or inputs.open_inputs(config)
  prog = program.build_program(config, steps_per_epoch=100, input_stats=data.stats)

  def make_iter():
    return inputs.train_batches(config, data.train_source, prog.mesh)

  state = prog.init_state()
  it = make_iter()
  fixed = next(it)
  it.close()

  def run(next_batch, state):
    for _ in range(warmup):
      state, m = prog.train_step(state, next_batch())
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      state, m = prog.train_step(state, next_batch())
    jax.block_until_ready(m)
    return state, steps * config.batch_size / (time.perf_counter() - start)

  fixed_ips, real_ips = 0.0, 0.0
  for _ in range(repeats):
    state, ips = run(lambda: fixed, state)
    fixed_ips = max(fixed_ips, ips)
    it = make_iter()
    try:
      state, ips = run(lambda: next(it), state)
    finally:
      it.close()
    real_ips = max(real_ips, ips)
  return dict(fixed_batch_images_per_second=fixed_ips, pipeline_images_per_second=real_ips,
              overlap=real_ips / fixed_ips, batch_size=config.batch_size,
              workers=config.input.workers, platform=jax.default_backend(),
              mesh=dict(prog.mesh.shape))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if f.make_folder:
    make_folder(f.make_folder, f.images)
    print(f'wrote {f.images} JPEGs in 10 classes to {f.make_folder}; prepare them with '
          f'python -m alexnet_jax.tools.prepare --source={f.make_folder} --name=NAME')
    return
  if f.overlap:
    config = cli.config_or_usage_error()
    config.emulate_cpu_devices = max(config.emulate_cpu_devices,
                                     max(1, config.mesh.data) * config.mesh.model)
    distributed.initialize(config)
    r = measure_overlap(config, steps=f.steps, warmup=2, repeats=f.repeats)
    print(f'overlap, {r["platform"]}, mesh {r["mesh"]}, batch {r["batch_size"]}, '
          f'{r["workers"]} workers:')
    print(f'  step fed one fixed in-memory batch {r["fixed_batch_images_per_second"]:9.1f} img/s')
    print(f'  step fed by the input pipeline     {r["pipeline_images_per_second"]:9.1f} img/s   '
          f'ratio {r["overlap"]:.3f}')
    return
  if f.data and f.compare_decoders:
    try:
      counts = [int(w) for w in f.compare_workers]
    except ValueError:
      counts = []
    if not counts or min(counts) < 0:
      raise app.UsageError(f'--compare_workers={",".join(f.compare_workers)}: give worker counts '
                           '>= 0 (0: in this process), e.g. 1,2')
    d = measure_decoders(data=f.data, data_dir=f.data_dir, worker_counts=counts,
                         batch_size=f.batch_size, crop=f.crop, batches=f.batches, warmup=f.warmup,
                         repeats=f.repeats, raw_data=f.raw_data)
    print(f'prepared set {f.data}, batch {d["batch_size"]}, {d["crop"]}² crops, the decoders '
          f'compared ({os.cpu_count()} cores; per core: images per CPU-second of the input '
          'processes):')
    if not d['fast_decoder']:
      print('  (simplejpeg is not installed: the "now" path decodes with PIL too)')
    for workers in d['worker_counts']:
      for path in d['paths']:
        core = d['per_core'][path, workers]
        shown = f'{core:9.1f}' if core is not None else '        -'
        print(f'  {workers} workers, {path:20s} {d["images_per_second"][path, workers]:9.1f} '
              f'img/s {shown} img/s per core')
      for path, ratio in d['ratios'].items():
        if workers in ratio:
          print(f'  {workers} workers: {path} / {d["paths"][0]}, per core {ratio[workers]:.2f}x')
    for path, x in d['scaling'].items():
      print(f'  {path}: {d["worker_counts"][-1]} workers / {d["worker_counts"][0]}: {x:.2f}x img/s')
  r = measure_pipelines(data=f.data, data_dir=f.data_dir, folder=f.folder, workers=f.workers,
                        batch_size=f.batch_size, crop=f.crop, batches=f.batches, warmup=f.warmup,
                        repeats=f.repeats, use_torch=f.torch)
  print(f'training input, batch {r["batch_size"]}, {r["crop"]}² crops, {r["workers"]} workers '
        f'({os.cpu_count()} cores):')
  for name, ips in r['images_per_second'].items():
    ratio = r.get('ratios_vs_torch', {}).get(name)
    print(f'  {name:24s} {ips:9.1f} img/s' + (f'   vs torch {ratio:.2f}x' if ratio else ''))
  if r['torch_baseline']:
    print(f'  (torch baseline: {r["torch_baseline"]})')


def _define_flags() -> None:
  cli.define_tool_flags()
  cli.define_huge_pages_flag()
  flags.DEFINE_string('data', None, 'A prepared set (or any set open_source knows).')
  flags.DEFINE_string('data_dir', None, "Where prepared sets live (default: TFDS's).")
  flags.DEFINE_string('folder', None, 'The original JPEG folder (class subfolders).')
  flags.DEFINE_string(
      'raw_data', None, 'With --data: the same images prepared with --codec=raw, timed beside '
      'the decoders (no decoding at all).')
  # Bounds: absl refuses a value outside them in one line (cli._parse_flags).
  flags.DEFINE_integer('workers', 2, 'Worker processes, for grain and torch alike.', lower_bound=0)
  flags.DEFINE_integer('batch_size', 128, 'Batch size.', lower_bound=1)
  flags.DEFINE_integer('crop', 227, 'Training crop side.', lower_bound=1)
  flags.DEFINE_integer('batches', 20, 'Timed batches per measurement.', lower_bound=1)
  flags.DEFINE_integer('warmup', 3, 'Untimed batches first (worker start-up).', lower_bound=0)
  flags.DEFINE_integer('repeats', 2, 'Interleaved rounds; the best of each is kept.', lower_bound=1)
  flags.DEFINE_bool('torch', True, "Also time torch's DataLoader on --folder when installed.")
  flags.DEFINE_bool(
      'compare_decoders', True, 'With --data: time the prepared set before and '
      'after the fast JPEG path, per core, with each of --compare_workers.')
  flags.DEFINE_list('compare_workers', ['1', '2'], 'Worker counts for --compare_decoders (0: '
                    'the pipeline in this process).')
  flags.DEFINE_bool('overlap', False, 'Measure the step fed by the pipeline vs a fixed batch '
                    '(needs --config).')
  flags.DEFINE_integer('steps', 20, 'Timed training steps per overlap measurement.', lower_bound=1)
  flags.DEFINE_string('make_folder', None, 'Write a benchmark JPEG folder here and exit.')
  flags.DEFINE_integer('images', 2000, 'Images for --make_folder.', lower_bound=1)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
