"""The same ResNet-20 training step in PyTorch: the yardstick `benchmark --suites=torch` uses.

PyTorch is an optional extra (`pip install torch`), never a requirement of lps-jax. The step
matches `lps_jax.training.step.train_step`: gather a batch of uint8 images by index, pad-4 random
crop + horizontal flip + per-channel normalisation, ResNet-20 (1x1 conv + BN shortcuts, as
`lps_jax.training.resnet`), cross-entropy, SGD momentum 0.9 with coupled weight decay 1e-4. Models train
one after another, as the paper's code does.

  python -m experiments.torch_reference --models=8 --steps=3 [--channels_last]   # prints JSON
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
  def __init__(self, widths=(16, 32, 64), blocks=(3, 3, 3), num_classes=2):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    layers, cin = [], widths[0]
    for s, (w, n) in enumerate(zip(widths, blocks)):
      for b in range(n):
        layers.append(Block(cin, w, 2 if (s > 0 and b == 0) else 1))
        cin = w
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.layers(F.relu(self.bn1(self.conv1(x))))
    return self.fc(x.mean((2, 3)))


def augmented_batch(images, labels, rows, gen, channels_last):
  """Pad-4 random crop + flip + normalisation of images[rows] (uint8 NHWC), as NCHW float."""
  x = images[rows]
  n = x.shape[0]
  xp = F.pad(x, (0, 0, 4, 4, 4, 4))                        # NHWC: pad H and W by 4.
  oy, ox = torch.randint(0, 9, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen)
  ar = torch.arange(32)
  x = xp[torch.arange(n)[:, None, None], (oy[:, None] + ar)[:, :, None],
         (ox[:, None] + ar)[:, None, :]]
  flip = torch.rand(n, generator=gen) < 0.5
  x = torch.where(flip[:, None, None, None], x.flip(2), x)
  x = (x.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
  x = x.permute(0, 3, 1, 2)                                # NCHW view of NHWC memory.
  x = x.contiguous(memory_format=torch.channels_last if channels_last
                   else torch.contiguous_format)
  return x, labels[rows]


def measure(models=8, steps=3, batch_size=128, channels_last=False, threads=0, seed=0):
  """Images/s of `models` ResNet-20s trained one after another for `steps` steps each."""
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  rng = np.random.default_rng(seed)
  images = torch.from_numpy(rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8))
  labels = torch.from_numpy(rng.integers(0, 2, 1000))
  nets = []
  for _ in range(models):
    net = ResNet20()
    if channels_last:
      net = net.to(memory_format=torch.channels_last)
    nets.append((net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9,
                                      weight_decay=1e-4)))

  def step(net, opt):
    rows = torch.randperm(1000, generator=gen)[:batch_size]
    x, y = augmented_batch(images, labels, rows, gen, channels_last)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()

  for net, opt in nets:                                    # Warm-up (allocator, oneDNN caches).
    step(net, opt)
  t0 = time.perf_counter()
  for _ in range(steps):
    for net, opt in nets:
      step(net, opt)
  seconds = time.perf_counter() - t0
  return {'images_per_s': models * steps * batch_size / seconds, 'seconds': seconds,
          'models': models, 'steps': steps, 'batch_size': batch_size,
          'channels_last': channels_last, 'threads': torch.get_num_threads(),
          'torch': torch.__version__}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', type=int, default=8)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--channels_last', action='store_true')
  p.add_argument('--threads', type=int, default=0, help='0 = PyTorch default (all cores).')
  a = p.parse_args()
  print(json.dumps(measure(a.models, a.steps, a.batch_size, a.channels_last, a.threads)))


if __name__ == '__main__':
  main()
