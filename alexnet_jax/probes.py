"""Linear classifiers on fixed features, and the metrics of the transfer protocol.

Zeiler & Fergus (2014, §5) keep an ImageNet-trained network fixed and train a new classifier on
one layer's features: a softmax (multinomial logistic regression) or a linear SVM, trained on N
random images per class and tested on the rest of each class (at most a cap per class), over S
random splits, reporting the mean ± standard deviation over the splits of the *mean per-class
accuracy* (the Caltech metric). PASCAL VOC is multi-label: one binary classifier per class
(one-vs-rest) and the average precision of each class, and their mean.

This module works on NumPy arrays only: it knows nothing of networks or data sets
(``transfer`` extracts the features and calls it). Its parts:

- ``draw_splits``: the seeded, class-balanced train/test splits.
- ``train_softmax`` (JAX + optax, float32, deterministic) and ``train_svm`` (scikit-learn's
  ``LinearSVC``), both returning a ``LinearProbe`` with ``scores`` and ``predict``;
  ``train_one_vs_rest`` for multi-label targets (an SVM or a logistic regression per class).
- ``mean_per_class_accuracy``, ``average_precision``, ``mean_average_precision``,
  ``mean_and_std``, and ``evaluate_splits``, which trains and tests a classifier on every split.
- ``flatten_features`` and ``l2_normalize``: the preprocessing a caller may choose.

Preprocessing, in order: features are flattened to ``(n, d)`` (a conv layer's ``(n, h, w, c)``
maps become vectors); ``l2_normalize`` (optional, the caller's choice: VGG's image descriptor is
L2-normalised) works per example, so it may be applied before splitting; then every classifier
standardises each feature with the mean and standard deviation of its *training* split (the test
split never leaks into them; a feature that is constant on the training split is only centred).
Standardising makes one regularisation strength mean the same thing for every layer (the layers'
activations differ in scale by orders of magnitude) and makes the optimisers converge quickly;
``standardize=False`` turns it off. The standardised features are float32, the precision the
network computes them in.

Regularisation. ``train_softmax`` minimises ``mean_i CE(x_i, y_i) + (l2 / 2) ||W||²`` (the bias
is not penalised): scikit-learn's ``LogisticRegression`` minimises ``0.5 ||W||² + C Σ_i CE``,
the same problem divided by ``C n``, so ``l2 = 1 / (C n)`` with ``n`` training examples
(``softmax_l2_from_sklearn_c``). ``train_svm`` is ``LinearSVC(C=C)`` itself: one-vs-rest,
squared hinge, its bias penalised like a weight (scikit-learn's ``intercept_scaling=1``).

Standard deviations over splits are *sample* standard deviations (``ddof=1``, the estimate of
the spread of the protocol's result from split to split); with a single split it is NaN
(undefined), not 0.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from alexnet_jax import errors

SKLEARN_HINT = "pip install 'alexnet_jax[transfer]'"
# Classifier names ``evaluate_splits`` and ``train_one_vs_rest`` accept.
CLASSIFIERS = ('softmax', 'svm')


@dataclasses.dataclass(frozen=True)
class Split:
  """One train/test split: sorted, disjoint index arrays into the labels it was drawn from."""
  train: np.ndarray
  test: np.ndarray


@dataclasses.dataclass(frozen=True)
class SplitResults:
  """Per-split mean per-class accuracies (fractions in [0, 1]) and their mean and sample std."""
  accuracies: np.ndarray
  mean: float
  std: float


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """``(x - mean) / scale`` per feature, with the statistics of a training split."""
  mean: np.ndarray
  scale: np.ndarray

  @classmethod
  def fit(cls, features) -> Standardizer:
    """The training split's mean and (population) standard deviation; a constant feature gets
    scale 1, as in scikit-learn's ``StandardScaler``."""
    x = flatten_features(features).astype(np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return cls(mean=mean, scale=np.where(std > 0, std, 1.0))

  def apply(self, features) -> np.ndarray:
    x = flatten_features(features)
    if x.shape[1] != self.mean.shape[0]:
      raise errors.ConfigError(f'features have {x.shape[1]} dimensions; the classifier was trained '
                               f'on {self.mean.shape[0]}')
    return ((x - self.mean) / self.scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LinearProbe:
  """A trained linear classifier: ``scores(x) = standardize(x) @ weights + bias``.

  ``weights`` is ``(d, k)``, ``bias`` ``(k,)``: one column per class (for ``train_one_vs_rest``,
  one binary classifier per column). ``kind`` is ``'softmax'``, ``'svm'``, ``'logistic_ovr'`` or
  ``'svm_ovr'``; ``info`` says how the fit went (iterations, final gradient, ...).
  """
  weights: np.ndarray
  bias: np.ndarray
  standardizer: Standardizer | None
  kind: str
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def prepare(self, features) -> np.ndarray:
    """The features as the classifier sees them: flattened, standardised, float32."""
    if self.standardizer is None:
      return _check_features(features).astype(np.float32)
    return self.standardizer.apply(_check_features(features))

  def scores(self, features) -> np.ndarray:
    """``(n, k)`` decision values (softmax logits, SVM margins, per-class logistic logits)."""
    return self.prepare(features) @ self.weights + self.bias

  def predict(self, features) -> np.ndarray:
    """Single-label predictions: the class of the highest score (the first, on ties)."""
    return np.argmax(self.scores(features), axis=1)

  def predict_multilabel(self, features) -> np.ndarray:
    """Multi-label predictions: ``(n, k)`` booleans, score > 0 (probability > ½ for logistic)."""
    return self.scores(features) > 0


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def flatten_features(features) -> np.ndarray:
  """``(n, ...)`` → ``(n, d)``: one feature vector per example (a conv map in C order)."""
  x = np.asarray(features)
  if x.ndim < 1:
    raise errors.ConfigError(f'features must have an example axis; got a scalar {x!r}')
  if x.ndim == 1:
    return x.reshape(-1, 1)
  return x.reshape(x.shape[0], -1)


def l2_normalize(features, eps: float = 1e-12) -> np.ndarray:
  """Each example's flattened feature vector divided by its L2 norm (VGG's image descriptor);
  an all-zero vector stays zero. Per example, so it may be applied before splitting."""
  x = flatten_features(features)
  norm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  return (x / np.maximum(norm, eps)).astype(np.result_type(x.dtype, np.float32))


def _check_features(features, n: int | None = None) -> np.ndarray:
  x = flatten_features(features)
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise errors.ConfigError(f'features must be real numbers; got dtype {x.dtype}')
  if n is not None and x.shape[0] != n:
    raise errors.ConfigError(f'{x.shape[0]} feature vectors for {n} labels')
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise errors.ConfigError(f'features contain {bad} non-finite values (NaN or infinity)')
  return x


def _check_labels(labels, num_classes: int | None = None, name: str = 'labels') -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1:
    raise errors.ConfigError(f'{name} must be one integer class per example; got shape {y.shape}')
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.equal(np.mod(y, 1), 0)):
      raise errors.ConfigError(f'{name} must be integer classes; got dtype {y.dtype}')
  y = y.astype(np.int64)
  if y.size and y.min() < 0:
    raise errors.ConfigError(f'{name} must be classes >= 0; got {y.min()}')
  if num_classes is not None:
    if num_classes < 1:
      raise errors.ConfigError(f'num_classes must be >= 1; got {num_classes}')
    if y.size and y.max() >= num_classes:
      raise errors.ConfigError(f'{name} has class {y.max()}, outside num_classes={num_classes}')
  return y


def _check_label_matrix(label_matrix, name: str = 'label_matrix') -> np.ndarray:
  t = np.asarray(label_matrix)
  if t.ndim != 2:
    raise errors.ConfigError(f'{name} must be (examples, classes) of 0/1; got shape {t.shape}')
  if not np.all((t == 0) | (t == 1)):
    raise errors.ConfigError(f'{name} must hold only 0 and 1 (VOC "difficult" labels are not '
                             'handled here: map them to 0 or 1 first)')
  return t.astype(bool)


# ---------------------------------------------------------------------------------------------
# Splits.


def draw_splits(labels, per_class: int, num_splits: int, seed: int,
                max_test_per_class: int | None = None) -> list[Split]:
  """``num_splits`` random splits with exactly ``per_class`` training examples of every class
  present in ``labels``, and the rest of each class (at most ``max_test_per_class`` of them, a
  random subset) for testing.

  Split ``s`` depends only on ``(seed, s)`` (a NumPy Generator seeded with both), so the first
  splits of a longer run are those of a shorter one. Index arrays are sorted.
  """
  y = _check_labels(labels)
  for name, value in (('per_class', per_class), ('num_splits', num_splits)):
    if int(value) != value or value < 1:
      raise errors.ConfigError(f'{name} must be an integer >= 1; got {value!r}')
  if max_test_per_class is not None and (int(max_test_per_class) != max_test_per_class or
                                         max_test_per_class < 1):
    raise errors.ConfigError(
        f'max_test_per_class must be an integer >= 1 or None; got {max_test_per_class!r}')
  if int(seed) != seed or seed < 0:
    raise errors.ConfigError(f'seed must be an integer >= 0; got {seed!r}')
  if not y.size:
    raise errors.ConfigError('no labels to draw splits from')
  classes, counts = np.unique(y, return_counts=True)
  smallest = int(np.argmin(counts))
  if counts[smallest] <= per_class:
    fails = int(np.sum(counts <= per_class))
    others = f' ({fails - 1} other classes too)' if fails > 1 else ''
    largest = int(counts[smallest]) - 1
    works = (f'at most per_class={largest} works' if largest >= 1 else
             'no per_class works: every class needs 2 examples, one to train and one to test')
    raise errors.ConfigError(f'per_class={per_class} leaves no test example of class '
                             f'{classes[smallest]}, which has {counts[smallest]} examples'
                             f'{others}: {works}')
  members = [np.flatnonzero(y == c) for c in classes]
  splits = []
  for s in range(int(num_splits)):
    rng = np.random.default_rng([int(seed), s])
    train, test = [], []
    for idx in members:
      order = rng.permutation(idx)
      train.append(order[:per_class])
      test.append(order[per_class:] if max_test_per_class is None else order[per_class:per_class +
                                                                             max_test_per_class])
    splits.append(Split(train=np.sort(np.concatenate(train)), test=np.sort(np.concatenate(test))))
  return splits


# ---------------------------------------------------------------------------------------------
# Metrics.


def per_class_accuracy(labels, predictions, num_classes: int) -> np.ndarray:
  """``(num_classes,)`` accuracy of each class's examples; NaN for a class with no example."""
  y = _check_labels(labels, num_classes)
  p = np.asarray(predictions).astype(np.int64)
  if p.shape != y.shape:
    raise errors.ConfigError(f'{p.shape[0] if p.ndim else p.size} predictions for '
                             f'{y.shape[0]} labels')
  total = np.bincount(y, minlength=num_classes)
  right = np.bincount(y[p == y], minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(total > 0, right / np.maximum(total, 1), np.nan)


def mean_per_class_accuracy(labels, predictions, num_classes: int) -> float:
  """The Caltech metric: the mean over classes of each class's accuracy, a fraction in [0, 1].

  Classes absent from ``labels`` (no test example) are left out of the mean, not counted as 0 or
  1: the mean is over the classes that were tested.
  """
  acc = per_class_accuracy(labels, predictions, num_classes)
  if np.all(np.isnan(acc)):
    raise errors.ConfigError('no labels: mean per-class accuracy of an empty test set')
  return float(np.nanmean(acc))


def _binary_average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
  # scikit-learn's definition (precision_recall_curve + the step integral), op for op: examples
  # sorted by descending score, tied scores one threshold, AP = Σ_n (R_n - R_{n-1}) P_n.
  order = np.argsort(scores, kind='mergesort')[::-1]
  s, t = scores[order], targets[order].astype(np.float64)
  ends = np.r_[np.flatnonzero(np.diff(s)), t.size - 1]
  tps = np.cumsum(t)[ends]
  if tps[-1] == 0:
    return float('nan')
  precision = tps / (ends + 1.0)
  recall = tps / tps[-1]
  precision = np.concatenate([precision[::-1], [1.0]])
  recall = np.concatenate([recall[::-1], [0.0]])
  return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def average_precision(targets, scores):
  """Average precision, as scikit-learn's ``average_precision_score`` defines it.

  ``targets`` 0/1 and ``scores`` of shape ``(n,)`` give a float; ``(n, k)`` give the ``(k,)``
  APs of the columns (``average=None``). AP is ``Σ_n (R_n - R_{n-1}) P_n`` over the distinct
  scores, descending (tied scores are one threshold): the non-interpolated AP, not the 11-point
  interpolated AP of the VOC 2007 devkit, and no example is "difficult" (VOC's difficult flags
  are not used: pass the targets you want scored). A class without a positive target gets NaN
  (scikit-learn warns and returns 0).
  """
  t, s = np.asarray(targets), np.asarray(scores, dtype=np.float64)
  if t.shape != s.shape or t.ndim not in (1, 2):
    raise errors.ConfigError(f'targets {t.shape} and scores {s.shape} must have the same shape, '
                             '(n,) or (n, classes)')
  if not np.all((t == 0) | (t == 1)):
    raise errors.ConfigError('average precision needs 0/1 targets')
  if np.isnan(s).any():
    raise errors.ConfigError('scores contain NaN')
  if t.ndim == 1:
    return _binary_average_precision(t, s)
  return np.array([_binary_average_precision(t[:, k], s[:, k]) for k in range(t.shape[1])])


def mean_average_precision(targets, scores) -> float:
  """The mean of ``average_precision`` over the classes that have a positive target."""
  ap = np.atleast_1d(average_precision(targets, scores))
  if np.all(np.isnan(ap)):
    raise errors.ConfigError('no class has a positive target: mean average precision undefined')
  return float(np.nanmean(ap))


def mean_and_std(values) -> tuple[float, float]:
  """Mean and *sample* standard deviation (``ddof=1``) over splits; std is NaN for one split."""
  v = np.asarray(values, dtype=np.float64).ravel()
  if not v.size:
    raise errors.ConfigError('no values to average')
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float('nan')


# ---------------------------------------------------------------------------------------------
# The softmax (and per-class logistic regression) in JAX.


def softmax_l2_from_sklearn_c(C: float, num_train: int) -> float:
  """``train_softmax``'s ``l2`` for scikit-learn's ``LogisticRegression(C=C)`` on ``num_train``
  examples: scikit-learn minimises ``0.5 ||W||² + C Σ loss``, this module ``mean loss + (l2/2)
  ||W||²``, the same divided by ``C n``."""
  return 1.0 / (C * num_train)


@functools.partial(jax.jit, static_argnames=('loss',))
def _fit_linear(x, targets, l2, tol, max_iter, *, loss: str):
  """Full-batch L-BFGS (optax, zoom line search) on a convex L2-penalised linear model.

  ``loss='softmax'``: ``targets`` are ``(n, k)`` one-hot rows, one multinomial model;
  ``loss='sigmoid'``: ``(n, k)`` 0/1 targets and one independent logistic regression per column
  (the objective is their sum, so its minimum is each one's). Stops when the largest gradient
  entry is <= ``tol`` (scipy's and scikit-learn's ``gtol``), after ``max_iter`` iterations, or
  when float32 can make no more progress (5 iterations in a row without a decrease).
  """
  d, k = x.shape[1], targets.shape[1]
  params = {'w': jnp.zeros((d, k), jnp.float32), 'b': jnp.zeros((k,), jnp.float32)}

  def objective(p):
    logits = x @ p['w'] + p['b']
    if loss == 'softmax':
      data = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      data = optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=1).mean()
    return data + 0.5 * l2 * jnp.sum(jnp.square(p['w']))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def gradient_max(state):
    return otu.tree_max(jax.tree.map(jnp.abs, otu.tree_get(state, 'grad')))

  def step(carry):
    p, state, stalled = carry
    before = otu.tree_get(state, 'value')
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    p = optax.apply_updates(p, updates)
    after = otu.tree_get(state, 'value')
    stalled = jnp.where(after < jnp.minimum(before, value), 0, stalled + 1)
    return p, state, stalled

  def keep_going(carry):
    _, state, stalled = carry
    count = otu.tree_get(state, 'count')
    return (count == 0) | ((count < max_iter) & (gradient_max(state) > tol) & (stalled < 5))

  p, state, stalled = jax.lax.while_loop(keep_going, step, (params, opt.init(params), 0))
  return p, otu.tree_get(state, 'count'), gradient_max(state), otu.tree_get(state, 'value')


def _lbfgs(x: np.ndarray, targets: np.ndarray, l2: float, tol: float, max_iter: int, loss: str):
  if not l2 > 0:
    raise errors.ConfigError(f'l2 must be > 0 (the problem has no unique minimum without it); '
                             f'got {l2!r}')
  if int(max_iter) != max_iter or max_iter < 1:
    raise errors.ConfigError(f'max_iter must be an integer >= 1; got {max_iter!r}')
  p, count, grad_max, value = _fit_linear(jnp.asarray(x, jnp.float32),
                                          jnp.asarray(targets, jnp.float32), jnp.float32(l2),
                                          jnp.float32(tol), jnp.int32(max_iter), loss=loss)
  info = {
      'iterations': int(count), 'gradient_max': float(grad_max), 'objective': float(value),
      'converged': bool(grad_max <= tol)
  }
  if info['iterations'] >= max_iter and not info['converged']:
    warnings.warn(
        f'L-BFGS stopped after max_iter={max_iter} iterations with gradient '
        f'{info["gradient_max"]:.2g} > tol={tol:g}: raise max_iter or l2', RuntimeWarning,
        stacklevel=3)
  return np.asarray(p['w']), np.asarray(p['b']), info


def _standardized(features, standardize: bool):
  x = _check_features(features)
  if not x.shape[0]:
    raise errors.ConfigError('no training examples')
  if not standardize:
    return x.astype(np.float32), None
  standardizer = Standardizer.fit(x)
  return standardizer.apply(x), standardizer


def train_softmax(features, labels, num_classes: int, *, l2: float = 1e-3, standardize: bool = True,
                  max_iter: int = 1000, tol: float = 1e-5) -> LinearProbe:
  """Multinomial logistic regression: minimises ``mean_i CE + (l2 / 2) ||W||²`` (bias free) by
  full-batch L-BFGS in float32 from zero weights (deterministic).

  ``l2 = 1 / (C n)`` is scikit-learn's ``LogisticRegression(C=C)`` on ``n`` training examples
  (``softmax_l2_from_sklearn_c``). ``tol`` bounds the largest gradient entry at the end;
  ``probe.info['converged']`` says whether it was reached (a RuntimeWarning if ``max_iter`` ran
  out first; float32 may also stall just above it, harmlessly).
  """
  y = _check_labels(labels, num_classes)
  x, standardizer = _standardized(features, standardize)
  if x.shape[0] != y.shape[0]:
    raise errors.ConfigError(f'{x.shape[0]} feature vectors for {y.shape[0]} labels')
  onehot = np.eye(num_classes, dtype=np.float32)[y]
  w, b, info = _lbfgs(x, onehot, l2, tol, max_iter, 'softmax')
  return LinearProbe(weights=w, bias=b, standardizer=standardizer, kind='softmax', info=info)


# ---------------------------------------------------------------------------------------------
# The linear SVM (scikit-learn).


def _sklearn(module: str):
  """A scikit-learn module, imported on first use: it is the optional ``transfer`` extra."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise errors.ConfigError(f'the linear SVM needs scikit-learn ({module} cannot be imported: '
                             f'{e}): {SKLEARN_HINT}') from e


def _linear_svc(C: float, max_iter: int, tol: float, random_state: int):
  if not C > 0:
    raise errors.ConfigError(f'C must be > 0; got {C!r}')
  return _sklearn('sklearn.svm').LinearSVC(C=C, loss='squared_hinge', tol=tol, max_iter=max_iter,
                                           random_state=random_state)


def train_svm(features, labels, num_classes: int | None = None, *, C: float = 1.0,
              standardize: bool = True, max_iter: int = 10_000, tol: float = 1e-4,
              random_state: int = 0) -> LinearProbe:
  """scikit-learn's ``LinearSVC(C=C)`` (one-vs-rest, squared hinge, L2, bias penalised) on the
  standardised features, as a ``LinearProbe`` with one score column per class.

  With ``num_classes`` the probe has that many columns; a class absent from the training labels
  scores ``-inf`` (never predicted). With two classes LinearSVC fits one margin ``m``; the probe
  scores ``[0, m]``, so it predicts exactly what LinearSVC predicts.
  """
  y = _check_labels(labels, num_classes)
  x, standardizer = _standardized(features, standardize)
  if x.shape[0] != y.shape[0]:
    raise errors.ConfigError(f'{x.shape[0]} feature vectors for {y.shape[0]} labels')
  present = np.unique(y)
  if present.size < 2:
    raise errors.ConfigError(f'an SVM needs training examples of 2 classes or more; got only '
                             f'class {present[0]}')
  k = int(num_classes) if num_classes is not None else int(y.max()) + 1
  svc = _linear_svc(C, max_iter, tol, random_state).fit(x, y)
  coef, intercept = np.asarray(svc.coef_), np.asarray(svc.intercept_)
  if present.size == 2:  # one margin for classes_[1]; classes_[0] scores 0
    coef = np.concatenate([np.zeros_like(coef), coef])
    intercept = np.concatenate([np.zeros_like(intercept), intercept])
  w = np.zeros((x.shape[1], k))
  b = np.full(k, -np.inf)
  w[:, present] = coef.T
  b[present] = intercept
  info = {'iterations': int(np.max(svc.n_iter_))}
  return LinearProbe(weights=w, bias=b, standardizer=standardizer, kind='svm', info=info)


# ---------------------------------------------------------------------------------------------
# Multi-label (PASCAL VOC): one binary classifier per class.


def train_one_vs_rest(features, label_matrix, kind: str = 'svm', *, C: float = 1.0,
                      l2: float = 1e-3, standardize: bool = True, max_iter: int | None = None,
                      tol: float | None = None, random_state: int = 0) -> LinearProbe:
  """One binary classifier per column of the ``(n, k)`` 0/1 ``label_matrix``; the probe's
  ``scores`` are the ``(n, k)`` per-class decision values for ``average_precision``.

  ``kind='svm'``: a ``LinearSVC(C=C)`` per class (``max_iter`` 10000, ``tol`` 1e-4 by default).
  ``kind='softmax'`` (alias ``'logistic'``): a binary logistic regression per class, minimising
  ``mean_i BCE + (l2 / 2) ||w||²`` (``l2 = 1 / (C n)`` of scikit-learn's binary
  ``LogisticRegression``), all fitted at once by ``train_softmax``'s L-BFGS (``max_iter`` 1000,
  ``tol`` 1e-5 by default). Every class needs positive and negative training examples.
  """
  t = _check_label_matrix(label_matrix)
  x, standardizer = _standardized(features, standardize)
  if x.shape[0] != t.shape[0]:
    raise errors.ConfigError(f'{x.shape[0]} feature vectors for {t.shape[0]} label rows')
  positives = t.sum(axis=0)
  for k, count in enumerate(positives):
    if count == 0 or count == t.shape[0]:
      raise errors.ConfigError(f'class {k} has {"no" if count == 0 else "only"} positive '
                               'training examples: a binary classifier needs both')
  if kind in ('softmax', 'logistic'):
    w, b, info = _lbfgs(x, t.astype(np.float32), l2, 1e-5 if tol is None else tol,
                        1000 if max_iter is None else max_iter, 'sigmoid')
    return LinearProbe(weights=w, bias=b, standardizer=standardizer, kind='logistic_ovr', info=info)
  if kind != 'svm':
    raise errors.ConfigError(f"unknown classifier kind {kind!r}: 'svm' or 'softmax'")
  w = np.zeros((x.shape[1], t.shape[1]))
  b = np.zeros(t.shape[1])
  iterations = []
  for k in range(t.shape[1]):
    svc = _linear_svc(C, 10_000 if max_iter is None else max_iter, 1e-4 if tol is None else tol,
                      random_state).fit(x, t[:, k].astype(np.int64))
    w[:, k], b[k] = svc.coef_[0], svc.intercept_[0]
    iterations.append(int(np.max(svc.n_iter_)))
  return LinearProbe(weights=w, bias=b, standardizer=standardizer, kind='svm_ovr',
                     info={'iterations': iterations})


# ---------------------------------------------------------------------------------------------
# The protocol.

Classifier = Callable[..., Any]


def _trainer(classifier: str | Classifier) -> Classifier:
  if callable(classifier):
    return classifier
  if classifier == 'softmax':
    return train_softmax
  if classifier == 'svm':
    return train_svm
  raise errors.ConfigError(f"unknown classifier {classifier!r}: one of {', '.join(CLASSIFIERS)} "
                           'or a function (features, labels, num_classes) -> model with predict')


def evaluate_splits(features, labels, splits: Sequence[Split],
                    classifier: str | Classifier = 'softmax', num_classes: int | None = None,
                    **classifier_kwargs) -> SplitResults:
  """Trains ``classifier`` on each split's training examples and scores the mean per-class
  accuracy of its test examples; returns the accuracies and their mean and sample std.

  ``classifier`` is ``'softmax'`` (``train_softmax``), ``'svm'`` (``train_svm``) or a function
  ``(features, labels, num_classes, **classifier_kwargs)`` returning a model with ``predict``.
  ``num_classes`` defaults to the largest label + 1.
  """
  y = _check_labels(labels, num_classes)
  x = _check_features(features, y.shape[0])
  k = int(num_classes) if num_classes is not None else int(y.max()) + 1
  train = _trainer(classifier)
  if not splits:
    raise errors.ConfigError('no splits to evaluate')
  accuracies = []
  for split in splits:
    model = train(x[split.train], y[split.train], k, **classifier_kwargs)
    accuracies.append(mean_per_class_accuracy(y[split.test], model.predict(x[split.test]), k))
  mean, std = mean_and_std(accuracies)
  return SplitResults(accuracies=np.asarray(accuracies), mean=mean, std=std)
