"""Tests for the PyTorch-eager AlexNet baseline (skipped when torch is absent)."""

import math

import pytest

torch = pytest.importorskip('torch')

from alexnet_jax.tools import bench_torch  # noqa: E402


@pytest.mark.parametrize('towers, expected', [(2, 60_965_224), (1, 62_378_344)])
def test_parameter_count_matches_reference(towers, expected):
  model = bench_torch.build_torch_alexnet(towers=towers, num_classes=1000)
  assert bench_torch.count_parameters(model) == expected


def test_feature_map_shape_at_227():
  model = bench_torch.build_torch_alexnet(towers=2).eval()
  with torch.no_grad():
    feats = model.features(torch.zeros(1, 3, 227, 227))
  assert tuple(feats.shape) == (1, 256, 6, 6)


def test_lrn_is_per_tower_with_paper_alpha():
  model = bench_torch.build_torch_alexnet(towers=2, width=0.125, image_size=67)
  lrn = model.features[2]
  x = torch.randn(2, 12, 3, 3, generator=torch.Generator().manual_seed(0)) * 20
  # Paper: b = a / (2 + 1e-4 * sum over 5 neighbouring maps of a^2) ** 0.75,
  # with the neighbourhood clipped to each tower's own 6 maps.
  expected = []
  for tower in x.chunk(2, dim=1):
    sq = tower**2
    n = tower.shape[1]
    sums = torch.stack([sq[:, max(0, i - 2):min(n, i + 3)].sum(1) for i in range(n)], dim=1)
    expected.append(tower / (2.0 + 1e-4 * sums)**0.75)
  torch.testing.assert_close(lrn(x), torch.cat(expected, dim=1))


@pytest.mark.parametrize('channels_last', [False, True])
def test_tiny_training_step_reports_finite_throughput(channels_last):
  result = bench_torch.torch_train_images_per_second(
      towers=2,
      batch_size=4,
      image_size=67,
      num_classes=10,
      width=0.125,
      steps=1,
      warmup=1,
      threads=1,
      channels_last=channels_last,
  )
  # The two figures are one measurement: images/s is the batch over the seconds per step.
  assert result['images_per_second'] == pytest.approx(4 / result['seconds_per_step'])
  # Two steps on one fixed batch: below chance (ln 10), above zero, finite.
  assert 0 < result['loss'] < math.log(10)


def test_trainer_starts_at_chance_and_learns_its_batch():
  """At the paper's initialisation (weights N(0, 0.01)) the logits start near zero, so the first
    step's softmax cross-entropy over 10 classes is ln 10; SGD on the fixed batch then lowers it.
    A different loss, a broken initialisation or an update that does not step would fail."""
  trainer = bench_torch.TorchTrainer(towers=2, batch_size=4, image_size=67, num_classes=10,
                                     width=0.125, threads=1)
  trainer.time_steps(1)
  first = trainer.loss
  assert first == pytest.approx(math.log(10), abs=0.1)
  trainer.time_steps(2)
  assert trainer.loss < first - 0.3
