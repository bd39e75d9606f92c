"""The modes of `lps_main`, one per table / figure of Sec. 5: what each needs, how many
second-order fits it runs, how it runs, and how its results render.

A mode's `run(ctx)` returns its JSON-able summary; `render(res, results_dir)` turns a finished
run's results.json into markdown (and a PNG for the figures), so --replot needs nothing else.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import numpy as np

from experiments import lps_render
from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common.errors import UserError
from lps_jax.evaluation import protocols
from lps_jax.methods import interface
from lps_jax.methods import registry as methods
from lps_jax.training import data
from lps_jax.training import modelset
from lps_jax.training import resnet
from lps_jax.zoo import manifest as manifest_lib


@dataclasses.dataclass
class Context:
  """Everything a mode's run needs, validated by `load`."""
  kernels: list
  task_id: np.ndarray
  config: SecondOrderConfig
  seeds: list[int]
  methods: list[str]
  branches: Optional[list[int]] = None     # 1-based (branches / alignment modes)
  model_set: Optional[modelset.ModelSet] = None
  test_tasks: int = 10
  num_permutations: int = 10000
  images: Optional[Callable[[], Any]] = None   # the test split, loaded on demand (transfer)
  cache: Any = None
  progress: Optional[Callable] = None
  feature_progress: Optional[Callable] = None
  other: Optional[tuple] = None          # cross mode: (kernels, task_id) of the other set


@dataclasses.dataclass(frozen=True)
class Mode:
  name: str
  help: str
  run: Callable[[Context], Any]
  render: Callable[[dict, Optional[str]], str]
  epochs_per_seed: Callable[[Context], int]   # second-order epochs one split seed trains
  takes_methods: bool = False           # runs --methods (the tables)
  folder_reason: Optional[str] = None   # why it needs the full model set folder, if it does
  first_branch: int = 1                 # lowest branch it accepts (alignment: 2)
  branch_methods: bool = False          # runs --branch_methods (lps_render.BRANCH_METHODS)

  def fits(self, ctx: Context) -> int:
    """Progress units (second-order epochs) of a whole run."""
    return self.epochs_per_seed(ctx) * len(ctx.seeds)


def _methods_epochs(ctx: Context) -> int:
  return sum(methods.get(m).fit_count(ctx.config) for m in ctx.methods)


# -- run
def _tables(ctx: Context, protocol: Callable, **kw) -> dict:
  out = {}
  for name in ctx.methods:
    for seed in ctx.seeds:
      r = protocol(ctx.kernels, ctx.task_id, name, ctx.config, seed, progress=ctx.progress,
                   cache=ctx.cache, **kw)
      out.setdefault(name, []).append(dict(r, split_seed=seed))
  return out


def run_classification(ctx: Context) -> dict:
  return _tables(ctx, protocols.run_classification)


def run_retrieval(ctx: Context) -> dict:
  return _tables(ctx, protocols.run_retrieval, test_tasks=ctx.test_tasks)


def run_cross(ctx: Context) -> dict:
  out = {}
  for name in ctx.methods:
    for seed in ctx.seeds:
      r = protocols.run_cross_architecture(ctx.kernels, ctx.task_id, *ctx.other, name,
                                           ctx.config, seed, progress=ctx.progress,
                                           cache=ctx.cache)
      out.setdefault(name, []).append(dict(r, split_seed=seed))
  return out


def run_branches(ctx: Context) -> dict:
  """{branch: [per seed]} for the paper's reader alone (the committed figures' format), or
  {reader: {branch: [per seed]}} when --branch_methods names others."""
  out = {}
  for name in ctx.methods:
    for seed in ctx.seeds:
      r = protocols.run_branches(ctx.kernels, ctx.task_id, ctx.config,
                                 [b - 1 for b in ctx.branches], seed, progress=ctx.progress,
                                 cache=ctx.cache, method=name)
      for layer, acc in r.items():
        out.setdefault(name, {}).setdefault(str(layer + 1), []).append(dict(acc, split_seed=seed))
  return out['lps'] if list(out) == ['lps'] else out


def run_alignment(ctx: Context) -> dict:
  out = {}
  for seed in ctx.seeds:
    r = protocols.run_alignment_ablation(ctx.kernels, ctx.task_id, ctx.config,
                                         [b - 1 for b in ctx.branches], seed,
                                         progress=ctx.progress, cache=ctx.cache)
    for variant, per in r.items():
      for layer, acc in per.items():
        out.setdefault(variant, {}).setdefault(str(layer + 1), []).append(
            dict(acc, split_seed=seed))
  return out


def run_transfer(ctx: Context) -> list:
  split = ctx.images()
  ms = ctx.model_set
  model_config = resnet.ResNetConfig.from_dict(ms.config['model'])
  return [dict(protocols.run_transfer(
      ctx.kernels, ctx.task_id, ms.params, ms.batch_stats, split.images, split.labels,
      model_config, ctx.config, seed, test_tasks=ctx.test_tasks,
      num_permutations=ctx.num_permutations, progress=ctx.progress,
      feature_progress=ctx.feature_progress, cache=ctx.cache), split_seed=seed)
      for seed in ctx.seeds]


_FOLDER = 'needs the full model set folder (train_population workdir/modelset), not a kernels .npz'
MODES = {m.name: m for m in [
    Mode('classification', 'Table 1: 8 train / 2 test models per task.', run_classification,
         lps_render.render_table, _methods_epochs, takes_methods=True),
    Mode('retrieval', 'Table 2: train on 40 tasks; 2 query + 8 gallery per held-out task.',
         run_retrieval, lps_render.render_table, _methods_epochs, takes_methods=True),
    Mode('cross', 'Different networks: fit on every model of --modelset, name the tasks of '
         "--other_modelset's models (another architecture).", run_cross, lps_render.render_table,
         _methods_epochs, takes_methods=True),
    Mode('transfer', 'Fig. 3a: parameter similarity vs transferability.', run_transfer,
         lps_render.render_transfer, lambda ctx: ctx.config.epochs,
         folder_reason='runs the first-order models on images, so it ' + _FOLDER),
    Mode('branches', 'Fig. 3b: one branch at a time.', run_branches, lps_render.render_branches,
         lambda ctx: len(ctx.methods) * len(ctx.branches) * ctx.config.epochs,
         folder_reason='trains branches of deeper conv layers, so it ' + _FOLDER,
         branch_methods=True),
    Mode('alignment', 'Fig. 3c: alignment ablation, branches 2..19.', run_alignment,
         lps_render.render_alignment,
         lambda ctx: len(protocols.ALIGNMENT_VARIANTS) * len(ctx.branches) * ctx.config.epochs,
         folder_reason='trains branches of deeper conv layers, so it ' + _FOLDER,
         first_branch=2),
]}


def render(res: dict, results_dir: Optional[str]) -> str:
  """results.md of a finished run (and its PNG into `results_dir`, if given)."""
  text = MODES[res['mode']].render(res, results_dir)
  text += (f'\n{res["num_models"]} models, {res["num_tasks"]} tasks from '
           f'`{res["modelset"]}`; mean ± std over split seeds {res["split_seeds"]}; '
           f'{res["wall_seconds"]:.0f} s wall time (cached work counts as 0).\n')
  if 'compare' in res:   # the same methods, splits and tasks on a second model set
    c = res['compare']
    text += '\n' + lps_render.render_table(dict(res, results=c['results'], title_suffix=(
        f', the same {res["num_tasks"]} tasks of `{c["modelset"]}`')), None)
    text += f'\n{c["num_models"]} models of `{c["modelset"]}` (tasks {c["tasks"]}).\n'
  return text


# -- validation and loading, in one place
def load(mode: Mode, path: str, config: SecondOrderConfig, method_names: list[str],
         branches: Optional[list[int]], images: Optional[Callable] = None,
         cache=None) -> tuple[list, np.ndarray, Optional[modelset.ModelSet],
                              Optional[list[int]]]:
  """(kernels, task_id, model set or None, branches or None) for `mode`, or a ValueError
  (ModelSetError) saying what to pass instead. Methods that read whole networks get a
  `modelset.NetworkStack` (with the models' logits on probe images from `images()` where one
  needs them) as the kernels."""
  chosen = [methods.get(m) for m in method_names] if mode.takes_methods or mode.branch_methods else []
  readers = [m.name for m in chosen if m.reads_networks]
  # A folder of slices (results/modelset500) is read as the models its slices keep whole.
  whole = manifest_lib.load_whole(path) if manifest_lib.is_slices_root(path) else None
  if mode.folder_reason is None and not readers:
    num_layers = max([m.num_layers(config) for m in chosen] or [len(config.layer_weights)])
    if whole is not None:
      kernels, names = modelset.layer_kernels(whole.models, num_layers)
      task_id = whole.models.task_id
    else:
      kernels, task_id, names, _ = modelset.load_kernels(path, num_layers)
    for m in chosen:
      missing = [names[i] for i in m.active_layers(config) if kernels[i] is None]
      if missing:
        raise modelset.ModelSetError(f'{path} has no kernels for {missing} (method {m.name!r}); '
                                     'pass the full model set folder instead of the exported '
                                     '.npz.')
    return kernels, task_id, None, None
  if path.endswith('.npz') and mode.name == 'branches' and not readers:
    return _branches_from_file(path, branches)
  if path.endswith('.npz'):
    why = (f'{mode.name} mode {mode.folder_reason}' if mode.folder_reason else
           f'{", ".join(readers)} read every layer, BatchNorm and the FC of each model, so they '
           f'{_FOLDER}')
    raise modelset.ModelSetError(f'{why}; got {path}. Pass results/modelset500 (the '
                                 'paper-recipe models kept whole), or build one with python -m '
                                 'experiments.train_population '
                                 '--flagfile=experiments/flags/modelset_cpu.flags (~1 h on 2 '
                                 'cores).')
  ms = whole.models if whole is not None else modelset.load(path)
  stack = None
  if readers:
    stack = modelset.network_stack(ms)
    if any(m.reads_probe_outputs for m in chosen):
      stored = None if whole is None else whole.logits   # computed before the float16 cast
      outputs = (stored.reshape(len(ms), -1) if stored is not None
                 else functional_outputs(stack, images, cache))
      stack = stack.with_array(methods.PROBE_OUTPUTS, outputs)
  if mode.takes_methods:
    return stack, ms.task_id, None, None
  if mode.name == 'transfer':
    kernels, _ = modelset.layer_kernels(ms, len(config.layer_weights))
    return kernels, ms.task_id, ms, None
  names = resnet.conv_layer_names(resnet.ResNetConfig.from_dict(ms.config['model']))
  branches = branches or list(range(mode.first_branch, len(names) + 1))
  bad = [b for b in branches if not mode.first_branch <= b <= len(names)]
  if bad:
    raise UserError(f'--branches {bad} out of range: {mode.name} mode takes branches '
                     f'{mode.first_branch}..{len(names)} of this model set (1-based, one per '
                     'conv layer).')
  kernels = stack if stack is not None else modelset.layer_kernels(ms, max(branches))[0]
  return kernels, ms.task_id, ms, branches


def _branches_from_file(path: str, branches: Optional[list[int]]):
  """Branches mode on a kernels file that holds deeper layers (a slice's stage-1 kernels,
  lps_jax.zoo.slice_folder): the branches it holds (default all of them), or what to pass instead."""
  kernels, task_id, names, _ = modelset.load_kernels(path, len(resnet.conv_layer_names()))
  held = [i + 1 for i, k in enumerate(kernels) if k is not None]
  branches = branches or held
  missing = [b for b in branches if b not in held]
  if missing:
    raise modelset.ModelSetError(f'{path} holds the kernels of branches {held}, not {missing}; '
                                 f'choose --branches among them or pass the model set folder.')
  return kernels[:max(branches)], task_id, None, branches


def functional_outputs(stack: modelset.NetworkStack, images: Callable, cache=None,
                       padding: str = 'same') -> np.ndarray:
  """The functional reference's features: every model's logits on 2 test-split images per
  class (`zoo.probe.probe_logits`; `padding` 'symmetric' runs PyTorch checkpoints as PyTorch
  does), kept in `cache`."""
  from lps_jax.common import cache as cache_lib
  from lps_jax.zoo import probe as probe_lib
  split = images()
  probe = probe_lib.probe_images(split.images, split.labels)
  def compute():
    logging.info('functional reference: %d models on %d probe images', stack.num_models,
                 len(probe))
    return {'logits': probe_lib.probe_logits(stack, probe, padding=padding)}

  if cache is None:
    return compute()['logits']
  key = {'kind': 'probe_logits', 'images': cache_lib.fingerprint(probe),
         'models': cache_lib.fingerprint(*stack.arrays)}
  if padding != 'same':
    key['padding'] = padding
  return cache.arrays(key, compute)['logits']


def restrict(kernels: list, task_id: np.ndarray, tasks, path: str,
             why: str = 'which the compared model set holds; compare sets with the same tasks'
             ) -> tuple[list, np.ndarray]:
  """The models of `tasks` only (a second model set compared on the first one's tasks, or
  --task_ids), or one line naming the tasks `path` lacks and `why` they were asked for."""
  keep = np.isin(task_id, tasks)
  absent = sorted(set(np.asarray(tasks).tolist()) - set(task_id[keep].tolist()))
  if absent:
    raise modelset.ModelSetError(f'{path} has no models of tasks {absent[:10]}, {why}.')
  return interface.take(kernels, np.flatnonzero(keep)), task_id[keep]


def test_split_loader(dataset: str, data_dir: Optional[str], tfds_data_dir: Optional[str]):
  """The test split (images clustered in transfer mode), loaded when first asked for."""
  def images():
    if dataset == 'npz':
      return data.load_npz_dir(data_dir or data.default_data_dir(), train=False)[1]
    return data.load_tfds('test', tfds_data_dir)
  return images
