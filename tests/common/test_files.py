"""Atomic writes (lps_jax.common.files): a file or folder appears whole or not at all."""
import json
import os

import pytest

from lps_jax.common import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = str(tmp_path / 'a.json')
  files.write_json(path, {'v': 1})
  with pytest.raises(RuntimeError):
    with files.atomic_path(path) as tmp, open(tmp, 'w') as f:
      f.write('{"v": 2, half')
      raise RuntimeError('killed mid-write')
  assert json.load(open(path)) == {'v': 1}
  assert os.listdir(tmp_path) == ['a.json']


def test_a_folder_is_replaced_whole_and_suffixes_are_kept(tmp_path):
  import numpy as np
  folder = str(tmp_path / 'set')
  for version in (1, 2):
    with files.atomic_path(folder) as tmp:
      os.makedirs(tmp)
      files.write_text(os.path.join(tmp, 'v'), str(version))
  assert open(os.path.join(folder, 'v')).read() == '2'
  with files.atomic_path(str(tmp_path / 'x.npz'), '.npz') as tmp:
    np.savez(tmp, a=np.arange(3))         # np.savez keeps a name that ends in .npz
  assert np.load(tmp_path / 'x.npz')['a'].tolist() == [0, 1, 2]
  assert sorted(os.listdir(tmp_path)) == ['set', 'x.npz']


def test_stale_temporaries_are_found_and_only_they_are_removed(tmp_path):
  files.write_text(str(tmp_path / 'keep.json'), '{}')
  stale = tmp_path / f'.keep.json{files.TMP}123-abcdef'
  stale.write_text('half')
  (tmp_path / '.lock').write_text('')
  assert files.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
  assert sorted(os.listdir(tmp_path)) == ['.lock', 'keep.json']
