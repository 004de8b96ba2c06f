"""Every device of a GPU cluster or TPU pod: the batch over N/2 data shards, the towers over 2.

The global batch grows with the data axis (128 per tower pair, as in the paper) and the learning
rate with it (linear scaling); override both for other recipes. Launch one process per host
(see launch/).

  python -m alexnet_jax.main --config=configs/pod.py --workdir=gs://bucket/alexnet_pod
"""

from alexnet_jax.configs import base_config


def get_config():
  c = base_config()
  c.mesh.data, c.mesh.model = -1, 2
  c.batch_size = 128 * 8  # 8 data shards; set to 128 x (devices / 2)
  c.optim.learning_rate = 0.01 * 8
  c.optim.warmup_epochs = 2
  return c
