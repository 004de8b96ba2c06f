"""Krizhevsky's "one weird trick" (2014) on 8 devices: AlexNet's convolutional layers data-parallel
over all devices (each convolves 1/8 of the batch with a replicated copy of the conv weights), its
fc layers model-parallel over the same devices (each holds 1/8 of every fc layer's neurons and
computes them for the whole batch). The mesh's model axis carries both: the batch is split over it
up to conv5 and the neurons from fc6 on. The convolutions are the dense one-tower network.

  python -m alexnet_jax.main --config=configs/owt.py --workdir=runs/alexnet_owt \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
  # bytes per step against data and tower parallelism:
  python -m alexnet_jax.tools.comm_map --config=configs/owt.py --compare

More devices: --config.mesh.model=N --config.model.towers=N (N divides 1000 and 4096), and a data
axis on top (--config.mesh.data=D) for a hybrid per group of N devices.
"""

from alexnet_jax.configs import base_config


def get_config():
  c = base_config()
  c.model.update(towers=8, hybrid=True)
  c.mesh.data, c.mesh.model = 1, 8
  c.batch_size = 128
  return c
