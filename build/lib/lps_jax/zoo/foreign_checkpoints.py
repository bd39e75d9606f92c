"""Conv kernels of one trained model from a checkpoint file, whatever wrote it.

Formats: `.npz` (numpy), `.safetensors`, flax msgpack (`.msgpack`, `flax.serialization`), an
orbax checkpoint folder, and PyTorch (`.pt` / `.pth` / `.bin`, the zip format torch.save writes
since 1.6), read without torch: only tensors, dicts and lists are unpickled, nothing else.

`read_arrays(path)` gives every array in the file by a '.'-joined name, in file order.
`conv_kernels(arrays, ...)` picks the 3x3 conv kernels in network order (or the names given)
and returns them HWIO, as everywhere in lps_jax (OIHW for PyTorch / safetensors files).
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile
from typing import Optional, Sequence

import numpy as np
from lps_jax.common.errors import UserError

LAYOUTS = ('auto', 'hwio', 'oihw')
_OIHW_SUFFIXES = ('.pt', '.pth', '.bin', '.safetensors')


class CheckpointError(UserError):
  """A checkpoint that cannot be read or does not hold the expected conv layers."""


def _flatten(tree, prefix: str, out: dict) -> dict:
  if isinstance(tree, dict):
    for k, v in tree.items():
      _flatten(v, f'{prefix}.{k}' if prefix else str(k), out)
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      _flatten(v, f'{prefix}.{i}' if prefix else str(i), out)
  elif hasattr(tree, 'shape') and hasattr(tree, 'dtype'):
    out[prefix] = np.asarray(tree)
  return out


# -- PyTorch, without torch
_TORCH_DTYPES = {'FloatStorage': np.float32, 'DoubleStorage': np.float64,
                 'HalfStorage': np.float16, 'BFloat16Storage': 'bfloat16',
                 'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
                 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not size:
    return storage[offset].copy()
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *unused):
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch.save zip's data.pkl into numpy arrays; refuses any other object."""
  ALLOWED = {('collections', 'OrderedDict'): collections.OrderedDict,
             ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
             ('torch._utils', '_rebuild_parameter'): _rebuild_parameter}

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self.zf, self.prefix, self.path = zf, prefix, path

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return self.ALLOWED[(module, name)]
    if module == 'torch' and name in _TORCH_DTYPES:
      return _StorageType(name)
    raise CheckpointError(f'{self.path}: holds a {module}.{name} object, which is read only '
                          'by torch; save the weights alone: torch.save(model.state_dict(), '
                          'path).')

  def persistent_load(self, pid):
    _, storage_type, key, _location, _numel = pid
    raw = self.zf.read(f'{self.prefix}/data/{key}')
    dtype = _TORCH_DTYPES[storage_type.name]
    if dtype == 'bfloat16':   # numpy has no bfloat16: widen to float32 exactly.
      return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype)


def _read_torch(path: str) -> dict:
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path}: not a zip-format PyTorch checkpoint (torch.save writes one '
                          'since 1.6); load it in torch and save it again, or export .npz / '
                          '.safetensors.')
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith('/data.pkl')]
    if not pkl:
      raise CheckpointError(f'{path}: zip without data.pkl, not a torch.save checkpoint.')
    prefix = pkl[0][:-len('/data.pkl')]
    byteorder = f'{prefix}/byteorder'
    if byteorder in zf.namelist() and zf.read(byteorder).strip() != b'little':
      raise CheckpointError(f'{path}: big-endian checkpoint; re-save it on a little-endian '
                            'machine.')
    with zf.open(pkl[0]) as f:
      obj = _TorchUnpickler(f, zf, prefix, path).load()
  return _flatten(obj, '', {})


def _read_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise CheckpointError('reading .safetensors needs the safetensors package '
                          '(pip install safetensors).') from e
  with open(path, 'rb') as f:   # Header order = the writer's order (load_file sorts by name).
    n = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(n))
  arrays = load_file(path)
  order = sorted((k for k in header if k != '__metadata__'),
                 key=lambda k: header[k]['data_offsets'][0])
  return {k: arrays[k] for k in order}


def _read_msgpack(path: str) -> dict:
  import flax.serialization
  with open(path, 'rb') as f:
    return _flatten(flax.serialization.msgpack_restore(f.read()), '', {})


def _read_orbax(path: str) -> dict:
  import orbax.checkpoint as ocp
  return _flatten(ocp.StandardCheckpointer().restore(os.path.abspath(path)), '', {})


def read_arrays(path: str) -> dict[str, np.ndarray]:
  """Every array of a checkpoint, by '.'-joined name, in the file's order."""
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint not found: {path!r}.')
  suffix = os.path.splitext(path)[1].lower()
  try:
    if os.path.isdir(path):
      if not os.path.exists(os.path.join(path, '_METADATA')):
        raise CheckpointError(f'{path} is a folder but not an orbax checkpoint (no _METADATA): '
                              'name a checkpoint file, or the item folder orbax wrote (in a '
                              'CheckpointManager step, e.g. 40/default).')
      arrays = _read_orbax(path)
    elif suffix == '.npz':
      with np.load(path) as f:
        arrays = {k: np.asarray(f[k]) for k in f.files}
    elif suffix == '.safetensors':
      arrays = _read_safetensors(path)
    elif suffix == '.msgpack':
      arrays = _read_msgpack(path)
    elif suffix in ('.pt', '.pth', '.bin'):
      arrays = _read_torch(path)
    else:
      raise CheckpointError(f'{path}: unknown checkpoint type {suffix!r}; use .npz, '
                            '.safetensors, .msgpack (flax), .pt/.pth (PyTorch) or an orbax '
                            'checkpoint folder.')
  except CheckpointError:
    raise
  except Exception as e:  # Truncated / corrupt files raise many types in the readers.
    raise CheckpointError(f'{path}: unreadable ({type(e).__name__}: {e}); the file may be '
                          'truncated or corrupt.') from e
  if not arrays:
    raise CheckpointError(f'{path}: holds no arrays.')
  return arrays


def natural_key(name: str) -> list:
  """Sort key that orders the numbers inside names by value ('layer2' before 'layer10')."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def conv_kernels(arrays: dict[str, np.ndarray], num_layers: int, layout: str = 'hwio',
                 names: Optional[Sequence[str]] = None, origin: str = 'checkpoint',
                 kernel_size: int = 3) -> tuple[list[np.ndarray], list[str]]:
  """The first `num_layers` conv kernels (HWIO), and the names they came from.

  Without `names`: every 4-D array whose kernel is `kernel_size` x `kernel_size` in `layout`
  (1x1 shortcut convs are skipped), in the file's order; names made only of lps_jax / flax
  module paths are put in network order by their numbers. With `names`: exactly those arrays.
  """
  if layout not in ('hwio', 'oihw'):
    raise UserError(f'layout must be hwio or oihw, got {layout!r}.')
  spatial = (slice(0, 2) if layout == 'hwio' else slice(2, 4))
  if names:
    unknown = [n for n in names if n not in arrays]
    if unknown:
      convs = [k for k, v in arrays.items() if v.ndim == 4]
      raise CheckpointError(f'{origin}: no arrays named {unknown}; its 4-D arrays are '
                            f'{convs[:30]}.')
    chosen = list(names)
  else:
    chosen = [k for k, v in arrays.items()
              if v.ndim == 4 and v.shape[spatial] == (kernel_size, kernel_size)]
    if all(k.endswith('kernel') for k in chosen):   # flax trees: file order is not network order
      chosen = sorted(chosen, key=natural_key)
  if len(chosen) < num_layers:
    raise CheckpointError(f'{origin}: found {len(chosen)} {kernel_size}x{kernel_size} conv '
                          f'kernels ({layout.upper()}) where {num_layers} are needed: '
                          f'{chosen[:10]}; name them with --layers or set --layout.')
  out = []
  for n in chosen[:num_layers]:
    raw = np.asarray(arrays[n])
    if raw.dtype.kind in 'biuSUO':
      raise CheckpointError(f'{origin}: {n} is {raw.dtype}, not a float conv kernel (quantized '
                            'weights: dequantize them first).')
    k = raw.astype(np.float32)
    if k.ndim != 4:
      raise CheckpointError(f'{origin}: {n} has shape {k.shape}, not a 4-D conv kernel.')
    out.append(k if layout == 'hwio' else k.transpose(2, 3, 1, 0))
  return out, chosen[:num_layers]


def default_layout(path: str) -> str:
  """OIHW for PyTorch-style files (.pt, .pth, .bin, .safetensors), HWIO otherwise."""
  return 'oihw' if os.path.splitext(path)[1].lower() in _OIHW_SUFFIXES else 'hwio'
