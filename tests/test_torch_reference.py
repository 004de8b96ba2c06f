"""Tests of tests/torch_reference.py, the PyTorch stand-in for torchvision and Caffe that the
weight importer's tests compare against: the releases' parameter counts, names and shapes, and
Caffe's computation (LRN, groups, ceil-mode pooling, C,H,W flattening)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch_reference as ref  # noqa: E402


@pytest.mark.parametrize(
    'build, expected', [
        (lambda: ref.tv_alexnet(), 61_100_840),
        (lambda: ref.tv_vgg('vgg11'), 132_863_336),
        (lambda: ref.tv_vgg('vgg16'), 138_357_544),
        (lambda: ref.tv_vgg('vgg19'), 143_667_240),
        (lambda: ref.tv_vgg('vgg16_bn'), 138_365_992),
        (lambda: ref.tv_resnet(18), 11_689_512),
        (lambda: ref.tv_resnet(50), 25_557_032),
        (lambda: ref.tv_resnet(152), 60_192_808),
    ], ids=['alexnet', 'vgg11', 'vgg16', 'vgg19', 'vgg16_bn', 'resnet18', 'resnet50', 'resnet152'])
def test_torchvision_parameter_counts(build, expected):
  with torch.device('meta'):  # no memory, no init: the count is all that is read
    assert ref.count_parameters(build()) == expected


@pytest.mark.parametrize('net, expected', [('alexnet', 60_965_224), ('vgg16', 138_357_544),
                                           ('vgg19', 143_667_240),
                                           ('googlenet', 6_998_552 + 3_188_840 + 3_190_888)])
def test_caffe_parameter_counts(net, expected):
  # GoogLeNet: the deploy net's 6,998,552 plus loss1's and loss2's heads (512, resp. 528 inputs).
  shapes = ref.caffe_shapes(net)
  assert sum(math.prod(s) for _, ss in shapes for s in ss) == expected


def _shapes(module):
  return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_resnet50_state_dict_keys():
  with torch.device('meta'):
    model = ref.tv_resnet(50)
  sd = _shapes(model)
  assert len(sd) == 320  # 161 parameters + 53 BNs × 3 buffers
  assert sd['conv1.weight'] == (64, 3, 7, 7)
  assert sd['bn1.num_batches_tracked'] == ()
  assert sd['layer1.0.conv1.weight'] == (64, 64, 1, 1)
  assert sd['layer1.0.conv3.weight'] == (256, 64, 1, 1)
  assert sd['layer1.0.downsample.0.weight'] == (256, 64, 1, 1)
  assert sd['layer1.0.downsample.1.running_var'] == (256,)
  assert 'layer1.1.downsample.0.weight' not in sd
  assert sd['layer3.5.bn3.running_mean'] == (1024,)
  assert sd['layer4.2.conv2.weight'] == (512, 512, 3, 3)
  assert sd['fc.weight'] == (1000, 2048) and sd['fc.bias'] == (1000,)
  assert not any(k.endswith(('conv1.bias', 'conv2.bias', 'conv3.bias')) for k in sd)
  # v1.5: the stride is on the 3×3 conv and on the 1×1 shortcut.
  assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
  assert model.layer2[0].downsample[0].stride == (2, 2)
  assert model.maxpool.padding == 1 and model.conv1.padding == (3, 3)


def test_resnet18_has_downsample_only_where_the_shape_changes():
  with torch.device('meta'):
    sd = _shapes(ref.tv_resnet(18))
  assert 'layer1.0.downsample.0.weight' not in sd
  assert sd['layer2.0.downsample.0.weight'] == (128, 64, 1, 1)
  assert sd['layer4.1.conv2.weight'] == (512, 512, 3, 3) and sd['fc.weight'] == (1000, 512)


def test_vgg16_bn_state_dict_keys():
  with torch.device('meta'):
    sd = _shapes(ref.tv_vgg('vgg16_bn'))
  assert sd['features.0.weight'] == (64, 3, 3, 3)
  assert sd['features.1.weight'] == (64,)  # the BN after conv1_1
  assert sd['features.1.running_var'] == (64,)
  assert sd['features.3.weight'] == (64, 64, 3, 3)
  assert sd['features.7.weight'] == (128, 64, 3, 3)  # 6 is the pool
  assert sd['features.40.weight'] == (512, 512, 3, 3) and sd['features.41.bias'] == (512,)
  assert sd['classifier.0.weight'] == (4096, 512 * 7 * 7)
  assert sd['classifier.3.weight'] == (4096, 4096)
  assert sd['classifier.6.weight'] == (1000, 4096)
  with torch.device('meta'):
    plain = _shapes(ref.tv_vgg('vgg16'))
  convs = sorted(int(k.split('.')[1]) for k in plain if k.startswith('features.'))
  assert convs == sorted(2 * [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28])


def test_alexnet_state_dict_keys():
  with torch.device('meta'):
    sd = _shapes(ref.tv_alexnet())
  assert sd == {
      'features.0.weight': (64, 3, 11, 11), 'features.0.bias': (64,), 'features.3.weight':
          (192, 64, 5, 5), 'features.3.bias': (192,), 'features.6.weight': (384, 192, 3, 3),
      'features.6.bias': (384,), 'features.8.weight': (256, 384, 3, 3), 'features.8.bias': (256,),
      'features.10.weight': (256, 256, 3, 3), 'features.10.bias': (256,), 'classifier.1.weight':
          (4096, 9216), 'classifier.1.bias': (4096,), 'classifier.4.weight': (4096, 4096),
      'classifier.4.bias': (4096,), 'classifier.6.weight': (1000, 4096), 'classifier.6.bias': (1000,
                                                                                              )
  }


@pytest.mark.parametrize('build', [
    lambda: ref.tv_alexnet(10, width=0.125),
    lambda: ref.tv_vgg('vgg19_bn', 10, width=0.0625),
    lambda: ref.tv_resnet(152, 10, width=0.0625),
], ids=['alexnet', 'vgg19_bn', 'resnet152'])
def test_random_state_dict_is_reproducible_and_keeps_activations_o1(build):
  model = build().eval()
  sd = ref.random_state_dict(model, seed=3)
  assert list(sd) == list(model.state_dict())
  again = ref.random_state_dict(build(), seed=3)
  other = ref.random_state_dict(build(), seed=4)
  for k, v in sd.items():
    assert torch.equal(v, again[k]), k
    if v.numel() > 1:
      assert not torch.equal(v, other[k]), k
    if k.endswith('running_var'):
      assert (v > 0).all() and not torch.equal(v, torch.ones_like(v))
    if k.endswith('num_batches_tracked'):
      assert v.dtype == torch.long and v.shape == ()
  x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    logits = model(x)
  assert logits.shape == (2, 10)
  assert 0.05 < logits.std().item() < 50, logits.std().item()


def test_caffe_alexnet_shapes_names_and_flattening():
  net = ref.caffe_alexnet(num_classes=10, width=0.125)
  assert [n for n, _ in net.blobs] == [f'conv{i}' for i in range(1, 6)] + ['fc6', 'fc7', 'fc8']
  blobs = net.blob_dict()
  assert blobs['conv1'][0].shape == (12, 3, 11, 11)
  assert blobs['conv2'][0].shape == (32, 6, 5, 5)  # group 2: in / group
  assert blobs['conv3'][0].shape == (48, 32, 3, 3)  # one group
  assert blobs['conv4'][0].shape == (48, 24, 3, 3) and blobs['conv5'][0].shape == (32, 24, 3, 3)
  assert blobs['fc6'][0].shape == (512, 32 * 6 * 6) and blobs['fc8'][1].shape == (10,)
  assert all(b.dtype == np.float32 for _, bs in net.blobs for b in bs)
  x = np.random.default_rng(0).standard_normal((2, 3, 227, 227)).astype(np.float32)
  tops = net.tops(x)
  sizes = {n: tops[n].shape[-1] for n in ('conv1', 'pool1', 'conv2', 'pool2', 'conv5', 'pool5')}
  assert sizes == dict(conv1=55, pool1=27, conv2=27, pool2=13, conv5=13, pool5=6)
  # fc6 reads the pool5 blob flattened C, H, W against the (out, in) blob.
  w, b = blobs['fc6']
  fc6 = np.maximum(tops['pool5'].numpy().reshape(2, -1) @ w.T + b, 0)
  np.testing.assert_allclose(tops['fc6'].numpy(), fc6, rtol=1e-4, atol=1e-4)
  logits = net.forward(x)
  assert logits.shape == (2, 10) and isinstance(logits, np.ndarray)
  assert 0.05 < logits.std() < 50


def _caffe_lrn(a, n=5, alpha=1e-4, beta=0.75, k=1.0):
  """Caffe's LRNLayer (ACROSS_CHANNELS), written from its formula in float64."""
  a = np.asarray(a, np.float64)
  c = a.shape[1]
  padded = np.pad(a**2, [(0, 0), (n // 2, n // 2), (0, 0), (0, 0)])
  sums = np.stack([padded[:, i:i + n].sum(1) for i in range(c)], 1)
  return a / (k + alpha / n * sums)**beta


def test_caffe_alexnet_lrn_is_caffes_across_the_whole_blob():
  net = ref.caffe_alexnet(num_classes=10, width=0.125)
  x = np.random.default_rng(1).standard_normal((2, 3, 227, 227)).astype(np.float32)
  tops = net.tops(x)
  # On the net's own O(1) activations LRN changes values by ~1e-4, still far above the tolerance.
  conv1 = tops['conv1'].numpy()
  assert np.abs(_caffe_lrn(conv1) - conv1).max() > 1e-5
  np.testing.assert_allclose(tops['norm1'].numpy(), _caffe_lrn(conv1), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(tops['norm2'].numpy(), _caffe_lrn(tops['conv2'].numpy()), rtol=1e-6,
                             atol=1e-7)
  # Scaled up so the denominator matters; the window crosses the groups' boundary (maps 5 | 6 of
  # 12): normalising each group on its own would differ there.
  a = 30.0 * conv1
  got = ref.caffe_lrn()(torch.from_numpy(a)).numpy()
  np.testing.assert_allclose(got, _caffe_lrn(a), rtol=1e-5, atol=1e-6)
  per_group = np.concatenate([_caffe_lrn(a[:, :6]), _caffe_lrn(a[:, 6:])], 1)
  assert not np.allclose(got[:, 4:8], per_group[:, 4:8], rtol=1e-3)
  np.testing.assert_allclose(got[:, :3], per_group[:, :3], rtol=1e-5, atol=1e-6)


def test_caffe_grouped_conv_splits_the_maps():
  net = ref.caffe_alexnet(num_classes=10, width=0.125)
  conv2 = net.modules['conv2']
  x = torch.randn(1, 12, 27, 27, generator=torch.Generator().manual_seed(0))
  y = x.clone()
  y[:, 6:] += 1.0
  with torch.no_grad():
    a, b = conv2(x), conv2(y)
  torch.testing.assert_close(a[:, :16], b[:, :16])  # group 1 reads maps 0-5 only
  assert not torch.allclose(a[:, 16:], b[:, 16:])
  # Group 2's first output: its weights (out, in/group, kh, kw) against maps 6-11.
  w, bias = net.blob_dict()['conv2']
  xp = np.pad(x.numpy()[0, 6:], [(0, 0), (2, 2), (2, 2)])
  direct = (w[16] * xp[:, :5, :5]).sum() + bias[16]
  np.testing.assert_allclose(a[0, 16, 0, 0].item(), direct, rtol=1e-4, atol=1e-5)


def test_caffe_net_from_given_blobs():
  net = ref.caffe_alexnet(num_classes=10, width=0.125, seed=5)
  x = np.random.default_rng(2).standard_normal((1, 3, 227, 227)).astype(np.float32)
  same = ref.caffe_alexnet(num_classes=10, width=0.125, blobs=net.blobs)
  np.testing.assert_array_equal(same.forward(x), net.forward(x))
  other = ref.caffe_alexnet(num_classes=10, width=0.125, seed=6)
  assert not np.allclose(other.forward(x), net.forward(x))
  with pytest.raises(ValueError, match='do not match'):
    ref.caffe_alexnet(num_classes=11, width=0.125, blobs=net.blobs)


def test_caffe_vgg_names_and_sizes():
  names19 = [n for n, _ in ref.caffe_shapes('vgg19')]
  assert names19[-5:] == ['conv5_3', 'conv5_4', 'fc6', 'fc7', 'fc8']
  shapes16 = dict(ref.caffe_shapes('vgg16'))
  assert list(shapes16)[:4] == ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2']
  assert 'conv5_4' not in shapes16 and shapes16['conv5_3'] == [(512, 512, 3, 3), (512,)]
  assert shapes16['fc6'] == [(4096, 25088), (4096,)]
  net = ref.caffe_vgg(16, num_classes=10, width=0.0625)
  x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
  tops = net.tops(x)
  assert [tops[f'pool{i}'].shape[-1] for i in range(1, 6)] == [112, 56, 28, 14, 7]
  assert tops['pool5'].shape[1] == 32 and net.forward(x).shape == (1, 10)


def test_caffe_googlenet_sizes_names_and_heads():
  net = ref.caffe_googlenet(num_classes=10, width=0.125)
  names = [n for n, _ in net.blobs]
  assert names[:9] == [
      'conv1/7x7_s2', 'conv2/3x3_reduce', 'conv2/3x3', 'inception_3a/1x1',
      'inception_3a/3x3_reduce', 'inception_3a/3x3', 'inception_3a/5x5_reduce', 'inception_3a/5x5',
      'inception_3a/pool_proj'
  ]
  assert names[-1] == 'loss3/classifier' and names[-2] == 'inception_5b/pool_proj'
  for h in ('loss1', 'loss2'):
    assert [n for n in names if n.startswith(h)] == [f'{h}/conv', f'{h}/fc', f'{h}/classifier']
  assert names.index('loss1/conv') == names.index('inception_4a/pool_proj') + 1
  assert names.index('loss2/conv') == names.index('inception_4d/pool_proj') + 1
  assert len(names) == 3 + 9 * 6 + 6 + 1
  x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
  tops = net.tops(x)
  size = lambda n: tops[n].shape[-1]
  # Ceil-mode pooling: floor would give 55, 27, 13, 6.
  assert [
      size(n) for n in ('conv1/7x7_s2', 'pool1/3x3_s2', 'pool2/3x3_s2', 'pool3/3x3_s2',
                        'pool4/3x3_s2', 'pool5/7x7_s1')
  ] == [112, 56, 28, 14, 7, 1]
  assert size('inception_3b/output') == 28 and size('inception_4e/output') == 14
  assert size('inception_5b/output') == 7
  assert size('loss1/ave_pool') == 4 and size('loss2/ave_pool') == 4
  # Branch order in the concatenation: 1x1, 3x3, 5x5, pool_proj.
  out = tops['inception_3a/output']
  parts = [tops[f'inception_3a/{b}'] for b in ('1x1', '3x3', '5x5', 'pool_proj')]
  assert [p.shape[1] for p in parts] == [8, 16, 4, 4] and out.shape[1] == 32
  torch.testing.assert_close(out, torch.cat(parts, 1))
  assert tops['inception_5b/output'].shape[1] == 48 + 48 + 16 + 16
  np.testing.assert_allclose(tops['pool1/norm1'].numpy(), _caffe_lrn(tops['pool1/3x3_s2'].numpy()),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(tops['conv2/norm2'].numpy(), _caffe_lrn(tops['conv2/3x3'].numpy()),
                             rtol=1e-6, atol=1e-7)
  main, aux1, aux2 = net.forward(x, aux=True)
  assert main.shape == aux1.shape == aux2.shape == (2, 10)
  np.testing.assert_array_equal(net.forward(x), main)
  assert 0.05 < main.std() < 50
