"""The papers' own numbers, which every result table puts beside ours (from the papers' tables, as
collected in the project's REFERENCE.md). Error rates and accuracies in %.
"""

from __future__ import annotations

# ILSVRC-2012 validation top-1 / top-5 error of single nets and ensembles (softmax averaged),
# by (model, number of networks): Krizhevsky et al. 2012 (AlexNet, 10 test views) and Zeiler &
# Fergus 2013 Table 2.
EVALUATION = {
    ('alexnet', 1): dict(row='AlexNet, 1 CNN', top1=40.7, top5=18.2),
    ('alexnet', 5): dict(row='AlexNet, 5 CNNs', top1=38.1, top5=16.4),
    ('zfnet', 1): dict(row='ZFNet, 1 net', top1=38.4, top5=16.5),
    ('zfnet', 5): dict(row='ZFNet, 5 nets', top1=36.7, top5=15.3),
}
EVALUATION_DATA = 'ILSVRC-2012 validation'

# The releases' own ILSVRC-2012 validation errors (%, centre crop), what an imported network
# (import_weights) should give on a user's ImageNet copy: Caffe's model zoo and torchvision's
# documentation (top-5 where given there).
PUBLISHED = {
    'bvlc_alexnet': dict(row="Caffe's bvlc_alexnet, centre crop", top1=42.9, top5=19.8),
    'alexnet': dict(row="torchvision's AlexNet, centre crop", top1=43.5, top5=20.9),
    'vgg16': dict(row="torchvision's VGG-16, centre crop", top1=28.41, top5=None),
    'resnet50': dict(row="torchvision's ResNet-50, centre crop", top1=23.87, top5=None),
}

# Zeiler & Fergus §5.2: layers 1-7 of the ImageNet-trained net kept fixed, a new softmax on top;
# mean per-class accuracy, mean ± std over splits, by training images per class.
TRANSFER = {
    'caltech101': dict(
        title='Caltech-101 (Zeiler & Fergus Table 4)',
        pretrained={15: (83.8, 0.5), 30: (86.5, 0.5)},
        scratch={15: (22.8, 1.5), 30: (46.5, 1.7)},
        best_previous={30: (81.4, None)},
    ),
    'caltech256': dict(
        title='Caltech-256 (Zeiler & Fergus Table 5)',
        pretrained={15: (65.7, 0.2), 30: (70.6, 0.2), 45: (72.7, 0.4), 60: (74.2, 0.3)},
        scratch={15: (9.0, 1.4), 30: (22.5, 0.7), 45: (31.2, 0.5), 60: (38.8, 1.4)},
        best_previous={15: (40.5, None), 30: (48.0, None), 45: (51.9, None), 60: (55.2, None)},
    ),
}
# PASCAL VOC 2012 (Table 6): mean average precision over the 20 classes.
VOC_MEAN_AP = dict(pretrained=79.0, best_previous=82.2)

# Table 7: a linear SVM or softmax on one layer's features; Caltech-101 at 30 per class,
# Caltech-256 at 60 per class (mean per-class accuracy).
PER_LAYER = {
    ('svm', 1): (44.8, 24.6),
    ('svm', 2): (66.2, 39.6),
    ('svm', 3): (72.3, 46.0),
    ('svm', 4): (76.6, 51.3),
    ('svm', 5): (86.2, 65.6),
    ('svm', 7): (85.5, 71.7),
    ('softmax', 5): (82.9, 65.7),
    ('softmax', 7): (85.4, 72.6),
}
PER_LAYER_DATA = ('caltech101', 'caltech256')


def evaluation_row(model: str, networks: int, release: str | None = None) -> dict | None:
  """The published figures for ``networks`` networks of ``model``, or for the imported
  ``release`` (``PUBLISHED``; one network), or None."""
  if release is not None:
    return PUBLISHED.get(release) if networks == 1 else None
  return EVALUATION.get((model, networks))


def transfer_table(dataset: str) -> dict | None:
  """The paper's table for a transfer data set, by its TFDS or prepared name (``caltech101``,
  ``caltech_101``, ``caltech256``, …)."""
  key = dataset.lower().replace('_', '').replace('-', '').split('/')[0]
  return TRANSFER.get(key)


def layer_number(layer: str) -> int | None:
  """``conv3`` → 3, ``fc7`` → 7: the paper's layer numbering of AlexNet / ZFNet."""
  digits = ''.join(ch for ch in layer if ch.isdigit())
  return int(digits) if digits and layer.startswith(('conv', 'fc')) else None
