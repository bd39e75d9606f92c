"""The chained-Gram kernel (lps_jax.methods.chain_kernel): equal to the explicit Grams of the
authors' chain, exactly invariant to ResNet's whole permutation symmetry at every depth (with
BatchNorm folded in too), and a classifier that reads it learns."""
import dataclasses

import numpy as np
import pytest

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.methods import authors_chain, chain_kernel
from lps_jax.methods import registry as methods
from lps_jax.symmetry import permutations
from lps_jax.training import resnet
from test_whole_network import TINY, _stack


def test_depth_kernels_equal_the_explicit_chained_grams():
  stack, _ = _stack(2, 2, config=resnet.ResNetConfig((1, 1, 1), (4, 6, 8)))
  w = chain_kernel.chain_weights(stack.kernels)
  got = np.exp(chain_kernel.log_depth_kernels(w, w))
  grams = authors_chain.chain_grams(stack.kernels, (1, 2, 3))
  for d, g in enumerate(grams):
    np.testing.assert_allclose(got[:, :, d], g.astype(np.float64) @ g.T, rtol=2e-5)
  np.testing.assert_allclose(np.exp(chain_kernel.log_self_kernels(w)),
                             np.stack([got[i, i] for i in range(4)]), rtol=1e-5)


def _numpy_log_kernels(wa, wb):
  """log ||M_k||^2 by the plain recursion in float64 (whose range holds every depth)."""
  m, out = wa[0][0].T.astype(np.float64) @ wb[0][0], []
  for l in range(len(wa)):
    if l:
      m = sum(wa[l][s].T.astype(np.float64) @ m @ wb[l][s] for s in range(len(wa[l])))
    out.append(np.log(np.sum(m * m)))
  return np.array(out)


def test_every_depth_of_resnet20_is_exact_where_float32_would_underflow():
  """Unit-norm layers shrink M_k ~50-fold per layer: the float32 recursion reaches zero by
  depth ~12 (K < 1e-45); the log-scaled one agrees with float64 numpy at all 19 depths."""
  stack, _ = _stack(1, 2, config=resnet.ResNetConfig())
  w = chain_kernel.ChainKernel(1)._weights(stack)
  got = chain_kernel.log_depth_kernels(w, w)
  assert got.shape == (2, 2, 19)
  want = _numpy_log_kernels([x[0] for x in w], [x[1] for x in w])
  assert want[-1] < np.log(1e-45)                     # below float32's smallest number
  np.testing.assert_allclose(got[0, 1], want, rtol=1e-4)
  np.testing.assert_allclose(got[1, 0], got[0, 1], rtol=1e-5)
  cos = chain_kernel.combined(got, np.diagonal(got).T, np.diagonal(got).T, [19])
  np.testing.assert_allclose(np.diagonal(cos), 1.0, rtol=1e-5)
  assert 0 < cos[0, 1] < 1


@pytest.mark.parametrize('fold', ['none', 'gamma', 'gamma_sigma'])
def test_every_depth_is_invariant_to_the_whole_symmetry(fold):
  stack, _ = _stack(1, 3, config=TINY)
  spec, rng = stack.spec(), np.random.default_rng(5)
  permuted = stack.replaced([permutations.apply(spec, permutations.random_perms(spec, f, rng), f)
                             for f in stack.model_flats()])
  inputs = (stack, permuted) if fold != 'none' else (stack.kernels, permuted.kernels)
  a, b = (chain_kernel.chain_weights(x, fold=fold) for x in inputs)
  k, kp = chain_kernel.log_depth_kernels(a, a), chain_kernel.log_depth_kernels(b, a)
  assert k.shape[-1] == len(resnet.conv_layer_names(TINY))
  np.testing.assert_allclose(kp, k, rtol=1e-5, atol=1e-4)     # log kernels
  assert not np.allclose(permuted.kernels[2], stack.kernels[2])   # the weights did move


def test_the_kernel_classifier_learns_and_embeds_on_the_unit_sphere():
  stack, task_id = _stack(4, 6, config=TINY, signal=1.0)
  train = np.arange(len(task_id)) % 3 != 0
  for name in ('chain_kernel', 'chain_kernel_bn'):
    est = methods.get(name).estimator(SecondOrderConfig(), 4)
    est.fit(stack.take(np.flatnonzero(train)), task_id[train])
    test = stack.take(np.flatnonzero(~train))
    assert (est.predict(test).argmax(1) == task_id[~train]).mean() >= 0.75, name  # chance .25
    np.testing.assert_allclose(np.linalg.norm(est.embed(test), axis=1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='pass the full model set folder'):
    chain_kernel.chain_weights(stack.kernels, fold='gamma')


def test_a_layer_scaled_by_1e20_changes_nothing_and_overflows_nothing():
  """The cosine-normalised kernel ignores each model's layer scales; the estimator's unit-norm
  chain weights keep float32 finite where the raw chained Grams would overflow."""
  stack, task_id = _stack(3, 4, config=TINY, signal=1.0)
  est = chain_kernel.ChainKernel(3, C=1.0)
  est.fit(stack, task_id)
  arrays = [np.asarray(a) * np.float32(1e20 if l % 2 else 1e-20) if l < stack.num_conv else a
            for l, a in enumerate(stack.arrays)]
  scaled = dataclasses.replace(stack, arrays=arrays)
  raw = chain_kernel.log_self_kernels(chain_kernel.chain_weights(scaled))
  assert not np.all(np.isfinite(raw))                           # what the raw Grams would do
  np.testing.assert_allclose(est.predict(scaled), est.predict(stack), rtol=1e-4, atol=1e-6)


def test_a_kernel_that_vanishes_is_a_clear_error_not_an_empty_regression():
  from lps_jax.common.errors import UserError
  from lps_jax.methods import chain_kernel
  zeros = [np.zeros((4, 3, 3, 3, 4), np.float32), np.zeros((4, 3, 3, 4, 4), np.float32)]
  with pytest.raises(UserError, match='is zero or not finite on these models'):
    chain_kernel.ChainKernel(2, 2).fit(zeros, np.array([0, 0, 1, 1]))


def test_chain_depth_branches_share_one_cached_kernel_computation(tmp_path, monkeypatch):
  """Fig. 3b: each branch's chain_depth reads one depth; with a cache the kernels of every
  depth are computed once per split and every branch answers as it would uncached."""
  from lps_jax.common import cache as cache_lib
  stack, task_id = _stack(3, 4, config=TINY, signal=1.0)
  kernels, depths = stack.kernels, len(stack.kernels)
  train = np.arange(len(task_id)) % 4 != 0
  tr, te = [k[train] for k in kernels], [k[~train] for k in kernels]
  cache = cache_lib.Cache(str(tmp_path))
  plain = {}
  for d in (depths, 1):
    est = chain_kernel.ChainKernel(3, None, depths=(d,), C=1.0)
    est.fit(tr, task_id[train])
    plain[d] = est.predict(te)
  calls = []
  real = chain_kernel.log_depth_kernels
  monkeypatch.setattr(chain_kernel, 'log_depth_kernels', lambda a, b: calls.append(1) or real(a, b))
  for d in (depths, 1):
    base = SecondOrderConfig(layer_weights=(0.0,) * (d - 1) + (1.0,))
    est = methods.get('chain_depth').estimator(base, 3, cache)
    est.fit(tr, task_id[train])
    np.testing.assert_allclose(est.predict(te), plain[d], rtol=1e-6, atol=1e-9)
  assert len(calls) == 2           # train x train and test x train, once for both depths


def _log_kernels_of(features):
  """(N, N, L) log kernels and (N, L) log diagonals of per-depth nonnegative features."""
  k = np.stack([f @ f.T for f in features], -1)
  return np.log(k), np.log(np.stack([np.diagonal(k[..., d]) for d in range(k.shape[-1])], -1))


def test_depths_chosen_on_the_training_models_keep_the_informative_ones():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 8)
  signal = np.eye(4)[labels] + 0.3 * rng.random((32, 4))
  noise = [rng.random((32, 4)) for _ in range(4)]
  log_k, log_diag = _log_kernels_of([signal] + noise)
  assert chain_kernel._cross_validated_depths(log_k, log_diag, labels) == (1,)
  log_k, log_diag = _log_kernels_of(noise[:1] + [signal] * 4)      # depth 1 is noise
  assert len(chain_kernel._cross_validated_depths(log_k, log_diag, labels)) >= 2
  # Too few models per task to fold: every depth.
  assert chain_kernel._cross_validated_depths(log_k[:8, :8], log_diag[:8], np.arange(8) % 4
                                              ) == (1, 2, 3, 4, 5)


def test_chain_kernel_cv_learns_and_keeps_its_chosen_depths_in_the_index_state():
  stack, task_id = _stack(3, 8, config=TINY, signal=1.0)
  train = np.arange(len(task_id)) % 4 != 0
  est = methods.get('chain_kernel_cv').estimator(SecondOrderConfig(), 3)
  est.fit(stack.take(np.flatnonzero(train)), task_id[train])
  test = stack.take(np.flatnonzero(~train))
  assert (est.predict(test).argmax(1) == task_id[~train]).mean() >= 0.8       # chance 1/3
  assert 1 <= len(est.depths) <= len(stack.kernels) and est.depths[0] == 1
  again = methods.get('chain_kernel_cv').estimator(SecondOrderConfig(), 3)
  again.load_state(est.state())
  assert again.depths == est.depths
  np.testing.assert_allclose(again.predict(test), est.predict(test), rtol=1e-6)


def test_the_tables_record_and_print_what_chain_kernel_cv_chose_per_split():
  from experiments import lps_render
  from lps_jax.evaluation import protocols
  stack, task_id = _stack(3, 8, config=TINY, signal=1.0)
  runs = [protocols.run_classification(stack, task_id, 'chain_kernel_cv', SecondOrderConfig(), s)
          for s in (0, 1)]
  for r in runs:
    assert r['chosen']['C'] in chain_kernel.C_GRID
    d = r['chosen']['depths']
    assert d == list(range(1, len(d) + 1)) and 1 <= len(d) <= len(stack.kernels)
  gram = protocols.run_classification(stack, task_id, 'gram', SecondOrderConfig(), 0)
  assert 'chosen' not in gram                                  # gram chooses nothing
  text = lps_render.render_table(
      {'mode': 'classification', 'command': 'x', 'num_tasks': 3, 'modelset': 'tiny',
       'results': {'chain_kernel_cv': [dict(r, split_seed=s) for s, r in enumerate(runs)],
                   'gram': [dict(gram, split_seed=0)]}}, None)
  line = next(l for l in text.splitlines() if l.startswith('Chosen on the training models'))
  assert f'`chain_kernel_cv`: split 0: C {runs[0]["chosen"]["C"]}, depth' in line
  assert 'split 1:' in line and '`gram`' not in line
  assert lps_render._chosen_lines({'m': [{'chosen': {'C': 1.0, 'depths': [1, 2, 3]}}]}) == (
      '\nChosen on the training models of each split: `m`: split 0: C 1.0, depths 1..3.\n')
