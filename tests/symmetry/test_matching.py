"""The one weight matcher (lps_jax.symmetry.matching.WeightMatcher): exact on permuted copies,
the same assignment as the Hungarian algorithm on one layer, its work kept in a cache."""
import os

import numpy as np
from scipy.optimize import linear_sum_assignment

from lps_jax.common import cache as cache_lib
from lps_jax.symmetry import matching, permutations
from lps_jax.symmetry.permutations import PermutationSpec

SPEC = PermutationSpec.from_axes({'a': (None, None, None, 'g0'), 'b': (None, None, 'g0', 'g1'),
                                  'c': (None, None, 'g1', None)})

def _models(rng, n):
  base = {'a': rng.normal(size=(3, 3, 3, 6)), 'b': rng.normal(size=(3, 3, 6, 5)),
          'c': rng.normal(size=(3, 3, 5, 2))}
  return [{k: v + 0.05 * rng.normal(size=v.shape) for k, v in base.items()} for _ in range(n)]

def test_permuted_copies_land_on_the_same_aligned_models():
  rng = np.random.default_rng(0)
  models = _models(rng, 6)
  matcher = matching.WeightMatcher(SPEC, sorted_start=True).fit(models)
  shuffled = [permutations.apply(SPEC, permutations.random_perms(SPEC, m, rng), m) for m in models]
  for a, b in zip(matcher.transform(models), matcher.transform(shuffled)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.allclose(shuffled[0]['b'], models[0]['b'])   # the copies did differ

def test_one_layer_is_the_hungarian_assignment():
  rng = np.random.default_rng(1)
  spec = PermutationSpec.from_axes({'a': (None, None, None, 'g0')})
  ref, model = rng.normal(size=(3, 3, 3, 8)), rng.normal(size=(3, 3, 3, 8))
  found = matching.weight_matching(spec, {'a': ref}, {'a': model})['g0']
  gain = ref.reshape(-1, 8).T @ model.reshape(-1, 8)
  np.testing.assert_array_equal(found, linear_sum_assignment(gain, maximize=True)[1])

def test_the_reference_rows_are_seeded_and_the_cache_is_reused(tmp_path):
  rng = np.random.default_rng(2)
  models = _models(rng, 8)
  cache = cache_lib.Cache(str(tmp_path))
  calls = []

  def counting(key, compute):
    calls.append(key['kind'])
    return cache.arrays(key, compute)

  m1 = matching.WeightMatcher(SPEC, reference_models=4, seed=3, cached=counting).fit(
      models, key={'models': 'x'})
  rows = m1.reference_rows(8)
  assert len(rows) == 4 and rows.tolist() == sorted(rows.tolist())
  np.testing.assert_array_equal(rows, matching.WeightMatcher(SPEC, 4, seed=3).reference_rows(8))
  first = m1.perms(models, key={'models': 'x'})
  stored = len(os.listdir(tmp_path))
  m2 = matching.WeightMatcher(SPEC, reference_models=4, seed=3, cached=counting).fit(
      models, key={'models': 'x'})
  again = m2.perms(models, key={'models': 'x'})
  assert len(os.listdir(tmp_path)) == stored            # hits, nothing new written
  for p, q in zip(first, again):
    for g in p:
      np.testing.assert_array_equal(p[g], q[g])
  assert calls == ['wn_reference', 'wn_perms'] * 2
