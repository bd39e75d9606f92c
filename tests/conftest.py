"""Test setup: two simulated CPU devices so sharded strategies are exercised for real, and the
offline CIFAR-100 folder ($LPS_DATA_DIR, README: Data) for the tests that read images."""
import os

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 2)

from lps_jax import data  # noqa: E402  (after the device count is set)

if data.default_data_dir():  # Subprocesses (the apps) inherit an absolute path.
  os.environ[data.DATA_DIR_ENV] = os.path.abspath(data.default_data_dir())


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
