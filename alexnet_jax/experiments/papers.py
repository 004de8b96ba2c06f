"""The built-in suites: the papers' comparisons, each row with the paper's figures beside it.

Figures are error rates in % on ILSVRC-2012 validation, from the papers' own tables as
``../shared/REFERENCE.md`` collects them (AlexNet's ablations, Zeiler & Fergus's Table 3), and, for
VGG, GoogLeNet and ResNet, from the papers themselves (cited per suite; REFERENCE.md does not list
them). Where a paper gives only a difference to its reference row, the row holds that difference
(``d_top1``, ``d_top5``); where it gives none, its claim in words.

``--scale=paper`` trains each paper's own recipe (``configs.paper_recipe``) on ImageNet.
``--scale=demo`` trains the same variants scaled down on the built-in shapes data set (generated
on first use, no download): 10 classes, small images, narrow layers, a few epochs, a cosine
schedule, centre-crop evaluation; a run takes a minute or two on a 2-core CPU, and the report says
it came from there. What a demo scale can show is the direction and size of an effect on that data,
not the papers' numbers.
"""

from __future__ import annotations

from alexnet_jax import configs, paper
from alexnet_jax.experiments.suite import Suite, Variant

# The built-in data set of the demo scale, the same for every suite; each suite's images are cut
# to its networks' smallest comfortable input by random crops (centre crops for evaluation).
DEMO_TRAIN, DEMO_VAL = 4000, 1000


def demo_data(image_size: int) -> str:
  return (f'built-in shapes ({DEMO_TRAIN:,} training / {DEMO_VAL:,} validation images of '
          f'{image_size} px, 10 classes), scaled-down networks, a 2-core CPU')


PAPER_DATA = "ILSVRC-2012 (train / validation), the papers' networks and recipes"


def demo_base(model, *, image_size: int, crop: int, epochs: int, batch: int = 64,
              learning_rate: float = 0.02, towers: int = 1, pca: float = 0.0):
  """The demo scale's base config: ``model`` (a ``config.model`` section, its class count and
  input size set here) on the built-in data set of ``image_size`` px, cut to ``crop``; for suite
  files too."""
  c = configs.base_config()
  c.model = model
  c.model.update(num_classes=10, image_size=crop)
  c.emulate_cpu_devices = 2
  c.mesh.data, c.mesh.model = (1, 2) if towers == 2 else (2, 1)
  c.dataset.update(name='builtin_shapes', num_train=DEMO_TRAIN, num_val=DEMO_VAL,
                   image_size=image_size)
  # The paper's input recipe (mean image, random crops, reflections, PCA lighting where the suite
  # compares it) at a unit-variance pixel scale, which the He initialisation of the narrow
  # layers needs; centre-crop evaluation (ten views would cost ten times as much).
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=1, resize_to=None,
                 mean_image=True, pca_lighting_std=pca, eval_views='center', worker_priority='idle')
  c.batch_size = batch
  c.eval_batch_size = 500
  c.num_epochs = epochs
  c.optim.update(learning_rate=learning_rate, schedule='cosine', warmup_epochs=1)
  # One logged window per epoch (the report's training curves), validation at the end only (the
  # cosine schedule needs none before), a checkpoint every epoch to resume from.
  c.log_every_steps = 10**6
  c.eval_every_epochs = epochs
  c.checkpoint.update(every_epochs=1, keep=1, keep_best=False, keep_epochs=())
  return c


def alexnet_ablations() -> Suite:
  ref = paper.EVALUATION['alexnet', 1]
  return Suite(
      name='alexnet', title="AlexNet's ingredients, one at a time",
      source='Krizhevsky, Sutskever & Hinton 2012, §3 and §4 (ILSVRC-2012 validation, 10 views)',
      reference='two_towers', variants=(
          Variant(
              'two_towers', "the paper's network: two towers, ReLU, LRN, overlapping pools, "
              'PCA lighting, dropout', paper=dict(top1=ref['top1'], top5=ref['top5'])),
          Variant(
              'tanh', 'tanh units instead of ReLUs', {'model.activation': 'tanh'},
              claim='ReLUs reach 25 % training error six times faster (in epochs) than tanh '
              'units (Fig. 1: a four-layer net on CIFAR-10)'),
          Variant('no_lrn', 'without response normalisation', {'model.lrn': False},
                  paper=dict(d_top1=1.4, d_top5=1.2)),
          Variant('plain_pooling', 'non-overlapping pools (2x2, stride 2; same map sizes)',
                  {'model.pool_window': 2}, paper=dict(d_top1=0.4, d_top5=0.3)),
          Variant('no_pca_lighting', 'without the PCA colour shifts',
                  {'input.pca_lighting_std': 0.0}, paper=dict(d_top1=1.0),
                  claim='PCA lighting reduces top-1 error by over 1 %'),
          Variant(
              'no_dropout', 'without dropout', {'model.dropout': 0.0},
              claim='without dropout the network overfits substantially (lower training, '
              'higher validation error); dropout roughly doubles the iterations to converge'),
          Variant('one_tower_half', 'one tower with half the kernels of conv1-4 (conv5, fc as two '
                  'towers)',
                  {'model.towers': 1, 'model.variant': 'one_gpu', 'mesh.data': -1, 'mesh.model': 1},
                  paper=dict(d_top1=1.7, d_top5=1.2),
                  claim='two towers beat it by 1.7 / 1.2 and take slightly less time to train'),
      ), bases=dict(
          demo=lambda: demo_base(configs.model_config('alexnet', width=0.25, init='he'), image_size=
                                 76, crop=67, epochs=8, towers=2, pca=0.1),
          paper=lambda: configs.paper_recipe('alexnet')), data=dict(demo=demo_data(76),
                                                                    paper=PAPER_DATA),
      threshold=dict(paper=0.25, demo=0.5), ensemble=dict(networks=5, **paper.EVALUATION['alexnet',
                                                                                         5]))


# Zeiler & Fergus Table 3: (train top-1, val top-1, val top-5).
ZF_TABLE_3 = {
    'alexnet': (35.1, 40.5, 18.1),
    'alexnet_remove_3_4': (41.8, 45.4, 22.1),
    'alexnet_remove_7': (27.4, 40.0, 18.4),
    'alexnet_remove_6_7': (27.4, 44.8, 22.4),
    'alexnet_remove_3_4_6_7': (71.1, 71.3, 50.1),
    'alexnet_fc_2048': (40.3, 41.7, 18.8),
    'alexnet_fc_8192': (26.8, 40.0, 18.1),
    'zfnet': (33.1, 38.4, 16.5),
    'zfnet_fc_2048': (38.2, 40.2, 17.6),
    'zfnet_fc_8192': (22.0, 38.8, 17.0),
    'zfnet_conv_512_1024_512': (18.8, 37.5, 16.0),
    'zfnet_fc_8192_conv_512_1024_512': (10.0, 38.3, 16.9),
}


def zfnet_table3() -> Suite:
  one_tower_alexnet = {'model.name': 'alexnet', 'model.towers': 1}
  rows = [
      ('alexnet', 'their one-tower replication of AlexNet', one_tower_alexnet),
      ('alexnet_remove_3_4', 'AlexNet without conv3, conv4',
       {**one_tower_alexnet, 'model.remove': (3, 4)}),
      ('alexnet_remove_7', 'AlexNet without fc7', {**one_tower_alexnet, 'model.remove': (7,)}),
      ('alexnet_remove_6_7', 'AlexNet without fc6, fc7',
       {**one_tower_alexnet, 'model.remove': (6, 7)}),
      ('alexnet_remove_3_4_6_7', 'AlexNet without conv3, conv4, fc6, fc7',
       {**one_tower_alexnet, 'model.remove': (3, 4, 6, 7)}),
      ('alexnet_fc_2048', 'AlexNet, fc6 and fc7 at 2048 units',
       {**one_tower_alexnet, 'model.fc_width': 2048}),
      ('alexnet_fc_8192', 'AlexNet, fc6 and fc7 at 8192 units',
       {**one_tower_alexnet, 'model.fc_width': 8192}),
      ('zfnet', 'ZFNet (their Fig. 3)', {}),
      ('zfnet_fc_2048', 'ZFNet, fc6 and fc7 at 2048 units', {'model.fc_width': 2048}),
      ('zfnet_fc_8192', 'ZFNet, fc6 and fc7 at 8192 units', {'model.fc_width': 8192}),
      ('zfnet_conv_512_1024_512', 'ZFNet, conv3-5 at 512, 1024, 512 maps',
       {'model.conv_widths': (512, 1024, 512)}),
      ('zfnet_fc_8192_conv_512_1024_512', 'ZFNet, fc at 8192 and conv3-5 at 512, 1024, 512',
       {'model.fc_width': 8192, 'model.conv_widths': (512, 1024, 512)}),
  ]
  variants = tuple(
      Variant(name, text, overrides, paper=dict(zip(('train', 'top1', 'top5'), ZF_TABLE_3[name])))
      for name, text, overrides in rows)
  return Suite(
      name='zfnet', title='Zeiler & Fergus Table 3: layers removed, widened, narrowed',
      source='Zeiler & Fergus 2013, Table 3 (ILSVRC-2012; train top-1, val top-1, val top-5)',
      reference='alexnet', variants=variants,
      bases=dict(demo=_zfnet_demo, paper=lambda: configs.paper_recipe('zfnet')),
      data=dict(demo=demo_data(76), paper=PAPER_DATA))


def _zfnet_demo():
  c = demo_base(configs.model_config('zfnet', width=0.25, init='he'), image_size=76, crop=67,
                epochs=8)
  # The paper's filter clipping at RMS 0.1 is for its N(0, 0.01) start; the He start of these
  # narrow layers begins above it, so the demo leaves it off.
  c.optim.filter_rms_clip = 0.0
  return c


# Simonyan & Zisserman 2014, Table 3: single test scale, training scale S = 256 (val top-1, top-5).
VGG_TABLE_3 = {
    'A': (29.6, 10.4),
    'A-LRN': (29.7, 10.5),
    'B': (28.7, 9.9),
    'C': (28.1, 9.4),
    'D': (27.0, 8.8),
    'E': (27.3, 9.0),
}


def vgg_depth() -> Suite:
  words = {
      'A': '11 weight layers', 'A-LRN': 'A with LRN after its first layer', 'B': '13 weight layers',
      'C': '16 weight layers, 1x1 convolutions ending stages 3-5',
      'D': '16 weight layers, all 3x3 (VGG-16)', 'E': '19 weight layers (VGG-19)'
  }
  variants = tuple(
      Variant(name, words[name], {'model.variant': name}, paper=dict(top1=top1, top5=top5))
      for name, (top1, top5) in VGG_TABLE_3.items())
  return Suite(
      name='vgg', title="VGG's depth table: configurations A to E",
      source='Simonyan & Zisserman 2014, Table 3 (single scale, S = 256, ILSVRC-2012 validation)',
      reference='A', variants=variants, bases=dict(
          demo=lambda: demo_base(configs.model_config('vgg', width=0.125, init='glorot'), image_size
                                 =36, crop=32, epochs=8, learning_rate=0.02),
          paper=lambda: configs.paper_recipe('vgg')), data=dict(demo=demo_data(36),
                                                                paper=PAPER_DATA))


def googlenet_heads() -> Suite:
  return Suite(
      name='googlenet', title='GoogLeNet with and without its auxiliary classifiers',
      source='Szegedy et al. 2014, §5 and Table 5 (1 model, 1 crop: top-5 10.07 %)',
      reference='aux_heads', variants=(
          Variant('aux_heads', 'two auxiliary classifiers (after 4a and 4d), loss weight 0.3',
                  paper=dict(top5=10.07)),
          Variant(
              'no_aux_heads', 'without the auxiliary classifiers', {'model.aux_heads': False},
              claim="later control experiments: the auxiliary networks' effect is minor "
              '(around 0.5 %), and one of them gives the same effect'),
      ), bases=dict(
          demo=lambda: demo_base(configs.model_config('googlenet', width=0.25), image_size=88, crop=
                                 80, epochs=6, learning_rate=0.02),
          paper=lambda: configs.paper_recipe('googlenet')), data=dict(demo=demo_data(88),
                                                                      paper=PAPER_DATA))


# He et al. 2015, Table 2: top-1 error, 10-crop testing, ILSVRC-2012 validation.
RESNET_TABLE_2 = {'plain_18': 27.94, 'plain_34': 28.54, 'resnet_18': 27.88, 'resnet_34': 25.03}


def resnet_plain() -> Suite:
  rows = (
      ('plain_18', '18 layers without shortcuts', {'model.depth': 18, 'model.residual': False}),
      ('plain_34', '34 layers without shortcuts', {'model.depth': 34, 'model.residual': False}),
      ('resnet_18', 'ResNet-18', {'model.depth': 18}),
      ('resnet_34', 'ResNet-34', {'model.depth': 34}),
  )
  variants = tuple(
      Variant(
          name, text, overrides, paper=dict(top1=RESNET_TABLE_2[name]),
          claim='the degradation problem: the deeper plain net is worse' if name ==
          'plain_34' else '') for name, text, overrides in rows)
  return Suite(
      name='resnet', title='Plain against residual networks: the degradation problem',
      source='He et al. 2015, Table 2 (top-1 error, 10-crop testing, ILSVRC-2012 validation)',
      reference='plain_18', variants=variants, bases=dict(
          demo=lambda: demo_base(configs.model_config('resnet', width=0.25), image_size=36, crop=32,
                                 epochs=8, learning_rate=0.05),
          paper=_resnet_paper), data=dict(demo=demo_data(36), paper=PAPER_DATA))


def _resnet_paper():
  c = configs.paper_recipe('resnet')
  c.model.depth = 18
  return c


SUITES = {
    'alexnet': alexnet_ablations,
    'zfnet': zfnet_table3,
    'vgg': vgg_depth,
    'googlenet': googlenet_heads,
    'resnet': resnet_plain,
}
