"""The "unknown" calibration: the threshold minimises the larger error rate (checked against brute
force), and leave-tasks-out calibration tells apart tasks that are distinct from tasks that are
not."""
import numpy as np

from lps_jax.query import open_set


def test_best_threshold_minimises_the_larger_error_rate():
  rng = np.random.default_rng(0)
  seen, unseen = rng.normal(1, 1, 200), rng.normal(-1, 1, 150)
  t = open_set.best_threshold(seen, unseen)
  grid = np.linspace(-5, 5, 4001)
  brute = min(max(open_set.rates(g, seen, unseen)) for g in grid)
  assert max(open_set.rates(t, seen, unseen)) <= brute + 1e-12
  assert open_set.rates(np.inf, seen, unseen) == (0.0, 1.0)


class NearestCentroid:
  """A toy estimator: softmax of negative distances to class centroids; embeddings = inputs."""

  def __init__(self, num_classes):
    self.num_classes = num_classes

  def fit(self, inputs, labels, progress=None):
    x = inputs[0]
    self.centroids = np.stack([x[labels == c].mean(0) for c in range(self.num_classes)])

  def predict(self, inputs):
    d = ((inputs[0][:, None] - self.centroids[None]) ** 2).sum(-1)
    e = np.exp(-(d - d.min(1, keepdims=True)))
    return e / e.sum(1, keepdims=True)

  def embed(self, inputs):
    return inputs[0] / np.linalg.norm(inputs[0], axis=1, keepdims=True)


def _set(spread, tasks=10, runs=10, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(tasks, dim)) * 3
  labels = np.repeat(np.arange(tasks), runs)
  return [centres[labels] + spread * rng.normal(size=(labels.size, dim))], labels


def test_calibration_separates_distinct_tasks_and_not_identical_ones():
  x, labels = _set(spread=0.3)
  cal = open_set.calibrate(NearestCentroid, x, labels, folds=5)
  assert cal.false_accept <= 0.05 and cal.false_reject <= 0.05 and cal.seen_top1 == 1.0
  assert np.all(np.diff(cal.distances) >= 0)                     # sorted, for percentiles
  assert 0 <= cal.percentile(0.0) <= cal.percentile(2.0) == 100.0
  # Every "task" drawn from one distribution: no threshold tells seen from unseen.
  rng = np.random.default_rng(1)
  same = [rng.normal(size=(100, 16))]
  cal = open_set.calibrate(NearestCentroid, same, labels, folds=5)
  assert max(cal.false_accept, cal.false_reject) >= 0.25


def test_trade_off_points_agree_with_brute_force():
  rng = np.random.default_rng(2)
  seen, unseen = rng.normal(1, 1, 120), rng.normal(0, 1, 80)
  t = open_set.trade_off(seen, unseen)
  grid = np.concatenate([np.sort(np.r_[seen, unseen]), [np.inf]])
  pairs = [open_set.rates(g, seen, unseen) for g in grid]
  assert t['false_accept_at_10_reject'] == min(fa for fa, fr in pairs if fr <= 0.1)
  assert t['false_reject_at_10_accept'] == min(fr for fa, fr in pairs if fa <= 0.1)
  wins = (seen[:, None] > unseen[None, :]).mean()     # no ties: AUC = P(seen > unseen)
  assert abs(t['auc'] - wins) < 1e-12
