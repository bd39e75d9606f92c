import numpy as np
import pytest

from lps_jax.evaluation import metrics


def test_topk_accuracy_against_brute_force():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(200, 50))
  labels = rng.integers(0, 50, 200)
  got = metrics.topk_accuracy(scores, labels, (1, 5, 10))
  for k in (1, 5, 10):
    ref = np.mean([labels[i] in np.argsort(-scores[i])[:k] for i in range(200)])
    assert got[k] == pytest.approx(ref)
  # Random scores over 50 classes: near k / 50.
  assert abs(got[10] - 0.2) < 0.1


def test_retrieval_metrics_hand_computed():
  # Query 0 (task 1): gallery sorted by similarity = [t2, t1, t1, t3] -> first hit at rank 2,
  # AP = (1/2 + 2/3) / 2. Query 1 (task 3): first item is a hit, AP = 1.
  sim = np.array([[0.9, 0.8, 0.7, 0.1], [0.0, 0.1, 0.2, 0.9]])
  gallery = np.array([2, 1, 1, 3])
  out = metrics.retrieval_metrics(sim, np.array([1, 3]), gallery, ks=(1, 2))
  assert out['rank-1'] == 0.5 and out['rank-2'] == 1.0
  assert out['mAP'] == pytest.approx(((0.5 + 2 / 3) / 2 + 1.0) / 2)
  with pytest.raises(ValueError, match='at least one gallery'):
    metrics.retrieval_metrics(sim, np.array([7, 3]), gallery)


def test_cosine_similarity():
  a = np.array([[3.0, 4.0], [1.0, 0.0]])
  np.testing.assert_allclose(metrics.cosine_similarity(a, a), [[1, 0.6], [0.6, 1]])
