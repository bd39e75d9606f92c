"""A trained model set (ModelSet500 and friends): stacked weights + per-model metadata.

On disk a model set is a directory:
  arrays/     orbax checkpoint of {'params', 'batch_stats'} stacked over models (axis 0),
  meta.json   per-model task_id, run, seed, held-out accuracy, and the config that made it.
It is written to a temporary sibling and renamed into place, so a reader never sees half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from lps_jax.common import files
from lps_jax.common.errors import UserError
from lps_jax.symmetry import permutations
from lps_jax.training import resnet


class ModelSetError(UserError):
  """A missing, corrupt or inconsistent model set; the message says what to do."""


@dataclasses.dataclass
class ModelSet:
  """Stacked variables of M models (leading axis M) and their labels.

  task_id[m] is the CIFAR-100 task r (fine labels 2r, 2r+1); run[m] the repeat index;
  seed[m] the base seed (the model's PRNG key is fold_in(fold_in(PRNGKey(seed), task), run)).
  """
  params: Any
  batch_stats: Any
  task_id: np.ndarray
  run: np.ndarray
  seed: np.ndarray
  heldout_accuracy: np.ndarray
  config: dict

  def __len__(self) -> int:
    return int(self.task_id.shape[0])

  def select(self, rows: Sequence[int] | np.ndarray) -> 'ModelSet':
    rows = np.asarray(rows)
    take = lambda x: np.asarray(x)[rows]
    return ModelSet(jax.tree_util.tree_map(take, self.params),
                    jax.tree_util.tree_map(take, self.batch_stats),
                    self.task_id[rows], self.run[rows], self.seed[rows],
                    self.heldout_accuracy[rows], self.config)


def concatenate(sets: Sequence[ModelSet]) -> ModelSet:
  if not sets:
    raise ModelSetError('nothing to concatenate: no model sets given.')
  cat = lambda *xs: np.concatenate([np.asarray(x) for x in xs])
  return ModelSet(jax.tree_util.tree_map(cat, *[s.params for s in sets]),
                  jax.tree_util.tree_map(cat, *[s.batch_stats for s in sets]),
                  cat(*[s.task_id for s in sets]), cat(*[s.run for s in sets]),
                  cat(*[s.seed for s in sets]), cat(*[s.heldout_accuracy for s in sets]),
                  sets[0].config)


def _local_checkpointer() -> ocp.StandardCheckpointer:
  """An orbax checkpointer private to this process: model sets hold host numpy arrays, and in
  a multi-process run only process 0 writes them (no cross-process barrier)."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def save(path: str, model_set: ModelSet) -> None:
  """Writes `model_set` to directory `path` atomically (replacing an older one)."""
  with files.atomic_path(os.path.abspath(path)) as tmp:
    os.makedirs(tmp)
    tree = {'params': model_set.params, 'batch_stats': model_set.batch_stats}
    tree = jax.tree_util.tree_map(np.asarray, tree)
    ckptr = _local_checkpointer()
    ckptr.save(os.path.join(tmp, 'arrays'), tree)
    ckptr.wait_until_finished()
    meta = {'num_models': len(model_set),
            'task_id': model_set.task_id.tolist(), 'run': model_set.run.tolist(),
            'seed': model_set.seed.tolist(),
            'heldout_accuracy': [float(a) for a in model_set.heldout_accuracy],
            'config': model_set.config}
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)


def load(path: str) -> ModelSet:
  """Loads a model set written by `save` (or by `experiments.train_population`).

  `path` is the model-set directory, or a training workdir that holds one in `modelset/`.
  """
  if os.path.isdir(os.path.join(path, 'modelset')) and not os.path.exists(
      os.path.join(path, 'meta.json')):
    path = os.path.join(path, 'modelset')
  meta_path = os.path.join(path, 'meta.json')
  if not os.path.isfile(meta_path):
    raise ModelSetError(f'no model set at {path!r} (missing meta.json); point at the '
                        '"modelset" folder a finished train_population run writes.')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    tree = _local_checkpointer().restore(os.path.abspath(os.path.join(path, 'arrays')))
  except Exception as e:  # orbax raises many types for damaged folders.
    raise ModelSetError(f'model set at {path!r} is unreadable ({type(e).__name__}: {e}); '
                        're-export it from its training workdir or retrain.') from e
  tree = jax.tree_util.tree_map(np.asarray, tree)
  n = meta['num_models']
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(tree)}
  if sizes != {n}:
    raise ModelSetError(f'model set at {path!r} is inconsistent: meta.json lists {n} models, '
                        f'arrays have leading sizes {sorted(sizes)}; re-export it.')
  return ModelSet(tree['params'], tree['batch_stats'],
                  np.asarray(meta['task_id'], np.int32), np.asarray(meta['run'], np.int32),
                  np.asarray(meta['seed'], np.int64),
                  np.asarray(meta['heldout_accuracy'], np.float32), meta['config'])


def export_kernels(path: str, model_set: ModelSet, layers: Sequence[str] = ('conv1',)) -> None:
  """Writes chosen conv kernels (HWIO, stacked over models) + metadata to a compressed .npz.

  Small enough to commit for the first layer (500 models: ~0.9 MB), so tests and CI can use
  real trained weights without retraining. Keys: 'kernel/<layer>', task_id, run, seed,
  heldout_accuracy, config (JSON string).
  """
  arrays = {f'kernel/{name}': np.asarray(resnet.get_kernel(model_set.params, name), np.float32)
            for name in layers}
  np.savez_compressed(path, task_id=model_set.task_id, run=model_set.run, seed=model_set.seed,
                      heldout_accuracy=model_set.heldout_accuracy,
                      config=np.asarray(json.dumps(model_set.config)), **arrays)


def markdown_summary(model_set: ModelSet, wall_seconds: float | None = None,
                     machine: str = '', command: str = '') -> str:
  """Per-task held-out accuracy (mean, min, max over runs) of a model set, as markdown."""
  acc, tasks = model_set.heldout_accuracy, model_set.task_id
  lines = ['# Model set summary', '']
  if command:
    lines += [f'Command: `{command}`', '']
  if wall_seconds is not None:
    lines += [f'Wall time: {wall_seconds:.0f} s ({wall_seconds / 60:.1f} min) on {machine}', '']
  lines += [f'{len(model_set)} models, {np.unique(tasks).size} tasks; held-out accuracy '
            f'mean {acc.mean():.3f}, median {np.median(acc):.3f}, min {acc.min():.3f}, '
            f'max {acc.max():.3f} (chance 0.5).', '',
            '| task | fine labels | runs | mean acc | min | max |', '|---|---|---|---|---|---|']
  for t in np.unique(tasks):
    a = acc[tasks == t]
    lines.append(f'| {t} | {2 * t}, {2 * t + 1} | {a.size} | {a.mean():.3f} | {a.min():.3f} '
                 f'| {a.max():.3f} |')
  return '\n'.join(lines) + '\n'


def layer_kernels(model_set: ModelSet, num_layers: int = 1):
  """(kernels, names): the (M, h, w, c, g) stacks of the first `num_layers` conv layers."""
  names = resnet.conv_layer_names(resnet.ResNetConfig.from_dict(model_set.config['model']))
  if not 1 <= num_layers <= len(names):
    raise ModelSetError(f'asked for {num_layers} conv layers; this ResNet has {len(names)}.')
  return [np.asarray(resnet.get_kernel(model_set.params, n)) for n in names[:num_layers]], names


class Kernels(NamedTuple):
  """What the second-order side reads of a model set. kernels[l] is the (M, h, w, c, g) stack
  of conv layer l (network order, `resnet.conv_layer_names`), or None where the file does not
  hold that layer (an exported .npz usually holds only the first)."""
  kernels: list
  task_id: np.ndarray
  names: list
  run: np.ndarray


def _kernel_array(path: str, name: str, raw: np.ndarray) -> np.ndarray:
  """A stored layer as float32 (M, h, w, c, g), or ModelSetError saying what it is instead."""
  if raw.dtype.kind != 'f' or raw.ndim != 5:
    raise ModelSetError(f'{path}: kernel/{name} is {raw.dtype} {raw.shape}, not float '
                        '(models, h, w, c_in, c_out); re-export the file.')
  return np.asarray(raw, np.float32)


def load_kernels(path: str, num_layers: int = 1) -> Kernels:
  """Conv kernels of the first `num_layers` layers, task labels, layer names and run numbers
  from a model set directory or an `export_kernels` .npz."""
  if path.endswith('.npz'):
    if not os.path.isfile(path):
      raise ModelSetError(f'kernel file not found: {path!r}; export one with '
                          'train_population --export_kernels, or pass a model set folder.')
    try:
      with np.load(path) as f:
        config = json.loads(str(f['config']))
        names = resnet.conv_layer_names(resnet.ResNetConfig.from_dict(config['model']))
        # Slices keep layers past the first as float16 (lps_jax.zoo.slice_folder): read back as float32.
        raw = [f[f'kernel/{n}'] if f'kernel/{n}' in f.files else None
               for n in names[:num_layers]]
        task_id = np.asarray(f['task_id'])
        run = np.asarray(f['run'])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
      raise ModelSetError(f'{path} is not a readable kernels file ({type(e).__name__}: {e}); '
                          'it may be truncated or not an export_kernels .npz: re-export it '
                          'with train_population --export_kernels.') from e
    kernels = [None if k is None else _kernel_array(path, n, k) for n, k in zip(names, raw)]
    for what, rows in (('task_id', task_id), ('run', run)):
      if kernels[0] is not None and rows.shape != (kernels[0].shape[0],):
        raise ModelSetError(f'{path}: {what} has shape {rows.shape} but the kernels hold '
                            f'{kernels[0].shape[0]} models; re-export the file.')
  else:
    ms = load(path)
    kernels, names = layer_kernels(ms, num_layers)
    task_id, run = ms.task_id, ms.run
  for name, k in zip(names, kernels):
    if k is not None and not np.all(np.isfinite(k)):
      bad = np.flatnonzero(~np.isfinite(k).reshape(k.shape[0], -1).all(axis=1))
      raise ModelSetError(f'{path}: layer {name} has NaN/Inf weights in models {bad[:10]}; '
                          'retrain or drop those models.')
  return Kernels(kernels, task_id, names, run)


@dataclasses.dataclass(frozen=True)
class NetworkStack:
  """Every variable of M models, the input of the whole-network methods (an explicit
  weight-space type, after nfn's): `arrays[i]` (M, ...) is the variable at `paths[i]`
  (`symmetry.permutations.flatten` paths, e.g. 'params/dense/kernel'); the first `num_conv` are
  the conv layers' kernels in network order (`kernels`), then the network's other variables
  (shortcut convs, BatchNorm parameters and statistics, the FC layer) and any derived per-model
  arrays. `model` is the ResNetConfig dict the models were built with. No member is None."""
  arrays: tuple
  paths: tuple
  model: dict
  num_conv: int

  def __post_init__(self):
    object.__setattr__(self, 'arrays', tuple(self.arrays))
    object.__setattr__(self, 'paths', tuple(self.paths))
    if len(self.paths) != len(self.arrays):
      raise UserError(f'{len(self.arrays)} arrays but {len(self.paths)} paths.')
    missing = [p for p, a in zip(self.paths, self.arrays) if a is None]
    if missing:
      raise UserError(f'a network stack holds every variable; {missing[:3]} are missing.')
    rows = {np.shape(a)[0] for a in self.arrays}
    if len(rows) > 1:
      raise UserError(f'the variables of a network stack hold {sorted(rows)} models.')

  @property
  def num_models(self) -> int:
    return int(np.shape(self.arrays[0])[0]) if self.arrays else 0

  @property
  def kernels(self) -> list[np.ndarray]:
    """The conv layers' (M, h, w, c, g) kernels in network order (what kernel readers take)."""
    return list(self.arrays[:self.num_conv])

  def items(self):
    return zip(self.paths, self.arrays)

  def take(self, rows) -> 'NetworkStack':
    return dataclasses.replace(self, arrays=[np.asarray(a)[rows] for a in self.arrays])

  def spec(self) -> permutations.PermutationSpec:
    """The models' channel symmetry (`resnet.permutation_spec` of their config)."""
    return resnet.permutation_spec(resnet.ResNetConfig.from_dict(self.model))

  def get(self, path: str) -> np.ndarray:
    if path not in self.paths:
      raise KeyError(f'{path!r} is not in this network stack (it holds {self.paths[:4]}...).')
    return self.arrays[self.paths.index(path)]

  def with_array(self, path: str, array: np.ndarray) -> 'NetworkStack':
    """This stack with one more (M, ...) array (a derived per-model feature) at the end."""
    if np.asarray(array).shape[:1] != (self.num_models,):
      raise UserError(f'{path}: {np.asarray(array).shape[0]} rows for {self.num_models} models.')
    return dataclasses.replace(self, arrays=self.arrays + (np.asarray(array),),
                               paths=self.paths + (path,))

  def model_flats(self, prefix: str = '') -> list[dict]:
    """One {path: array} dict per model, of the paths that start with `prefix`."""
    return permutations.unstack({p: a for p, a in self.items() if p.startswith(prefix)})

  def replaced(self, flats: Sequence[dict]) -> 'NetworkStack':
    """This stack with the paths the per-model dicts hold restacked from them."""
    return dataclasses.replace(self, arrays=[np.stack([f[p] for f in flats]) if p in flats[0]
                                             else a for p, a in self.items()])


def require_stack(stack, reader: str) -> NetworkStack:
  """`stack` if it is a NetworkStack, else one line saying to pass the model set folder."""
  if not isinstance(stack, NetworkStack):
    raise ModelSetError(f'{reader} reads every variable of each model: pass the full model set '
                        'folder (train_population workdir/modelset), not a kernels .npz.')
  return stack


def network_stack(model_set: ModelSet) -> NetworkStack:
  """All variables of a model set, conv kernels first (`NetworkStack`)."""
  names = resnet.conv_layer_names(resnet.ResNetConfig.from_dict(model_set.config['model']))
  flat = permutations.flatten({'params': model_set.params, 'batch_stats': model_set.batch_stats})
  conv = [f'params/{n}/kernel' for n in names]
  paths = conv + sorted(set(flat) - set(conv))
  return NetworkStack([flat[p] for p in paths], paths, model_set.config['model'], len(conv))
