"""An honest "unknown": when is a query's best answer too weak to name a task?

Calibration leaves tasks out of the index. The classes are split into `folds` groups; for each,
the method is fitted on the other classes' models minus a held-out share of each (`HOLDOUT`),
and two scores are read for the held-out models of seen classes and for every model of the
left-out classes: the top task probability, and the cosine to the nearest fitted model. A
threshold on a score accepts (names the top task) or answers "unknown". Its error rates are
cross-fitted: the threshold applied to fold f is chosen on the other folds' scores, so the
reported false-accept rate (unseen tasks named) and false-reject rate (seen tasks called
unknown) are those of a threshold calibrated on other tasks. The threshold minimises the larger
of the two; the score whose cross-fitted rates are lower is kept. The held-out seen models'
nearest-model distances (1 - cosine) are kept too: a query's distance percentile among them
says how far it lies from what the index knows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.methods import interface

HOLDOUT = 0.2          # share of each seen class's models held out per fold
SCORES = ('probability', 'cosine')


@dataclasses.dataclass
class Calibration:
  score: str                   # which score the threshold reads (SCORES)
  threshold: float
  false_accept: float          # unseen-task models named (cross-fitted)
  false_reject: float          # seen-task held-out models called unknown (cross-fitted)
  seen_top1: float             # top-1 of the seen held-out models among the seen tasks
  folds: int
  distances: np.ndarray        # sorted nearest-model distances of the seen held-out models
  rates: dict                  # score -> cross-fitted rates and `trade_off`, both scores

  def summary(self) -> dict:
    return {'score': self.score, 'threshold': self.threshold,
            'false_accept': self.false_accept, 'false_reject': self.false_reject,
            'seen_top1': self.seen_top1, 'folds': self.folds,
            'rates': self.rates}

  @staticmethod
  def from_summary(d: dict, distances: np.ndarray) -> 'Calibration':
    return Calibration(d['score'], d['threshold'], d['false_accept'], d['false_reject'],
                       d['seen_top1'], d['folds'], np.asarray(distances), d['rates'])

  def percentile(self, distance: float) -> float:
    """Percent of the index's held-out models that lie nearer their nearest model."""
    return float(100.0 * np.searchsorted(self.distances, distance, side='right')
                 / max(self.distances.size, 1))


def best_threshold(seen: np.ndarray, unseen: np.ndarray) -> float:
  """The threshold (accept score >= t) minimising max(false accept, false reject)."""
  candidates = np.unique(np.concatenate([seen, unseen]))
  candidates = np.concatenate([candidates, [np.inf]])
  fa = np.array([(unseen >= t).mean() for t in candidates])
  fr = np.array([(seen < t).mean() for t in candidates])
  return float(candidates[int(np.argmin(np.maximum(fa, fr)))])


def rates(threshold: float, seen: np.ndarray, unseen: np.ndarray) -> tuple[float, float]:
  return float((unseen >= threshold).mean()), float((seen < threshold).mean())


def trade_off(seen: np.ndarray, unseen: np.ndarray, rate: float = 0.1) -> dict:
  """How well a score tells seen from unseen over all thresholds: the ROC AUC, the lowest
  false-accept rate among thresholds that reject at most `rate` of the seen, and the lowest
  false-reject rate among those that accept at most `rate` of the unseen."""
  from sklearn.metrics import roc_auc_score
  t = np.concatenate([np.unique(np.concatenate([seen, unseen])), [np.inf]])
  fa = (unseen[None, :] >= t[:, None]).mean(1)
  fr = (seen[None, :] < t[:, None]).mean(1)
  return {'auc': float(roc_auc_score(np.r_[np.ones(seen.size), np.zeros(unseen.size)],
                                     np.r_[seen, unseen])),
          'false_accept_at_10_reject': float(fa[fr <= rate].min()),
          'false_reject_at_10_accept': float(fr[fa <= rate].min())}


def fold_scores(estimator_for: Callable, inputs, labels: np.ndarray, folds: int, seed: int,
                progress: Optional[Callable] = None) -> dict:
  """Per evaluated model: fold, unseen (bool), correct (seen only), and both SCORES.
  `estimator_for(num_classes)` builds an unfitted estimator."""
  labels = np.asarray(labels)
  classes = np.unique(labels)
  rng = np.random.default_rng(seed)
  groups = np.array_split(rng.permutation(classes), folds)
  out = {k: [] for k in ('fold', 'unseen', 'correct') + SCORES}
  for f, left_out in enumerate(groups):
    seen = np.setdiff1d(classes, left_out)
    train, held = [], []
    for c in seen:
      rows = rng.permutation(np.flatnonzero(labels == c))
      k = min(max(int(round(HOLDOUT * rows.size)), 1), rows.size - 1)   # 0 for one model
      held += list(rows[:k])
      train += list(rows[k:])
    train, held = np.sort(train), np.sort(held)
    unseen_rows = np.flatnonzero(np.isin(labels, left_out))
    est = estimator_for(seen.size)
    est.fit(interface.take(inputs, train), np.searchsorted(seen, labels[train]),
            progress=progress)
    reference = est.embed(interface.take(inputs, train))
    rows = np.concatenate([held, unseen_rows])
    evaluated = interface.take(inputs, rows)
    probs, emb = est.predict(evaluated), est.embed(evaluated)
    out['fold'] += [f] * rows.size
    out['unseen'] += [False] * held.size + [True] * unseen_rows.size
    out['correct'] += list(seen[np.argmax(probs, 1)] == labels[rows])
    out['probability'] += list(probs.max(1))
    out['cosine'] += list((emb @ reference.T).max(1))
  return {k: np.asarray(v) for k, v in out.items()}


def calibrate(estimator_for: Callable, inputs, labels: np.ndarray, folds: int = 5,
              seed: int = 0, progress: Optional[Callable] = None) -> Calibration:
  """Leave-tasks-out calibration of the "unknown" threshold (module docstring)."""
  num_classes = np.unique(labels).size
  folds = min(folds, num_classes)
  if folds < 2 or num_classes - -(-num_classes // folds) < 2:
    raise UserError(f'calibrating "unknown" leaves tasks out and needs >= 3 tasks with '
                    f'{max(folds, 2)} folds; the index has {num_classes}: build it with '
                    '--calibration_folds=0 (no "unknown" answer).')
  s = fold_scores(estimator_for, inputs, labels, folds, seed, progress)
  cross = {}
  for kind in SCORES:
    accepted_unseen, rejected_seen = [], []
    for f in range(folds):
      other, this = s['fold'] != f, s['fold'] == f
      t = best_threshold(s[kind][other & ~s['unseen']], s[kind][other & s['unseen']])
      accepted_unseen += list(s[kind][this & s['unseen']] >= t)
      rejected_seen += list(s[kind][this & ~s['unseen']] < t)
    cross[kind] = (float(np.mean(accepted_unseen)), float(np.mean(rejected_seen)))
  kind = min(SCORES, key=lambda k: max(cross[k]))
  seen = ~s['unseen']
  threshold = best_threshold(s[kind][seen], s[kind][~seen])
  report = {k: dict(false_accept=cross[k][0], false_reject=cross[k][1],
                    **trade_off(s[k][seen], s[k][~seen])) for k in SCORES}
  return Calibration(kind, threshold, *cross[kind], float(s['correct'][seen].mean()), folds,
                     np.sort(1.0 - s['cosine'][seen]), report)
