"""An exactly invariant kernel between whole networks: chained Grams, never formed.

Chain the conv layers of a network's main path as the authors' published code chains its
first layers (`methods.authors_chain`): X_1 = W_1 (27 x c_1, columns = filters), X_k[(p, s), o]
= sum_i X_{k-1}[p, i] W_k[s][i, o] over layer k's 3x3 taps s. A hidden channel permutation P
enters X_{k-1} as X_{k-1} P and W_k[s] as P^T W_k[s], so it cancels; the last layer's filter
order is removed by the Gram X_k^T X_k. The kernel between models i and j at depth k,

  K_k(i, j) = <X_ki^T X_ki, X_kj^T X_kj>_F = ||M_k||_F^2,   M_k = X_ki^T X_kj  (c_k x c_k),

follows layer by layer without forming X (27 * 9^(k-1) rows): M_1 = W_1i^T W_1j,
M_k = sum_s W_ki[s]^T M_{k-1} W_kj[s]. ResNet-20's main path (conv1, then each block's conv1
and conv2 in `resnet.conv_layer_names` order) is such a chain: each link shares one channel
group of `resnet.permutation_spec` (the residual stream between blocks, a block's inner
channels within it), so every depth is exactly invariant to the whole symmetry. ~30 MFLOP per
pair of models for all 19 layers; pairs are vmapped in blocks. ||M_k|| falls ~50-fold per layer,
so M_k is carried at unit norm with its scale as a log (float32 would reach zero by depth ~12).

BatchNorm's scale can be folded into each conv's output channels (it permutes with them):
gamma (parameters only) or gamma / sqrt(var + eps) (with the running statistics). Each depth's
kernel is cosine-normalised, the selected depths averaged; a logistic regression reads the
Nystroem features of the training models (kernel logistic regression), and retrieval the
normalised features (their cosine is the normalised kernel).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from lps_jax.common import cache as cache_lib
from lps_jax.common.errors import UserError
from lps_jax.methods import probes
from lps_jax.training import modelset, resnet
from lps_jax.training.modelset import NetworkStack

BN_EPS = 1e-5     # resnet.ResNet's BatchNorm epsilon
FOLDS = ('none', 'gamma', 'gamma_sigma')
BLOCK = 16        # models per side of a block of pairs


def _bn_of(conv_name: str) -> str:
  head, _, num = conv_name.rpartition('conv')
  return f'{head}bn{num}'


def chain_weights(inputs, num_layers: Optional[int] = None, fold: str = 'none') -> list:
  """The main path's kernels as (M, taps, c_in, c_out) float32 arrays, BatchNorm's scale
  folded into the output channels (`fold`); `inputs` are kernels (fold 'none') or a
  `NetworkStack`."""
  if fold not in FOLDS:
    raise UserError(f'unknown BatchNorm fold {fold!r}; choose from {FOLDS}.')
  if isinstance(inputs, NetworkStack):
    names = resnet.conv_layer_names(resnet.ResNetConfig.from_dict(inputs.model))
    kernels = inputs.kernels
  else:
    if fold != 'none':    # one line: pass the model set folder
      modelset.require_stack(inputs, 'the chain kernel with BatchNorm folded in')
    names, kernels = None, list(inputs)
  num_layers = num_layers or len(kernels)
  if len(kernels) < num_layers or any(k is None for k in kernels[:num_layers]):
    raise UserError(f'the chain kernel reads conv layers 1-{num_layers}; the inputs hold '
                    f'{sum(k is not None for k in kernels)}.')
  out = []
  for l in range(num_layers):
    k = np.asarray(kernels[l], np.float32)
    m, h, w, c_in, c_out = k.shape
    if out and out[-1].shape[-1] != c_in:
      raise UserError(f'conv layer {l + 1} reads {c_in} channels, layer {l} writes '
                      f'{out[-1].shape[-1]}: not a chain.')
    if fold != 'none':
      bn = _bn_of(names[l])
      scale = np.asarray(inputs.get(f'params/{bn}/scale'), np.float32)
      if fold == 'gamma_sigma':
        scale = scale / np.sqrt(np.asarray(inputs.get(f'batch_stats/{bn}/var'), np.float32)
                                + BN_EPS)
      k = k * scale[:, None, None, None, :]
    out.append(k.reshape(m, h * w, c_in, c_out) if l else k.reshape(m, 1, h * w * c_in, c_out))
  return out


def _pair(wa: Sequence[jax.Array], wb: Sequence[jax.Array]) -> jax.Array:
  """(L,) log K_k of one pair of models for depths 1..L. M_k shrinks ~50-fold per layer on
  trained ResNets (K_15 < 1e-45, float32's smallest, for every pair), so each M_k is carried at
  unit norm and its scale as a log: exact for every depth."""
  m = jnp.einsum('tdp,tdq->pq', wa[0], wb[0])
  out, log_scale = [], 0.0
  for l in range(len(wa)):
    if l:
      m = jnp.einsum('sip,ij,sjq->pq', wa[l], m, wb[l])
    norm = jnp.sqrt(jnp.sum(m * m))                    # m has unit norm: no underflow here
    log_scale = log_scale + jnp.log(norm)              # -inf where M_k = 0
    out.append(2 * log_scale)                          # log ||M_k||^2
    m = m / jnp.where(norm > 0, norm, 1.0)
  return jnp.stack(out)


@jax.jit
def _block(wa, wb):
  return jax.vmap(lambda a: jax.vmap(lambda b: _pair(a, b))(wb))(wa)


@jax.jit
def _diagonal(w):
  return jax.vmap(lambda a: _pair(a, a))(w)


def _rows(ws, rows):
  return [jnp.asarray(w[rows]) for w in ws]


def log_depth_kernels(wa: list, wb: list) -> np.ndarray:
  """(A, B, L) log K_k between every model of `wa` and of `wb` (chain weights), in blocks."""
  na, nb = len(wa[0]), len(wb[0])
  out = np.zeros((na, nb, len(wa)), np.float64)
  side = min(BLOCK, 1 << (na - 1).bit_length())    # a few queries: a thin block, not 16 rows
  for i in range(0, na, side):
    ra = np.arange(i, min(i + side, na))
    a = _rows(wa, np.pad(ra, (0, side - ra.size), mode='edge'))
    for j in range(0, nb, BLOCK):
      rb = np.arange(j, min(j + BLOCK, nb))
      b = _rows(wb, np.pad(rb, (0, BLOCK - rb.size), mode='edge'))
      out[ra[:, None], rb[None, :]] = np.asarray(_block(a, b))[:ra.size, :rb.size]
  return out


def log_self_kernels(w: list) -> np.ndarray:
  """(M, L) log K_k(i, i)."""
  return np.concatenate([np.asarray(_diagonal(_rows(w, np.arange(i, min(i + BLOCK, len(w[0]))))))
                         for i in range(0, len(w[0]), BLOCK)]).astype(np.float64)


def combined(log_k: np.ndarray, log_diag_a: np.ndarray, log_diag_b: np.ndarray,
             depths: Sequence[int]) -> np.ndarray:
  """The mean over `depths` (1-based) of the cosine-normalised depth kernels, (A, B), from the
  log kernels; a model whose chain vanishes at a depth is at cosine 0 from every model there."""
  sel = np.asarray(depths) - 1
  log_norm = 0.5 * (np.asarray(log_diag_a, np.float64)[:, None, sel]
                    + np.asarray(log_diag_b, np.float64)[None, :, sel])
  with np.errstate(invalid='ignore'):
    cos = np.exp(log_k[:, :, sel] - log_norm)
  return np.mean(np.where(np.isfinite(log_norm), cos, 0.0), axis=-1)


C_GRID = (0.1, 1.0, 10.0, 100.0)
CV_FOLDS = 4


def _folds(labels: np.ndarray) -> Optional[list]:
  """Stratified `CV_FOLDS`-fold (train, test) rows of the training models, or None when a task
  has too few models to fold."""
  from sklearn.model_selection import StratifiedKFold
  counts = np.bincount(labels)
  if counts[counts > 0].min() < CV_FOLDS:
    return None
  return list(StratifiedKFold(CV_FOLDS, shuffle=True, random_state=0).split(labels, labels))


def _cross_validated_c(x: np.ndarray, labels: np.ndarray) -> float:
  """The regression's C from `C_GRID` by cross-validation on the training models alone
  (`_folds`; ties: the smaller C); C = 1 when a task has too few models to fold."""
  folds = _folds(labels)
  if folds is None:
    return 1.0
  score = [np.mean([LogisticRegression(C=c, max_iter=5000).fit(x[tr], labels[tr])
                    .score(x[te], labels[te]) for tr, te in folds]) for c in C_GRID]
  return C_GRID[int(np.argmax(score))]


def nystroem(k: np.ndarray, depths) -> np.ndarray:
  """P with phi(x) = k(x, T) P the Nystroem features of a (T, T) kernel, or one clear line."""
  vals, vecs = np.linalg.eigh((k + k.T) / 2)
  keep = vals > 1e-10 * vals.max()
  if not np.isfinite(vals).all() or not keep.any():
    raise UserError(f'the chained-Gram kernel of depths {depths} is zero or not finite on '
                    'these models (all-zero or non-finite conv kernels?); check the weights.')
  return vecs[:, keep] / np.sqrt(vals[keep])


def _cross_validated_depths(log_k: np.ndarray, log_diag: np.ndarray,
                            labels: np.ndarray) -> tuple:
  """Depths 1..d, d chosen by cross-validation of the kernel regression (C = 1) on the
  training models alone (`_folds`; ties: the shallower); every depth when a task has too
  few models to fold."""
  num_depths, folds = log_k.shape[-1], _folds(labels)
  if folds is None:
    return tuple(range(1, num_depths + 1))

  def score(depths):
    acc = []
    for tr, te in folds:
      p = nystroem(combined(log_k[np.ix_(tr, tr)], log_diag[tr], log_diag[tr], depths), depths)
      x = lambda rows: combined(log_k[np.ix_(rows, tr)], log_diag[rows], log_diag[tr], depths) @ p
      acc.append(LogisticRegression(C=1.0, max_iter=5000).fit(x(tr), labels[tr])
                 .score(x(te), labels[te]))
    return np.mean(acc)
  scores = [score(tuple(range(1, d + 1))) for d in range(1, num_depths + 1)]
  return tuple(range(1, int(np.argmax(scores)) + 2))


class ChainKernel:
  """Kernel logistic regression on the chained-Gram kernel (an `Estimator`); `C=None` picks
  the regularisation by cross-validation on the training models (`C_GRID`), `depths='cv'` the
  depths 1..d the same way."""

  def __init__(self, num_classes: int, num_layers: Optional[int] = None,
               depths: Optional[Sequence[int]] = None, fold: str = 'none',
               C: Optional[float] = None, cache: Optional[cache_lib.Cache] = None):
    self.num_classes, self.num_layers, self.fold, self.C = num_classes, num_layers, fold, C
    self.choose_depths = depths == 'cv'
    self.depths = tuple(depths) if depths and not self.choose_depths else None
    self.train, self._last, self.cache = None, None, cache

  def _weights(self, inputs):
    """Chain weights, each model's layers scaled to unit norm: the cosine-normalised kernel
    does not change (a layer's scale multiplies K_k(i, j) and sqrt(K_k(i, i) K_k(j, j)) alike),
    and float32 cannot overflow on the weights of any network."""
    out = []
    for w in chain_weights(inputs, self.num_layers, self.fold):
      norm = np.linalg.norm(w.reshape(len(w), -1).astype(np.float64), axis=1)  # no overflow
      out.append((w / np.maximum(norm, 1e-300)[:, None, None, None]).astype(np.float32))
    return out

  def _log_kernels(self, wa: list, wb: list) -> dict:
    """{'cross': (A, B, L), 'self': (A, L)} log kernels of every depth the weights reach;
    with a cache, once per pair of weight sets (Fig. 3b's branches 1..L share one computation)."""
    def compute():
      cross = log_depth_kernels(wa, wb)
      return {'cross': cross,      # the training set against itself: its diagonal is 'self'
              'self': np.diagonal(cross).T.copy() if wa is wb else log_self_kernels(wa)}
    if self.cache is None:
      return compute()
    key = {'chain_log_kernels': 2, 'a': cache_lib.fingerprint(*wa),
           'b': cache_lib.fingerprint(*wb)}
    return self.cache.arrays(key, compute)

  def _features(self, w) -> np.ndarray:
    k = self._log_kernels(w, self.train)
    return combined(k['cross'], k['self'], self.train_log_diag, self.depths) @ self.projection

  def _query_features(self, inputs) -> np.ndarray:
    """`_features` of `inputs`, kept for the next call on the same object (predict, then
    embed, of one batch)."""
    if self._last is None or self._last[0] is not inputs:
      self._last = (inputs, self._features(self._weights(inputs)))
    return self._last[1]

  def fit(self, inputs, labels, progress: Optional[Callable] = None) -> None:
    w = self._weights(inputs)
    self.depths = self.depths or tuple(range(1, len(w) + 1))
    if max(self.depths) > len(w):
      raise UserError(f'depths {self.depths} need {max(self.depths)} conv layers; {len(w)} read.')
    logs = self._log_kernels(w, w)
    self.train, self.train_log_diag, self._last = w, logs['self'], None
    labels = np.asarray(labels)
    if self.choose_depths:
      self.depths = _cross_validated_depths(logs['cross'], logs['self'], labels)
    k = combined(logs['cross'], self.train_log_diag, self.train_log_diag, self.depths)
    self.projection = nystroem(k, self.depths)                 # Nystroem: phi(x) = k(x, T) P
    x = k @ self.projection
    self.chosen_C = self.C if self.C is not None else _cross_validated_c(x, labels)
    clf = LogisticRegression(C=self.chosen_C, max_iter=5000).fit(x, labels)
    self.coef, self.intercept = probes.regression_logits(clf, self.num_classes)
    if progress is not None:
      progress(1, None)

  def chosen(self) -> dict:
    """What the fit chose on the training models: the regression's C and the depths read."""
    return {'C': float(self.chosen_C), 'depths': [int(d) for d in self.depths]}

  def predict(self, inputs) -> np.ndarray:
    """The regression's probabilities: the softmax of its logits (sklearn's predict_proba)."""
    return probes.softmax(self._query_features(inputs) @ self.coef.T + self.intercept)

  def embed(self, inputs) -> np.ndarray:
    f = self._query_features(inputs)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

  # -- serialisation (lps_query's index): the training models' chain weights and the regression
  def state(self) -> dict[str, np.ndarray]:
    out = {f'train/{l}': np.asarray(w) for l, w in enumerate(self.train)}
    out.update(train_log_diag=self.train_log_diag, projection=self.projection, coef=self.coef,
               intercept=self.intercept, depths=np.asarray(self.depths),
               chosen_C=np.asarray(self.chosen_C))
    return out

  def load_state(self, arrays: dict) -> None:
    layers = sorted(int(k.split('/')[1]) for k in arrays if k.startswith('train/'))
    self.train, self._last = [np.asarray(arrays[f'train/{l}']) for l in layers], None
    self.train_log_diag, self.projection = arrays['train_log_diag'], arrays['projection']
    self.coef, self.intercept = arrays['coef'], arrays['intercept']
    self.depths, self.chosen_C = tuple(int(d) for d in arrays['depths']), float(arrays['chosen_C'])
