"""Baselines beyond the paper's (Tables 1-2): fixed, permutation-aware features of the conv
kernels, fed to a logistic regression. None of them is learned end to end like LPS.

  weight_stats  per-layer mean, variance and 0/25/50/75/100 % quantiles of the weights
                (StatNN; Unterthiner et al., "Predicting Neural Network Accuracy from Weights",
                2020): order-invariant by construction;
  gram          the filter Gram matrix sum_g theta_g theta_g^T and the mean filter (a plain
                second-moment probe the LPS paper never tried): invariant to the order of a
                layer's filters (fully invariant on the first layer, whose inputs are RGB;
                deeper layers keep their input-channel order); for layers
                with more than 64 inputs per filter, the channel Gram matrix (summed over
                positions) keeps the size bounded;
  sort          sort canonicalisation: filters ordered by their L2 norm, the next layer's input
                channels permuted to match (the canonical form of Schürholt et al., "Model
                Zoos", NeurIPS 2022 Datasets and Benchmarks);
  rebasin       weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023) of the layers read,
  rebasin_chain through the network's permutation spec (`lps_jax.symmetry`: a ResNet's residual
                stream is one permutation across its blocks) with the one weight matcher
                (`symmetry.matching.WeightMatcher`): every channel group solved jointly by
                coordinate descent (Alg. 1), the reference the mean of the training models after
                two rounds of matching; exactly invariant to the symmetry. On the first layer
                alone (the paper's setting) this is the Hungarian assignment of its filters to
                the reference's. The two differ only in the layers they read: `rebasin` the run
                config's, `rebasin_chain` stage 1 (layers 1-7).
`sort` chains layers in network order (exact for a plain chain of convs; a ResNet's residual
stream shares one permutation across blocks, which it ignores past layer 1).

Kernels are lists over conv layers of (M, h, w, c, g) HWIO stacks, as everywhere in lps_jax.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lps_jax.common.errors import UserError
from lps_jax.symmetry import matching, permutations

FEATURES = ('weight_stats', 'gram', 'sort', 'rebasin', 'rebasin_chain')
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
GRAM_MAX_INPUTS = 64


def _flat_filters(k: np.ndarray) -> np.ndarray:
  """(M, h, w, c, g) -> (M, g, h*w*c): one row per filter."""
  m, h, w, c, g = k.shape
  return np.moveaxis(k, -1, 1).reshape(m, g, h * w * c)


def weight_stats(kernels: Sequence[np.ndarray]) -> np.ndarray:
  """(M, 7 L): mean, variance and quantiles of each layer's weights (StatNN)."""
  out = []
  for k in kernels:
    flat = k.reshape(k.shape[0], -1)
    out += [flat.mean(1, keepdims=True), flat.var(1, keepdims=True),
            np.quantile(flat, QUANTILES, axis=1).T]
  return np.concatenate(out, axis=1)


def gram(kernels: Sequence[np.ndarray]) -> np.ndarray:
  """(M, F): per layer, the upper triangle of the filter Gram matrix and the mean filter."""
  out = []
  for k in kernels:
    m, h, w, c, g = k.shape
    if h * w * c <= GRAM_MAX_INPUTS:
      f = _flat_filters(k)                                   # (M, g, d)
    else:                                                    # channel Gram: (M, g*h*w, c)
      f = np.moveaxis(k, -1, 1).reshape(m, g * h * w, c)
    second = np.einsum('mgd,mge->mde', f, f) / f.shape[1]
    iu = np.triu_indices(second.shape[1])
    out += [second[:, iu[0], iu[1]], f.mean(1)]
  return np.concatenate(out, axis=1)


def _permute_inputs(k: np.ndarray, perm: Optional[np.ndarray]) -> np.ndarray:
  """Permutes the input channels of each model's kernel (perm: (M, c)) along axis -2."""
  if perm is None:
    return k
  return np.take_along_axis(k, perm[:, None, None, :, None], axis=3)


def _permute_filters(k: np.ndarray, perm: np.ndarray) -> np.ndarray:
  return np.take_along_axis(k, perm[:, None, None, None, :], axis=4)


def sort_canonical(kernels: Sequence[np.ndarray]) -> np.ndarray:
  """(M, F): all layers flattened after ordering filters by L2 norm (descending), chained."""
  out, perm = [], None
  for k in kernels:
    k = _permute_inputs(k, perm) if perm is not None and perm.shape[1] == k.shape[3] else k
    perm = np.argsort(-np.linalg.norm(_flat_filters(k), axis=2), axis=1, kind='stable')
    out.append(_permute_filters(k, perm).reshape(k.shape[0], -1))
  return np.concatenate(out, axis=1)


MATCHED = ('rebasin', 'rebasin_chain')   # features read through the one weight matcher


def regression_logits(clf: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(coef, intercept) whose logits' softmax is a fitted regression's predict_proba, one row per
  class; every class must have had training models."""
  if list(clf.classes_) != list(range(num_classes)):
    raise UserError('every task needs training models (labels 0..num_classes-1).')
  coef, intercept = clf.coef_, clf.intercept_
  if coef.shape[0] == 1:   # two classes: sklearn's one logit z as the pair (-z/2, z/2)
    coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
  return coef, intercept


def softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def plain_chain_spec(paths: Sequence[str]) -> permutations.PermutationSpec:
  """The symmetry of a plain chain of HWIO convs: layer l's filters and layer l+1's inputs
  share one permutation (the first layer's inputs, RGB, are not permuted)."""
  return permutations.PermutationSpec.from_axes(
      {p: (None, None, f'g{i - 1}' if i else None, f'g{i}') for i, p in enumerate(paths)})


def matched_features(matcher, kernels: Sequence[np.ndarray], paths: Sequence[str]) -> np.ndarray:
  """(M, F): each model's layers, matched to `matcher`'s reference jointly, flattened."""
  models = permutations.unstack(dict(zip(paths, kernels)))
  return np.stack([np.concatenate([a[p].ravel() for p in paths])
                   for a in matcher.transform(models)])


class FeatureProbe:
  """Fixed features + standardisation + multinomial logistic regression; the same interface
  as `second_order_fit.SecondOrderModel` (fit / predict / embed)."""

  def __init__(self, features: str, layers: Sequence[int], num_classes: int, C: float = 1.0,
               spec=None, paths: Sequence[str] = ()):
    """`spec`, `paths` (matched features): the permutation spec of the read layers and each
    one's path in it."""
    if features not in FEATURES:
      raise UserError(f'unknown features {features!r}; choose from {sorted(FEATURES)}.')
    if features in MATCHED and spec is None:   # no network given: a plain chain of convs
      paths = [f'conv{i}' for i in range(len(layers))]
      spec = plain_chain_spec(paths)
    if features in MATCHED and len(paths) != len(layers):
      raise UserError(f'{features} needs the permutation spec and a path per layer.')
    self.features, self.layers, self.num_classes, self.C = features, tuple(layers), num_classes, C
    self.spec, self.paths = spec, tuple(paths)
    self.matcher = matching.WeightMatcher(spec) if features in MATCHED else None
    self.linear = None   # fitted: standardisation and regression arrays

  def _x(self, kernels) -> np.ndarray:
    ks = [np.asarray(kernels[i], np.float64) for i in self.layers]
    if self.matcher is not None:
      if self.matcher.reference is None:    # fitted on the first inputs seen: the training set
        self.matcher.fit(permutations.unstack(dict(zip(self.paths, ks))))
      ref = self.matcher.reference
      if any(ref[p].shape != k.shape[1:] for p, k in zip(self.paths, ks)):
        raise UserError(f'{self.features} features of layers shaped '
                        f'{[k.shape[1:] for k in ks]}, the probe was fitted on '
                        f'{[ref[p].shape for p in self.paths]}: models whose read layers have '
                        'other shapes.')
      return matched_features(self.matcher, ks, self.paths)
    return {'weight_stats': weight_stats, 'gram': gram, 'sort': sort_canonical}[self.features](ks)

  def fit(self, kernels, labels, progress: Optional[Callable] = None) -> None:
    labels = np.asarray(labels)
    x = self._x(kernels)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=self.C, max_iter=3000).fit(scaler.transform(x), labels)
    coef, intercept = regression_logits(clf, self.num_classes)
    self.linear = {'mean': scaler.mean_, 'scale': scaler.scale_, 'coef': coef,
                   'intercept': intercept}
    if progress is not None:
      progress(1, None)

  def _logits(self, kernels) -> np.ndarray:
    """The regression's logits: standardised features times the weights (sklearn's
    decision_function; its predict_proba is their softmax)."""
    if self.linear is None:
      raise UserError('FeatureProbe.predict before fit.')
    lin, x = self.linear, self._x(kernels)
    if x.shape[1] != lin['mean'].size:
      raise UserError(f'{self.features} features of {x.shape[1]} values, the probe was fitted on '
                       f'{lin["mean"].size}: models whose read layers have other shapes.')
    return ((x - lin['mean']) / lin['scale']) @ lin['coef'].T + lin['intercept']

  def predict(self, kernels) -> np.ndarray:
    return softmax(self._logits(kernels))

  def embed(self, kernels) -> np.ndarray:
    """L2-normalised logits of the regression (as LPS embeds with its FC outputs)."""
    z = self._logits(kernels)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

  # -- serialisation (lps_query's index): the fitted state is a few arrays
  def state(self) -> dict:
    """The fitted probe as arrays: the regression, and the weight-matching reference."""
    out = {f'linear/{k}': v for k, v in self.linear.items()}
    if self.matcher is not None:
      out.update({f'reference/{p}': v for p, v in self.matcher.reference.items()})
    return out

  def load_state(self, arrays: dict) -> None:
    self.linear = {k.split('/', 1)[1]: np.asarray(v) for k, v in arrays.items()
                   if k.startswith('linear/')}
    ref = {k.split('/', 1)[1]: np.asarray(v) for k, v in arrays.items()
           if k.startswith('reference/')}
    if self.matcher is not None:   # indexes of an earlier release name layers by position
      self.matcher.reference = {self.paths[int(k)] if k.isdigit() else k: v
                                for k, v in ref.items()}
