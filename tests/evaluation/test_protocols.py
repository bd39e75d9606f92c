"""lps_main's figure modes (Fig. 3a-c) end to end on a tiny model set, run as a user runs them.

The tiny set (conftest.py): 6 tasks x 4 runs of a 7-conv-layer ResNet whose kernels carry a
task signal, so the outputs are real but small. Checks shapes and ranges of every
output, the PNGs, reuse of cached work on a rerun, and the clear errors.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lps_jax.common import cache as cache_lib
from lps_jax.evaluation import results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.lps_main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _common(tiny_set, tmp_path, name):
  return [f'--modelset={tiny_set}', '--num_filters=4', '--epochs=3', '--lr_boundaries=2',
          '--learning_rate=0.01', '--split_seeds=0', f'--cache_dir={tmp_path}/cache',
          f'--results_dir={tmp_path}/{name}']


def _ok(r):
  assert r.returncode == 0, r.stderr[-3000:]


def _accuracies_in_range(acc):
  assert set(acc) >= {'top-1', 'top-5', 'top-10'}
  assert all(0.0 <= acc[k] <= 1.0 for k in ('top-1', 'top-5', 'top-10'))
  assert acc['top-1'] <= acc['top-5'] <= acc['top-10']


@pytest.mark.slow
def test_branches_one_bar_per_branch_and_rerun_reuses_cache(tiny_set, tmp_path):
  args = ['--mode=branches', '--branches=1,3,7'] + _common(tiny_set, tmp_path, 'b')
  _ok(_run(*args))
  res = json.load(open(tmp_path / 'b' / 'results.json'))
  assert list(res['results']) == ['1', '3', '7']          # one bar per branch
  for runs in res['results'].values():
    assert len(runs) == 1
    _accuracies_in_range(runs[0])
  assert res['chance'] == pytest.approx(1 / 6)   # tiny_set (conftest.py): 6 tasks
  assert os.path.getsize(tmp_path / 'b' / 'fig3b_branches.png') > 1000
  cached = sorted(os.listdir(tmp_path / 'cache'))
  assert len([f for f in cached if f.endswith('.bin')]) == 3   # one trained net per branch
  stamp = os.path.getmtime(tmp_path / 'cache' / [f for f in cached if f.endswith('.bin')][0])
  # Same flags again: every net comes from the cache (nothing retrained), same numbers.
  _ok(_run(*args))
  again = json.load(open(tmp_path / 'b' / 'results.json'))
  untimed = lambda r: {b: [{k: v for k, v in x.items() if k != 'fit_seconds'} for x in runs]
                       for b, runs in r['results'].items()}
  assert untimed(again) == untimed(res)
  assert sorted(os.listdir(tmp_path / 'cache')) == cached
  assert os.path.getmtime(tmp_path / 'cache' / [f for f in cached if f.endswith('.bin')][0]) == stamp
  # A different configuration never overwrites these results.
  r = _run(*(args + ['--epochs=4']))
  assert r.returncode != 0 and 'different configuration' in r.stderr and "'epochs'" in r.stderr
  assert json.load(open(tmp_path / 'b' / 'results.json')) == again
  # Replot from the finished run.
  os.remove(tmp_path / 'b' / 'fig3b_branches.png')
  _ok(_run('--mode=branches', '--replot', f'--results_dir={tmp_path}/b'))
  assert os.path.exists(tmp_path / 'b' / 'fig3b_branches.png')


@pytest.mark.slow
def test_alignment_ablation_four_variants_per_branch(tiny_set, tmp_path):
  _ok(_run('--mode=alignment', '--branches=2,5', *_common(tiny_set, tmp_path, 'a')))
  res = json.load(open(tmp_path / 'a' / 'results.json'))
  assert list(res['results']) == ['w/o align', 'filt.', 'chan.', 'filt. + chan.']
  for per in res['results'].values():
    assert list(per) == ['2', '5']
    for runs in per.values():
      _accuracies_in_range(runs[0])
  assert os.path.getsize(tmp_path / 'a' / 'fig3c_alignment.png') > 1000
  text = open(tmp_path / 'a' / 'results.md').read()
  assert '| 5 |' in text and 'filt. + chan.' in text


@pytest.mark.slow
def test_transfer_similarity_and_ari(tiny_set, tmp_path):
  _ok(_run('--mode=transfer', '--test_tasks=3', '--num_permutations=50',
           *_common(tiny_set, tmp_path, 't')))
  res = json.load(open(tmp_path / 't' / 'results.json'))
  r = res['results'][0]
  sim, ari = np.asarray(r['similarity']), np.asarray(r['ari'])
  assert sim.shape == ari.shape == (3, 3) and len(r['tasks']) == 3
  off = ~np.eye(3, dtype=bool)
  assert np.all(np.isnan(np.diag(ari))) and np.all((ari[off] >= -1) & (ari[off] <= 1))
  assert np.all((sim >= -1 - 1e-6) & (sim <= 1 + 1e-6))
  c = r['correlation']
  assert c['n'] == 6 and -1 <= c['spearman'] <= 1 and 0 < c['pearson_p'] <= 1
  assert os.path.getsize(tmp_path / 't' / 'fig3a_transfer.png') > 1000


@pytest.mark.slow
def test_figure_modes_bad_input(tiny_set, tmp_path):
  r = _run('--mode=branches', '--branches=1,8', *_common(tiny_set, tmp_path, 'x'))
  assert r.returncode != 0 and 'out of range' in r.stderr and '1..7' in r.stderr
  assert not os.path.exists(tmp_path / 'x')                  # nothing written
  assert 'Traceback' not in r.stderr
  assert [l for l in r.stderr.splitlines() if 'error' in l.lower()] == [r.stderr.splitlines()[-1]]
  # The rest in-process: what lps_main's loading and results folders refuse.
  from experiments import lps_modes
  from lps_jax.training import modelset
  from lps_jax.align.fit import SecondOrderConfig
  cfg = SecondOrderConfig()
  with pytest.raises(ValueError, match=r'2\.\.7'):
    lps_modes.load(lps_modes.MODES['alignment'], tiny_set, cfg, [], [1])
  with pytest.raises(modelset.ModelSetError, match='needs the full model set folder'):
    lps_modes.load(lps_modes.MODES['transfer'], 'results/test_split_cpu/modelset/'
                   'first_layer_kernels.npz', cfg, [], None)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(results.ResultsError, match='holds no results.json'):
    results.read_results(str(tmp_path / 'empty'), 'branches')
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  with pytest.raises(results.ResultsError, match='not a results folder'):
    results.ResultsDir(str(tmp_path / 'other'), {'mode': 'branches'})
  assert (tmp_path / 'other' / 'notes.txt').read_text() == 'mine'


def test_transfer_needs_the_tasks_images():
  from lps_jax.evaluation import transfer
  images = np.zeros((4, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match='no images of task 3'):
    transfer.task_images(images, np.array([0, 1, 2, 3]), 3)
  with pytest.raises(ValueError, match='no models of tasks \\[9\\]'):
    transfer.transferability({}, {}, np.array([0, 0]), images, np.array([0, 1, 0, 1]), [0, 9])


def test_results_dir_and_cache_units(tmp_path):
  d = results.ResultsDir(str(tmp_path / 'r'), {'a': 1, 'b': [1, 2]})
  results.ResultsDir(str(tmp_path / 'r'), {'b': (1, 2), 'a': 1})   # same config: fine
  with pytest.raises(results.ResultsError, match=r"differs in \['a'\]"):
    results.ResultsDir(str(tmp_path / 'r'), {'a': 2, 'b': [1, 2]})
  d.write_json('x.json', {'v': np.float32(0.5), 'n': np.int64(3)})   # numpy scalars too
  assert json.load(open(d.file('x.json'))) == {'v': 0.5, 'n': 3}
  cache = cache_lib.Cache(str(tmp_path / 'c'))
  calls = []
  compute = lambda: calls.append(1) or {'x': np.arange(3)}
  np.testing.assert_array_equal(cache.arrays({'k': 1}, compute)['x'], np.arange(3))
  np.testing.assert_array_equal(cache.arrays({'k': 1}, compute)['x'], np.arange(3))
  assert len(calls) == 1
  cache.arrays({'k': 2}, compute)
  assert len(calls) == 2
  assert cache_lib.fingerprint(np.zeros(3)) != cache_lib.fingerprint(np.zeros(4))


@pytest.mark.slow
def test_table_beside_a_second_model_set_on_the_same_tasks(tiny_set, tmp_path):
  from lps_jax.training import modelset
  ms = modelset.load(tiny_set)
  part = str(tmp_path / 'part.npz')        # 3 of the 6 tasks, as a partial ModelSet500 would be
  modelset.export_kernels(part, ms.select(np.flatnonzero(ms.task_id < 3)))
  args = _common(tiny_set, tmp_path, 't')[1:] + [
      '--mode=classification', f'--modelset={part}', f'--compare_modelset={tiny_set}',
      '--methods=lps,gram', '--val_per_task=0', '--layer_weights=1']
  r = _run(*args)
  _ok(r)
  res = json.load(open(tmp_path / 't' / 'results.json'))
  assert res['num_tasks'] == 3 and res['compare']['tasks'] == [0, 1, 2]
  assert res['compare']['num_models'] == 12
  # The second set restricted to the first one's tasks holds the same kernels here: same numbers.
  for name in ('lps', 'gram'):
    assert res['results'][name][0]['top-1'] == res['compare']['results'][name][0]['top-1']
  assert 'the same 3 tasks of' in r.stdout
  # Each split records how long its fit took, and the table shows the mean as a column.
  assert all(run['fit_seconds'] > 0 for runs in res['results'].values() for run in runs)
  header = next(l for l in r.stdout.splitlines() if l.startswith('| method'))
  assert header.endswith('| fit (s) |')
  bad = _run(*(args[:-4] + [f'--modelset={tiny_set}', f'--compare_modelset={part}',
                            '--methods=lps', '--val_per_task=0', '--layer_weights=1']))
  assert bad.returncode != 0 and 'has no models of tasks [3, 4, 5]' in bad.stderr
  # --task_ids narrows the first set to the tasks the second holds: the same table as above.
  narrowed = args[:-4] + [f'--modelset={tiny_set}', f'--compare_modelset={part}',
                          '--methods=lps,gram', '--val_per_task=0', '--layer_weights=1']
  narrowed = [a.replace(str(tmp_path / 't'), str(tmp_path / 'n')) for a in narrowed]
  _ok(_run(*narrowed, '--task_ids=0-2'))
  res_n = json.load(open(tmp_path / 'n' / 'results.json'))
  assert res_n['num_tasks'] == 3 and res_n['compare']['tasks'] == [0, 1, 2]
  for name in ('lps', 'gram'):
    assert res_n['results'][name][0]['top-1'] == res['results'][name][0]['top-1']
  bad = _run(*narrowed, '--task_ids=4-7')
  assert bad.returncode != 0 and 'no models of tasks [6, 7]' in bad.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_table1_whole_network_methods_and_the_functional_reference(tiny_set, tmp_path, data_dir):
  args = ['--mode=classification', '--methods=wn_probe,wn_probe_unaligned,functional'] + _common(
      tiny_set, tmp_path, 'wn')
  _ok(_run(*args))
  res = results.read_results(str(tmp_path / 'wn'), 'classification')
  assert set(res['results']) == {'wn_probe', 'wn_probe_unaligned', 'functional'}
  for runs in res['results'].values():
    _accuracies_in_range(runs[0])
  # The tiny set's signal is an offset on raw weights: both probes see it.
  assert res['results']['wn_probe'][0]['top-1'] > 1 / 6
  assert len(list((tmp_path / 'cache').glob('*.npz'))) >= 3   # reference, perms, probe logits
  text = open(tmp_path / 'wn' / 'results.md').read()
  assert 'functional reference' in text and 'Git Re-Basin' in text


@pytest.mark.slow
def test_branches_with_and_without_whole_network_alignment(tiny_set, tmp_path):
  _ok(_run('--mode=branches', '--branches=1,4', '--branch_methods=lps,wn_branch,chain_depth',
           *_common(tiny_set, tmp_path, 'bw')))
  res = json.load(open(tmp_path / 'bw' / 'results.json'))
  assert list(res['results']) == ['lps', 'wn_branch', 'chain_depth']
  for per in res['results'].values():
    assert list(per) == ['1', '4']
    for runs in per.values():
      _accuracies_in_range(runs[0])
  text = open(tmp_path / 'bw' / 'results.md').read()
  assert 'lps top-1 (%)' in text and 'wn_branch top-1 (%)' in text
  assert 'chain_depth top-1 (%)' in text
  assert os.path.getsize(tmp_path / 'bw' / 'fig3b_branches.png') > 1000
