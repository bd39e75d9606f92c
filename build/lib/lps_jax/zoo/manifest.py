"""The manifest of a model set built in slices (`lps_jax.zoo.slice_folder`): check, merge, describe.

`check(root)`: every slice readable and matching its digest, one recipe / seed / model for all
(only the tasks differ), no task twice, the gaps listed. `merge(root, path)` writes the tasks
present as one kernels file in `modelset.export_kernels`' format, which every `lps_main` /
`lps_query` command takes. `load_whole(root)` assembles the models the slices keep whole into
one model set.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from lps_jax.common import files
from lps_jax.training import modelset
from lps_jax.training.data import NUM_TASKS
from lps_jax.zoo import whole_models
from lps_jax.zoo.slice_folder import SliceError, execution_of, read


def _recipe(config: dict) -> dict:
  """What every slice of one model set shares: the config without its tasks."""
  return {k: v for k, v in config.items() if k != 'task_ids'}


def check(root: str, allow_gaps: bool = False) -> dict:
  """The manifest of the slices under `root`: raises SliceError on an unreadable slice, a
  second recipe, a task twice or (unless `allow_gaps`) a task missing below the highest."""
  if not os.path.isdir(root):
    raise SliceError(f'no slices folder {root!r}: train a slice first '
                     '(train_population --flagfile=experiments/flags/modelset500.flags '
                     '--task_ids=A-B).')
  folders = sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith('tasks_')
                   and os.path.isdir(os.path.join(root, d)))
  if not folders:
    raise SliceError(f'{root!r} holds no slices (tasks_* folders).')
  slices = [read(f) for f in folders]
  recipe = _recipe(slices[0].record['config'])
  owner = {}
  for s in slices:
    if _recipe(s.record['config']) != recipe:
      diff = sorted(k for k in recipe if recipe[k] != _recipe(s.record['config']).get(k))
      raise SliceError(f'slice {s.folder} was trained with another recipe than '
                       f'{slices[0].folder} (differs in: {", ".join(diff)}); one model set '
                       'has one recipe: retrain it with the same flagfile.')
    for t in s.tasks:
      if t in owner:
        raise SliceError(f'task {t} is in two slices: {owner[t]} and {s.folder}; remove one.')
      owner[t] = s.folder
  tasks = sorted(owner)
  missing = [t for t in range(max(tasks) + 1) if t not in owner]
  if missing and not allow_gaps:
    raise SliceError(f'tasks {missing} are missing below task {max(tasks)}: train them '
                     '(--task_ids), or pass --allow_gaps to use the tasks present.')
  runs = recipe['runs_per_task']
  backends = sorted({s.record['hardware']['backend'] for s in slices})
  return {
      'root': root, 'tasks': tasks, 'num_models': len(tasks) * runs, 'runs_per_task': runs,
      'missing': [t for t in range(NUM_TASKS) if t not in owner], 'recipe': recipe,
      'backends': backends,
      'rounding': ('all slices trained on CPU: a CPU replay reproduces them bit for bit'
                   if backends == ['cpu'] else
                   'slices from several backends share the recipe, not the float rounding'),
      'slices': [{'folder': os.path.basename(s.folder), 'tasks': s.tasks,
                  'backend': s.record['hardware']['backend'],
                  'device_kind': s.record['hardware']['device_kind'],
                  'cpu': s.record['hardware']['cpu'],
                  'conv_impl': s.record['execution']['conv_impl'],
                  'norm_impl': execution_of(s.record).norm_impl,
                  'wall_seconds': s.record['wall_seconds'],
                  'heldout_accuracy_mean': s.record['heldout_accuracy_mean'],
                  'whole_bytes': (s.record.get('whole') or {}).get('bytes'),
                  'versions': s.record['versions']} for s in slices],
      'whole_tasks': sorted(t for s in slices if s.record.get('whole') for t in s.tasks)}


def merge(root: str, path: str, stage1: bool = False, allow_gaps: bool = False) -> dict:
  """Writes the slices' models (task-major, runs in order) to kernels file `path` in
  `modelset.export_kernels`' format: conv1 only, or with `stage1` layers 2-7 (float16) too.
  Returns the manifest."""
  manifest = check(root, allow_gaps=allow_gaps)
  slices = sorted((read(os.path.join(root, s['folder'])) for s in manifest['slices']),
                  key=lambda s: s.tasks[0])
  keys = [k for k in slices[0].arrays if k.startswith('kernel/')]
  keys = keys if stage1 else ['kernel/conv1']
  cat = lambda k: np.concatenate([s.arrays[k] for s in slices])
  config = dict(slices[0].record['config'], task_ids=manifest['tasks'])
  meta = {k: cat(k) for k in ('task_id', 'run', 'seed', 'heldout_accuracy')}
  order = np.lexsort((meta['run'], meta['task_id']))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_path(path, '.npz') as tmp:
    np.savez_compressed(tmp, config=np.asarray(json.dumps(config)),
                        **{k: v[order] for k, v in meta.items()},
                        **{k: cat(k)[order] for k in keys})
  return manifest


def _ranges(tasks: list) -> str:
  out, start = [], tasks[0]
  for prev, cur in zip(tasks, tasks[1:] + [None]):
    if cur != prev + 1:
      out.append(f'{start}' if start == prev else f'{start}-{prev}')
      start = cur
  return ', '.join(out)


def manifest_markdown(manifest: dict) -> str:
  lines = ['# ModelSet500 slices', '',
           f'{len(manifest["tasks"])} of {NUM_TASKS} tasks, {manifest["num_models"]} models '
           f'({manifest["runs_per_task"]} runs per task). {manifest["rounding"].capitalize()}.',
           '', '| slice | tasks | backend | device | conv | batch norm | wall (s) | mean held-out '
           'acc | whole models | jax |', '|---|---|---|---|---|---|---|---|---|---|']
  for s in manifest['slices']:
    lines.append(f'| {s["folder"]} | {s["tasks"][0]}-{s["tasks"][-1]} | {s["backend"]} | '
                 f'{s["cpu"] if s["backend"] == "cpu" else s["device_kind"]} | {s["conv_impl"]} '
                 f'| {s.get("norm_impl", "flax")} | {s["wall_seconds"]:.0f} | {s["heldout_accuracy_mean"]:.3f} | '
                 + (f'{s["whole_bytes"] / 1e6:.1f} MB' if s.get('whole_bytes') else '-')
                 + f' | {s["versions"]["jax"]} |')
  whole = manifest.get('whole_tasks') or []
  lines += ['', f'Tasks kept whole (every variable, probe logits, first-layer trajectory: '
            f'`lps_jax.zoo.whole_models`): {_ranges(whole) if whole else "none"}.',
            f'Missing tasks: {manifest["missing"] or "none"}.']
  return '\n'.join(lines) + '\n'


def is_slices_root(path: str) -> bool:
  """Whether `path` is a folder of slices (tasks_* folders), e.g. results/modelset500."""
  return os.path.isdir(path) and any(
      d.startswith('tasks_') and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def whole_slices(root: str) -> list[str]:
  """The slice folders under `root` that keep their models whole, in task order."""
  return sorted(os.path.join(root, d) for d in os.listdir(root)
                if d.startswith('tasks_')
                and os.path.isfile(os.path.join(root, d, whole_models.MODELS)))


def load_whole(root: str, tasks: Optional[Sequence[int]] = None) -> whole_models.WholeModels:
  """Every whole model under slices folder `root` (of `tasks`, default all whole ones), task
  major, runs in order, checked against each slice's digest (`slice_folder.read`)."""
  folders = whole_slices(root)
  if not folders:
    raise modelset.ModelSetError(
        f'{root} holds no slice with whole models ({whole_models.MODELS}; slices from task 12 on '
        'keep them): pass a model set folder, or train a slice with train_population '
        '--flagfile=experiments/flags/modelset500.flags --task_ids=A-B.')
  parts = []
  for folder in folders:
    s = read(folder)   # checks the digests, the whole-model file's included
    if tasks is None or set(s.tasks) & set(tasks):
      parts.append(whole_models.read(os.path.join(folder, whole_models.MODELS)))
  if tasks is not None:
    have = sorted({int(t) for p in parts for t in p.models.task_id})
    missing = sorted(set(tasks) - set(have))
    if missing:
      raise modelset.ModelSetError(f'{root}: tasks {missing} have no whole models (whole: '
                                   f'{have}); choose among those.')
  recipes = {json.dumps({k: v for k, v in p.models.config.items() if k != 'task_ids'},
                        sort_keys=True) for p in parts}
  if len(recipes) > 1:
    raise modelset.ModelSetError(f'{root}: the whole slices were trained with different '
                                 'recipes; one model set has one recipe.')
  ms = modelset.concatenate([p.models for p in parts])
  order = np.lexsort((ms.run, ms.task_id))
  if tasks is not None:
    order = order[np.isin(ms.task_id[order], tasks)]
  ms = ms.select(order)
  ms.config = dict(ms.config, task_ids=sorted({int(t) for t in ms.task_id}))
  logits = (np.concatenate([p.logits for p in parts])[order]
            if all(p.logits is not None for p in parts) else None)
  epochs = set.intersection(*[set(p.trajectory) for p in parts])
  trajectory = {e: np.concatenate([p.trajectory[e] for p in parts])[order] for e in sorted(epochs)}
  return whole_models.WholeModels(ms, logits, trajectory)
