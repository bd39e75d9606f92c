"""The functional probe: each model's logits on a fixed batch of images (not weight-space).

What the models compute, not how their weights look: the ceiling the `functional` method reads.
Whole slices record these logits for every model (`zoo.whole_models`); `lps_main` computes them
for model sets that do not carry them.
"""
from __future__ import annotations

import jax
import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.symmetry import permutations
from lps_jax.training import data as data_lib
from lps_jax.training import modelset, resnet
from lps_jax.training.modelset import NetworkStack


def probe_images(images: np.ndarray, labels: np.ndarray, per_class: int = 2) -> np.ndarray:
  """The first `per_class` images of every class, in class order: a fixed probe batch."""
  classes = np.unique(labels)
  rows = [np.flatnonzero(labels == c)[:per_class] for c in classes]
  short = [int(c) for c, r in zip(classes, rows) if r.size < per_class]
  if short:
    raise UserError(f'classes {short[:5]} have fewer than {per_class} images for the probe.')
  return images[np.concatenate(rows)]


def probe_logits(stack: NetworkStack, images: np.ndarray, padding: str = 'same') -> np.ndarray:
  """(M, N * classes): each model's logits on the N uint8 probe images, flattened. The
  functional reference: what the models compute, not how their weights look. `padding`:
  'symmetric' runs mapped PyTorch checkpoints as the functions they are (`resnet.Conv`)."""
  stack = modelset.require_stack(stack, 'the functional probe')
  model = resnet.ResNet(resnet.ResNetConfig.from_dict(stack.model), conv_padding=padding)
  forward = jax.jit(lambda v, x: model.apply(v, data_lib.normalize(x), train=False))
  out = []
  for flat in stack.model_flats():
    variables = permutations.unflatten({k: v for k, v in flat.items()
                                        if k.startswith(('params/', 'batch_stats/'))})
    out.append(np.asarray(forward(variables, images)).reshape(-1))
  return np.stack(out)
