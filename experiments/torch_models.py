"""ResNet-20s trained outside this project: PyTorch, PyTorch's default init, saved as state_dict
.pt files, to measure how lps_query does on a model market's checkpoints (RESULTS.md).

  python -m experiments.torch_models --tasks=0,5,10,15,20,25,30,35,40,45 --runs=1 \
      --out=runs/torch_models
  python -m experiments.torch_models --recipe=paper --tasks=12,16,20,24,28 --out=runs/torch_paper

Same data as our sets; `--recipe` picks the training: `yardstick` as modelset_cpu.flags (batch
10, 3 epochs, lr 0.05 /10 after epoch 2, the last partial batch dropped), `paper` as
modelset500.flags (batch 128, 160 epochs, lr 0.1 /10 after epochs 80 and 120, the last partial
batch kept); both SGD 0.9, wd 1e-4, pad-4 crop + flip. Only the framework and the init differ
(PyTorch kaiming_uniform(a=sqrt(5)) convs, vs this project's He-normal fan-out); models.json
records each model's task, run, recipe and held-out accuracy. Resumable: finished models are
kept. Needs torch (optional).
"""
import argparse
import json
import os
import time

import numpy as np

from lps_jax.common import files

RECIPES = {   # as experiments/flags/modelset_cpu.flags and modelset500.flags train
    'yardstick': dict(batch_size=10, epochs=3, lr=0.05, decay_epochs=(2,), drop_last=True),
    'paper': dict(batch_size=128, epochs=160, lr=0.1, decay_epochs=(80, 120), drop_last=False),
}


def train_one(task, run, train, test, tasks_split, args):
  import torch
  import torch.nn.functional as F
  from experiments.torch_reference import ResNet20, augmented_batch
  row = list(tasks_split.task_ids).index(task)
  seed = 1000 * task + run
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  images = torch.from_numpy(train.images)
  labels = torch.from_numpy(np.zeros(len(train.images), np.int64))
  labels[tasks_split.train_idx[row]] = torch.from_numpy(tasks_split.train_labels[row].astype(np.int64))
  rows = torch.from_numpy(tasks_split.train_idx[row].astype(np.int64))
  recipe = RECIPES[args.recipe]
  net = ResNet20()
  opt = torch.optim.SGD(net.parameters(), lr=recipe['lr'], momentum=0.9, weight_decay=1e-4)
  bs = recipe['batch_size']
  steps = len(rows) // bs if recipe['drop_last'] else -(-len(rows) // bs)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, [e * steps for e in recipe['decay_epochs']],
                                               0.1)
  net.train()
  for _ in range(recipe['epochs']):
    perm = rows[torch.randperm(len(rows), generator=gen)]
    for s in range(steps):
      x, y = augmented_batch(images, labels, perm[s * bs:(s + 1) * bs], gen, False)
      opt.zero_grad(set_to_none=True)
      F.cross_entropy(net(x), y).backward()
      opt.step()
      sched.step()
  net.eval()
  from experiments.torch_reference import MEAN, STD
  ev = torch.from_numpy(test.images[tasks_split.eval_idx[row]])
  x = ((ev.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2)
  with torch.no_grad():
    acc = float((net(x).argmax(1).numpy() == tasks_split.eval_labels[row]).mean())
  return net.state_dict(), acc


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tasks', default='0,5,10,15,20,25,30,35,40,45')
  p.add_argument('--runs', type=int, default=1)
  p.add_argument('--recipe', choices=sorted(RECIPES), default='yardstick')
  p.add_argument('--data_dir', default=None, help='default $LPS_DATA_DIR')
  p.add_argument('--out', default='runs/torch_models')
  a = p.parse_args()
  import torch
  from lps_jax.training import data
  tasks = [int(t) for t in a.tasks.split(',')]
  train, test = data.load('npz', a.data_dir or data.default_data_dir(),
                          classes=data.task_classes(tasks))
  split = data.make_tasks(train, tasks, eval_split=test)
  os.makedirs(a.out, exist_ok=True)
  meta_path = os.path.join(a.out, 'models.json')
  meta = {}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  for task in tasks:
    for run in range(a.runs):
      name = f'task{task:02d}_run{run}.pt'
      if name in meta:   # resumable: finished models are kept
        if meta[name].get('recipe', 'yardstick') != a.recipe:
          raise SystemExit(f'error: {a.out} holds {name} trained with recipe '
                           f'{meta[name].get("recipe", "yardstick")!r}; use another --out for '
                           f'{a.recipe!r}.')
        continue
      t0 = time.time()
      state, acc = train_one(task, run, train, test, split, a)
      torch.save(state, os.path.join(a.out, name))
      meta[name] = {'task': task, 'run': run, 'recipe': a.recipe, 'heldout_accuracy': acc,
                    'seconds': time.time() - t0}
      files.write_json(meta_path, meta)
      print(f'{name}: held-out accuracy {acc:.3f} ({time.time() - t0:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
