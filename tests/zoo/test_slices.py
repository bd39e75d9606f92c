"""ModelSet500 slices: slices of tasks equal one whole run bit for bit, the manifest refuses
what would mix model sets, the merge feeds lps_main, a replay reproduces a recorded model."""
import json
import os
import shutil

import numpy as np
import pytest

from lps_jax.symmetry import permutations
from lps_jax.training import data
from lps_jax.training import modelset
from lps_jax.training import resnet
from lps_jax.training import trainer, workdir
from lps_jax.training.config import ExecutionConfig, PopulationConfig, TrainConfig
from lps_jax.zoo import manifest
from lps_jax.zoo import slice_folder as slices
from lps_jax.zoo import whole_models as slice_models

TINY = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))
EX = ExecutionConfig(models_per_chunk=2)          # the CPU default: loop, split, 2 devices


TRAJECTORY = (2, 3)        # the tiny recipe's trajectory: epoch 1 stays unrecorded


@pytest.fixture(scope='module')
def splits(data_dir):
  return data.load('npz', data_dir, classes=data.task_classes(range(3)))


@pytest.fixture(scope='module')
def test_split(data_dir):
  return data.test_split('npz', data_dir)


def _config(tasks):
  return PopulationConfig(task_ids=tuple(tasks), runs_per_task=2, dataset='npz', model=TINY,
                          train=TrainConfig(epochs=3, batch_size=250,
                                                       lr_boundaries=(2,)))


def _train_slice(tasks, splits, tmp, root, test_split=None):
  tr = trainer.PopulationTrainer(_config(tasks), EX, *splits)
  wd = str(tmp / f'wd_{slices.slice_name(tasks)}')
  result = tr.train(wd, progress=False, hooks=[slices.TrajectoryRecorder(TRAJECTORY)])
  ex, chunks = tr.execution, len(tr.chunks())
  whole = {} if test_split is None else dict(
      logits=slice_models.probe_logits(result, test_split.images, test_split.labels),
      trajectory=workdir.trajectory(wd, chunks, TRAJECTORY))
  return slices.export(str(root), result, ex, 1.0, 'test',
                       early=workdir.early_kernels(wd, chunks, slices.RECORD_EPOCHS), **whole)


@pytest.fixture(scope='module')
def sliced(splits, test_split, tmp_path_factory):
  """Tasks 0-2 as two slices (0-1 first-layer only, as the slices before task 12; 2 whole)
  and as one run."""
  tmp = tmp_path_factory.mktemp('slices')
  root = tmp / 'root'
  _train_slice((0, 1), splits, tmp, root)     # pathlib paths: the tests copy and edit slices
  _train_slice((2,), splits, tmp, root, test_split)
  whole = trainer.PopulationTrainer(_config((0, 1, 2)), EX, *splits).train(
      str(tmp / 'whole'), progress=False)
  return root, whole, tmp


def test_task_ranges_and_names():
  assert data.parse_task_ids(['0-3', '7']) == (0, 1, 2, 3, 7)
  assert slices.slice_name((0, 1, 2, 3)) == 'tasks_00-03'
  assert slices.slice_name((0, 1, 5)) == 'tasks_00-01_05-05'
  for bad, msg in ((['3-1'], 'empty'), (['a'], 'ranges A-B'), (['0-2', '1'], 'twice'),
                   (['48-50'], 'task 50 is outside 0-49')):
    with pytest.raises(data.DataError, match=msg):
      data.parse_task_ids(bad)


@pytest.mark.slow
def test_slices_merge_to_the_whole_run_bit_for_bit(sliced, tmp_path):
  root, whole, _ = sliced
  out = str(tmp_path / 'merged.npz')
  m = manifest.merge(str(root), out, stage1=True)
  assert m['tasks'] == [0, 1, 2] and m['num_models'] == 6
  assert m['missing'] == list(range(3, 50)) and m['backends'] == ['cpu']
  kernels = modelset.load_kernels(out, num_layers=3)
  np.testing.assert_array_equal(kernels.task_id, whole.task_id)
  np.testing.assert_array_equal(kernels.run, whole.run)
  np.testing.assert_array_equal(kernels.kernels[0], whole.params['conv1']['kernel'])
  deeper = resnet.get_kernel(whole.params, kernels.names[1])
  np.testing.assert_array_equal(kernels.kernels[1], np.asarray(deeper, np.float16))
  with np.load(os.path.join(root, 'tasks_00-01', 'kernels.npz')) as f:
    np.testing.assert_array_equal(f['dense/kernel'], whole.params['dense']['kernel'][:4])
  record = json.load(open(os.path.join(root, 'tasks_02-02', 'slice.json')))
  conv = EX.resolve().conv_impl                    # onednn where the extra is installed
  assert record['tasks'] == [2] and record['execution']['conv_impl'] == conv
  assert record['hardware']['backend'] == 'cpu' and record['versions']['jax']
  assert ('onednn' in record['versions']) == conv.startswith('onednn')
  text = manifest.manifest_markdown(m)
  assert 'tasks_00-01' in text and '3 of 50 tasks' in text
  assert m['whole_tasks'] == [2] and 'trajectory: `lps_jax.zoo.whole_models`): 2.' in text


def _relabel(src, dst, task=None, seed=None):
  """A copy of slice `src` as task `task` (or trained with another `seed`), digest updated."""
  shutil.copytree(src, dst)
  record = json.load(open(dst / 'slice.json'))
  with np.load(dst / 'kernels.npz') as f:
    arrays = {k: f[k] for k in f.files}
  config = json.loads(str(arrays['config']))
  if task is not None:
    arrays['task_id'] = np.full_like(arrays['task_id'], task)
    record['tasks'] = config['task_ids'] = [task]
  if seed is not None:
    config['seed'] = seed
  record['config'] = config
  arrays['config'] = np.asarray(json.dumps(config))
  np.savez_compressed(dst / 'kernels.npz', **arrays)
  record['sha256']['kernels.npz'] = slices._sha256(str(dst / 'kernels.npz'))
  json.dump(record, open(dst / 'slice.json', 'w'))


@pytest.mark.slow
def test_manifest_refuses_what_would_mix_model_sets(sliced, tmp_path):
  root, _, _ = sliced
  bad = tmp_path / 'bad'
  shutil.copytree(root, bad)
  _relabel(root / 'tasks_02-02', bad / 'tasks_04-04', task=4)      # task 3 missing below 4
  with pytest.raises(slices.SliceError, match=r'tasks \[3\] are missing'):
    manifest.check(str(bad))
  assert manifest.check(str(bad), allow_gaps=True)['tasks'] == [0, 1, 2, 4]
  shutil.rmtree(bad / 'tasks_04-04')
  shutil.copytree(bad / 'tasks_02-02', bad / 'tasks_02-02_again')
  with pytest.raises(slices.SliceError, match='task 2 is in two slices'):
    manifest.check(str(bad))
  shutil.rmtree(bad / 'tasks_02-02_again')
  _relabel(root / 'tasks_02-02', bad / 'tasks_03-03', task=3, seed=1)   # another recipe
  with pytest.raises(slices.SliceError, match='another recipe.*seed'):
    manifest.check(str(bad))
  shutil.rmtree(bad / 'tasks_03-03')
  npz = bad / 'tasks_02-02' / 'kernels.npz'
  npz.write_bytes(npz.read_bytes()[:-10])          # truncated after export
  with pytest.raises(slices.SliceError, match='does not match the digest'):
    manifest.check(str(bad))
  (bad / 'tasks_02-02' / 'slice.json').unlink()
  with pytest.raises(slices.SliceError, match='slice.json is missing'):
    manifest.check(str(bad))
  with pytest.raises(slices.SliceError, match='no slices folder'):
    manifest.check(str(tmp_path / 'nowhere'))


@pytest.mark.slow
def test_replay_reproduces_a_recorded_model(sliced, data_dir):
  root, _, _ = sliced
  folder = os.path.join(root, 'tasks_00-01')
  early = slices.replay_check(folder, data_dir, (1, 1))
  assert early['epochs'] == slices.RECORD_EPOCHS and early['bitwise_expected']
  assert early['equal'], early
  final = slices.replay_check(folder, data_dir, (0, 0), epochs=3)
  assert final['equal'], final
  with pytest.raises(slices.SliceError, match='records the first layer after epochs'):
    slices.replay_check(folder, data_dir, (0, 0), epochs=1)
  whole = os.path.join(root, 'tasks_02-02')     # any trajectory epoch replays
  assert slices.replay_check(whole, data_dir, (2, 1), epochs=3)['equal']
  with pytest.raises(slices.SliceError, match=r'after epochs \[2, 3\]; replay one'):
    slices.replay_check(whole, data_dir, (2, 1), epochs=1)
  with pytest.raises(slices.SliceError, match='no model of task 5'):
    slices.replay_check(folder, data_dir, (5, 0))


@pytest.mark.slow
def test_whole_slices_hold_every_variable_the_trajectory_and_the_probe_logits(sliced, test_split):
  """A whole slice reads back as the run that trained it: conv1 exact, every other variable
  float16-rounded, the trajectory's last epoch equal to the final first layer, the logits
  equal to the functional reference of the float32 models; safetensors, readable anywhere."""
  from safetensors.numpy import load_file
  root, whole_run, _ = sliced
  got = manifest.load_whole(str(root))
  want = whole_run.select(np.flatnonzero(whole_run.task_id == 2))
  np.testing.assert_array_equal(got.models.task_id, want.task_id)
  np.testing.assert_array_equal(got.models.run, want.run)
  np.testing.assert_array_equal(got.models.params['conv1']['kernel'], want.params['conv1']['kernel'])
  for section in ('params', 'batch_stats'):
    mine = permutations.flatten(getattr(got.models, section))
    theirs = permutations.flatten(getattr(want, section))
    assert sorted(mine) == sorted(theirs)
    for path, a in theirs.items():
      if path != 'conv1/kernel':
        np.testing.assert_array_equal(mine[path], np.asarray(a, np.float16).astype(np.float32))
  assert sorted(got.trajectory) == list(TRAJECTORY)
  np.testing.assert_array_equal(got.trajectory[3], want.params['conv1']['kernel'])
  np.testing.assert_array_equal(
      got.logits, slice_models.probe_logits(want, test_split.images, test_split.labels))
  assert got.logits.shape == (2, 200, 2)
  raw = load_file(str(root / 'tasks_02-02' / slice_models.MODELS))   # plain safetensors
  assert raw['params/conv1/kernel'].dtype == np.float32
  assert raw['params/dense/kernel'].dtype == np.float16 and raw['batch_stats/bn1/mean'].shape[0] == 2
  record = json.load(open(root / 'tasks_02-02' / 'slice.json'))
  assert record['whole']['bytes'] == os.path.getsize(root / 'tasks_02-02' / slice_models.MODELS)
  assert json.load(open(root / 'tasks_00-01' / 'slice.json'))['whole'] is None
  with pytest.raises(modelset.ModelSetError, match=r'tasks \[0\] have no whole models'):
    manifest.load_whole(str(root), tasks=[0, 2])
  with pytest.raises(data.DataError, match=r'classes \[2, 3, 4, 5, 6\] have fewer'):
    slice_models.check_probe(np.repeat([0, 1], 2))     # a folder of one task's classes


@pytest.mark.slow
def test_whole_network_methods_run_on_a_folder_of_slices(sliced, tmp_path):
  """lps_main's loading reads a slices folder as its whole models: the functional reference
  from the stored logits (no images), weight-space methods from every variable."""
  from experiments import lps_modes
  from lps_jax.methods import registry as methods
  from lps_jax.align.fit import SecondOrderConfig
  root, _, _ = sliced
  table = lps_modes.MODES['classification']
  never = lambda: pytest.fail('the stored logits make images unnecessary')
  stack, task_id, _, _ = lps_modes.load(table, str(root), SecondOrderConfig(),
                                        ['functional', 'wn_probe_unaligned'], None, never)
  assert task_id.tolist() == [2, 2] and stack.get(methods.PROBE_OUTPUTS).shape == (2, 400)
  kernels, task_id, _, _ = lps_modes.load(table, str(root), SecondOrderConfig(), ['lps'], None)
  assert kernels[0].shape == (2, 3, 3, 3, 4) and task_id.tolist() == [2, 2]
  bad = tmp_path / 'bad'
  shutil.copytree(root, bad)
  blob = bad / 'tasks_02-02' / slice_models.MODELS
  blob.write_bytes(blob.read_bytes()[:-10])
  with pytest.raises(slices.SliceError, match='models.safetensors does not match the digest'):
    manifest.load_whole(str(bad))
