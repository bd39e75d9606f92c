"""A checkpoint's arrays as lps_jax's ResNet: a PyTorch state_dict (written without torch) maps
back to the exact Flax variables, by order and shape; Flax trees keep their paths; what does not
fit is refused in one line."""
import collections

import jax
import numpy as np
import pytest

from lps_jax.symmetry import permutations
from lps_jax.training import resnet
from lps_jax.zoo import foreign_checkpoints as checkpoints
from lps_jax.zoo import network_arrays
from tests.fixtures import torch_zip

CONFIG = resnet.ResNetConfig((2, 1, 1), (4, 8, 16), num_classes=3)


def _model(seed=0):
  flat = permutations.flatten(resnet.init_variables(jax.random.PRNGKey(seed), CONFIG))
  rng = np.random.default_rng(seed)   # every variable distinct, so a swapped pair shows
  return {p: (np.asarray(a) + rng.normal(size=a.shape)).astype(np.float32) for p, a in flat.items()}


def test_a_pytorch_state_dict_maps_onto_the_exact_flax_variables(tmp_path):
  flat = _model()
  torch_zip.save(tmp_path / 'm.pt', torch_zip.state_dict(flat, CONFIG))
  got, config = network_arrays.to_flax(checkpoints.read_arrays(str(tmp_path / 'm.pt')), 'm.pt')
  assert config == CONFIG
  assert list(got) == list(network_arrays.expected(CONFIG))      # network order, all of it
  for p in flat:
    np.testing.assert_array_equal(got[p], flat[p], err_msg=p)
  assert network_arrays.has_statistics(got)
  # Parameters only (named_parameters, no buffers): the running statistics are simply absent.
  params, _ = network_arrays.to_flax(torch_zip.state_dict(flat, CONFIG, statistics=False), 'p')
  assert not network_arrays.has_statistics(params)
  assert set(params) == {p for p in flat if p.startswith('params/')}


def test_flax_trees_keep_their_paths():
  flat = _model(1)
  dotted = {'state.' + p.replace('/', '.'): a for p, a in flat.items()}   # a wrapped msgpack tree
  got, config = network_arrays.to_flax(dotted, 'flax')
  assert config == CONFIG and set(got) == set(flat)
  bare = {p[len('params/'):]: a for p, a in flat.items() if p.startswith('params/')}   # npz
  got, _ = network_arrays.to_flax(bare, 'npz')
  assert set(got) == {p for p in flat if p.startswith('params/')}


def test_a_stack_of_mapped_models_reads_like_a_model_set():
  flats = [network_arrays.to_flax(torch_zip.state_dict(_model(s), CONFIG), str(s))[0]
           for s in range(3)]
  stack = network_arrays.stack(flats, CONFIG)
  assert stack.num_models == 3 and stack.num_conv == len(resnet.conv_layer_names(CONFIG))
  np.testing.assert_array_equal(stack.kernels[0][2], flats[2]['params/conv1/kernel'])
  with pytest.raises(network_arrays.NetworkError, match='with and without BatchNorm statistics'):
    network_arrays.stack([flats[0], {p: a for p, a in flats[1].items()
                                     if p.startswith('params/')}], CONFIG, ['a', 'b'])


def test_what_does_not_fit_is_refused_in_one_line():
  sd = torch_zip.state_dict(_model(), CONFIG)
  option_a = collections.OrderedDict((k, v) for k, v in sd.items() if '.shortcut.' not in k)
  with pytest.raises(network_arrays.NetworkError, match='option-A shortcuts'):
    network_arrays.to_flax(option_a, 'a.pt')
  extra = collections.OrderedDict(sd, head=np.zeros(3, np.float32))
  with pytest.raises(network_arrays.NetworkError, match='left over after the FC'):
    network_arrays.to_flax(extra, 'b.pt')
  bad = collections.OrderedDict(sd)
  bad['conv1.weight'] = np.full_like(bad['conv1.weight'], np.nan)
  with pytest.raises(network_arrays.NetworkError, match='NaN/Inf'):
    network_arrays.to_flax(bad, 'c.pt')
  with pytest.raises(network_arrays.NetworkError, match='no params/dense/kernel'):
    network_arrays.to_flax({'conv1/kernel': np.zeros((3, 3, 3, 4), np.float32)}, 'd.npz')


def test_a_mapped_pytorch_model_computes_what_pytorch_computes_with_symmetric_padding(tmp_path):
  """The functional reference can run a PyTorch checkpoint: mapped onto the Flax ResNet and run
  with PyTorch's symmetric padding, its logits on uint8 images are PyTorch's own; with Flax's
  'SAME' (stride-2 convs pad (0, 1)) they are not."""
  torch = pytest.importorskip('torch')
  from experiments import torch_reference
  from lps_jax.zoo import probe
  torch.manual_seed(0)
  net = torch_reference.ResNet20(CONFIG.widths, CONFIG.blocks_per_stage, CONFIG.num_classes)
  with torch.no_grad():   # non-trivial running statistics, so eval mode reads them
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.weight.normal_()
  net.eval()
  torch.save(net.state_dict(), tmp_path / 'net.pt')
  flat, config = network_arrays.to_flax(checkpoints.read_arrays(str(tmp_path / 'net.pt')), 'net')
  assert config == CONFIG
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  x = (torch.from_numpy(images).float() / 255 - torch.tensor(torch_reference.MEAN)) / torch.tensor(
      torch_reference.STD)
  with torch.no_grad():
    want = net(x.permute(0, 3, 1, 2)).numpy().reshape(-1)
  stack = network_arrays.stack([flat], config)
  got = probe.probe_logits(stack, images, padding='symmetric')[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  same = probe.probe_logits(stack, images)[0]
  assert not np.allclose(same, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
