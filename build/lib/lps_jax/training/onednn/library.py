"""The oneDNN extension as a loaded library: built on first use (`build`), every FFI target
registered with XLA once (the conv passes of `conv.cc`, the batch-norm passes of `norm.cc`)."""
from __future__ import annotations

import ctypes
import functools

import jax

from lps_jax.training.onednn import build

TARGETS = ('lps_onednn_conv_fwd', 'lps_onednn_conv_bwd_data', 'lps_onednn_conv_bwd_weights',
           'lps_onednn_bn_fwd', 'lps_onednn_bn_bwd')


@functools.cache
def load() -> ctypes.CDLL:
  """Builds (first time) and loads the extension and registers its FFI targets once."""
  path = build.library_path()
  try:
    lib = ctypes.CDLL(path)
  except OSError as e:
    raise build.OneDNNUnavailable(f'cannot load the oneDNN extension {path} ({e}): reinstall '
                                  f'the extra ({build.INSTALL_HINT}) and rerun '
                                  'python -m lps_jax.training.onednn.build') from e
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
  lib.lps_onednn_bn_workspace_bytes.restype = ctypes.c_int64
  lib.lps_onednn_bn_workspace_bytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_float] + [
      ctypes.c_int64] * 2
  return lib


def version() -> str:
  """The oneDNN version the extension runs against, e.g. '3.2.0'."""
  v = load().lps_onednn_version()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'
