"""The defaults every config file starts from: the paper's AlexNet recipe on ImageNet.

Config files in ``configs/`` call ``base_config()`` and change what differs; every field can also be
overridden on the command line (``--config.optim.learning_rate=0.02``).
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      name='alexnet', towers=2, num_classes=1000, image_size=227, width=1.0, lrn=True,
      lrn_alpha_divided_by_n=False, dropout=0.5, weight_std=0.01, hybrid=False))

  # data x model devices; data=-1 takes every device left. The model axis carries the towers.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=2))
  # On a machine with only a CPU, split it into this many XLA devices (0: leave it alone).
  c.emulate_cpu_devices = 0

  c.dataset = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split='train', eval_split='validation',
      # Only for the built-in set: how many images to generate, and their size.
      num_train=10000, num_val=2000, image_size=112, seed=0, max_bad_fraction=0.01))

  # The paper's input recipe (data.augment, steps.normalize): shorter side to 256 and the central
  # square (once at prepare time; at read time for TFDS sets), subtract the training set's mean
  # image (mean_image=False: mean_rgb instead), random crops (random_crop=False: central ones) and
  # their reflections, PCA colour shifts with alpha ~ N(0, pca_lighting_std) (0: off), and
  # evaluation on the 10 views ('ten') or the centre crop ('center'). Pixels are then divided by
  # std_rgb (use (1, 1, 1) for the paper's raw pixel scale). Batches travel as uint8 and are
  # normalised on the device; prefetch_batches wait there ahead of the step.
  c.input = ml_collections.ConfigDict(dict(
      mean_rgb=IMAGENET_MEAN_RGB, std_rgb=IMAGENET_STD_RGB, workers=4, prefetch_batches=2,
      resize_to=ml_collections.FieldReference(256, field_type=int), mean_image=True,
      random_crop=True, flip=True, pca_lighting_std=0.1, eval_views='ten',
      # How training input workers share the CPU with the steps (data.pipeline.WORKER_PRIORITIES):
      # 'normal', 'low' (nice 19) or 'idle' (SCHED_IDLE: only the cycles the compute leaves idle;
      # for CPU training, see configs/demo.py).
      worker_priority='low'))

  c.batch_size = 128          # global, over all devices and hosts
  c.eval_batch_size = 256
  c.num_epochs = 90
  c.compute_dtype = 'float32'

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=0.01, momentum=0.9, weight_decay=0.0005, decay_biases=True,
      schedule='plateau',                       # plateau | step | cosine
      plateau_factor=0.1, plateau_patience=1, plateau_threshold=1e-3, max_drops=3,
      step_epochs=(30, 60, 80), step_factor=0.1, warmup_epochs=0,
      # > 0: after every update, rescale each conv filter whose RMS exceeds this (ZFNet: 0.1).
      filter_rms_clip=0.0))

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  # keep_epochs: checkpoints kept for good at these epochs (Zeiler & Fergus's feature evolution).
  c.checkpoint = ml_collections.ConfigDict(dict(every_epochs=1, keep=3, keep_best=True,
                                                async_save=True,
                                                keep_epochs=(1, 2, 5, 10, 20, 30, 40, 64)))
  # Every N epochs (0: never) write the first-layer filters and a few deconvnet projections to
  # <workdir>/visualize/ and TensorBoard, to watch the features form.
  c.visualize = ml_collections.ConfigDict(dict(every_epochs=0, images=4))
  return c
