"""Zeiler & Fergus's ZFNet on ImageNet: one dense tower, 224 crops, weights N(0, 0.01) and biases 0,
batch 128, learning rate 0.01 (÷10 on plateau), momentum 0.9, feature-scale clipping of the conv
filters at RMS 0.1, 70 epochs. Every device of the machine splits the batch (data parallel).

  python -m alexnet_jax.main --config=configs/zfnet.py --workdir=runs/zfnet \
      --config.dataset.data_dir=/path/to/tensorflow_datasets

The paper's ablations: --config.model.remove='(3,4)' (or '(7,)', '(6,7)', '(3,4,6,7)');
--config.model.fc_width=2048 (or 8192); --config.model.conv_widths='(512,1024,512)'.
"""

from alexnet_jax.configs import paper_recipe


def get_config():
  return paper_recipe('zfnet')
