"""The transfer protocol's classifiers and metrics (``alexnet_jax.probes``) on synthetic features:
Gaussian class clusters, checked against scikit-learn computed directly."""

import sys
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC

from alexnet_jax import errors, probes

K, D, PER_CLASS = 6, 16, 40  # classes, feature dimensions, examples per class
TRAIN = 15  # training examples per class in the splits


def clusters(separation, seed=0, per_class=PER_CLASS, k=K, d=D):
  """Gaussian clusters: class means ``separation`` apart (in units of the noise), shuffled."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(k, d)) * separation / np.sqrt(2)
  labels = rng.permutation(np.repeat(np.arange(k), per_class))
  features = means[labels] + rng.normal(size=(labels.size, d))
  # Scales and offsets that differ per feature, as a network's activations do.
  return (features * rng.uniform(0.1, 10, d) + rng.uniform(-5, 5, d)).astype(np.float32), labels


def one_line(excinfo):
  message = str(excinfo.value)
  assert '\n' not in message, message
  return message


# ------------------------------------------------------------------------------------------------
# Splits.


def test_splits_are_disjoint_balanced_capped_and_seeded():
  labels = np.repeat(np.arange(4), [10, 20, 30, 12])
  splits = probes.draw_splits(labels, per_class=5, num_splits=4, seed=3, max_test_per_class=9)
  assert len(splits) == 4
  for split in splits:
    assert not np.intersect1d(split.train, split.test).size
    assert np.all(np.diff(split.train) > 0) and np.all(np.diff(split.test) > 0)
    np.testing.assert_array_equal(np.bincount(labels[split.train], minlength=4), [5, 5, 5, 5])
    # The rest of each class, capped at 9: class 0 has only 5 left, class 3 has 7.
    np.testing.assert_array_equal(np.bincount(labels[split.test], minlength=4), [5, 9, 9, 7])
  # Different across splits, the same for the same seed, different for another seed.
  assert len({tuple(s.train) for s in splits}) == 4
  again = probes.draw_splits(labels, 5, 4, 3, max_test_per_class=9)
  for a, b in zip(splits, again):
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
  other = probes.draw_splits(labels, 5, 4, 4, max_test_per_class=9)
  assert all(not np.array_equal(a.train, b.train) for a, b in zip(splits, other))
  # Split s depends on (seed, s) only: a shorter run's splits are the first of a longer one's.
  np.testing.assert_array_equal(
      probes.draw_splits(labels, 5, 2, 3, max_test_per_class=9)[1].test, splits[1].test)
  # Without a cap every remaining example is a test example.
  for split in probes.draw_splits(labels, 5, 2, 0):
    assert split.train.size + split.test.size == labels.size


def test_splits_with_too_many_training_examples_name_the_class_and_what_works():
  labels = np.repeat(np.arange(3), [31, 20, 45])
  with pytest.raises(errors.ConfigError) as excinfo:
    probes.draw_splits(labels, per_class=30, num_splits=2, seed=0)
  message = one_line(excinfo)
  assert 'class 1' in message and '20 examples' in message and 'per_class=19' in message
  probes.draw_splits(labels, per_class=19, num_splits=2, seed=0)  # the largest that works
  with pytest.raises(errors.ConfigError):
    probes.draw_splits(labels, per_class=20, num_splits=2, seed=0)
  with pytest.raises(errors.ConfigError) as excinfo:
    probes.draw_splits(np.array([0, 0, 1]), per_class=1, num_splits=1, seed=0)
  assert 'class 1' in one_line(excinfo)
  for bad in ({'per_class': 0}, {'num_splits': 0}, {'seed': -1}, {'max_test_per_class': 0}):
    kwargs = {'per_class': 2, 'num_splits': 1, 'seed': 0, **bad}
    with pytest.raises(errors.ConfigError):
      probes.draw_splits(labels, **kwargs)


# ------------------------------------------------------------------------------------------------
# Metrics.


def test_mean_per_class_accuracy_by_hand():
  labels = np.array([0, 0, 0, 0, 1, 1, 3])
  predictions = np.array([0, 0, 0, 1, 0, 0, 3])
  # Class 0: 3/4, class 1: 0/2, class 3: 1/1; class 2 has no test example and is left out.
  np.testing.assert_allclose(probes.per_class_accuracy(labels, predictions, 4),
                             [0.75, 0.0, np.nan, 1.0])
  assert probes.mean_per_class_accuracy(labels, predictions, 4) == pytest.approx(1.75 / 3)
  # Not the overall accuracy (4/7), which weighs the classes by their size.
  assert probes.mean_per_class_accuracy(labels, predictions, 4) != pytest.approx(4 / 7)
  with pytest.raises(errors.ConfigError):
    probes.mean_per_class_accuracy(labels, predictions, 3)  # class 3 outside num_classes


def test_average_precision_matches_scikit_learn_with_ties():
  rng = np.random.default_rng(0)
  for n, levels in ((200, None), (60, 4), (37, 2)):  # continuous scores, then heavy ties
    targets = (rng.random((n, 5)) < [0.05, 0.2, 0.5, 0.8, 0.97]).astype(int)
    targets[0] = 1  # every class has a positive
    scores = rng.normal(size=(n, 5)) + targets * rng.uniform(0, 2, 5)
    if levels is not None:
      scores = np.round(scores * levels / 3) / levels
    expected = average_precision_score(targets, scores, average=None)
    np.testing.assert_allclose(probes.average_precision(targets, scores), expected, rtol=1e-12)
    assert probes.mean_average_precision(targets, scores) == pytest.approx(expected.mean())
    for k in range(5):
      assert probes.average_precision(targets[:, k], scores[:, k]) == pytest.approx(expected[k])
  # All tied: AP is the fraction of positives; perfect ranking: 1.
  assert probes.average_precision(np.array([1, 0, 0, 1]), np.zeros(4)) == pytest.approx(0.5)
  assert probes.average_precision(np.array([0, 1, 1]), np.array([0.1, 0.5, 0.9])) == 1.0
  # A class without a positive is NaN and left out of the mean.
  targets = np.array([[1, 0], [0, 0], [1, 0]])
  scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.5]])
  ap = probes.average_precision(targets, scores)
  assert ap[0] == 1.0 and np.isnan(ap[1])
  assert probes.mean_average_precision(targets, scores) == 1.0


def test_mean_and_std_over_splits_is_the_sample_std():
  assert probes.mean_and_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
  mean, std = probes.mean_and_std([0.8])
  assert mean == 0.8 and np.isnan(std)


# ------------------------------------------------------------------------------------------------
# Preprocessing.


def test_preprocessing_flattens_normalises_and_standardises_with_the_training_split():
  maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
  np.testing.assert_array_equal(probes.flatten_features(maps), maps.reshape(2, 12))
  unit = probes.l2_normalize(maps)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
  assert unit.dtype == np.float32
  np.testing.assert_array_equal(probes.l2_normalize(np.zeros((2, 3))), 0.0)

  train = np.array([[1.0, 5.0], [3.0, 5.0]])
  standardizer = probes.Standardizer.fit(train)
  np.testing.assert_allclose(standardizer.apply(train), [[-1, 0], [1, 0]])  # constant: centred
  # The test split is standardised with the training statistics, not its own.
  np.testing.assert_allclose(standardizer.apply(np.array([[5.0, 7.0]])), [[3, 2]])
  with pytest.raises(errors.ConfigError):
    standardizer.apply(np.zeros((1, 3)))
  with pytest.raises(errors.ConfigError):
    probes.train_svm(np.array([[np.nan], [1.0]]), np.array([0, 1]))


# ------------------------------------------------------------------------------------------------
# The classifiers against scikit-learn.


@pytest.fixture(scope='module')
def overlapping():
  """Clusters that overlap (so the classifiers disagree somewhere) and a split of them."""
  features, labels = clusters(separation=1.5)
  split = probes.draw_splits(labels, TRAIN, 1, seed=0)[0]
  return features, labels, split


def test_softmax_equals_scikit_learn_logistic_regression(overlapping):
  features, labels, split = overlapping
  n = split.train.size
  C = 0.5
  l2 = probes.softmax_l2_from_sklearn_c(C, n)
  assert l2 == pytest.approx(1 / (C * n))
  probe = probes.train_softmax(features[split.train], labels[split.train], K, l2=l2)
  assert probe.info['converged'], probe.info
  train_x = probe.standardizer.apply(features[split.train]).astype(np.float64)
  test_x = probe.standardizer.apply(features[split.test]).astype(np.float64)
  # Multinomial (scikit-learn's only multi-class loss for lbfgs), L2, converged tightly.
  reference = LogisticRegression(C=C, solver='lbfgs', tol=1e-10, max_iter=10_000)
  reference.fit(train_x, labels[split.train])
  agree = np.mean(probe.predict(features[split.test]) == reference.predict(test_x))
  assert agree >= 0.99, agree
  # Coefficients within 0.2 % of their largest magnitude (float32 L-BFGS vs float64); the
  # intercepts, defined up to a common shift, compared centred.
  coef = reference.coef_.T
  scale = np.abs(coef).max()
  np.testing.assert_allclose(probe.weights, coef, rtol=0, atol=2e-3 * scale)
  np.testing.assert_allclose(probe.bias - probe.bias.mean(),
                             reference.intercept_ - reference.intercept_.mean(), rtol=0,
                             atol=2e-3 * scale)
  # A different C is a different solution: the comparison can tell.
  assert np.abs(
      probes.train_softmax(features[split.train], labels[split.train], K, l2=10 * l2).weights -
      coef).max() > 0.05 * scale
  # Deterministic: the same fit twice gives the same bits.
  again = probes.train_softmax(features[split.train], labels[split.train], K, l2=l2)
  np.testing.assert_array_equal(again.weights, probe.weights)


def test_svm_equals_scikit_learn_linear_svc(overlapping):
  features, labels, split = overlapping
  probe = probes.train_svm(features[split.train], labels[split.train], K, C=0.3)
  train_x = probe.standardizer.apply(features[split.train])
  test_x = probe.standardizer.apply(features[split.test])
  reference = LinearSVC(C=0.3, random_state=0, max_iter=10_000).fit(train_x, labels[split.train])
  np.testing.assert_array_equal(probe.predict(features[split.test]), reference.predict(test_x))
  np.testing.assert_allclose(probe.scores(features[split.test]),
                             reference.decision_function(test_x), rtol=1e-12, atol=1e-12)
  # Two classes: LinearSVC's one margin; the probe predicts the same.
  two = np.isin(labels, [1, 4])
  x2, y2 = features[two], labels[two]
  binary = probes.train_svm(x2, y2, K)
  reference = LinearSVC(random_state=0, max_iter=10_000).fit(binary.standardizer.apply(x2), y2)
  np.testing.assert_array_equal(binary.predict(x2),
                                reference.predict(binary.standardizer.apply(x2)))
  assert np.all(np.isin(binary.predict(features), [1, 4]))  # absent classes are never predicted


def test_svm_without_scikit_learn_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'sklearn.svm', None)  # `import sklearn.svm` now fails
  with pytest.raises(errors.ConfigError) as excinfo:
    probes.train_svm(np.eye(4), np.array([0, 1, 0, 1]))
  assert "pip install 'alexnet_jax[transfer]'" in one_line(excinfo)


# ------------------------------------------------------------------------------------------------
# The protocol: it must succeed where it can and fail where it must.


@pytest.mark.parametrize('classifier', ['softmax', 'svm'])
def test_protocol_separable_near_100_random_near_chance(classifier):
  separable, labels = clusters(separation=8.0, seed=1)
  splits = probes.draw_splits(labels, TRAIN, 3, seed=0, max_test_per_class=20)
  good = probes.evaluate_splits(separable, labels, splits, classifier, K)
  assert good.accuracies.shape == (3,)
  assert good.mean >= 0.98, good
  assert good.std == pytest.approx(np.std(good.accuracies, ddof=1))
  # Features that carry no information about the labels: chance is 1/6. With 120 test examples
  # per split, 3 splits, a probe that leaked test labels or memorised would be far above.
  noise = np.random.default_rng(2).normal(size=separable.shape).astype(np.float32)
  bad = probes.evaluate_splits(noise, labels, splits, classifier, K)
  assert bad.mean < 0.3, bad
  # Labels shuffled across examples: as bad.
  shuffled = np.random.default_rng(3).permutation(labels)
  splits = probes.draw_splits(shuffled, TRAIN, 3, seed=0, max_test_per_class=20)
  assert probes.evaluate_splits(separable, shuffled, splits, classifier, K).mean < 0.3


def test_evaluate_splits_takes_a_function_and_refuses_unknown_names(overlapping):
  features, labels, _ = overlapping
  splits = probes.draw_splits(labels, TRAIN, 2, seed=0)

  class Constant:

    def predict(self, x):
      return np.zeros(len(x), int)

  result = probes.evaluate_splits(features, labels, splits, lambda x, y, k: Constant(), K)
  np.testing.assert_allclose(result.accuracies, 1 / K)  # one class of K right
  with pytest.raises(errors.ConfigError):
    probes.evaluate_splits(features, labels, splits, 'knn', K)


# ------------------------------------------------------------------------------------------------
# Multi-label (VOC-like): one-vs-rest.


def multilabel(informative, seed=0, n=150, k=4):
  """Features: the sum of the present classes' directions (the same for every seed) + noise."""
  directions = np.random.default_rng(100).normal(size=(k, D))
  rng = np.random.default_rng(seed)
  targets = (rng.random((n, k)) < 0.3).astype(int)
  targets[:2] = [[1] * k, [0] * k]  # every class has positives and negatives
  signal = targets @ directions * 2.0 if informative else 0.0
  return (signal + rng.normal(size=(n, D))).astype(np.float32), targets


def test_one_vs_rest_svm_equals_a_linear_svc_per_class():
  features, targets = multilabel(informative=True)
  probe = probes.train_one_vs_rest(features, targets, 'svm', C=0.5)
  x = probe.standardizer.apply(features)
  scores = probe.scores(features)
  for k in range(targets.shape[1]):
    reference = LinearSVC(C=0.5, random_state=0, max_iter=10_000).fit(x, targets[:, k])
    np.testing.assert_allclose(scores[:, k], reference.decision_function(x), rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(probe.predict_multilabel(features), scores > 0)


def test_one_vs_rest_logistic_matches_scikit_learn_and_the_map_can_fail():
  features, targets = multilabel(informative=True)
  n, C = len(targets), 1.0
  probe = probes.train_one_vs_rest(features, targets, 'softmax', l2=1 / (C * n))
  x = probe.standardizer.apply(features).astype(np.float64)
  for k in range(targets.shape[1]):
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x, targets[:, k])
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(probe.weights[:, k], reference.coef_[0], atol=2e-3 * scale)
    assert probe.bias[k] == pytest.approx(reference.intercept_[0], abs=2e-3 * scale)
  # Held-out examples: informative features rank well, noise ranks at the prevalence (~0.3).
  test_features, test_targets = multilabel(informative=True, seed=1)
  assert probes.mean_average_precision(test_targets, probe.scores(test_features)) > 0.9
  noise, noise_targets = multilabel(informative=False)
  for kind in ('softmax', 'svm'):
    blind = probes.train_one_vs_rest(noise, noise_targets, kind)
    assert probes.mean_average_precision(test_targets, blind.scores(test_features)) < 0.5
  with pytest.raises(errors.ConfigError) as excinfo:
    probes.train_one_vs_rest(features, np.c_[targets, np.zeros(n, int)], 'svm')
  assert 'class 4' in one_line(excinfo)


def test_softmax_warns_when_it_runs_out_of_iterations(overlapping):
  features, labels, split = overlapping
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    probe = probes.train_softmax(features[split.train], labels[split.train], K, l2=1e-4, max_iter=3)
  assert probe.info['iterations'] == 3 and not probe.info['converged']
  assert any('max_iter=3' in str(w.message) for w in caught)
