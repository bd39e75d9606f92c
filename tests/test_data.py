import time

import jax
import numpy as np
import pytest

from lps_jax import data


@pytest.fixture(scope='module')
def split():
  return data.load_npz()


def test_vendored_split_is_the_real_test_split(split):
  assert split.images.shape == (10000, 32, 32, 3) and split.images.dtype == np.uint8
  assert np.bincount(split.labels).tolist() == [100] * 100
  assert split.labels[:10].tolist() == [49, 33, 72, 51, 71, 92, 15, 14, 23, 0]


def test_tasks_split_80_20_per_class_and_relabel(split):
  tasks = data.make_tasks(split, range(50), holdout_fraction=0.2, seed=0)
  assert tasks.train_idx.shape == (50, 160) and tasks.eval_idx.shape == (50, 40)
  for r in (0, 17, 49):
    tr, ev = tasks.train_idx[r], tasks.eval_idx[r]
    assert not set(tr) & set(ev)
    np.testing.assert_array_equal(split.labels[tr], 2 * r + tasks.train_labels[r])
    np.testing.assert_array_equal(split.labels[ev], 2 * r + tasks.eval_labels[r])
    assert np.bincount(tasks.train_labels[r]).tolist() == [80, 80]
    assert np.bincount(tasks.eval_labels[r]).tolist() == [20, 20]
  again = data.make_tasks(split, range(50), seed=0)
  np.testing.assert_array_equal(again.train_idx, tasks.train_idx)
  other = data.make_tasks(split, range(50), seed=1)
  assert not np.array_equal(other.train_idx, tasks.train_idx)


def test_augment_is_a_padded_crop_maybe_flipped(split):
  imgs = split.images[:6]
  out = np.asarray(data.augment(jax.random.PRNGKey(3), imgs))
  assert out.shape == (6, 32, 32, 3) and out.dtype == np.float32
  norm = np.asarray(data.normalize(np.pad(imgs, ((0, 0), (4, 4), (4, 4), (0, 0)))))
  for i in range(6):
    windows = [w for dy in range(9) for dx in range(9)
               for w in (norm[i, dy:dy + 32, dx:dx + 32], norm[i, dy:dy + 32, dx:dx + 32][:, ::-1])]
    assert min(np.abs(w - out[i]).max() for w in windows) < 1e-5
  # Different keys give different augmentations.
  assert not np.allclose(out, np.asarray(data.augment(jax.random.PRNGKey(4), imgs)))


def test_bad_inputs(tmp_path, split):
  with pytest.raises(data.DataError, match='not found'):
    data.load_npz(str(tmp_path / 'missing.npz'))
  bad = tmp_path / 'bad.npz'
  np.savez(bad, image=np.zeros((4, 28, 28, 3), np.uint8), label=np.zeros(4, np.int64))
  with pytest.raises(data.DataError, match=r'\(N, 32, 32, 3\)'):
    data.load_npz(str(bad))
  np.savez(bad, image=np.zeros((4, 32, 32, 3), np.float32), label=np.zeros(4, np.int64))
  with pytest.raises(data.DataError, match='uint8'):
    data.load_npz(str(bad))
  np.savez(bad, pixels=np.zeros((4, 32, 32, 3), np.uint8))
  with pytest.raises(data.DataError, match='missing arrays'):
    data.load_npz(str(bad))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip file')
  with pytest.raises(data.DataError, match='not a readable'):
    data.load_npz(str(tmp_path / 'junk.npz'))
  with pytest.raises(data.DataError, match='task ids must be in'):
    data.make_tasks(split, range(51))
  few = data.Split(split.images[:300], split.labels[:300])
  with pytest.raises(data.DataError, match='no images of fine labels'):
    data.make_tasks(data.Split(few.images[few.labels < 10], few.labels[few.labels < 10]),
                    range(6))


def test_tfds_offline_fails_fast_with_the_offline_option(tmp_path, monkeypatch):
  # Never touch the network in tests: the probe is replaced by "unreachable".
  monkeypatch.setattr(data, '_network_reachable', lambda *a, **k: False)
  t0 = time.time()
  with pytest.raises(data.DataError, match='--dataset=npz'):
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
