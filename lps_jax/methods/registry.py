"""The methods of Tables 1-2, by name: the paper's (Sec. 5.1), LPS variants, and baselines.

A method is small data: what it is (a label and a citation), the paper's numbers where the
paper has them, and how to build a model with `fit(kernels, labels)`, `predict(kernels)` and
`embed(kernels)`. LPS variants are `SecondOrderConfig` overrides; probes are fixed features +
logistic regression (`lps_jax.methods.probes`). Every method sees the same kernels: the conv layers
whose w_l > 0 in the run's config (the paper: the first layer only), unless it names its own.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from lps_jax.methods import probes as baselines
from lps_jax.training import resnet
from lps_jax.align.fit import SecondOrderConfig, SecondOrderModel
from lps_jax.common.errors import UserError


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  label: str
  kind: str                      # 'random' | 'second_order' | 'probe' | 'ensemble' | 'network'
  cite: str = 'LPS paper, Sec. 5.1'
  overrides: tuple = ()          # (field, value) pairs applied to the SecondOrderConfig
  features: Optional[str] = None  # probe features (baselines.FEATURES)
  paper: dict = dataclasses.field(default_factory=dict)  # protocol -> (top/rank-1, 5, 10)
  members: tuple = ()            # ensemble: names of the methods it averages
  layers: tuple = ()             # conv layers it reads, if not the run config's (0-based)
  network: Optional[str] = None  # 'network' kind: what reads the whole networks (NETWORK)
  aligned: bool = False          # 'network' kind: whole-network weight matching first
  variables: tuple = ('params/', 'batch_stats/')   # 'network' kind: which variables it reads
  any_width: bool = False        # reads models of other channel counts (cross-architecture)

  def config(self, base: SecondOrderConfig) -> SecondOrderConfig:
    if self.kind == 'second_order' or self.network == 'second_order':
      return dataclasses.replace(base, **dict(self.overrides))
    return base

  @property
  def reads_networks(self) -> bool:
    """Whether it needs every variable of each model (the model set folder), not kernels."""
    if self.kind == 'ensemble':
      return any(get(m).reads_networks for m in self.members)
    return self.kind == 'network'

  @property
  def reads_probe_outputs(self) -> bool:
    """Whether it needs the models' outputs on probe images (`whole_network.probe_logits`)."""
    if self.kind == 'ensemble':
      return any(get(m).reads_probe_outputs for m in self.members)
    return self.network == 'functional'

  def num_layers(self, base: SecondOrderConfig) -> int:
    """How many conv layers (network order) its kernels must include."""
    return max(self.active_layers(base)) + 1

  def active_layers(self, base: SecondOrderConfig) -> tuple[int, ...]:
    """The conv layers it reads."""
    if self.kind == 'ensemble':
      return tuple(sorted({i for m in self.members for i in get(m).active_layers(base)}))
    return self.layers or self.config(base).active_layers()


_REG = (('weight_decay', 5e-4), ('val_per_task', 1))
_STD = (('feature_norm', 'across'),)
_FUSION_LAYERS = 3
_STAGE1_LAYERS = 7   # conv1 + stage 1's 3 blocks x 2: the layers a slice keeps (lps_jax.zoo.slice_folder)
_RESNET20_LAYERS = 19
_REBASIN = 'Ainsworth et al. 2023, "Git Re-Basin" (Alg. 1, whole network, ResNet\'s permutation spec)'
# What reads whole networks ('network' kind), all in lps_jax.methods.whole_network / invariant_net.
NETWORK = ('probe', 'second_order', 'invariant', 'functional')
PROBE_OUTPUTS = 'functional/logits'

REGISTRY = {m.name: m for m in [
    Method('random', 'random prediction', 'random', any_width=True,
           paper={'classification': (2.0, 9.6, 18.3), 'retrieval': (10.0, 41.0, 65.1)}),
    Method('fc_only', 'only one FC layer', 'second_order', overrides=(('method', 'fc_only'),),
           paper={'classification': (5.3, 17.5, 29.3), 'retrieval': (15.0, 55.8, 83.3)}),
    Method('no_align', 'Frobenius+FC, w/o alignment', 'second_order',
           overrides=(('method', 'no_align'),),
           paper={'classification': (5.5, 18.3, 29.0), 'retrieval': (13.3, 58.3, 80.0)}),
    Method('lps', 'LPS (Frobenius+FC, w/ alignment)', 'second_order',
           overrides=(('method', 'lps'),),
           paper={'classification': (79.8, 94.8, 98.0), 'retrieval': (80.7, 95.0, 95.8)}),
    # LPS variants (not in the paper; RESULTS.md says which generalise).
    Method('lps_reg', 'LPS + weight decay 5e-4 + early stopping', 'second_order',
           'this project', overrides=(('method', 'lps'),) + _REG),
    Method('lps_std', 'LPS + features standardised across models', 'second_order',
           'this project', overrides=(('method', 'lps'),) + _STD),
    Method('lps_reg_std', 'LPS + standardised + wd + early stopping', 'second_order',
           'this project', overrides=(('method', 'lps'),) + _REG + _STD),
    Method('lps_fusion', f'LPS fusion of branches 1-{_FUSION_LAYERS}, learned w_l, '
           'standardised', 'second_order', 'this project',
           overrides=(('method', 'lps'), ('layer_weights', (1.0,) * _FUSION_LAYERS),
                      ('learned_weights', True)) + _STD),
    # Fig. 3c ablations of the alignment (Sec. 5.5); 'no_align' is the channel-only case.
    Method('unaligned', 'Frobenius+FC, no alignment at all', 'second_order', 'LPS paper, Sec. 5.5',
           overrides=(('method', 'none'),)),
    Method('filter_only', 'Frobenius+FC, filter alignment only', 'second_order',
           'LPS paper, Sec. 5.5', overrides=(('method', 'filter_only'),)),
    Method('channel_only', 'Frobenius+FC, channel alignment only', 'second_order',
           'LPS paper, Sec. 5.5', overrides=(('method', 'channel_only'),)),
    # Baselines the paper did not run (lps_jax.methods.probes cites each).
    Method('weight_stats', 'weight statistics + LR (StatNN)', 'probe',
           'Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights"',
           features='weight_stats', any_width=True),
    Method('gram', 'filter Gram matrix + mean filter + LR', 'probe',   # any width: layer 1's
           'second-moment probe (this project)', features='gram', any_width=True),
    Method('sort', 'filters sorted by norm + LR (Model Zoos)', 'probe',
           'Schürholt et al. 2022, "Model Zoos"', features='sort'),
    Method('rebasin', 'weight matching to a reference + LR (Git Re-Basin)', 'probe',
           'Ainsworth et al. 2023, "Git Re-Basin"', features='rebasin'),
    Method('rebasin_chain', 'whole-chain weight matching of stage 1 (layers 1-7) + LR',
           'probe', 'Ainsworth et al. 2023, "Git Re-Basin" (Alg. 1, with ResNet\'s permutation '
           'spec)', features='rebasin_chain', layers=tuple(range(_STAGE1_LAYERS))),
    # Whole networks (every layer; the model set folder): aligned by weight matching first
    # where `aligned`, then read (lps_jax.methods.whole_network).
    Method('wn_probe', 'whole-network weight matching + linear probe (all weights, BN, FC)',
           'network', _REBASIN + ' + LR', network='probe', aligned=True, variables=('params/',)),
    Method('wn_probe_unaligned', 'linear probe on all weights, no alignment', 'network',
           'this project (control)', network='probe', variables=('params/',)),
    Method('wn_lps', 'LPS branches 1-19 on aligned layers (Eq. 5/7 by index), fused, learned w_l',
           'network', 'this project; ' + _REBASIN, network='second_order', aligned=True,
           overrides=(('method', 'none'), ('layer_weights', (1.0,) * _RESNET20_LAYERS),
                      ('learned_weights', True)) + _STD),
    Method('wn_branch', 'Frobenius + FC on whole-network-aligned kernels (Eq. 5/7 by index)',
           'network', 'this project; ' + _REBASIN, network='second_order', aligned=True,
           overrides=(('method', 'none'),)),
    Method('wn_invariant', 'permutation-invariant weight-space network, all layers (NFN-style)',
           'network', 'after Zhou et al. 2023 (NFN) and 2024 (UNF); lps_jax.methods.invariant_net',
           network='invariant', any_width=True),
    Method('wn_invariant_params', 'the invariant network on parameters only (no BatchNorm '
           'running statistics)', 'network', 'ablation of wn_invariant (this project)',
           network='invariant', variables=('params/',), any_width=True),
    Method('functional', 'functional reference: logits on 200 probe images + LR (not weight-space)',
           'network', 'this project (outputs of the models, as a ceiling)', network='functional',
           variables=(PROBE_OUTPUTS,), any_width=True),
    # Added after the tables above were measured (RESULTS.md says so): the two best methods,
    # which read different things (learned alignment vs fixed second moments), averaged.
    Method('lps_gram', 'LPS + Gram probe, probabilities averaged', 'ensemble', 'this project',
           members=('lps', 'gram')),
]}

PAPER_METHODS = ('random', 'fc_only', 'no_align', 'lps')


def get(name: str) -> Method:
  if name not in REGISTRY:
    raise UserError(f'unknown method {name!r}; choose from {", ".join(REGISTRY)}.')
  return REGISTRY[name]


class RandomScores:
  """Random prediction: uniform scores / embeddings, seeded by the split."""

  def __init__(self, num_classes: int, seed: int):
    self.num_classes, self.rng = num_classes, np.random.default_rng(seed)

  def fit(self, kernels, labels, progress=None):
    if progress is not None:
      progress(1, None)

  def predict(self, kernels) -> np.ndarray:
    return self.rng.random((_rows(kernels), self.num_classes))

  def embed(self, kernels) -> np.ndarray:
    z = self.rng.random((_rows(kernels), self.num_classes)) - 0.5
    return z / np.linalg.norm(z, axis=1, keepdims=True)


class Ensemble:
  """Members fitted on the same data: mean of their task probabilities; embeddings are the
  members' L2-normalised embeddings concatenated / sqrt(n), so cosine = mean of cosines."""

  def __init__(self, members: list):
    self.members = members

  def fit(self, kernels, labels, progress=None):
    for m in self.members:
      m.fit(kernels, labels, progress=progress)

  def predict(self, kernels) -> np.ndarray:
    return np.mean([m.predict(kernels) for m in self.members], axis=0)

  def embed(self, kernels) -> np.ndarray:
    return np.concatenate([m.embed(kernels) for m in self.members], 1) / np.sqrt(
        len(self.members))


def _rows(kernels) -> int:
  return next(np.asarray(k).shape[0] for k in kernels if k is not None)


def build(method: Method, base: SecondOrderConfig, num_classes: int, cache=None):
  """An unfitted model of `method` for `num_classes` tasks (`base.split_seed` seeds it;
  `cache`, a `results.Cache`, keeps whole-network alignments)."""
  if method.kind == 'random':
    return RandomScores(num_classes, base.split_seed)
  if method.kind == 'probe':
    layers = method.active_layers(base)
    if method.features != 'rebasin_chain':
      return baselines.FeatureProbe(method.features, layers, num_classes)
    names = resnet.conv_layer_names()
    paths = [f'params/{names[i]}/kernel' for i in layers]
    return baselines.FeatureProbe(method.features, layers, num_classes,
                                  spec=resnet.permutation_spec().restrict(paths), paths=paths)
  if method.kind == 'ensemble':
    return Ensemble([build(get(m), base, num_classes, cache) for m in method.members])
  if method.kind == 'network':
    return _network(method, base, num_classes, cache)
  return SecondOrderModel(method.config(base), num_classes)


def _invariant_config(base: SecondOrderConfig):
  from lps_jax.methods import invariant_net
  return invariant_net.InvariantConfig(seed=base.seed)


def _network(method: Method, base: SecondOrderConfig, num_classes: int, cache):
  from lps_jax.methods import invariant_net, whole_network
  if method.network in ('probe', 'functional'):
    inner = whole_network.FlatProbe(method.variables, num_classes)
  elif method.network == 'second_order':
    inner = SecondOrderModel(method.config(base), num_classes)
  elif method.network == 'invariant':
    inner = invariant_net.InvariantModel(_invariant_config(base), num_classes,
                                         split_seed=base.split_seed, prefixes=method.variables)
  else:
    raise UserError(f'unknown network reader {method.network!r}; choose from {NETWORK}.')
  if method.aligned:
    return whole_network.Aligned(inner, whole_network.Aligner(seed=base.split_seed, cache=cache))
  return inner


def width_free() -> list[str]:
  """Names of the methods that read models of any channel count (`any_width`)."""
  return [n for n, m in REGISTRY.items() if m.any_width]


def fit_count(method: Method, base: SecondOrderConfig) -> int:
  """Epochs a progress bar counts for one fit."""
  if method.kind == 'ensemble':
    return sum(fit_count(get(m), base) for m in method.members)
  if method.network == 'invariant':
    return _invariant_config(base).epochs
  uses_config = method.kind == 'second_order' or method.network == 'second_order'
  return method.config(base).epochs if uses_config else 1
