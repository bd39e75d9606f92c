"""The methods of Tables 1-2, by name: the paper's (Sec. 5.1), LPS variants, and baselines.

Each entry of `REGISTRY` is a `methods.interface.Method` of one of the kinds below, and builds
its estimator (`Estimator`: fit / predict / embed). LPS variants are `SecondOrderConfig`
overrides; probes are fixed features + logistic regression (`lps_jax.methods.probes`). Every
method sees the same kernels: the conv layers whose w_l > 0 in the run's config (the paper: the
first layer only), unless it names its own. Adding a method: docs/methods.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from lps_jax.align.fit import SecondOrderModel
from lps_jax.common.errors import UserError
from lps_jax.methods import interface, probes
from lps_jax.methods.interface import Ensemble, Method
from lps_jax.training import resnet


@dataclasses.dataclass(frozen=True)
class Random(Method):
  """Uniform random scores: the chance row of every table."""

  def build(self, base, num_classes, cache=None):
    return RandomScores(num_classes, base.split_seed)


@dataclasses.dataclass(frozen=True)
class SecondOrder(Method):
  """The paper's second-order network (Eq. 5-9) with `SecondOrderConfig` overrides; its fitted
  variables are cached (`interface.CachedFit`)."""
  overrides: tuple = ()          # (field, value) pairs applied to the SecondOrderConfig
  indexable = True

  def config(self, base):
    return dataclasses.replace(base, **dict(self.overrides))

  def fit_count(self, base):
    return self.config(base).epochs

  def build(self, base, num_classes, cache=None):
    cfg = self.config(base)
    model = SecondOrderModel(cfg, num_classes)
    if cache is None:
      return model
    key = {'kind': 'second_order_variables', 'config': dataclasses.asdict(cfg),
           'num_classes': num_classes}
    return interface.CachedFit(model, cache, key, fit_count=cfg.epochs,
                               read=lambda k: [np.asarray(k[i]) for i in cfg.active_layers()])


@dataclasses.dataclass(frozen=True)
class Probe(Method):
  """Fixed features of the read layers + logistic regression (`probes.FEATURES`)."""
  features: str = 'gram'
  indexable = True

  def build(self, base, num_classes, cache=None):
    layers = self.active_layers(base)
    if self.features not in probes.MATCHED:
      return probes.FeatureProbe(self.features, layers, num_classes)
    names = resnet.conv_layer_names()
    paths = [f'params/{names[i]}/kernel' for i in layers]
    return probes.FeatureProbe(self.features, layers, num_classes,
                               spec=resnet.permutation_spec().restrict(paths), paths=paths)


@dataclasses.dataclass(frozen=True)
class AuthorsChain(Method):
  """The authors' published meta-model (`methods.authors_chain`): Grams of chained kernels of
  the selected depths, one FC each, summed; their script's recipe."""
  depths: tuple = (1,)

  def active_layers(self, base):
    return tuple(range(max(self.depths)))

  def fit_count(self, base):
    from lps_jax.methods import authors_chain
    return authors_chain.EPOCHS

  def build(self, base, num_classes, cache=None):
    from lps_jax.methods import authors_chain
    return authors_chain.ChainGramFC(self.depths, num_classes, split_seed=base.split_seed)


@dataclasses.dataclass(frozen=True)
class ChainKernel(Method):
  """Kernel logistic regression on the exactly invariant chained-Gram kernel
  (`methods.chain_kernel`): the first `chain_layers` conv layers of the main path read from
  kernels, or every layer of whole networks (`whole`) with BatchNorm's scale folded (`fold`)."""
  chain_layers: Optional[int] = None   # None: every conv layer (whole networks)
  whole: bool = False
  fold: str = 'none'
  choose_depths: bool = False          # depths 1..d, d by cross-validation on training models
  indexable = True

  @property
  def reads_statistics(self):
    return self.fold == 'gamma_sigma'

  @property
  def reads(self):
    return interface.READS_NETWORKS if self.whole else interface.READS_KERNELS

  def active_layers(self, base):
    return tuple(range(self.chain_layers or _RESNET20_LAYERS))

  def build(self, base, num_classes, cache=None):
    from lps_jax.methods import chain_kernel
    return chain_kernel.ChainKernel(num_classes, self.chain_layers, fold=self.fold, cache=cache,
                                    depths='cv' if self.choose_depths else None)


@dataclasses.dataclass(frozen=True)
class ChainDepth(ChainKernel):
  """The chained-Gram kernel of one depth alone, the deepest layer the run's layer_weights
  reach (Fig. 3b: branch l reads depth l, every link of the chain up to it). The kernels of
  every depth the inputs hold are computed once per split and kept in the cache."""
  indexable = False

  @staticmethod
  def depth(base) -> int:
    return max(i for i, w in enumerate(base.layer_weights) if w > 0) + 1

  def active_layers(self, base):
    return tuple(range(self.depth(base)))

  def build(self, base, num_classes, cache=None):
    from lps_jax.methods import chain_kernel
    d = self.depth(base)
    return chain_kernel.ChainKernel(num_classes, None, depths=(d,), fold=self.fold, cache=cache)


@dataclasses.dataclass(frozen=True)
class Averaged(Method):
  """An ensemble of registered methods, their probabilities averaged."""
  members: tuple = ()

  @property
  def reads(self):
    kinds = {get(m).reads for m in self.members}
    for kind in (interface.READS_OUTPUTS, interface.READS_NETWORKS):
      if kind in kinds:
        return kind
    return interface.READS_KERNELS

  def fit_count(self, base):
    return sum(get(m).fit_count(base) for m in self.members)

  def active_layers(self, base):
    return tuple(sorted({i for m in self.members for i in get(m).active_layers(base)}))

  def build(self, base, num_classes, cache=None):
    return Ensemble([get(m).estimator(base, num_classes, cache) for m in self.members])


@dataclasses.dataclass(frozen=True)
class WholeNetwork(Method):
  """Every layer of a model at once (a `NetworkStack`), optionally aligned by whole-network
  weight matching first (`whole_network.Aligned`), then read by `reader`."""
  variables: tuple = ('params/', 'batch_stats/')   # which variables it reads
  aligned: bool = False          # whole-network weight matching first
  reads = interface.READS_NETWORKS

  @property
  def reads_statistics(self):
    return 'batch_stats/' in self.variables

  def reader(self, base, num_classes):
    raise NotImplementedError

  def build(self, base, num_classes, cache=None):
    from lps_jax.methods import whole_network
    inner = self.reader(base, num_classes)
    if self.aligned:
      return whole_network.Aligned(inner, whole_network.Aligner(seed=base.split_seed,
                                                                cache=cache))
    return inner


@dataclasses.dataclass(frozen=True)
class NetworkProbe(WholeNetwork):
  """Standardised, flattened variables (by path prefix) + logistic regression."""

  @property
  def reads(self):
    return (interface.READS_OUTPUTS if PROBE_OUTPUTS in self.variables
            else interface.READS_NETWORKS)

  def reader(self, base, num_classes):
    from lps_jax.methods import whole_network
    return whole_network.FlatProbe(self.variables, num_classes)


@dataclasses.dataclass(frozen=True)
class NetworkSecondOrder(WholeNetwork):
  """The second-order network on the conv kernels of whole-network-aligned models."""
  overrides: tuple = ()

  def config(self, base):
    return dataclasses.replace(base, **dict(self.overrides))

  def fit_count(self, base):
    return self.config(base).epochs

  def reader(self, base, num_classes):
    return interface.OnKernels(SecondOrderModel(self.config(base), num_classes))


@dataclasses.dataclass(frozen=True)
class Invariant(WholeNetwork):
  """The permutation-invariant weight-space network (`methods.invariant_net`)."""
  indexable = True

  def fit_count(self, base):
    from lps_jax.methods import invariant_net
    return invariant_net.InvariantConfig(seed=base.seed).epochs

  def reader(self, base, num_classes):
    from lps_jax.methods import invariant_net
    return invariant_net.InvariantModel(invariant_net.InvariantConfig(seed=base.seed),
                                        num_classes, split_seed=base.split_seed,
                                        prefixes=self.variables)


_REG = (('weight_decay', 5e-4), ('val_per_task', 1))
_STD = (('feature_norm', 'across'),)
_FUSION_LAYERS = 3
_STAGE1_LAYERS = 7   # conv1 + stage 1's 3 blocks x 2: the layers a slice keeps (lps_jax.zoo.slice_folder)
_RESNET20_LAYERS = 19
_CHAIN = 'this project, after the chained Grams of the authors\' published code'
_AUTHORS = ('Wang et al., published code (SolutionSimilarityLearning, models/meta_model_cnn.py '
            'sup_cifar_chain; train_sup.py recipe)')
_REBASIN = 'Ainsworth et al. 2023, "Git Re-Basin" (Alg. 1, whole network, ResNet\'s permutation spec)'
PROBE_OUTPUTS = 'functional/logits'

REGISTRY = {m.name: m for m in [
    Random('random', 'random prediction', any_width=True,
           paper={'classification': (2.0, 9.6, 18.3), 'retrieval': (10.0, 41.0, 65.1)}),
    SecondOrder('fc_only', 'only one FC layer', overrides=(('method', 'fc_only'),),
                paper={'classification': (5.3, 17.5, 29.3), 'retrieval': (15.0, 55.8, 83.3)}),
    SecondOrder('no_align', 'Frobenius+FC, w/o alignment', overrides=(('method', 'no_align'),),
                paper={'classification': (5.5, 18.3, 29.0), 'retrieval': (13.3, 58.3, 80.0)}),
    SecondOrder('lps', 'LPS (Frobenius+FC, w/ alignment)', overrides=(('method', 'lps'),),
                paper={'classification': (79.8, 94.8, 98.0), 'retrieval': (80.7, 95.0, 95.8)}),
    # LPS variants (not in the paper; RESULTS.md says which generalise).
    SecondOrder('lps_reg', 'LPS + weight decay 5e-4 + early stopping', 'this project',
                overrides=(('method', 'lps'),) + _REG),
    SecondOrder('lps_std', 'LPS + features standardised across models', 'this project',
                overrides=(('method', 'lps'),) + _STD),
    SecondOrder('lps_reg_std', 'LPS + standardised + wd + early stopping', 'this project',
                overrides=(('method', 'lps'),) + _REG + _STD),
    SecondOrder('lps_fusion', f'LPS fusion of branches 1-{_FUSION_LAYERS}, learned w_l, '
                'standardised', 'this project',
                overrides=(('method', 'lps'), ('layer_weights', (1.0,) * _FUSION_LAYERS),
                           ('learned_weights', True)) + _STD),
    # Fig. 3c ablations of the alignment (Sec. 5.5); 'no_align' is the channel-only case.
    SecondOrder('unaligned', 'Frobenius+FC, no alignment at all', 'LPS paper, Sec. 5.5',
                overrides=(('method', 'none'),)),
    SecondOrder('filter_only', 'Frobenius+FC, filter alignment only', 'LPS paper, Sec. 5.5',
                overrides=(('method', 'filter_only'),)),
    SecondOrder('channel_only', 'Frobenius+FC, channel alignment only', 'LPS paper, Sec. 5.5',
                overrides=(('method', 'channel_only'),)),
    # Baselines the paper did not run (lps_jax.methods.probes cites each).
    Probe('weight_stats', 'weight statistics + LR (StatNN)',
          'Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights"',
          features='weight_stats', any_width=True),
    Probe('gram', 'filter Gram matrix + mean filter + LR',   # any width: layer 1's
          'second-moment probe (this project); on layer 1 the Gram the authors\' published '
          'code reads (authors_chain), with a logistic regression instead of their SGD FC',
          features='gram', any_width=True),
    Probe('sort', 'filters sorted by norm + LR (Model Zoos)',
          'Schürholt et al. 2022, "Model Zoos"', features='sort'),
    Probe('rebasin', 'weight matching to a reference + LR (Git Re-Basin)',
          'Ainsworth et al. 2023, "Git Re-Basin"', features='rebasin'),
    Probe('rebasin_chain', 'whole-chain weight matching of stage 1 (layers 1-7) + LR',
          'Ainsworth et al. 2023, "Git Re-Basin" (Alg. 1, with ResNet\'s permutation spec)',
          features='rebasin_chain', layers=tuple(range(_STAGE1_LAYERS))),
    # The authors' published code (Wanggcong/SolutionSimilarityLearning, scripts/train_sup.sh):
    # layer 1 as their script runs it, and layers 1-3 chained (ResNet-20's conv1 -> stage 1).
    AuthorsChain('authors_chain', 'authors\' code: Gram of layer 1 + FC (sup_cifar_chain)',
                 _AUTHORS),
    AuthorsChain('authors_chain3', 'authors\' code: Grams of layers 1-3 chained + FCs',
                 _AUTHORS + ', --selected-layers 1,2,3', depths=(1, 2, 3)),
    # The chained Grams as an exact kernel (this project): layer 1, stage 1 (layers 1-7, what a
    # slice's kernels file holds), every layer with BatchNorm's scale folded in.
    ChainKernel('chain_kernel_l1', 'chained-Gram kernel, layer 1 + kernel LR', _CHAIN,
                chain_layers=1),
    ChainKernel('chain_kernel_stage1', 'chained-Gram kernel, layers 1-7 + kernel LR', _CHAIN,
                chain_layers=_STAGE1_LAYERS),
    ChainKernel('chain_kernel', 'chained-Gram kernel, all 19 layers, BN scale folded + kernel LR',
                _CHAIN, whole=True, fold='gamma'),
    ChainKernel('chain_kernel_bn', 'chained-Gram kernel, all 19 layers, BN scale / running std '
                'folded + kernel LR', _CHAIN + ' (with BatchNorm running statistics)',
                whole=True, fold='gamma_sigma'),
    ChainKernel('chain_kernel_cv', 'chained-Gram kernel, layers 1..d (d by cross-validation on '
                'the training models), BN scale folded + kernel LR', _CHAIN, whole=True,
                fold='gamma', choose_depths=True),
    ChainDepth('chain_depth', 'chained-Gram kernel of one depth (the branch\'s) + kernel LR',
               _CHAIN),
    # Whole networks (every layer; the model set folder): aligned by weight matching first
    # where `aligned`, then read (lps_jax.methods.whole_network).
    NetworkProbe('wn_probe', 'whole-network weight matching + linear probe (all weights, BN, FC)',
                 _REBASIN + ' + LR', aligned=True, variables=('params/',)),
    NetworkProbe('wn_probe_unaligned', 'linear probe on all weights, no alignment',
                 'this project (control)', variables=('params/',)),
    NetworkSecondOrder('wn_lps', 'LPS branches 1-19 on aligned layers (Eq. 5/7 by index), '
                       'fused, learned w_l', 'this project; ' + _REBASIN, aligned=True,
                       overrides=(('method', 'none'),
                                  ('layer_weights', (1.0,) * _RESNET20_LAYERS),
                                  ('learned_weights', True)) + _STD),
    NetworkSecondOrder('wn_branch', 'Frobenius + FC on whole-network-aligned kernels (Eq. 5/7 '
                       'by index)', 'this project; ' + _REBASIN, aligned=True,
                       overrides=(('method', 'none'),)),
    Invariant('wn_invariant', 'permutation-invariant weight-space network, all layers '
              '(NFN-style)', 'after Zhou et al. 2023 (NFN) and 2024 (UNF); '
              'lps_jax.methods.invariant_net', any_width=True),
    Invariant('wn_invariant_params', 'the invariant network on parameters only (no BatchNorm '
              'running statistics)', 'ablation of wn_invariant (this project)',
              variables=('params/',), any_width=True),
    NetworkProbe('functional', 'functional reference: logits on 200 probe images + LR (not '
                 'weight-space)', 'this project (outputs of the models, as a ceiling)',
                 variables=(PROBE_OUTPUTS,), any_width=True),
    # Added after the tables above were measured (RESULTS.md says so): the two best methods,
    # which read different things (learned alignment vs fixed second moments), averaged.
    Averaged('lps_gram', 'LPS + Gram probe, probabilities averaged', 'this project',
             members=('lps', 'gram')),
]}

PAPER_METHODS = ('random', 'fc_only', 'no_align', 'lps')


def get(name: str) -> Method:
  if name not in REGISTRY:
    raise UserError(f'unknown method {name!r}; choose from {", ".join(REGISTRY)}.')
  return REGISTRY[name]


def width_free() -> list[str]:
  """Names of the methods that read models of any channel count (`any_width`)."""
  return [n for n, m in REGISTRY.items() if m.any_width]


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


def _rows(kernels) -> int:
  return next(np.asarray(k).shape[0] for k in kernels if k is not None)
