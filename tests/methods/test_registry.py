"""Methods of Tables 1-2: baselines' invariances against numpy references, the registry, the
LPS variants' options (early stopping, standardisation across models, learned weights), and
per-split seeding."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

from lps_jax.align.fit import SecondOrderConfig, SecondOrderModel, validation_rows
from lps_jax.common import cache as cache_lib
from lps_jax.evaluation import protocols
from lps_jax.methods import probes as baselines
from lps_jax.methods import registry as methods
from lps_jax.symmetry import matching, permutations
from lps_jax.symmetry.permutations import PermutationSpec
from lps_jax.training import modelset


def _chain(rng, m=4, widths=(3, 5, 6)):
  """Kernels of a plain conv chain: (M, 3, 3, c_in, c_out) per layer."""
  return [rng.normal(size=(m, 3, 3, c, g)) for c, g in zip(widths[:-1], widths[1:])]


def _permute_network(kernels, rng):
  """The same function with every hidden layer's units permuted (filters, then the next
  layer's input channels)."""
  out, prev = [], None
  for k in kernels:
    if prev is not None:
      k = k[:, :, :, prev]
    perm = rng.permutation(k.shape[-1])
    out.append(k[..., perm])
    prev = perm
  return out


def test_probe_features_are_invariant_to_permuting_hidden_units():
  rng = np.random.default_rng(0)
  ks = _chain(rng)
  ps = _permute_network(ks, rng)
  for fn in (baselines.weight_stats, baselines.sort_canonical):
    np.testing.assert_allclose(fn(ps), fn(ks), rtol=1e-10, atol=1e-12, err_msg=fn.__name__)
  # The Gram probe is invariant to each layer's filter order (fully so for the first layer,
  # whose inputs are RGB); a deeper layer's input-channel order stays in it.
  shuffled = [k[..., rng.permutation(k.shape[-1])] for k in ks]
  np.testing.assert_allclose(baselines.gram(shuffled), baselines.gram(ks), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(baselines.gram(ps[:1]), baselines.gram(ks[:1]), rtol=1e-10)
  # Weight matching undoes the permutation exactly (reference = the unpermuted network).
  matcher = matching.WeightMatcher(PermutationSpec.from_axes({'l0': (None, None, None, 'g')}))
  matcher.reference = {'l0': ks[0][0]}
  np.testing.assert_allclose(baselines.matched_features(matcher, ps[:1], ['l0']),
                             baselines.matched_features(matcher, ks[:1], ['l0']))
  # Raw weights are not invariant: the check above can fail.
  assert not np.allclose(ps[0], ks[0])


def test_whole_chain_matching_is_exactly_invariant_to_resnet_symmetry():
  """rebasin_chain reads stage 1 of a ResNet-20 through its permutation spec: a model with all
  its channel groups permuted (the residual stream shared across blocks) gets the same
  features, bit for bit."""
  from lps_jax.training import resnet
  probe = methods.get('rebasin_chain').build(SecondOrderConfig(), 2)
  names = resnet.conv_layer_names()[:7]
  variables = [resnet.init_variables(jax.random.PRNGKey(i)) for i in range(4)]
  permuted = [resnet.random_permutation(v, jax.random.PRNGKey(10 + i))
              for i, v in enumerate(variables)]
  stack = lambda vs: [np.stack([np.asarray(resnet.get_kernel(v['params'], n)) for v in vs])
                      for n in names]
  ks, ps = stack(variables), stack(permuted)
  probe.matcher.fit(permutations.unstack(dict(zip(probe.paths, ks))))
  a = baselines.matched_features(probe.matcher, ks, probe.paths)
  b = baselines.matched_features(probe.matcher, ps, probe.paths)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(ks[3], ps[3])     # the raw weights did change
  # One matcher: `rebasin` reading the same layers is `rebasin_chain`, feature for feature.
  seven = SecondOrderConfig(layer_weights=(1.0,) * 7)
  chain, plain = (methods.get(n).build(seven, 2) for n in ('rebasin_chain', 'rebasin'))
  both = [np.concatenate([k, p]) for k, p in zip(ks, ps)]
  np.testing.assert_array_equal(chain._x(both), plain._x(both))


def test_gram_and_weight_stats_match_plain_numpy():
  rng = np.random.default_rng(1)
  k = rng.normal(size=(2, 3, 3, 3, 4))
  f = baselines.gram([k])
  filt = k[1].reshape(27, 4).T                       # (g, d): one row per filter
  second = filt.T @ filt / 4
  iu = np.triu_indices(27)
  np.testing.assert_allclose(f[1], np.concatenate([second[iu], filt.mean(0)]))
  s = baselines.weight_stats([k])[1]
  np.testing.assert_allclose(s, [k[1].mean(), k[1].var(),
                                 *np.quantile(k[1].ravel(), baselines.QUANTILES)])


def _toy(rng, tasks=4, runs=6):
  """First-layer kernels with a per-task pattern plus noise: learnable, not trivially."""
  centres = rng.normal(size=(tasks, 3, 3, 3, 8))
  task_id = np.repeat(np.arange(tasks), runs)
  k = centres[task_id] + 0.7 * rng.normal(size=(tasks * runs, 3, 3, 3, 8))
  return [k.astype(np.float32)], task_id


@pytest.mark.parametrize('name', sorted(methods.REGISTRY))
def test_every_registered_method_fits_predicts_and_embeds(name):
  m = methods.get(name)
  rng = np.random.default_rng(0)
  kernels, y = _toy(rng)
  base = SecondOrderConfig(num_filters=4, epochs=3, lr_boundaries=(2,), learning_rate=0.01)
  if m.reads_networks:   # fitted on whole networks in test_whole_network; kernels are refused
    with pytest.raises(modelset.ModelSetError, match='pass the full model set folder'):
      m.build(base, 4).fit(kernels, y)
    return
  if m.num_layers(base) > 1:   # fusion: three layers; the stage-1 chain: seven
    extra = [rng.normal(size=(y.size, 3, 3, 8, 8)).astype(np.float32)
             for _ in range(m.num_layers(base) - 1)]
    kernels = kernels + extra
  model = m.build(base, 4)
  model.fit(kernels, y)
  p = model.predict(kernels)
  assert p.shape == (y.size, 4) and np.all(np.isfinite(p))
  e = model.embed(kernels)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown method 'lsp'; choose from random"):
    methods.get('lsp')


def test_probes_beat_chance_and_random_does_not_learn():
  rng = np.random.default_rng(3)
  kernels, task_id = _toy(rng, tasks=5, runs=10)
  cfg = SecondOrderConfig()
  gram = protocols.run_classification(kernels, task_id, 'gram', cfg, split_seed=0)
  assert gram['top-1'] >= 0.8, gram
  rand = [protocols.run_classification(kernels, task_id, 'random', cfg, split_seed=s)['top-1']
          for s in range(5)]
  assert np.mean(rand) < 0.5


@pytest.mark.parametrize('features,classes', [('rebasin', 5), ('gram', 2)])
def test_probe_equals_sklearn_and_its_state_round_trips(features, classes):
  """predict / embed from the probe's arrays are sklearn's predict_proba and normalised
  decision_function (two classes too); a probe rebuilt from `state()` answers the same."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  kernels, task_id = _toy(np.random.default_rng(4), tasks=classes, runs=6)
  probe = baselines.FeatureProbe(features, [0], classes)
  probe.fit(kernels, task_id)
  x = probe._x(kernels)
  scaler = StandardScaler().fit(x)
  clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x), task_id)
  np.testing.assert_allclose(probe.predict(kernels), clf.predict_proba(scaler.transform(x)),
                             atol=1e-12)
  z = clf.decision_function(scaler.transform(x))
  z = np.stack([-z / 2, z / 2], 1) if z.ndim == 1 else z
  np.testing.assert_allclose(probe.embed(kernels), z / np.linalg.norm(z, axis=1, keepdims=True),
                             atol=1e-12)
  again = baselines.FeatureProbe(features, [0], classes)
  again.load_state(probe.state())
  np.testing.assert_array_equal(again.predict(kernels), probe.predict(kernels))
  with pytest.raises(ValueError, match='the probe was fitted on'):   # other filters / inputs
    probe.predict([kernels[0][..., :2] if features == 'rebasin' else kernels[0][:, :, :, :2]])


def test_each_split_draws_its_own_phi_and_shuffling():
  rng = np.random.default_rng(0)
  kernels, y = _toy(rng)
  cfg = SecondOrderConfig(num_filters=4, epochs=1)
  phis = []
  for split_seed in (0, 0, 1):
    model = SecondOrderModel(dataclasses.replace(cfg, split_seed=split_seed), 4)
    model.init(kernels)
    phis.append(np.asarray(model.params['branch_0']['phi']))
  np.testing.assert_array_equal(phis[0], phis[1])
  assert not np.allclose(phis[0], phis[2])


def test_early_stopping_keeps_the_best_validation_epoch():
  rng = np.random.default_rng(1)
  kernels, y = _toy(rng, runs=6)
  cfg = SecondOrderConfig(num_filters=4, epochs=6, lr_boundaries=(), learning_rate=0.02,
                          val_per_task=1)
  model = SecondOrderModel(cfg, 4)
  model.fit(kernels, y)
  # The kept network is the one of its best epoch: training only that many epochs (same
  # per-epoch shuffling, no lr steps) ends on exactly the same parameters.
  assert 1 <= model.best_epoch <= 6
  short = SecondOrderModel(dataclasses.replace(cfg, epochs=model.best_epoch), 4)
  short.fit(kernels, y)
  assert short.best_epoch == model.best_epoch
  jax.tree_util.tree_map(np.testing.assert_array_equal, short.params, model.params)
  rows = validation_rows(y, 1, 0)
  assert np.bincount(y[rows]).tolist() == [1, 1, 1, 1]
  with pytest.raises(ValueError, match='too few to hold out 6'):
    SecondOrderModel(dataclasses.replace(cfg, val_per_task=6), 4).fit(kernels, y)


def test_across_standardisation_and_learned_weights_round_trip():
  rng = np.random.default_rng(2)
  kernels, y = _toy(rng)
  kernels = kernels + [rng.normal(size=(y.size, 3, 3, 8, 8)).astype(np.float32)]
  cfg = SecondOrderConfig(layer_weights=(1.0, 1.0), num_filters=4, epochs=2, lr_boundaries=(),
                          feature_norm='across', learned_weights=True, learning_rate=0.05)
  model = SecondOrderModel(cfg, 4)
  # Statistics are refreshed every epoch by one compiled function (traced once per fit).
  model._features = chex.assert_max_traces(model._features, n=1)
  model.fit(kernels, y)
  stats = model.variables['feature_stats']['branch_1']
  assert stats['mean'].shape == (8 * 4,) and np.all(np.asarray(stats['std']) > 0)
  assert not np.allclose(stats['mean'], 0.0)   # filled from the data, not the init
  w = np.asarray(model.weights(model.params))
  assert w.shape == (2,) and np.isclose(w.sum(), 1.0) and not np.allclose(w, 0.5)
  clone = SecondOrderModel(cfg, 4)
  clone.from_bytes(kernels, model.to_bytes())
  np.testing.assert_allclose(clone.predict(kernels), model.predict(kernels), rtol=1e-6)


def test_ensemble_averages_its_members_and_reuses_their_cached_networks(tmp_path):
  rng = np.random.default_rng(4)
  kernels, y = _toy(rng)
  base = SecondOrderConfig(num_filters=4, epochs=2, lr_boundaries=(), learning_rate=0.01)
  cache = cache_lib.Cache(str(tmp_path))
  ens = protocols.fit('lps_gram', base, 4, kernels, y, cache)
  calls = []
  lps = protocols.fit('lps', base, 4, kernels, y, cache, progress=lambda *a: calls.append(a))
  assert calls == [(2, None)]   # the ensemble's LPS network, from the cache
  gram = protocols.fit('gram', base, 4, kernels, y)
  np.testing.assert_allclose(ens.predict(kernels),
                             (lps.predict(kernels) + gram.predict(kernels)) / 2, rtol=1e-6)
  cos = lambda m: m.embed(kernels) @ m.embed(kernels).T
  np.testing.assert_allclose(cos(ens), (cos(lps) + cos(gram)) / 2, rtol=1e-5, atol=1e-6)
  assert methods.get('lps_gram').fit_count(base) == 2 + 1


def test_every_registered_method_builds_an_estimator_of_the_one_interface():
  from lps_jax.methods import interface
  for name, m in methods.REGISTRY.items():
    assert isinstance(m, interface.Method), name
    assert m.reads in (interface.READS_KERNELS, interface.READS_NETWORKS,
                       interface.READS_OUTPUTS), name
    assert isinstance(m.build(SecondOrderConfig(), 3), interface.Estimator), name
