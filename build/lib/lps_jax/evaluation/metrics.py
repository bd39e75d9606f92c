"""Evaluation metrics of Sec. 5.1-5.2: top-k accuracy, CMC rank-k and mAP (numpy only)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
  """Fraction of rows whose true label is among the k highest scores (ties: lower index first)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.ndim != 2 or labels.shape != (scores.shape[0],):
    raise ValueError(f'scores (N, C) and labels (N,) expected, got {scores.shape}, {labels.shape}.')
  order = np.argsort(-scores, axis=1, kind='stable')
  rank = np.argmax(order == labels[:, None], axis=1)  # 0-based rank of the true label.
  return {k: float(np.mean(rank < k)) for k in ks}


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def retrieval_metrics(similarity: np.ndarray, query_labels: np.ndarray,
                      gallery_labels: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
  """CMC rank-k (a correct gallery item within the top k) and mAP over queries.

  similarity: (Q, N), higher = more similar. Returns {'rank-1': ..., ..., 'mAP': ...}.
  """
  similarity = np.asarray(similarity)
  q, g = np.asarray(query_labels), np.asarray(gallery_labels)
  if similarity.shape != (q.size, g.size):
    raise ValueError(f'similarity must be (queries, gallery) = {(q.size, g.size)}, '
                     f'got {similarity.shape}.')
  order = np.argsort(-similarity, axis=1, kind='stable')
  hits = g[order] == q[:, None]                      # (Q, N), sorted by similarity.
  if not np.all(hits.any(axis=1)):
    raise ValueError('every query needs at least one gallery item of its task.')
  first = np.argmax(hits, axis=1)
  out = {f'rank-{k}': float(np.mean(first < k)) for k in ks}
  cum = np.cumsum(hits, axis=1)
  precision = cum / np.arange(1, g.size + 1)
  ap = (precision * hits).sum(axis=1) / hits.sum(axis=1)
  out['mAP'] = float(np.mean(ap))
  return out
