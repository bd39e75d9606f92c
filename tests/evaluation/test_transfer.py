import os

import jax
import numpy as np
import pytest

from lps_jax.evaluation import transfer
from lps_jax.training import data, resnet


def test_task_similarity_means_model_pairs():
  emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  tasks, sim = transfer.task_similarity(emb, np.array([3, 3, 7, 7]))
  assert tasks.tolist() == [3, 7]
  np.testing.assert_allclose(sim, [[1.0, 0.3], [0.3, 0.8]])
  with pytest.raises(ValueError, match=r'\(M, D\)'):
    transfer.task_similarity(emb, np.array([1, 2]))


def test_kmeans_ari_range_and_extremes():
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1], 20)
  separable = rng.normal(size=(40, 3)) + 10 * labels[:, None]
  assert transfer.kmeans_ari(separable, labels) == pytest.approx(1.0)
  noise = transfer.kmeans_ari(rng.normal(size=(40, 3)), labels)
  assert -1.0 <= noise <= 1.0 and abs(noise) < 0.3
  with pytest.raises(ValueError, match='NaN'):
    transfer.kmeans_ari(np.full((40, 3), np.nan), labels)


def test_correlation_permutation_test():
  rng = np.random.default_rng(1)
  x = rng.normal(size=60)
  strong = transfer.correlation(x, 2 * x + 0.3 * rng.normal(size=60), num_permutations=500)
  assert strong['spearman'] > 0.9 and strong['pearson_p'] < 0.01
  null = transfer.correlation(x, rng.normal(size=60), num_permutations=500)
  assert null['spearman_p'] > 0.01 and 0 < null['pearson_p'] <= 1


def test_extract_features_shapes_and_model_dependence(data_dir):
  cfg = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))
  vs = [resnet.init_variables(jax.random.PRNGKey(i), cfg) for i in range(2)]
  stack = lambda key: jax.tree_util.tree_map(lambda *x: np.stack(x), *[v[key] for v in vs])
  images = data.load_npz(os.path.join(data_dir, 'test.npz')).images[:7]
  f = transfer.extract_features(stack('params'), stack('batch_stats'), images, cfg, batch_size=4)
  assert f.shape == (2, 7, 8) and np.all(np.isfinite(f))
  assert not np.allclose(f[0], f[1])
