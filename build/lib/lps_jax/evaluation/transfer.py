"""Task transferability vs parameter similarity (Sec. 5.3, Fig. 3a): the library pieces.

- Parameter similarity of two tasks: the mean cosine similarity over all pairs of their models'
  L2-normalised second-order representations (pairs of a model with itself are left out).
- Transferability source -> target: the source task's first-order models extract the
  global-average-pooled features of the target task's images; k-means (k = 2) clusters them and
  the adjusted Rand index against the target's true labels scores the clustering, averaged over
  the source models.
- Their relation: Spearman and Pearson correlation with two-sided permutation-test p-values.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from lps_jax.common import cache as cache_lib
from lps_jax.common.errors import UserError
from lps_jax.training import data as data_lib
from lps_jax.training import resnet


def task_similarity(embeddings: np.ndarray, task_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tasks (T,), sim (T, T)): mean pairwise cosine between the models of two tasks."""
  emb = np.asarray(embeddings, np.float64)
  if emb.ndim != 2 or emb.shape[0] != len(task_id):
    raise UserError(f'embeddings must be (M, D) with M = {len(task_id)}, got {emb.shape}.')
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  cos = emb @ emb.T
  tasks = np.unique(task_id)
  masks = [np.asarray(task_id) == t for t in tasks]
  sim = np.zeros((tasks.size, tasks.size))
  for i, mi in enumerate(masks):
    for j, mj in enumerate(masks):
      block = cos[np.ix_(mi, mj)]
      if i == j:
        n = block.shape[0]
        sim[i, j] = (block.sum() - np.trace(block)) / max(n * (n - 1), 1)
      else:
        sim[i, j] = block.mean()
  return tasks, sim


@functools.partial(jax.jit, static_argnums=(0,))
def _pooled_features(model: resnet.ResNet, variables, images_uint8):
  return model.apply(variables, data_lib.normalize(images_uint8), train=False, features=True)


def extract_features(params, batch_stats, images: np.ndarray,
                     config: resnet.ResNetConfig = resnet.ResNetConfig(),
                     batch_size: int = 500) -> np.ndarray:
  """Pooled features (M, N, d) of N uint8 images under each of M stacked models."""
  model = resnet.ResNet(config)
  m = jax.tree_util.tree_leaves(params)[0].shape[0]
  out = []
  for i in range(m):
    v = {'params': jax.tree_util.tree_map(lambda x: x[i], params),
         'batch_stats': jax.tree_util.tree_map(lambda x: x[i], batch_stats)}
    out.append(np.concatenate([np.asarray(_pooled_features(model, v, images[s:s + batch_size]))
                               for s in range(0, images.shape[0], batch_size)]))
  return np.stack(out)


def kmeans_ari(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
  """Adjusted Rand index of a 2-means clustering of `features` against binary `labels`."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] != len(labels):
    raise UserError(f'features must be (N, d) with N = {len(labels)}, got {features.shape}.')
  if not np.all(np.isfinite(features)):
    raise UserError('features contain NaN/Inf; check the source models.')
  pred = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(features)
  return float(adjusted_rand_score(labels, pred))


def task_images(images: np.ndarray, labels: np.ndarray, task: int):
  """Images of task r (fine labels 2r, 2r+1) and their binary labels (0 for 2r)."""
  rows = np.flatnonzero((labels == 2 * task) | (labels == 2 * task + 1))
  if rows.size == 0:
    raise UserError(f'the data split has no images of task {task} (fine labels {2 * task}, '
                     f'{2 * task + 1}).')
  return images[rows], (labels[rows] == 2 * task + 1).astype(np.int32)


def transferability(params, batch_stats, task_id: np.ndarray, images: np.ndarray,
                    labels: np.ndarray, tasks, config: resnet.ResNetConfig = resnet.ResNetConfig(),
                    cache=None, progress=None, seed: int = 0) -> np.ndarray:
  """ARI (T, T): row s = source task, column t = target task, NaN on the diagonal.

  Every model of the source task extracts pooled features of all target tasks' images; 2-means
  per target, ARI against the target's labels, averaged over the source's models. With a
  `cache_lib.Cache`, each source task's row is stored under a hash of its models and the images.
  `progress(done, total)` is called after each source task.
  """
  task_id = np.asarray(task_id)
  tasks = [int(t) for t in tasks]
  missing = [t for t in tasks if not np.any(task_id == t)]
  if missing:
    raise UserError(f'the model set has no models of tasks {missing}; train them or choose '
                     'other tasks.')
  per_target = [task_images(images, labels, t) for t in tasks]
  all_images = np.concatenate([x for x, _ in per_target])
  bounds = np.cumsum([0] + [x.shape[0] for x, _ in per_target])
  take = lambda tree, rows: jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], tree)
  ari = np.full((len(tasks), len(tasks)), np.nan)
  for i, source in enumerate(tasks):
    rows = np.flatnonzero(task_id == source)
    p, b = take(params, rows), take(batch_stats, rows)

    def compute(p=p, b=b, i=i):
      feats = extract_features(p, b, all_images, config)
      scores = np.full((rows.size, len(tasks)), np.nan)
      for m in range(rows.size):
        for j, (_, y) in enumerate(per_target):
          if j != i:
            scores[m, j] = kmeans_ari(feats[m, bounds[j]:bounds[j + 1]], y, seed)
      return {'ari': scores}

    if cache is None:
      scores = compute()['ari']
    else:
      key = {'kind': 'transfer_ari', 'source': source, 'targets': tasks, 'seed': seed,
             'models': cache_lib.fingerprint(*jax.tree_util.tree_leaves((p, b))),
             'images': cache_lib.fingerprint(all_images)}
      scores = cache.arrays(key, compute)['ari']
    ari[i] = scores.mean(axis=0)  # NaN stays on the diagonal only.
    if progress is not None:
      progress(i + 1, len(tasks))
  return ari


def correlation(x: np.ndarray, y: np.ndarray, num_permutations: int = 10000,
                seed: int = 0) -> dict:
  """Spearman and Pearson r of (x, y) with two-sided permutation-test p-values."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size < 3:
    raise UserError(f'x and y must be equal-length vectors of >= 3 values, got {x.shape}, {y.shape}.')
  rng = np.random.default_rng(seed)
  out = {'n': int(x.size)}
  for name, fn in (('spearman', lambda a, b: stats.spearmanr(a, b)[0]),
                   ('pearson', lambda a, b: stats.pearsonr(a, b)[0])):
    r = float(fn(x, y))
    null = np.asarray([fn(x, rng.permutation(y)) for _ in range(num_permutations)])
    out[name] = r
    out[f'{name}_p'] = float((np.sum(np.abs(null) >= abs(r)) + 1) / (num_permutations + 1))
  return out
