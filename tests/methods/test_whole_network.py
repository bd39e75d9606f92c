"""Whole-network methods (lps_jax.methods.whole_network, lps_jax.methods.invariant_net): exact invariance to the
permutation spec, agreement with the plain model, and learning beyond chance."""
import dataclasses
import io

import jax
import numpy as np
import pytest

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common.errors import UserError
from lps_jax.evaluation import protocols
from lps_jax.methods import invariant_net
from lps_jax.methods import registry as methods
from lps_jax.methods import whole_network
from lps_jax.symmetry import permutations
from lps_jax.training import modelset
from lps_jax.training import resnet
from lps_jax.zoo import probe

TINY = resnet.ResNetConfig((2, 1, 1), (4, 6, 8))   # with shortcut convs in stages 2 and 3


def _stack(num_tasks=4, runs=4, config=TINY, seed=0, signal=0.5):
  """Models whose weights carry a task signal: a per-task offset, then every model's channels
  randomly permuted (so the signal is only visible up to the symmetry)."""
  rng = np.random.default_rng(seed)
  spec = resnet.permutation_spec(config)
  shapes = permutations.flatten(jax.tree_util.tree_map(
      lambda x: np.zeros(x.shape, np.float32),
      jax.eval_shape(lambda: resnet.init_variables(jax.random.PRNGKey(0), config))))
  draw = lambda: {k: (0.3 * rng.standard_normal(x.shape)).astype(np.float32)
                  for k, x in shapes.items()}
  flats, task_id = [], []
  for t in range(num_tasks):
    offset = draw()
    for r in range(runs):
      v = {k: (x + signal * offset[k] if k.startswith('params/') else 1 + np.abs(x))
           for k, x in draw().items()}
      flats.append(permutations.apply(spec, permutations.random_perms(spec, v, rng), v))
      task_id.append(t)
  tree = permutations.unflatten({k: np.stack([f[k] for f in flats]) for k in flats[0]})
  task_id = np.asarray(task_id)
  ms = modelset.ModelSet(tree['params'], tree['batch_stats'], task_id, task_id * 0, task_id * 0,
                         np.zeros(len(task_id)), {'model': dataclasses.asdict(config)})
  return modelset.network_stack(ms), task_id


def _permuted(stack, seed):
  rng = np.random.default_rng(seed)
  spec = stack.spec()
  return stack.replaced([permutations.apply(spec, permutations.random_perms(spec, f, rng), f)
                         for f in stack.model_flats()])


def test_network_stack_puts_conv_kernels_first_and_keeps_every_variable():
  stack, _ = _stack(2, 2)
  names = resnet.conv_layer_names(TINY)
  assert stack.num_conv == len(names)
  assert stack.paths[:len(names)] == tuple(f'params/{n}/kernel' for n in names)
  assert list(stack.paths[len(names):]) == sorted(stack.paths[len(names):])
  assert 'params/dense/kernel' in stack.paths and 'batch_stats/bn1/var' in stack.paths
  part = stack.take([1, 2])
  assert isinstance(part, modelset.NetworkStack) and part.paths == stack.paths
  np.testing.assert_array_equal(part.arrays[0], stack.arrays[0][[1, 2]])
  assert part.num_models == 2 and part.kernels[0].shape[0] == 2
  with pytest.raises(ValueError, match='missing'):   # an explicit type: every member is there
    modelset.NetworkStack((None,) + stack.arrays[1:], stack.paths, stack.model, stack.num_conv)
  with pytest.raises(ValueError, match='2 rows for 4 models'):
    stack.with_array('x', np.zeros((2, 3)))


def test_aligner_maps_permuted_copies_to_the_same_aligned_models_bit_for_bit():
  stack, _ = _stack()
  aligner = whole_network.Aligner(reference_models=8).fit(stack)
  a, b = aligner.transform(stack), aligner.transform(_permuted(stack, 5))
  for x, y in zip(a.arrays, b.arrays):
    np.testing.assert_array_equal(x, y)
  # The aligned models compute what the originals compute.
  model = resnet.ResNet(TINY)
  images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  for m in (0, 7):
    out = [model.apply(permutations.unflatten(s.model_flats()[m]), images, train=False)
           for s in (stack, a)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_aligner_caches_its_work(tmp_path):
  from lps_jax.common import cache as cache_lib
  stack, _ = _stack(2, 3)
  cache = cache_lib.Cache(str(tmp_path))
  first = whole_network.Aligner(reference_models=4, cache=cache).fit(stack).transform(stack)
  assert len(list(tmp_path.glob('*.npz'))) == 2          # the reference, the permutations
  again = whole_network.Aligner(reference_models=4, cache=cache).fit(stack).transform(stack)
  for x, y in zip(first.arrays, again.arrays):
    np.testing.assert_array_equal(x, y)


def test_aligned_probe_is_invariant_and_beats_chance_where_the_unaligned_one_cannot():
  stack, task_id = _stack(4, 6, signal=1.0)
  train = np.flatnonzero(np.tile(np.arange(6), 4) < 4)
  test = np.setdiff1d(np.arange(len(task_id)), train)
  cfg = SecondOrderConfig()
  probe = methods.get('wn_probe').build(cfg, 4)
  probe.fit(stack.take(train), task_id[train])
  p = probe.predict(stack.take(test))
  np.testing.assert_allclose(p, probe.predict(_permuted(stack.take(test), 3)), atol=1e-12)
  assert (p.argmax(1) == task_id[test]).mean() >= 0.75            # chance 0.25


def test_invariant_network_is_invariant_reads_other_widths_and_learns():
  stack, task_id = _stack(4, 6, signal=1.0)
  config = invariant_net.InvariantConfig(epochs=40, batch_size=8, depth=1, hidden=8)
  model = invariant_net.InvariantModel(config, 4)
  train = np.flatnonzero(np.tile(np.arange(6), 4) < 4)
  test = np.setdiff1d(np.arange(len(task_id)), train)
  model.fit(stack.take(train), task_id[train])
  z = model.logits(stack.take(test))
  np.testing.assert_allclose(z, model.logits(_permuted(stack.take(test), 9)), rtol=1e-4,
                             atol=1e-4 * np.abs(z).max())
  assert (z.argmax(1) == task_id[test]).mean() >= 0.5              # chance 0.25
  wide, _ = _stack(1, 2, config=resnet.ResNetConfig((2, 1, 1), (8, 12, 16)))
  assert model.predict(wide).shape == (2, 4)                      # any channel counts
  # Its fitted state, through an .npz as an lps_query index keeps it, answers the same.
  buf = io.BytesIO()
  np.savez(buf, **model.state())
  buf.seek(0)
  with np.load(buf) as f:
    loaded = invariant_net.InvariantModel(config, 4)
    loaded.load_state({k: f[k] for k in f.files})
  np.testing.assert_array_equal(loaded.logits(stack.take(test)), z)
  other = invariant_net.InvariantModel(config, 4, prefixes=('params/',))
  with pytest.raises(UserError, match='stored invariant network reads'):
    other.load_state(model.state())


def test_probe_logits_are_the_models_outputs_and_a_function_of_the_network():
  from lps_jax.training import data
  stack, _ = _stack(1, 2)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  logits = probe.probe_logits(stack, images)
  want = resnet.ResNet(TINY).apply(permutations.unflatten(stack.model_flats()[1]),
                                   data.normalize(images), train=False)
  np.testing.assert_allclose(logits[1], np.asarray(want).reshape(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probe.probe_logits(_permuted(stack, 2), images), logits,
                             rtol=1e-4, atol=1e-5)
  labels = np.repeat(np.arange(3), 2)
  assert probe.probe_images(np.arange(6), labels, 2).tolist() == list(range(6))
  with pytest.raises(ValueError, match='fewer than 3 images'):
    probe.probe_images(np.arange(6), labels, 3)


def test_whole_network_methods_refuse_kernel_lists_in_one_line():
  stack, task_id = _stack(2, 2)
  for name in ('wn_probe', 'wn_invariant', 'wn_lps'):
    model = methods.get(name).build(SecondOrderConfig(), 2)
    with pytest.raises(modelset.ModelSetError, match='pass the full model set folder'):
      model.fit(stack.kernels, task_id)


def test_table1_runs_whole_network_methods_on_a_stack():
  stack, task_id = _stack(3, 10, signal=1.0)
  r = protocols.run_classification(stack, task_id, 'wn_probe', SecondOrderConfig(), 0)
  assert r['top-1'] >= 0.5                                       # 3-way, chance 0.33


def test_methods_fitted_on_one_width_name_the_tasks_of_another():
  narrow, task_id = _stack(3, 6, signal=1.0)
  wide, wide_task = _stack(3, 2, config=resnet.ResNetConfig((2, 1, 1), (8, 12, 16)), signal=1.0)
  cfg = SecondOrderConfig()
  for name in ('gram', 'weight_stats', 'random'):
    r = protocols.run_cross_architecture(narrow, task_id, wide, wide_task, name, cfg, 0)
    assert 0 <= r['top-1'] <= r['top-5'] <= 1
  for name in ('lps', 'wn_probe'):
    with pytest.raises(ValueError, match=f"method '{name}' reads layers of fixed shape .*any "
                                         'width: random, weight_stats, gram'):
      protocols.run_cross_architecture(narrow, task_id, wide, wide_task, name, cfg, 0)


def test_the_invariant_network_reads_only_the_variables_asked_for():
  stack, _ = _stack(1, 2)
  nodes, unpermuted = invariant_net.nodes_of(stack, stack.spec(), ('params/',))
  paths = [p for n in nodes for p in n.paths] + unpermuted
  assert paths and all(p.startswith('params/') for p in paths)
  every, _ = invariant_net.nodes_of(stack, stack.spec())
  assert any(p.startswith('batch_stats/') for n in every for p in n.paths)
  bn = [n for n in every if n.name == 'bn1'][0]
  assert set(bn.paths) == {'params/bn1/bias', 'params/bn1/scale', 'batch_stats/bn1/mean',
                           'batch_stats/bn1/var'} and bn.groups == ('stream0',)
