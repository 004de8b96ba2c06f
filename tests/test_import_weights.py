"""Importing the released networks (``import_weights``): files built here in each source's exact
format and naming from random values — Caffe's ``.caffemodel`` (modern and legacy V1 layers),
torchvision's ``.pth`` and ``.safetensors`` — imported into checkpoints, and the imported network's
logits compared with the source framework's computation of the same input: PyTorch transcriptions
of the releases (``torch_reference``; skipped without torch) and a NumPy forward of the first
layers that always runs. Small widths at the releases' full resolutions keep it fast; the
mapping does not depend on the width. Then the checkpoints through the commands that read them,
and bad files refused in one line naming the first tensor that does not fit."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alexnet_jax import configs, import_weights, steps, trained
from alexnet_jax.weights import WeightFileError, caffe_format, layouts, tensor_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Relative difference of float32 logits between two frameworks' computations of the same network.
RTOL = 1e-4


def _images(n, size, seed=0):
  """Natural-image statistics matter little here; random pixels exercise every weight."""
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _relative(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_bgr_channel_order_reverses_the_normalised_channels():
  images = _images(2, 5)
  mean, std = (120.0, 110.0, 100.0), (2.0, 4.0, 8.0)
  rgb = np.asarray(steps.normalize(jnp.asarray(images), mean, std, jnp.float32))
  bgr = np.asarray(steps.normalize(jnp.asarray(images), mean, std, jnp.float32,
                                   channel_order='bgr'))
  np.testing.assert_allclose(rgb, (images - np.asarray(mean)) / np.asarray(std), rtol=1e-6)
  np.testing.assert_array_equal(bgr, rgb[..., ::-1])


def test_channel_order_is_checked_and_defaults_to_rgb():
  c = configs.base_config()
  assert c.input.channel_order == 'rgb'
  c.input.channel_order = 'grb'
  with pytest.raises(configs.ConfigError, match='channel_order'):
    configs.check_fields(c)


# -- the imported network's logits ----------------------------------------------------------------


def _ours(workdir, images, layer=None):
  """The imported checkpoint's logits (or ``layer``'s activations, towers concatenated) for uint8
  ``images``, normalised as its stored config says (channel order, mean, scale)."""
  config = trained.stored_config(str(workdir))
  net = trained.load(config, str(workdir))
  x = steps.normalize(jnp.asarray(images), config.input.mean_rgb, config.input.std_rgb, jnp.float32,
                      channel_order=config.input.channel_order)
  model = nnx.merge(net.program.graphdef, jax.device_get(net.params),
                    jax.device_get(net.batch_stats))
  out = model(x, train=False, capture=layer is not None)
  if layer is None:
    return np.asarray(out.logits)
  return np.concatenate(list(np.asarray(out.activations[layer])), axis=-1)


TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCHVISION_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _torchvision_input(images):
  """torchvision's ``ToTensor`` then ``Normalize(mean, std)``, NCHW."""
  x = (images.astype(np.float32) / 255 - TORCHVISION_MEAN) / TORCHVISION_STD
  return x.transpose(0, 3, 1, 2).copy()


def _caffe_input(images, mean_bgr):
  """Caffe's preprocessing: B, G, R channels of 0-255 pixels minus the mean pixel, NCHW."""
  x = images[..., ::-1].astype(np.float32) - np.asarray(mean_bgr, np.float32)
  return x.transpose(0, 3, 1, 2).copy()


CAFFE_ALEXNET_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


def _numpy_conv(x, w, b, stride=1, pad=0, groups=1):
  """Caffe's convolution in NumPy: NCHW input, (out, in/groups, kh, kw) kernel."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, c, h, wd = x.shape
  o, ci, kh, kw = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = []
  for g in range(groups):
    xg = x[:, g * ci:(g + 1) * ci]
    wg = w[g * (o // groups):(g + 1) * (o // groups)]
    patches = np.stack([
        xg[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
        for i in range(kh)
        for j in range(kw)
    ], -1)  # (n, ci, oh, ow, kh*kw)
    out.append(np.einsum('ncyxk,ock->noyx', patches, wg.reshape(o // groups, ci, kh * kw)))
  return np.concatenate(out, 1) + b[None, :, None, None]


def _numpy_lrn(x, k=1.0, n=5, alpha=1e-4, beta=0.75):
  """Caffe's across-channel LRN: alpha divided by the window size, zero maps beyond the edges."""
  sq = np.pad(x**2, ((0, 0), (n // 2, n // 2), (0, 0), (0, 0)))
  window = sum(sq[:, i:i + x.shape[1]] for i in range(n))
  return x / (k + alpha / n * window)**beta


def _numpy_max_pool(x, window=3, stride=2):
  n, c, h, w = x.shape
  oh, ow = -(-(h - window) // stride) + 1, -(-(w - window) // stride) + 1  # Caffe rounds up
  out = np.full((n, c, oh, ow), -np.inf, np.float32)
  for i in range(window):
    for j in range(window):
      part = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
      out[:, :, :part.shape[2], :part.shape[3]] = np.maximum(
          out[:, :, :part.shape[2], :part.shape[3]], part)
  return out


def _alexnet_blobs(rng, classes=10):
  """bvlc_alexnet's blobs at width 1/8 (maps 12-32-48-48-32, fc 512), He-scaled."""
  shapes = [('conv1', (12, 3, 11, 11)), ('conv2', (32, 6, 5, 5)), ('conv3', (48, 32, 3, 3)),
            ('conv4', (48, 24, 3, 3)), ('conv5', (32, 24, 3, 3)), ('fc6', (512, 32 * 36)),
            ('fc7', (512, 512)), ('fc8', (classes, 512))]
  return [(name, 'Convolution' if name.startswith('conv') else 'InnerProduct', [
      rng.standard_normal(s).astype(np.float32) * np.sqrt(2 / np.prod(s[1:])),
      rng.standard_normal(s[0]).astype(np.float32) * 0.05
  ]) for name, s in shapes]


@pytest.mark.parametrize('legacy', [True, False])
def test_caffe_alexnet_first_layers_equal_a_numpy_forward(tmp_path, legacy):
  """Caffe's BGR input, its (out, in, kh, kw) blobs, conv2's groups as the towers, and its LRN
  (k = 1, α/n, the window crossing the groups) — no PyTorch needed."""
  rng = np.random.default_rng(0)
  blobs = _alexnet_blobs(rng)
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  caffe_format.write_caffemodel(path, 'AlexNet', [(n, t, b) for n, t, b in blobs], legacy=legacy)
  import_weights.import_file(str(path), str(tmp_path / 'w'))
  images = _images(2, 227)
  x = _caffe_input(images, CAFFE_ALEXNET_MEAN_BGR)
  (_, _, (w1, b1)), (_, _, (w2, b2)) = blobs[:2]
  conv1 = np.maximum(_numpy_conv(x, w1, b1, stride=4), 0)
  conv2 = np.maximum(_numpy_conv(_numpy_max_pool(_numpy_lrn(conv1)), w2, b2, pad=2, groups=2), 0)
  ours1 = _ours(tmp_path / 'w', images, 'conv1').transpose(0, 3, 1, 2)
  ours2 = _ours(tmp_path / 'w', images, 'conv2').transpose(0, 3, 1, 2)
  assert ours1.shape == conv1.shape == (2, 12, 55, 55)
  assert ours2.shape == conv2.shape == (2, 32, 27, 27)
  assert _relative(ours1, conv1) < RTOL
  assert _relative(ours2, conv2) < RTOL
  config = trained.stored_config(str(tmp_path / 'w'))
  assert config.input.channel_order == 'bgr' and tuple(config.input.std_rgb) == (1.0, 1.0, 1.0)
  assert config.model.towers == 2 and config.model.lrn_k == 1.0
  assert config.model.image_size == 227 and config.model.num_classes == 10


# -- against PyTorch ------------------------------------------------------------------------------


def _torch_reference():
  pytest.importorskip('torch')
  import torch_reference  # noqa: PLC0415  (imports torch: only where the test runs)
  return torch_reference


def _torch_logits(module, x):
  import torch  # noqa: PLC0415
  with torch.no_grad():
    return module(torch.from_numpy(x)).numpy()


TORCHVISION_CASES = [
    # (release, builder arguments, file suffix, width)
    ('resnet18', ('resnet', 18), '.pth', 0.25),
    ('resnet50', ('resnet', 50), '.safetensors', 0.125),
    ('vgg11_bn', ('vgg', 'vgg11_bn'), '.safetensors', 0.125),
    ('vgg16', ('vgg', 'vgg16'), '.pth', 0.125),
    ('alexnet', ('alexnet',), '.safetensors', 0.25),
]


def _torchvision_module(ref, args, width):
  if args[0] == 'resnet':
    return ref.tv_resnet(args[1], num_classes=10, width=width)
  if args[0] == 'vgg':
    return ref.tv_vgg(args[1], num_classes=10, width=width)
  return ref.tv_alexnet(num_classes=10, width=width)


@pytest.mark.parametrize('release, args, suffix, width', TORCHVISION_CASES,
                         ids=[c[0] for c in TORCHVISION_CASES])
def test_torchvision_import_gives_pytorchs_logits(tmp_path, release, args, suffix, width):
  ref = _torch_reference()
  module = _torchvision_module(ref, args, width)
  state = ref.random_state_dict(module, seed=1)
  module.eval()
  path = tmp_path / f'{release}{suffix}'
  tensors = {k: v.numpy() for k, v in state.items()}
  if suffix == '.pth':
    tensor_files.write_pth(path, state)
  else:
    tensor_files.write_safetensors(path, tensors)
  done = import_weights.import_file(str(path), str(tmp_path / 'w'))
  assert done['model'] == release  # read from the tensor names
  images = _images(2, 224)
  theirs = _torch_logits(module, _torchvision_input(images))
  ours = _ours(tmp_path / 'w', images)
  assert ours.shape == theirs.shape == (2, 10)
  assert _relative(ours, theirs) < RTOL, (ours, theirs)
  config = trained.stored_config(str(tmp_path / 'w'))
  assert config.input.channel_order == 'rgb' and config.input.resize_to == 256
  assert tuple(config.input.mean_rgb) == configs.IMAGENET_MEAN_RGB
  assert tuple(config.input.std_rgb) == configs.IMAGENET_STD_RGB


CAFFE_CASES = [
    ('bvlc_alexnet', 'caffe_alexnet', {}, 227, CAFFE_ALEXNET_MEAN_BGR, 0.125),
    ('vgg16_caffe', 'caffe_vgg', dict(depth=16), 224, (103.939, 116.779, 123.68), 0.125),
    ('vgg19_caffe', 'caffe_vgg', dict(depth=19), 224, (103.939, 116.779, 123.68), 0.0625),
    ('bvlc_googlenet', 'caffe_googlenet', {}, 224, (104.0, 117.0, 123.0), 0.25),
]


@pytest.mark.parametrize('release, builder, kwargs, size, mean_bgr, width', CAFFE_CASES,
                         ids=[c[0] for c in CAFFE_CASES])
def test_caffe_import_gives_caffes_logits(tmp_path, release, builder, kwargs, size, mean_bgr,
                                          width):
  ref = _torch_reference()
  net = getattr(ref, builder)(num_classes=10, width=width, seed=2, **kwargs)
  path = tmp_path / f'{release}.caffemodel'
  kinds = {'conv': 'Convolution'}
  caffe_format.write_caffemodel(
      path, release, [(name, 'InnerProduct' if blobs[0].ndim == 2 else kinds['conv'], blobs)
                      for name, blobs in net.blobs], legacy=release == 'bvlc_alexnet')
  done = import_weights.import_file(str(path), str(tmp_path / 'w'))
  assert done['model'] == release
  images = _images(2, size)
  theirs = net.forward(_caffe_input(images, mean_bgr))
  ours = _ours(tmp_path / 'w', images)
  assert ours.shape == theirs.shape == (2, 10)
  assert _relative(ours, theirs) < RTOL, (ours, theirs)


# -- bad files: one line naming the first tensor that does not fit ---------------------------------


def _resnet18_tensors(seed=0):
  """A torchvision ResNet-18 state dict at width 1/8, from its layout (no torch needed)."""
  rng = np.random.default_rng(seed)
  config = import_weights.release_config(
      layouts.RELEASES['resnet18'],
      {'conv1.weight': np.zeros((8, 3, 7, 7)), 'fc.weight': np.zeros((10, 64))})
  abstract = import_weights.abstract_variables(config)
  out = {}
  for e in layouts.RELEASES['resnet18'].entries(dict(config.model)):
    if e.kind == 'unused':
      out[e.source] = np.array(3, np.int64)
      continue
    shape = layouts._lookup(abstract, e.target).shape  # noqa: SLF001
    if e.kind == 'conv':
      shape = (shape[0] * shape[4], shape[3], shape[1], shape[2])
    elif e.kind == 'dense':
      shape = (shape[0] * shape[1], shape[2])
    elif e.kind == 'vector':
      shape = (int(np.prod(shape)),)
    out[e.source] = rng.standard_normal(shape).astype(np.float32)
  return out


def _cli(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.import_weights', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _one_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  for f in fragments:
    assert f in lines[0], lines[0]
  return lines[0]


def test_the_command_imports_and_refuses_an_occupied_workdir(tmp_path):
  path = tmp_path / 'resnet18.safetensors'
  tensor_files.write_safetensors(path, _resnet18_tensors())
  proc = _cli([f'--file={path}', f'--workdir={tmp_path / "w"}'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "torchvision's ResNet-18" in proc.stdout and '10 classes' in proc.stdout
  meta = trained.read_meta(str(tmp_path / 'w'))
  assert meta['imported']['model'] == 'resnet18'
  assert meta['imported']['sha256'] == import_weights.file_digest(str(path))
  before = sorted(os.listdir(tmp_path / 'w' / 'checkpoints'))
  _one_error(_cli([f'--file={path}', f'--workdir={tmp_path / "w"}']), 'already holds checkpoints')
  assert sorted(os.listdir(tmp_path / 'w' / 'checkpoints')) == before


def _refused(tmp_path, tensors, *fragments, model=None, suffix='.safetensors'):
  path = tmp_path / f'weights{suffix}'
  tensor_files.write_safetensors(path, tensors)
  with pytest.raises(WeightFileError) as e:
    import_weights.import_file(str(path), str(tmp_path / 'w'), model=model)
  for f in fragments:
    assert f in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / 'w')
  return str(e.value)


def test_a_resnet_file_named_as_vgg_names_the_missing_tensor_and_what_it_is(tmp_path):
  _refused(tmp_path, _resnet18_tensors(), "no tensor 'features.0.weight'", 'vgg16',
           'looks like resnet18', '--model=resnet18', model='vgg16')


def test_a_missing_tensor_is_named(tmp_path):
  tensors = _resnet18_tensors()
  del tensors['layer2.0.bn1.running_var']
  _refused(tmp_path, tensors, "no tensor 'layer2.0.bn1.running_var'", 'conv3_1.bns.0.var',
           model='resnet18')


def test_an_extra_tensor_is_named(tmp_path):
  tensors = _resnet18_tensors()
  tensors['head.extra.weight'] = np.zeros((3, 3), np.float32)
  _refused(tmp_path, tensors, "'head.extra.weight'", 'does not have')


def test_a_tensor_of_another_shape_is_named(tmp_path):
  tensors = _resnet18_tensors()
  tensors['layer3.1.conv2.weight'] = np.zeros((32, 32, 5, 5), np.float32)
  _refused(tmp_path, tensors, "'layer3.1.conv2.weight'", '(32, 32, 5, 5)', '(32, 32, 3, 3)')


def test_a_file_of_no_known_release_is_one_line_through_the_command(tmp_path):
  path = tmp_path / 'mine.safetensors'
  tensor_files.write_safetensors(path, {'encoder.w': np.zeros((4, 4), np.float32)})
  _one_error(_cli([f'--file={path}', f'--workdir={tmp_path / "w"}']), 'none of the torchvision',
             '--model')
  _one_error(_cli([f'--file={tmp_path / "absent.pth"}', f'--workdir={tmp_path / "w"}']),
             'no such file')
  _one_error(_cli([f'--file={path}', f'--workdir={tmp_path / "w"}', '--model=bvlc_alexnet']),
             'not a torchvision release')
  assert not os.path.exists(tmp_path / 'w')


def test_evaluate_and_features_read_an_imported_checkpoint_without_training_flags(tmp_path):
  """The stored config carries the architecture and the input convention: the commands need only
  the data set (here the built-in one, with the file's 10 classes)."""
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  caffe_format.write_caffemodel(path, 'AlexNet', _alexnet_blobs(np.random.default_rng(1)),
                                legacy=True)
  assert _cli([f'--file={path}', f'--workdir={tmp_path / "w"}']).returncode == 0
  data = [
      '--config.dataset.name=builtin_shapes', f'--config.dataset.data_dir={tmp_path / "data"}',
      '--config.dataset.num_train=20', '--config.dataset.num_val=20',
      '--config.dataset.image_size=72', '--config.eval_batch_size=20'
  ]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  run = lambda module, *args: subprocess.run([
      sys.executable, '-m', module, f'--checkpoint={tmp_path / "w"}', *args, *data
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  proc = run('alexnet_jax.evaluate', f'--out={tmp_path / "ev"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 'ev' / 'results.json').read_text())
  assert result['members'][0]['release'] == 'bvlc_alexnet' and result['examples'] == 20
  md = (tmp_path / 'ev' / 'results.md').read_text()
  assert "Caffe's bvlc_alexnet, centre crop" in md and '| 42.9 | 19.8 |' in md
  proc = run('alexnet_jax.features', f'--out={tmp_path / "f"}', '--layers=fc7')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.load(tmp_path / 'f' / 'fc7.npy').shape == (20, 512)


def test_first_layer_filters_of_a_bgr_network_are_shown_in_rgb(tmp_path):
  from alexnet_jax.visualize import analyses, checkpoints  # noqa: PLC0415
  blobs = _alexnet_blobs(np.random.default_rng(2))
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  caffe_format.write_caffemodel(path, 'AlexNet', blobs)
  import_weights.import_file(str(path), str(tmp_path / 'w'))
  config = trained.stored_config(str(tmp_path / 'w'))
  net = checkpoints.load_network(config, str(tmp_path / 'w'))
  conv1 = blobs[0][2][0].astype(np.float32)  # (maps, B G R, kh, kw), as the file holds it
  np.testing.assert_array_equal(analyses.first_layer_filters(net),
                                conv1.transpose(0, 2, 3, 1)[..., ::-1])


def test_the_published_figures_are_the_references():
  from alexnet_jax import paper  # noqa: PLC0415
  # REFERENCE.md: "Caffe bvlc_alexnet 42.9 / 19.8 (centre crop); torchvision 43.5 / 20.9"; the
  # issue's torchvision top-1 accuracies: VGG-16 71.59 %, ResNet-50 76.13 %.
  assert (paper.PUBLISHED['bvlc_alexnet']['top1'],
          paper.PUBLISHED['bvlc_alexnet']['top5']) == (42.9, 19.8)
  assert (paper.PUBLISHED['alexnet']['top1'], paper.PUBLISHED['alexnet']['top5']) == (43.5, 20.9)
  assert paper.PUBLISHED['vgg16']['top1'] == pytest.approx(100 - 71.59)
  assert paper.PUBLISHED['resnet50']['top1'] == pytest.approx(100 - 76.13)
  assert set(paper.PUBLISHED) <= set(layouts.RELEASES)
  assert paper.evaluation_row('alexnet', 1, 'bvlc_alexnet')['top1'] == 42.9
  assert paper.evaluation_row('alexnet', 5, 'bvlc_alexnet') is None


def test_main_fine_tunes_from_an_imported_checkpoint_and_refuses_another_channel_order(tmp_path):
  """``config.init`` reads an imported checkpoint like one of ours; a run that would feed its
  first layer RGB where it learnt BGR is refused in one line, before anything trains."""
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  blobs = _alexnet_blobs(np.random.default_rng(3), classes=4)
  caffe_format.write_caffemodel(path, 'AlexNet', blobs, legacy=True)
  import_weights.import_file(str(path), str(tmp_path / 'w'))
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  args = [
      '--config=configs/demo.py', f'--workdir={tmp_path / "run"}',
      f'--config.init.checkpoint={tmp_path / "w"}', '--config.init.freeze_through=conv2',
      '--config.dataset.num_train=32', '--config.dataset.num_val=16',
      '--config.dataset.image_size=232', '--config.dataset.classes=(0,1,2,3)',
      f'--config.dataset.data_dir={tmp_path / "data"}', '--config.model.num_classes=4',
      '--config.model.width=0.125', '--config.model.image_size=227',
      '--config.model.lrn_alpha_divided_by_n=True', '--config.model.lrn_across_towers=True',
      '--config.batch_size=8', '--config.eval_batch_size=8', '--config.num_epochs=1',
      '--config.input.workers=0', '--config.input.mean_rgb=(122.68,116.67,104.01)',
      '--config.input.std_rgb=(1.0,1.0,1.0)', '--config.checkpoint.async_save=False'
  ]
  main = lambda *more: subprocess.run([sys.executable, '-m', 'alexnet_jax.main', *args, *more], cwd=
                                      REPO, env=env, capture_output=True, text=True, timeout=600)
  _one_error(main(), 'reads its colour channels as BGR', '--config.input.channel_order=bgr')
  saved = tmp_path / 'run' / 'checkpoints'
  assert not (saved.exists() and any(p.name.isdigit() for p in saved.iterdir()))  # none saved
  proc = main('--config.input.channel_order=bgr')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'fine-tuning from' in proc.stderr and 'the classifier copied too' in proc.stderr
  # lrn_k left at the paper's 2: every shape fits, so only a warning can tell
  assert "--config.model.lrn_k='1.0'" in proc.stderr
  tuned = trained.load(trained.stored_config(str(tmp_path / 'run')), str(tmp_path / 'run'))
  kernel = np.concatenate(list(np.asarray(jax.device_get(tuned.params['conv1']['kernel']))), -1)
  np.testing.assert_array_equal(kernel, blobs[0][2][0].astype(np.float32).transpose(2, 3, 1, 0))


def test_deconv_projections_of_a_bgr_network_are_in_rgb(tmp_path):
  """The BGR network and its RGB twin (conv1's input channels reversed) compute the same
  function of the image: their projections to pixels must be the same RGB pictures."""
  from alexnet_jax.visualize import checkpoints  # noqa: PLC0415
  from alexnet_jax.visualize.network import Network  # noqa: PLC0415
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  caffe_format.write_caffemodel(path, 'AlexNet', _alexnet_blobs(np.random.default_rng(4)))
  import_weights.import_file(str(path), str(tmp_path / 'w'))
  config = trained.stored_config(str(tmp_path / 'w'))
  bgr = checkpoints.load_network(config, str(tmp_path / 'w'))
  rgb_config = config.copy_and_resolve_references()
  rgb_config.input.channel_order = 'rgb'
  params = jax.tree.map(np.asarray, bgr.params)
  params['conv1']['kernel'] = params['conv1']['kernel'][..., ::-1, :]  # (towers, kh, kw, in, out)
  rgb = Network(config=rgb_config, apply=bgr.apply, params=params)
  images = _images(2, 227, seed=5).astype(np.float32)
  maps = np.array([1, 3])
  ours, theirs = bgr.project(images, 'conv2', maps)[0], rgb.project(images, 'conv2', maps)[0]
  assert np.abs(ours).max() > 0
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * np.abs(theirs).max())


def test_files_without_num_batches_tracked_import(tmp_path):
  """torchvision's files saved before PyTorch 0.4.1 (its vgg*_bn, the first ResNets) lack it."""
  tensors = {k: v for k, v in _resnet18_tensors().items() if 'num_batches_tracked' not in k}
  path = tmp_path / 'resnet18.safetensors'
  tensor_files.write_safetensors(path, tensors)
  assert import_weights.import_file(str(path), str(tmp_path / 'w'))['model'] == 'resnet18'


def test_caffenet_is_not_taken_for_alexnet(tmp_path):
  """bvlc_reference_caffenet has AlexNet's tensors but pools before it normalises."""
  blobs = _alexnet_blobs(np.random.default_rng(5))
  layers = [
      blobs[0], ('relu1', 'ReLU', []), ('pool1', 'Pooling', []), ('norm1', 'LRN', []), *blobs[1:]
  ]
  path = tmp_path / 'bvlc_reference_caffenet.caffemodel'
  caffe_format.write_caffemodel(path, 'CaffeNet', layers)
  with pytest.raises(WeightFileError, match='CaffeNet'):
    import_weights.import_file(str(path), str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')
