"""Every flag of every app, given a bad value, ends in one line on stderr that names it (and
so do an unknown flag, a missing flagfile, a folder as flagfile, a flagfile naming an unknown
flag).

Generated from the apps' own flag definitions (tests/apps/flag_sweep_child.py): a flag added later
is swept too, and a string flag (whose bad values depend on what it names) must be listed in
STRINGS or EXEMPT, or this test fails. Each case must exit non-zero, print no traceback, print
exactly one line (besides log lines) and that line must name the flag; no case may write
outside its temporary folder.
"""
import fcntl
import json
import os
import re
import subprocess
import sys

import pytest

from lps_jax.common import locks

pytestmark = pytest.mark.slow   # subprocesses / training: the fast tier skips it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = 'results/test_split_gpu/modelset/first_layer_kernels.npz'

MISSING, A_FILE, UNDER_FILE, A_DIR = '{tmp}/missing', '{tmp}/afile', '{tmp}/afile/sub', '{tmp}'
# Base arguments: every other flag valid, every output inside the temporary folder, and the
# work cheap, so that a bad value that slips through fails the case quickly.
BASE = {
    'train_population': ['--dataset=npz', '--task_ids=0', '--runs_per_task=1', '--epochs=2',
                         '--lr_boundaries=1', '--workdir={tmp}/wd', '--data_dir={tmp}',
                         '--noprogress'],
    'lps_main': [f'--modelset={KERNELS}', '--results_dir={tmp}/res', '--cache_dir={tmp}/cache',
                 '--split_seeds=0', '--epochs=2', '--lr_boundaries=1', '--num_filters=4'],
    'lps_query': ['--build', f'--modelset={KERNELS}', '--index={tmp}/index', '--epochs=2',
                  '--lr_boundaries=1', '--num_filters=4'],
    'benchmark': ['--suites=matmul', '--matmul_size=8', '--out={tmp}/bench.json'],
    'query_eval': [f'--modelset={KERNELS}', '--foreign={tmp}/foreign', '--out={tmp}/qe',
                   '--epochs=2', '--lr_boundaries=1', '--num_filters=4'],
    'open_set_eval': [f'--modelset={KERNELS}', '--methods=gram', '--split_seeds=0',
                      '--out={tmp}/os'],
    'recipe_eval': [f'--sets=k:{KERNELS}', '--trajectory=', '--methods=gram',
                    '--split_seeds=0', '--out={tmp}/rec'],
    'slices': ['--action=stage', '--task_ids=0', '--data_dir={tmp}', '--stage_dir={tmp}/stage',
               '--root={tmp}/root', '--out={tmp}/merged.npz'],
}
STRINGS = {   # flag: [(bad value, extra arguments)]
    'train_population': {
        'data_dir': [(MISSING, []), (A_FILE, [])],
        'tfds_data_dir': [(A_FILE, ['--dataset=tfds'])],
        'workdir': [(UNDER_FILE, []), (A_FILE, [])],
        'export_slice': [(UNDER_FILE, [])],
        'export_kernels': [(UNDER_FILE, []), (A_DIR, [])],
        'summary': [(UNDER_FILE, []), (A_DIR, [])],
        'coordinator_address': [('nohostport', []), ('host:99999', [])]},
    'lps_main': {
        'modelset': [(MISSING, [])],
        'compare_modelset': [(MISSING, [])],
        'other_modelset': [(MISSING, ['--mode=cross'])],
        'data_dir': [(MISSING, [])],
        'tfds_data_dir': [(A_FILE, ['--dataset=tfds'])],
        'results_dir': [(A_FILE, []), (MISSING, ['--replot'])],
        'cache_dir': [(UNDER_FILE, [])]},
    'lps_query': {
        'modelset': [(MISSING, [])],
        'zoo': [(MISSING, [f'--labels={KERNELS}']), (A_FILE, [f'--labels={KERNELS}'])],
        'labels': [(MISSING, ['--zoo={tmp}'])],
        'index': [(UNDER_FILE, []), (MISSING, ['--nobuild'])]},
    'benchmark': {
        'devices_config': [('nope', []), ('loop/lax/x', [])],
        'data_dir': [(MISSING, [])],
        'out': [(UNDER_FILE, []), (A_DIR, [])]},
    'query_eval': {
        'modelset': [(MISSING, [])],
        'foreign': [(MISSING, []), (A_DIR, [])],
        'data_dir': [(MISSING, []), (A_FILE, [])],
        'out': [(A_FILE, [])]},
    'open_set_eval': {
        'modelset': [(MISSING, [])],
        'stage1': [(MISSING, []), (A_DIR, [])],
        'out': [(A_FILE, [])]},
    'recipe_eval': {
        'sets': [('k:' + MISSING, [])],
        'trajectory': [(MISSING, []), (A_FILE, [])],
        'out': [(A_FILE, [])]},
    'slices': {
        'root': [(MISSING, ['--action=check']), (A_FILE, ['--action=export'])],
        'out': [(UNDER_FILE, ['--action=merge'])],
        'workdir': [(MISSING, ['--action=export'])],
        'slice': [(MISSING, ['--action=replay'])],
        'model': [('3', []), ('a:b', [])],
        'data_dir': [(MISSING, [])],
        'stage_dir': [(UNDER_FILE, [])]},
}
EXEMPT = {   # flag: where its bad values are tested instead
    'lps_query': {'layers': 'names are checked against each checkpoint: test_query.py '
                            '(--layers=conv9)'},
}
LOG_LINE = re.compile(r'^[IWEF]\d{4} ')


def _held_by_a_live_run(folder: str) -> bool:
  """A work directory whose lock a running trainer holds (its writes are not ours)."""
  lock = os.path.join(folder, locks.LOCK_NAME)
  if not os.path.isfile(lock):
    return False
  with open(lock) as f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
      return True
  return False


def _tree():
  """Every file and folder under the checkout (but .git, caches and live runs' work
  directories) with its mtime."""
  out = {}
  for top, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in ('.git', '__pycache__', '.pytest_cache')
               and not _held_by_a_live_run(os.path.join(top, d))]
    for name in dirs + files:
      p = os.path.join(top, name)
      out[p] = os.lstat(p).st_mtime_ns
  return out


@pytest.mark.parametrize('app', sorted(BASE))
def test_every_flag_refuses_a_bad_value_in_one_line(app, tmp_path):
  (tmp_path / 'afile').write_text('not a folder')
  (tmp_path / 'foreign').mkdir()
  (tmp_path / 'foreign' / 'models.json').write_text('{}')
  fill = lambda v: v.format(tmp=tmp_path)
  spec = {'base': [fill(a) for a in BASE[app]], 'tmp': str(tmp_path),
          'strings': {k: [(v, [fill(e) for e in extra]) for v, extra in vals]
                      for k, vals in STRINGS[app].items()},
          'exempt': sorted(EXEMPT.get(app, {}))}
  (tmp_path / 'spec.json').write_text(json.dumps(spec))
  before = _tree()
  child = os.path.join(ROOT, 'tests', 'apps', 'flag_sweep_child.py')
  r = subprocess.run([sys.executable, child, app, str(tmp_path / 'spec.json'),
                      str(tmp_path / 'out.json')], capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.load(open(tmp_path / 'out.json'))
  swept = {c['flag'] for c in out['results']}
  string_flags = set(STRINGS[app]) | set(EXEMPT.get(app, {}))
  assert set(out['flags']) - swept - string_flags == set(), 'flags no case reached'
  assert set(STRINGS[app]) <= set(out['flags']), 'STRINGS names flags the app lacks'
  bad = []
  for case in out['results']:
    lines = [l for l in case['stderr'].splitlines() if l.strip() and not LOG_LINE.match(l)]
    name = case['flag']
    ok = (case['code'] not in (0, 'timeout') and 'Traceback' not in case['stderr']
          and len(lines) == 1 and (f'--{name}' in lines[0] or f"'{name}'" in lines[0]))
    if not ok:
      bad.append(f'{" ".join(case["argv"][-2:])}: exit {case["code"]}: '
                 f'{case["stderr"].strip()[-300:]!r}')
  assert not bad, f'{len(bad)} of {len(out["results"])} cases:\n' + '\n'.join(bad)
  changed = {p for p, t in _tree().items() if before.get(p) != t}
  assert not changed, f'written outside {tmp_path}: {sorted(changed)[:10]}'


_PARSE_FLAGFILES = """
import importlib, json, sys
sys.path.insert(0, {root!r})
from absl import flags
importlib.import_module('experiments.' + sys.argv[1])
out = {{}}
for path in sys.argv[2:]:
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS([sys.argv[1], '--flagfile=' + path])
    out[path] = None
  except flags.Error as e:
    out[path] = str(e)
print(json.dumps(out))
"""


def test_committed_flagfiles_parse():
  """Every flagfile in experiments/flags passes its app's checks; one whose model set is not
  built yet says how to build it."""
  folder = os.path.join(ROOT, 'experiments', 'flags')
  files = sorted(os.path.join('experiments', 'flags', f) for f in os.listdir(folder))
  by_app = {'train_population': [f for f in files if 'modelset' in os.path.basename(f)]}
  for app, prefix in (('open_set_eval', 'open_set'), ('recipe_eval', 'recipe_eval')):
    by_app[app] = [f for f in files if os.path.basename(f).startswith(prefix)]
  by_app['lps_main'] = [f for f in files if f not in sum(by_app.values(), [])]
  for app, paths in by_app.items():
    r = subprocess.run([sys.executable, '-c', _PARSE_FLAGFILES.format(root=ROOT), app, *paths],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for path, error in json.loads(r.stdout.strip().splitlines()[-1]).items():
      assert error is None or (re.search(r'--(compare_)?modelset=runs/', error)
                               and 'train_population' in error), (path, error)
