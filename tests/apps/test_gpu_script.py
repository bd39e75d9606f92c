"""The GPU slices script, dry-run on the CPU: staged parts hold whole tasks with the full
folder's rows, and one call benchmarks, trains a (tiny) slice and packs it for the manifest."""
import json
import os
import subprocess
import tarfile

import pytest
import numpy as np

from lps_jax.training import data
from lps_jax.zoo import manifest, stage
from lps_jax.zoo import probe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ['--runs_per_task=2', '--epochs=2', '--lr_boundaries=1', '--widths=4,8,8',
        '--blocks_per_stage=1,1,1', '--batch_size=250', '--checkpoint_every=1']


def test_staged_parts_hold_the_full_folders_tasks(data_dir, tmp_path):
  out = stage.stage(data_dir, [3, 4, 5], str(tmp_path), part_mib=8)   # 2 tasks per part
  assert [p['tasks'] for p in out['parts']] == [[3, 4], [5]]
  assert all(p['bytes'] <= 8 * 2**20 for p in out['parts'])
  full_train, full_test = data.load('npz', data_dir, classes=data.task_classes([3, 4, 5]))
  full = data.make_tasks(full_train, [4], eval_split=full_test)
  part_train, part_test = data.load('npz', str(tmp_path / 'part_0'),
                                    classes=data.task_classes([4]))
  part = data.make_tasks(part_train, [4], eval_split=part_test)
  np.testing.assert_array_equal(part_train.images[part.train_idx[0]],      # the same images,
                                full_train.images[full.train_idx[0]])      # in the same order
  np.testing.assert_array_equal(part_test.images[part.eval_idx[0]],
                                full_test.images[full.eval_idx[0]])
  np.testing.assert_array_equal(part.train_labels, full.train_labels)
  whole_test = data.load_npz_dir(data_dir, train=False)[1]        # every part carries the
  part_whole = data.load_npz_dir(str(tmp_path / 'part_1'), train=False)[1]   # probe batch
  np.testing.assert_array_equal(probe.probe_images(part_whole.images, part_whole.labels),
                                probe.probe_images(whole_test.images, whole_test.labels))


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(data_dir, tmp_path):
  stage.stage(data_dir, [0, 1], str(tmp_path / 'stage'), part_mib=5)    # one task per part
  env = dict(os.environ, OUT=str(tmp_path / 'out'), WORK=str(tmp_path / 'work'), BENCH='1',
             BENCH_CONFIGS='default', BENCH_STEPS='1', BENCH_FLAGS='--batch_size=8')
  r = subprocess.run(['bash', 'experiments/scripts/gpu_slices.sh', str(tmp_path / 'stage/part_1'),
                      '1-1', *TINY], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  assert 'bench rc=0' in r.stdout and 'train rc=0' in r.stdout
  with tarfile.open(tmp_path / 'out' / 'slices.tgz') as tar:
    tar.extractall(tmp_path / 'back')
  m = manifest.check(str(tmp_path / 'back'), allow_gaps=True)
  assert m['tasks'] == [1] and m['num_models'] == 2 and m['recipe']['train']['epochs'] == 2
  record = json.load(open(tmp_path / 'back' / 'tasks_01-01' / 'slice.json'))
  assert record['whole']['probe_logits'] == [200, 2]       # the full probe, from a staged part
