"""experiments.query_eval end to end on the tiny set: indexes of several methods (a first-layer
probe, a whole-network kernel) and the functional reference, queried with the set's held-out
runs and with the same models written as PyTorch state_dicts, read from their files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lps_jax.training import modelset
from tests.conftest import TINY_CONFIG
from tests.fixtures import torch_zip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_foreign_copies_of_held_out_models_score_as_the_models_themselves(tiny_set, tmp_path,
                                                                          data_dir):
  ms = modelset.load(tiny_set)
  stack = modelset.network_stack(ms)
  folder = tmp_path / 'foreign'
  folder.mkdir()
  meta = {}
  for row in np.flatnonzero(ms.run == 3):              # the runs the index holds out
    name = f'task{ms.task_id[row]}.pt'
    torch_zip.save(folder / name, torch_zip.state_dict({p: a[row] for p, a in stack.items()},
                                                       TINY_CONFIG))
    meta[name] = {'task': int(ms.task_id[row]), 'run': 3, 'recipe': 'copy',
                  'heldout_accuracy': 0.5}
  (folder / 'models.json').write_text(json.dumps(meta))
  out = tmp_path / 'qe'
  r = subprocess.run([sys.executable, '-m', 'experiments.query_eval', f'--modelset={tiny_set}',
                      '--methods=gram,chain_kernel,functional', '--index_runs=3',
                      f'--foreign={folder}', f'--data_dir={data_dir}', f'--out={out}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(out / 'results.json'))
  assert res['tasks'] == list(range(6))
  for name in ('gram', 'chain_kernel'):
    own, foreign = res['methods'][name]['rows'].values()
    assert own['models'] == foreign['models'] == 6
    assert own['top-1'] == foreign['top-1'] and own['top-5'] == foreign['top-5'], name
    assert own['top-1'] > 1 / 6                          # the tiny set's task signal is read
  rows = res['methods']['functional']['rows']
  assert all(0 <= v['top-1'] <= v['top-5'] <= 1 for v in rows.values())
  assert '| chained-Gram kernel' in r.stdout and 'PyTorch, copy recipe' in r.stdout
  # A foreign model of a task the index does not hold is refused in one line.
  meta['task9.pt'] = dict(meta['task0.pt'], task=9)
  (folder / 'task9.pt').write_bytes((folder / 'task0.pt').read_bytes())
  (folder / 'models.json').write_text(json.dumps(meta))
  r = subprocess.run([sys.executable, '-m', 'experiments.query_eval', f'--modelset={tiny_set}',
                      '--methods=gram', '--index_runs=3', f'--foreign={folder}',
                      f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode != 0 and 'foreign checkpoints of tasks [9]' in r.stderr.strip().splitlines()[-1]
