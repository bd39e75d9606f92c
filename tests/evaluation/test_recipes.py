"""Training length as a variable: the cross-recipe and across-epoch protocols agree with Table 1
where they must (a set against itself; a trajectory that never moves)."""
import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.evaluation import protocols, recipes


def _set(seed, tasks=6, runs=10):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(tasks, 3, 3, 3, 8))
  task_id = np.repeat(np.arange(tasks), runs)
  return recipes.Set((centres[task_id] + 0.8 * rng.normal(size=(task_id.size, 3, 3, 3, 8)))
                     .astype(np.float32), task_id)


def test_a_set_against_itself_is_table_1():
  a = _set(0)
  out = recipes.cross_recipe({'a': a, 'copy': a}, 'gram', SecondOrderConfig(), split_seed=1)
  table1 = protocols.run_classification([a.kernels], a.task_id, 'gram', SecondOrderConfig(),
                                        split_seed=1)['top-1']
  assert out['a']['a'] == out['a']['copy'] == out['copy']['copy'] == table1
  assert set(out) == {'a', 'copy', recipes.MIX}


def test_only_shared_tasks_count_and_a_frozen_trajectory_is_flat():
  a, b = _set(0), _set(1, tasks=4)
  out = recipes.cross_recipe({'a': a, 'b': b}, 'gram', SecondOrderConfig())
  shared = a.task_id < 4          # a's tasks 4-5 are not b's: left out of fit and test
  table1 = protocols.run_classification([a.kernels[shared]], a.task_id[shared], 'gram',
                                        SecondOrderConfig(), split_seed=0)['top-1']
  assert out['a']['a'] == table1
  frozen = {e: a.kernels for e in (1, 5, 160)}
  epochs = recipes.across_epochs(a.kernels, frozen, a.task_id, 'gram', SecondOrderConfig(),
                                 split_seed=2)
  table1 = protocols.run_classification([a.kernels], a.task_id, 'gram', SecondOrderConfig(),
                                        split_seed=2)['top-1']
  assert set(epochs['final'].values()) == {table1}
  assert len(set(epochs['all epochs'].values())) == 1
