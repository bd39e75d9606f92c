"""Test setup: two simulated CPU devices so sharded strategies are exercised for real, and the
offline CIFAR-100 folder ($LPS_DATA_DIR, README: Data) for the tests that read images."""
import os

import jax
import numpy as np
import pytest

jax.config.update('jax_num_cpu_devices', 2)

from lps_jax.training import config as train_config  # noqa: E402  (after the device count)
from lps_jax.training import data, modelset, resnet

if data.default_data_dir():  # Subprocesses (the apps) inherit an absolute path.
  os.environ[data.DATA_DIR_ENV] = os.path.abspath(data.default_data_dir())


@pytest.fixture(scope='session', autouse=True)
def subprocess_compile_cache(tmp_path_factory):
  """Apps run as subprocesses (SIGKILL, devices, processes) compile the same programs again
  and again: they share one persistent XLA cache for the session (a cache hit runs the same
  executable, so bitwise comparisons between runs are unaffected)."""
  env = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('xla_cache')),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope='session')
def data_dir():
  """The offline data folder; without it the test is skipped (CI sets LPS_REQUIRE_DATA=1,
  which turns the skip into a failure)."""
  path = data.default_data_dir()
  if not path or not os.path.isdir(path):
    msg = (f'needs the offline CIFAR-100 folder: set ${data.DATA_DIR_ENV} (here: '
           '../shared/data/cifar100; elsewhere see README "Data")')
    if os.environ.get('LPS_REQUIRE_DATA'):
      pytest.fail(msg)
    pytest.skip(msg)
  return path


def onednn_available() -> bool:
  """Whether the oneDNN extension (optional extra) builds and loads here. CI sets
  LPS_REQUIRE_ONEDNN=1, so its tests fail instead of skipping when it does not."""
  from lps_jax.training.onednn import build, library
  try:
    library.load()
    return True
  except build.OneDNNUnavailable as e:
    if os.environ.get('LPS_REQUIRE_ONEDNN'):
      raise
    print(f'oneDNN extension unavailable, its tests skip: {e}')
    return False


requires_onednn = pytest.mark.skipif(not onednn_available(), reason='needs the oneDNN extra: '
                                     'pip install -e .[onednn] (README)')

TINY_CONFIG = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))   # 7 conv layers
TINY_TASKS, TINY_RUNS = 6, 4


@pytest.fixture(scope='session')
def tiny_set(tmp_path_factory):
  """A saved model set of 6 tasks x 4 runs of a 7-conv-layer ResNet whose kernels carry a task
  signal (a per-task offset): real structure, tiny cost."""
  path = str(tmp_path_factory.mktemp('tiny') / 'modelset')
  rng = np.random.default_rng(0)
  variables = []
  for t in range(TINY_TASKS):
    offset = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                    resnet.init_variables(jax.random.PRNGKey(100 + t),
                                                          TINY_CONFIG))
    for r in range(TINY_RUNS):
      v = resnet.init_variables(jax.random.PRNGKey(t * TINY_RUNS + r), TINY_CONFIG)
      v['params'] = jax.tree_util.tree_map(lambda a, b: a + 0.5 * b, v['params'],
                                           offset['params'])
      variables.append(v)
  stack = lambda key: jax.tree_util.tree_map(lambda *x: np.stack(x), *[v[key] for v in variables])
  task_id = np.repeat(np.arange(TINY_TASKS), TINY_RUNS)
  cfg = train_config.PopulationConfig(task_ids=tuple(range(TINY_TASKS)), runs_per_task=TINY_RUNS,
                                      dataset='npz', model=TINY_CONFIG)
  modelset.save(path, modelset.ModelSet(stack('params'), stack('batch_stats'), task_id,
                                        np.tile(np.arange(TINY_RUNS), TINY_TASKS),
                                        np.zeros_like(task_id), np.full(task_id.shape, 0.5),
                                        cfg.to_json()))
  return path
