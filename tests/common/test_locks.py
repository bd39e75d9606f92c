"""One writer per folder: a second holder is refused naming the first; a killed holder frees it."""
import os
import signal
import subprocess
import sys

import pytest

from lps_jax.common import locks
from lps_jax.evaluation import results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_second_holder_refused_until_the_first_lets_go(tmp_path):
  first = locks.hold(str(tmp_path / 'f'), 'results folder', '--results_dir')
  with pytest.raises(locks.FolderBusy, match=rf'in use by another run \(pid {os.getpid()} on '):
    locks.hold(str(tmp_path / 'f'), 'results folder', '--results_dir')
  first.close()
  with locks.exclusive(str(tmp_path / 'f'), 'results folder', '--results_dir'):
    pass


def _holder(folder):
  """A subprocess holding `folder`'s lock until killed."""
  code = (f'import sys, time; sys.path.insert(0, {ROOT!r}); from lps_jax.common import locks; '
          f'f = locks.hold({folder!r}, "index", "--index"); print("held", flush=True); '
          'time.sleep(60)')
  p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == 'held'
  return p


def test_a_killed_holder_never_blocks(tmp_path):
  p = _holder(str(tmp_path))
  with pytest.raises(locks.FolderBusy, match=f'pid {p.pid} '):
    locks.hold(str(tmp_path), 'index', '--index')
  p.send_signal(signal.SIGKILL)
  p.wait()
  locks.hold(str(tmp_path), 'index', '--index').close()


def test_results_folder_is_one_run_at_a_time(tmp_path):
  d = str(tmp_path / 'res')
  p = _holder(d)
  with pytest.raises(locks.FolderBusy, match='--results_dir'):
    results.ResultsDir(d, {'a': 1})
  p.send_signal(signal.SIGKILL)
  p.wait()
  first = results.ResultsDir(d, {'a': 1})
  results.ResultsDir(d, {'a': 1})      # this process again (a notebook cell rerun): fine
  del first
