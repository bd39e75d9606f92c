"""Checkpoint readers (every format gives the same kernels; PyTorch without torch) and
lps_query end to end: an index over a tiny model set, queried with a checkpoint of each format."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lps_jax.training import modelset, resnet
from lps_jax.zoo import foreign_checkpoints as checkpoints
from lps_jax.query.checkpoint_inputs import QueryError
from tests.fixtures import torch_zip

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
  r = _query('--build', f'--modelset={tiny_set}', index, '--method=lps', '--num_filters=8',
             '--epochs=6', '--lr_boundaries=4', '--learning_rate=0.01', '--calibration_folds=0')
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(tmp_path / 'index' / 'index.json')
  r = _query(index, *map(str, paths.values()), '--format=json', '--top=3')
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout)
  assert out['indexes'][0]['models'] == 24 and out['indexes'][0]['calibration'] is None
  answers = out['answers']
  assert len(answers) == len(paths) and not out['errors']
  # Row 5 of the set is task 1, run 1: it finds itself (cosine 1) whatever the file format.
  for a in answers:
    m = a['models'][0]
    assert (m['row'], m['label'], m['run']) == (5, 'task 1 (fine 2, 3)', '1')
    assert m['cosine'] == pytest.approx(1, abs=1e-5)
    assert a['answer'] == a['labels'][0]['label'] == 'task 1 (fine 2, 3)'
    assert a['labels'] == answers[0]['labels']
  # The PyTorch fixture (same architecture, PyTorch init) gets a table; a bad file among the
  # queries costs only its own answer.
  (tmp_path / 'cut.npz').write_bytes(paths['npz'].read_bytes()[:100])
  r = _query(index, os.path.join(FIXTURES, 'tiny_resnet.pt'), str(tmp_path / 'cut.npz'))
  assert r.returncode != 0
  assert '| rank | label |' in r.stdout and 'tiny_resnet.pt' in r.stdout
  assert 'cut.npz: unreadable' in r.stderr and 'Traceback' not in r.stderr
  # Wrong layer names, wrong shapes, no index.
  r = _query(index, str(paths['npz']), '--layers=conv9')
  assert r.returncode != 0 and "no arrays named ['conv9']" in r.stderr
  r = _query(index, str(paths['npz']), '--layers=stage2_block1/conv2')
  assert r.returncode != 0 and 'the index expects (3, 3, 3, 4)' in r.stderr
  assert 'an index of a method that reads any width takes it: weight_stats, gram' in r.stderr
  r = _query(f'--index={tmp_path}/none', str(paths['npz']))
  assert r.returncode != 0 and 'none: not found. Build one with --build' in r.stderr


def _tiny_zoo(folder, tiny_set, tasks, statistics=True):
  """The tiny set's models of `tasks` as PyTorch state_dicts (torch_reference's names) in
  `folder`, with a labels table; returns (table path, {row of the set: file})."""
  from tests.conftest import TINY_CONFIG
  ms = modelset.load(tiny_set)
  stack = modelset.network_stack(ms)
  folder.mkdir(exist_ok=True)
  lines, files = ['path,label,run,recipe'], {}
  for row in np.flatnonzero(np.isin(ms.task_id, tasks)):
    flat = {p: a[row] for p, a in stack.items()}
    name = f'm{row}.pt'
    torch_zip.save(folder / name, torch_zip.state_dict(flat, TINY_CONFIG, statistics))
    lines.append(f'{name},kind {ms.task_id[row]},{ms.run[row]},torch-like')
    files[int(row)] = folder / name
  (folder / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return folder / 'labels.csv', files


def test_a_zoo_of_pytorch_checkpoints_is_indexed_whole_and_answers_unseen_tasks_unknown(
    tmp_path, tiny_set):
  """Tasks 0-4 of the tiny set as a zoo of PyTorch files: a whole-network index (the chained-
  Gram kernel with BatchNorm's scale) names an indexed model's label with the model itself at
  cosine 1, round-trips through its folder, and calls task 5's models (never indexed) unknown;
  a checkpoint without BatchNorm statistics is refused by the chain_kernel_bn index with a
  line naming the indexes that take it."""
  from lps_jax.align.fit import SecondOrderConfig
  from lps_jax.query import index, zoo
  table, files = _tiny_zoo(tmp_path / 'zoo', tiny_set, range(5))
  z = zoo.from_table(str(table), str(tmp_path / 'zoo'), 'chain_kernel', SecondOrderConfig())
  assert z.inputs.num_models == 20 and z.labels == [f'kind {t}' for t in range(5)]
  built = index.build(z.inputs, z.labels, z.label_of, z.run, z.recipe, z.path, 'chain_kernel',
                      calibration_folds=5)
  index.save(str(tmp_path / 'idx'), built)
  idx = index.load(str(tmp_path / 'idx'))
  assert idx.recipes() == {'torch-like': 20} and idx.needs.whole
  assert idx.calibration.false_accept <= 0.2 and idx.calibration.false_reject <= 0.2
  a = idx.query(files[5])
  assert a['answer'] == 'kind 1' and a['known'] and a['models'][0]['path'] == 'm5.pt'
  assert a['models'][0]['cosine'] == pytest.approx(1, abs=1e-6)
  np.testing.assert_allclose(idx.estimator.predict(z.inputs), built.estimator.predict(z.inputs),
                             rtol=0, atol=1e-12)
  _, unseen = _tiny_zoo(tmp_path / 'unseen', tiny_set, [5])
  answers = idx.query_many(list(unseen.values()))
  assert sum(a['answer'] == 'unknown' for a in answers) >= 3, answers
  # Parameters only: chain_kernel takes it, chain_kernel_bn refuses it.
  _, bare = _tiny_zoo(tmp_path / 'bare', tiny_set, [1], statistics=False)
  assert idx.query(bare[5])['answer'] == 'kind 1'
  zb = zoo.from_table(str(table), str(tmp_path / 'zoo'), 'chain_kernel_bn', SecondOrderConfig())
  bn = index.build(zb.inputs, zb.labels, zb.label_of, zb.run, zb.recipe, zb.path,
                   'chain_kernel_bn', calibration_folds=0)
  with pytest.raises(index.QueryError, match=r'reads every parameter and BatchNorm running '
                     r'statistics, which this checkpoint does not carry .*chain_kernel.* take it'):
    bn.query(bare[5])


@pytest.mark.slow
def test_an_invariant_network_index_round_trips_and_takes_what_it_reads(tmp_path, tiny_set):
  """The invariant network, kept in an index of a PyTorch zoo (tasks 0-4), answers from its
  folder exactly as when built; with BatchNorm statistics it refuses a checkpoint without them
  (naming the indexes that take it), on parameters only it answers that checkpoint."""
  from lps_jax.align.fit import SecondOrderConfig
  from lps_jax.query import index, zoo
  table, files = _tiny_zoo(tmp_path / 'zoo', tiny_set, range(5))
  _, bare = _tiny_zoo(tmp_path / 'bare', tiny_set, [1], statistics=False)
  for method in ('wn_invariant', 'wn_invariant_params'):
    z = zoo.from_table(str(table), str(tmp_path / 'zoo'), method, SecondOrderConfig())
    built = index.build(z.inputs, z.labels, z.label_of, z.run, z.recipe, z.path, method,
                        calibration_folds=0)
    index.save(str(tmp_path / method), built)
    idx = index.load(str(tmp_path / method))
    np.testing.assert_array_equal(idx.estimator.predict(z.inputs),
                                  built.estimator.predict(z.inputs))
    a, b = idx.query(files[5]), built.query(files[5])
    assert a['answer'] == b['answer'] and a['labels'] == b['labels']
    if method == 'wn_invariant':
      with pytest.raises(index.QueryError, match='BatchNorm running statistics, which this '
                         'checkpoint does not carry'):
        idx.query(bare[5])
    else:
      assert idx.query(bare[5])['labels'] == a['labels']


def test_zoo_tables_are_checked(tmp_path, tiny_set):
  from lps_jax.align.fit import SecondOrderConfig
  from lps_jax.query import zoo
  table, _ = _tiny_zoo(tmp_path / 'zoo', tiny_set, [0, 1])
  text = table.read_text()
  cases = {'nope.pt,kind 9,0,x\n': "1 paths not found under .*'nope.pt'",
           'm0.pt,lonely,0,x\n': r"labels \['lonely'\] have one model each"}
  for extra, message in cases.items():
    table.write_text(text + extra)
    with pytest.raises(zoo.ZooError, match=message):
      zoo.read_table(str(table), str(tmp_path / 'zoo'))
  table.write_text('file,task\nm0.pt,1\n')
  with pytest.raises(zoo.ZooError, match='needs a header with columns path and label'):
    zoo.read_table(str(table), str(tmp_path / 'zoo'))
  # A zoo that mixes architectures, for a method that reads one.
  table.write_text(text + 'other.npz,kind 1,9,x\n')
  np.savez(tmp_path / 'zoo' / 'other.npz', **{'conv1/kernel': np.ones((3, 3, 3, 6), np.float32)})
  with pytest.raises(QueryError, match='mix architectures'):
    zoo.from_table(str(table), str(tmp_path / 'zoo'), 'lps', SecondOrderConfig())


def test_a_width_free_probe_index_names_a_wider_models_task(tmp_path, tiny_set):
  """An index of the Gram probe (layer 1, any width) round-trips through its folder and answers
  a 2x-wide copy of a model (each first-layer filter twice: the same Gram matrix and mean
  filter) exactly as the model itself; an LPS index refuses the wider model in one line."""
  from lps_jax.align.fit import SecondOrderConfig
  from lps_jax.query import index, zoo
  z = zoo.from_modelset(tiny_set, 'gram', SecondOrderConfig())
  built = index.build(z.inputs, z.labels, z.label_of, z.run, z.recipe, z.path, 'gram',
                      calibration_folds=0)
  index.save(str(tmp_path / 'gram'), built)
  idx = index.load(str(tmp_path / 'gram'))
  assert sorted(os.listdir(tmp_path / 'gram')) == ['estimator.npz', 'index.json', 'models.npz']
  _, _, one = _model_kernels(tiny_set, row=5)
  wide = [np.concatenate([one[0], one[0]], axis=-1)]          # (3, 3, 3, 8): twice the filters
  a, b = idx.query(one[:1]), idx.query(wide)
  assert a['answer'] == 'task 1 (fine 2, 3)' and a['models'][0]['row'] == 5
  # The same labels and rows in the same order, each score within 1e-9.
  for key, score in (('labels', 'probability'), ('models', 'cosine')):
    assert [{k: v for k, v in x.items() if k != score} for x in a[key]] == \
        [{k: v for k, v in y.items() if k != score} for y in b[key]]
    np.testing.assert_allclose([x[score] for x in a[key]], [y[score] for y in b[key]],
                               rtol=0, atol=1e-9)
  np.testing.assert_array_equal(idx.estimator.predict(z.inputs), built.estimator.predict(z.inputs))
  lps = dataclasses.replace(idx, method='lps')
  with pytest.raises(QueryError, match=r'reads any width takes it: weight_stats, gram'):
    index.check_kernels(lps, wide, 'wide')
  with pytest.raises(ValueError, match='an index needs a method it can keep'):
    index.build(z.inputs, z.labels, z.label_of, z.run, z.recipe, z.path, 'wn_probe')


@pytest.mark.slow
def test_lps_query_builds_from_a_zoo_folder(tmp_path, tiny_set):
  table, files = _tiny_zoo(tmp_path / 'zoo', tiny_set, range(6))
  r = _query('--build', f'--zoo={tmp_path}/zoo', f'--labels={table}', '--method=gram',
             f'--index={tmp_path}/idx', str(files[9]), '--format=json')
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout)
  assert out['answers'][0]['models'][0]['path'] == 'm9.pt'
  assert out['indexes'][0]['recipes'] == {'torch-like': 24}
  assert 'false accepts' in r.stderr and 'written to' in r.stderr
  assert '% on held-out models of seen tasks' in r.stderr       # what --method=auto compares
  r = _query('--build', f'--zoo={tmp_path}/zoo', f'--index={tmp_path}/idx2')
  assert r.returncode != 0 and '--zoo needs --labels' in r.stderr


def test_auto_answers_each_checkpoint_with_the_best_index_it_feeds(tmp_path, tiny_set):
  """A shelf of a gram and a chain_kernel index over the same zoo: a first-layer-only file goes
  to gram (the only one that reads it); a whole checkpoint, which both read, to the index that
  measured the higher top-1 on the zoo's held-out models, or without calibrations to the first
  in shelf.AUTO; a shelf folder is told apart from one index."""
  import dataclasses
  from lps_jax.align.fit import SecondOrderConfig
  from lps_jax.query import index, open_set, shelf, zoo
  table, files = _tiny_zoo(tmp_path / 'zoo', tiny_set, range(4))
  for method in ('gram', 'chain_kernel'):
    z = zoo.from_table(str(table), str(tmp_path / 'zoo'), method, SecondOrderConfig())
    index.save(str(tmp_path / 'shelf' / method),
               index.build(z.inputs, z.labels, z.label_of, z.run, z.recipe, z.path, method,
                           calibration_folds=0))
  assert shelf.is_shelf(str(tmp_path / 'shelf'))
  assert not shelf.is_shelf(str(tmp_path / 'shelf' / 'gram'))
  indexes = shelf.load(str(tmp_path / 'shelf'))
  assert [i.method for i in indexes] == ['gram', 'chain_kernel']           # shelf.AUTO order
  assert shelf.choose(indexes, files[6]).method == 'gram'                  # no calibrations
  _, _, one = _model_kernels(tiny_set, row=6)
  np.savez(tmp_path / 'first.npz', **{'conv1/kernel': one[0]})
  assert shelf.choose(indexes, str(tmp_path / 'first.npz')).method == 'gram'

  def measured(idx, top1):
    cal = open_set.Calibration('probability', 0.5, 0.1, 0.1, top1, 2, np.zeros(3), {})
    return dataclasses.replace(idx, calibration=cal)
  gram, chain = indexes
  assert shelf.choose([measured(gram, 0.8), measured(chain, 0.9)], files[6]).method == (
      'chain_kernel')
  assert shelf.choose([measured(gram, 0.9), measured(chain, 0.8)], files[6]).method == 'gram'
  # One tied index without a calibration: the measurements are not compared, AUTO decides.
  assert shelf.choose([gram, measured(chain, 0.9)], files[6]).method == 'gram'
  assert shelf.choose([measured(gram, 0.8), measured(chain, 0.9)],
                      str(tmp_path / 'first.npz')).method == 'gram'
  with pytest.raises(QueryError, match='no indexes under'):
    shelf.load(str(tmp_path / 'zoo'))
