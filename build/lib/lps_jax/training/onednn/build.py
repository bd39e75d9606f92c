"""Builds the oneDNN extension (`conv.cc`, `norm.cc`, `common.h`) against the pip wheels, once per
cache.

  python -m lps_jax.training.onednn.build        # the documented build command (prints the library path)

Needs the optional extra (`pip install -e .[onednn]` or `-r requirements-onednn.txt`): the
`onednn-cpu-gomp` wheel (libdnnl.so, GNU OpenMP) and `onednn-devel-cpu-gomp` (its headers), plus
g++ and jaxlib's XLA FFI headers (`jax.ffi.include_dir()`). The library is built into
`$LPS_ONEDNN_CACHE` (default `~/.cache/lps_jax/onednn`), in a folder named by the hash of the
source, the compiler command and the jaxlib version, under a file lock so that two processes
never race; `library_path()` builds it on first use. Anything missing raises
`OneDNNUnavailable` with one line that says what and how to get it: never a silent fallback.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from lps_jax.common import files
from lps_jax.common.errors import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name) for name in ('conv.cc', 'norm.cc'))
HEADERS = (os.path.join(_HERE, 'common.h'),)
CACHE_ENV = 'LPS_ONEDNN_CACHE'
LIBRARY = 'liblps_onednn.so'
INSTALL_HINT = 'pip install -e .[onednn]  (or: pip install -r requirements-onednn.txt)'


class OneDNNUnavailable(UserError, RuntimeError):
  """The oneDNN extension was asked for but cannot be built or loaded (the message says why)."""


def _prefixes() -> list[str]:
  """Where pip puts the wheels' data files (lib/, include/): the environment's prefix, and the
  user scheme's for `pip install --user`."""
  out = [sys.prefix, sysconfig.get_config_var('userbase') or '']
  return [p for p in dict.fromkeys(out) if p]


def find_onednn() -> tuple[str, str]:
  """(include dir, lib dir) of the oneDNN wheels, or OneDNNUnavailable naming what is missing."""
  lib = next((p for p in _prefixes() if os.path.exists(os.path.join(p, 'lib', 'libdnnl.so.3'))),
             None)
  if lib is None:
    raise OneDNNUnavailable(f'--conv_impl=onednn needs libdnnl.so.3 from the onednn-cpu-gomp '
                            f'wheel (looked in {", ".join(_prefixes())}/lib): {INSTALL_HINT}')
  inc = next((p for p in _prefixes()
              if os.path.exists(os.path.join(p, 'include', 'oneapi', 'dnnl', 'dnnl.hpp'))), None)
  if inc is None:
    raise OneDNNUnavailable(f'--conv_impl=onednn needs the oneDNN headers from the '
                            f'onednn-devel-cpu-gomp wheel: {INSTALL_HINT}')
  return os.path.join(inc, 'include'), os.path.join(lib, 'lib')


def compile_command(output: str) -> list[str]:
  import jax
  include, libdir = find_onednn()
  cxx = os.environ.get('CXX', 'g++')
  if shutil.which(cxx) is None:
    raise OneDNNUnavailable(f'--conv_impl=onednn is built from C++ on first use, but the '
                            f'compiler {cxx!r} was not found: install g++ (e.g. apt-get install '
                            f'g++) or set $CXX.')
  return [cxx, '-O3', '-std=c++17', '-shared', '-fPIC', '-w', '-I', jax.ffi.include_dir(),
          '-I', include, *SOURCES, '-o', output, '-L', libdir, '-ldnnl', '-lgomp',
          f'-Wl,-rpath,{libdir}']


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache',
                                                   'lps_jax', 'onednn')


def library_path() -> str:
  """The built extension, building it first if this source / compiler / jaxlib has none."""
  import jaxlib
  command = compile_command('{output}')
  digest = hashlib.sha256(repr((command, jaxlib.__version__)).encode())
  for source in SOURCES + HEADERS:
    with open(source, 'rb') as f:
      digest.update(f.read())
  folder = os.path.join(cache_dir(), digest.hexdigest()[:16])
  path = os.path.join(folder, LIBRARY)
  if os.path.exists(path):
    return path
  try:
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, '.lock'), 'w')
  except OSError as e:
    raise OneDNNUnavailable(f'cannot write the oneDNN build cache {folder} ({e.strerror}): set '
                            f'${CACHE_ENV} to a writable folder.') from e
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # a second process waits here, then finds the library
    if os.path.exists(path):
      return path
    with files.atomic_path(path) as tmp:
      result = subprocess.run([a.replace('{output}', tmp) for a in command],
                              capture_output=True, text=True)
      if result.returncode != 0:
        first = next((l for l in result.stderr.splitlines() if 'error' in l),
                     result.stderr[-300:])
        raise OneDNNUnavailable(f'building the oneDNN extension failed ({command[0]} exit '
                                f'{result.returncode}): {first.strip()}; full command: '
                                f'python -m lps_jax.training.onednn.build')
  return path


def main() -> None:
  try:
    print(library_path())
  except OneDNNUnavailable as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
