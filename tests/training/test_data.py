import os
import time

import jax
import numpy as np
import pytest

from lps_jax.training import data


@pytest.fixture(scope='module')
def splits(data_dir):
  return data.load('npz', data_dir)


def test_offline_folder_is_the_real_cifar100(splits):
  train, test = splits
  assert train.images.shape == (50000, 32, 32, 3) and train.images.dtype == np.uint8
  assert np.bincount(train.labels).tolist() == [500] * 100
  assert test.images.shape == (10000, 32, 32, 3)
  assert np.bincount(test.labels).tolist() == [100] * 100
  assert test.labels[:10].tolist() == [49, 33, 72, 51, 71, 92, 15, 14, 23, 0]
  mean = train.images.reshape(-1, 3).mean(0) / 255   # the published train statistics
  np.testing.assert_allclose(mean, data.CIFAR100_MEAN, atol=2e-4)


def test_paper_tasks_train_on_1000_and_hold_out_200(splits, data_dir):
  train, test = splits
  tasks = data.make_tasks(train, range(50), seed=0, eval_split=test)
  assert tasks.train_idx.shape == (50, 1000) and tasks.eval_idx.shape == (50, 200)
  for r in (0, 17, 49):
    np.testing.assert_array_equal(train.labels[tasks.train_idx[r]], 2 * r + tasks.train_labels[r])
    np.testing.assert_array_equal(test.labels[tasks.eval_idx[r]], 2 * r + tasks.eval_labels[r])
    assert np.bincount(tasks.train_labels[r]).tolist() == [500, 500]
    assert len(set(tasks.train_idx[r].tolist())) == 1000
  # The shards are sorted by class: a class's rows are shuffled per split seed (and every
  # epoch draws its own permutation of the task's rows: test_train_step).
  assert not np.all(np.diff(tasks.train_idx[3][:500]) > 0)
  other = data.make_tasks(train, range(50), seed=1, eval_split=test)
  assert not np.array_equal(other.train_idx, tasks.train_idx)
  # Loading only the tasks' classes gives the same images per task.
  few_train, few_test = data.load('npz', data_dir, classes=data.task_classes([3, 7]))
  assert set(np.unique(few_train.labels).tolist()) == {6, 7, 14, 15}
  few = data.make_tasks(few_train, [3, 7], seed=0, eval_split=few_test)
  assert few.train_idx.shape == (2, 1000)
  # ... in the same order, whichever tasks train beside it (rows are seeded per class): the
  # property that lets ModelSet500 be trained in slices.
  for pos, r in ((0, 3), (1, 7)):
    np.testing.assert_array_equal(few_train.images[few.train_idx[pos]],
                                  train.images[tasks.train_idx[r]])
    np.testing.assert_array_equal(few_test.images[few.eval_idx[pos]],
                                  test.images[tasks.eval_idx[r]])
  # The older test-split-only mode: 80/20 per class of test.npz.
  only, held = data.load('npz_test_only', data_dir, classes=data.task_classes([0]))
  assert held is None
  t = data.make_tasks(only, [0], holdout_fraction=0.2, seed=0)
  assert t.train_idx.shape == (1, 160) and t.eval_idx.shape == (1, 40)
  assert not set(t.train_idx[0]) & set(t.eval_idx[0])


def test_augment_is_a_padded_crop_maybe_flipped(splits):
  imgs = splits[1].images[:6]
  out = np.asarray(data.augment(jax.random.PRNGKey(3), imgs))
  assert out.shape == (6, 32, 32, 3) and out.dtype == np.float32
  norm = np.asarray(data.normalize(np.pad(imgs, ((0, 0), (4, 4), (4, 4), (0, 0)))))
  for i in range(6):
    windows = [w for dy in range(9) for dx in range(9)
               for w in (norm[i, dy:dy + 32, dx:dx + 32], norm[i, dy:dy + 32, dx:dx + 32][:, ::-1])]
    assert min(np.abs(w - out[i]).max() for w in windows) < 1e-5
  assert not np.allclose(out, np.asarray(data.augment(jax.random.PRNGKey(4), imgs)))


def _folder(tmp_path, name, **files):
  d = tmp_path / name
  d.mkdir()
  for fname, arrays in files.items():
    np.savez(d / f'{fname}.npz', **arrays)
  return str(d)


def test_bad_folders_are_one_clear_line(tmp_path):
  ok = {'image': np.zeros((4, 32, 32, 3), np.uint8), 'label': np.arange(4)}
  with pytest.raises(data.DataError, match='no offline data folder given.*LPS_DATA_DIR'):
    data.load('npz', None)
  with pytest.raises(data.DataError, match='data folder not found'):
    data.load('npz', str(tmp_path / 'nowhere'))
  d = _folder(tmp_path, 'no_test', train_0=ok)
  with pytest.raises(data.DataError, match=r'test\.npz: file not found'):
    data.load('npz', d)
  d = _folder(tmp_path, 'no_train', test=ok)
  with pytest.raises(data.DataError, match='no train shards; expected train_0.npz'):
    data.load('npz', d)
  d = _folder(tmp_path, 'shape', test=ok, train_0={'image': np.zeros((4, 28, 28, 3), np.uint8),
                                                    'label': np.arange(4)})
  with pytest.raises(data.DataError, match=r'train_0\.npz: images must have shape \(N, 32, 32, 3\)'):
    data.load('npz', d)
  d = _folder(tmp_path, 'dtype', test={'image': np.zeros((4, 32, 32, 3), np.float32),
                                       'label': np.arange(4)})
  with pytest.raises(data.DataError, match=r'test\.npz: images must be uint8'):
    data.load('npz', d)
  d = _folder(tmp_path, 'arrays', test={'pixels': np.zeros((4, 32, 32, 3), np.uint8)})
  with pytest.raises(data.DataError, match=r"test\.npz: missing arrays \['image', 'label'\]"):
    data.load('npz', d)
  d = _folder(tmp_path, 'corrupt', test=ok)
  with open(os.path.join(d, 'train_0.npz'), 'wb') as f:
    f.write(b'PK\x03\x04 truncated')
  with pytest.raises(data.DataError, match=r'train_0\.npz: not a readable \.npz'):
    data.load('npz', d)
  d = _folder(tmp_path, 'few', test=ok, train_0=ok)
  with pytest.raises(data.DataError, match=r'train_\*\.npz: no images of fine labels \[4, 5\]'):
    data.load('npz', d, classes=data.task_classes([0, 2]))
  with pytest.raises(data.DataError, match='task ids must be in'):
    data.make_tasks(data.Split(ok['image'], ok['label']), range(51))


def test_tfds_offline_fails_fast_with_the_offline_option(tmp_path, monkeypatch):
  # Never touch the network in tests: the probe is replaced by "unreachable".
  monkeypatch.setattr(data, '_network_reachable', lambda *a, **k: False)
  t0 = time.time()
  with pytest.raises(data.DataError, match='--dataset=npz --data_dir'):
    data.load_tfds('train', data_dir=str(tmp_path))
  assert time.time() - t0 < 30
  with pytest.raises(data.DataError, match='download is off'):
    data.load_tfds('train', data_dir=str(tmp_path), download=False)


def test_tfds_prepare_without_tensorflow_is_a_clear_error(tmp_path, monkeypatch):
  import importlib.util
  monkeypatch.setattr(data, '_network_reachable', lambda *a, **k: True)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'tensorflow' else real(name, *a))
  with pytest.raises(data.DataError, match='needs TensorFlow'):
    data.load_tfds('train', data_dir=str(tmp_path))
