"""Checkpoint readers (every format gives the same kernels; PyTorch without torch) and
lps_query end to end: an index over a tiny model set, queried with a checkpoint of each format."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lps_jax.training import modelset, resnet
from lps_jax.zoo import foreign_checkpoints as checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
TORCH_NAMES = ['conv1.weight'] + [f'layers.{b}.conv{i}.weight' for b in range(3) for i in (1, 2)]


def test_pytorch_state_dict_read_without_torch():
  """tiny_resnet.pt was written by torch.save (fixtures/make_torch_fixture.py); every tensor,
  including strided views, storage offsets and bfloat16, must match torch's own values."""
  arrays = checkpoints.read_arrays(os.path.join(FIXTURES, 'tiny_resnet.pt'))
  expected = np.load(os.path.join(FIXTURES, 'tiny_resnet_expected.npz'))
  assert sorted(arrays) == sorted(expected.files)
  for k in expected.files:
    np.testing.assert_array_equal(arrays[k], expected[k], err_msg=k)
  kernels, names = checkpoints.conv_kernels(arrays, 7, 'oihw')
  assert names == [f'state_dict.{n}' for n in TORCH_NAMES]   # 1x1 shortcut convs skipped
  np.testing.assert_array_equal(kernels[0], expected['state_dict.conv1.weight'].transpose(2, 3, 1, 0))
  assert [k.shape for k in kernels][:2] == [(3, 3, 3, 4), (3, 3, 4, 4)]


def _model_kernels(tiny_set, row=5):
  ms = modelset.load(tiny_set)
  cfg = resnet.ResNetConfig.from_dict(ms.config['model'])
  one = jax.tree_util.tree_map(lambda x: np.asarray(x[row]), ms.params)
  names = resnet.conv_layer_names(cfg)
  return one, names, [np.asarray(resnet.get_kernel(one, n)) for n in names]


def _write_all_formats(tmp_path, tiny_set):
  """One model of the set, saved as .npz, .safetensors (torch names, OIHW), .msgpack, orbax."""
  import flax.serialization
  import orbax.checkpoint as ocp
  from safetensors.numpy import save_file
  params, names, kernels = _model_kernels(tiny_set)
  paths = {'npz': tmp_path / 'm.npz', 'safetensors': tmp_path / 'm.safetensors',
           'msgpack': tmp_path / 'm.msgpack', 'orbax': tmp_path / 'm_orbax'}
  np.savez(paths['npz'], **{n: k for n, k in zip(names, kernels)}, fc=np.zeros((8, 2)))
  save_file({n: np.ascontiguousarray(k.transpose(3, 2, 0, 1))
             for n, k in zip(TORCH_NAMES, kernels)}, str(paths['safetensors']))
  paths['msgpack'].write_bytes(flax.serialization.msgpack_serialize({'params': params}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(paths['orbax']), params)
  return paths, kernels


def test_every_format_gives_the_same_kernels(tmp_path, tiny_set):
  paths, kernels = _write_all_formats(tmp_path, tiny_set)
  for fmt, path in paths.items():
    arrays = checkpoints.read_arrays(str(path))
    got, _ = checkpoints.conv_kernels(arrays, 7, checkpoints.default_layout(str(path)))
    for a, b in zip(got, kernels):
      np.testing.assert_array_equal(a, b, err_msg=fmt)


def test_checkpoint_errors(tmp_path):
  pt = open(os.path.join(FIXTURES, 'tiny_resnet.pt'), 'rb').read()
  (tmp_path / 'cut.pt').write_bytes(pt[:len(pt) // 2])
  with pytest.raises(checkpoints.CheckpointError, match='not a zip-format'):
    checkpoints.read_arrays(str(tmp_path / 'cut.pt'))
  (tmp_path / 'bad.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": garbage')
  with pytest.raises(checkpoints.CheckpointError, match='unreadable.*truncated or corrupt'):
    checkpoints.read_arrays(str(tmp_path / 'bad.safetensors'))
  with pytest.raises(checkpoints.CheckpointError, match='unknown checkpoint type'):
    checkpoints.read_arrays(__file__)
  with pytest.raises(checkpoints.CheckpointError, match='not found'):
    checkpoints.read_arrays(str(tmp_path / 'none.pt'))
  arrays = {'a': np.zeros((3, 3, 3, 4)), 'b': np.zeros((8,))}
  with pytest.raises(checkpoints.CheckpointError, match=r"no arrays named \['x'\]; its 4-D arrays are \['a'\]"):
    checkpoints.conv_kernels(arrays, 1, 'hwio', names=['x'])
  with pytest.raises(checkpoints.CheckpointError, match='found 1 3x3 conv kernels .* 2 are needed'):
    checkpoints.conv_kernels(arrays, 2, 'hwio')
  for suffix in ('.npz', '.pt', '.safetensors', '.msgpack'):   # empty files
    (tmp_path / f'empty{suffix}').write_bytes(b'')
    with pytest.raises(checkpoints.CheckpointError, match='unreadable|not a zip-format'):
      checkpoints.read_arrays(str(tmp_path / f'empty{suffix}'))
  (tmp_path / 'plain').mkdir()
  with pytest.raises(checkpoints.CheckpointError, match='a folder but not an orbax checkpoint'):
    checkpoints.read_arrays(str(tmp_path / 'plain'))
  with pytest.raises(checkpoints.CheckpointError, match='is int32, not a float conv kernel'):
    checkpoints.conv_kernels({'a': np.zeros((3, 3, 3, 4), np.int32)}, 1, 'hwio')
  # A pickle that would run code is refused, not executed.
  import pickle
  import zipfile
  with zipfile.ZipFile(tmp_path / 'evil.pt', 'w') as z:
    z.writestr('archive/data.pkl', pickle.dumps({'x': os.system}))
  with pytest.raises(checkpoints.CheckpointError, match='posix.system object'):
    checkpoints.read_arrays(str(tmp_path / 'evil.pt'))


def _query(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.lps_query', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.slow
def test_lps_query_builds_an_index_and_answers_every_format(tmp_path, tiny_set):
  paths, _ = _write_all_formats(tmp_path, tiny_set)
  index = f'--index={tmp_path}/index'
  r = _query('--build', f'--modelset={tiny_set}', index, '--num_filters=8', '--epochs=6',
             '--lr_boundaries=4', '--learning_rate=0.01')
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(tmp_path / 'index' / 'index.json')
  answers = []
  for path in paths.values():
    r = _query(index, str(path), '--format=json', '--top=3')
    assert r.returncode == 0, r.stderr[-3000:]
    answers.append(json.loads(r.stdout))
  # Row 5 of the set is task 1, run 1: it finds itself (cosine 1) whatever the file format.
  for a in answers:
    assert a['models'][0] == {'row': 5, 'task': 1, 'run': 1, 'cosine': pytest.approx(1, abs=1e-5)}
    assert a['tasks'][0]['task'] == 1 and a['tasks'][0]['fine_labels'] == [2, 3]
    assert a['tasks'] == answers[0]['tasks']
  # The PyTorch fixture (same architecture, PyTorch init) gets a table; a bad file among the
  # queries costs only its own answer.
  (tmp_path / 'cut.npz').write_bytes(paths['npz'].read_bytes()[:100])
  r = _query(index, os.path.join(FIXTURES, 'tiny_resnet.pt'), str(tmp_path / 'cut.npz'))
  assert r.returncode != 0
  assert '| rank | task (fine labels) |' in r.stdout and 'tiny_resnet.pt' in r.stdout
  assert 'cut.npz: unreadable' in r.stderr and 'Traceback' not in r.stderr
  # Wrong layer names, wrong shapes, no index.
  r = _query(index, str(paths['npz']), '--layers=conv9')
  assert r.returncode != 0 and "no arrays named ['conv9']" in r.stderr
  r = _query(index, str(paths['npz']), '--layers=stage2_block1/conv2')
  assert r.returncode != 0 and 'the index expects (3, 3, 3, 4)' in r.stderr
  assert 'an index of a method that reads any width takes it: weight_stats, gram' in r.stderr
  r = _query(f'--index={tmp_path}/none', str(paths['npz']))
  assert r.returncode != 0 and 'none: not found. Build one with --build' in r.stderr


@pytest.mark.slow
def test_a_width_free_probe_index_names_a_wider_models_task(tmp_path, tiny_set):
  """An index of the Gram probe (layer 1, any width) round-trips through its folder and answers
  a 2x-wide copy of a model (each first-layer filter twice: the same Gram matrix and mean
  filter) exactly as the model itself; the LPS index refuses the wider model in one line."""
  from lps_jax.query import index
  from lps_jax.align.fit import SecondOrderConfig
  kernels, task_id, _, run = modelset.load_kernels(tiny_set, 1)
  built = index.build(kernels, task_id, run, 'gram', SecondOrderConfig())
  index.save(str(tmp_path / 'gram'), built)
  idx = index.load(str(tmp_path / 'gram'))
  assert sorted(os.listdir(tmp_path / 'gram')) == ['embeddings.npz', 'index.json', 'probe.npz']
  _, _, one = _model_kernels(tiny_set, row=5)
  wide = [np.concatenate([one[0], one[0]], axis=-1)]          # (3, 3, 3, 8): twice the filters
  index.check_kernels(idx, wide, 'wide')
  a, b = index.query(idx, one), index.query(idx, wide)
  assert a['tasks'][0]['task'] == 1 and a['models'][0]['row'] == 5
  # The same tasks and rows in the same order, each score within 1e-9.
  for key, score in (('tasks', 'probability'), ('models', 'cosine')):
    assert [{k: v for k, v in x.items() if k != score} for x in a[key]] == \
        [{k: v for k, v in y.items() if k != score} for y in b[key]]
    np.testing.assert_allclose([x[score] for x in a[key]], [y[score] for y in b[key]],
                               rtol=0, atol=1e-9)
  np.testing.assert_array_equal(idx.model.predict(kernels), built.model.predict(kernels))
  lps = index.Index('lps', SecondOrderConfig(), idx.tasks, idx.shapes, None, idx.embeddings,
                    idx.task_id, idx.run)
  with pytest.raises(index.QueryError, match=r'reads any width takes it: weight_stats, gram'):
    index.check_kernels(lps, wide, 'wide')
  with pytest.raises(ValueError, match='an index needs a second-order or probe method'):
    index.build(kernels, task_id, run, 'wn_invariant', SecondOrderConfig())
