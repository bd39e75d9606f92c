import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lps_jax.training import resnet


def _expected_resnet20_params():
  """Independent count: convs (no bias) + BN (scale, bias) + dense, option-B shortcuts."""
  conv = lambda k, c, g: k * k * c * g
  bn = lambda c: 2 * c
  total = conv(3, 3, 16) + bn(16)
  c_in = 16
  for s, width in enumerate((16, 32, 64)):
    for b in range(3):
      total += conv(3, c_in, width) + bn(width) + conv(3, width, width) + bn(width)
      if c_in != width:
        total += conv(1, c_in, width) + bn(width)
      c_in = width
  return total + 64 * 2 + 2


def test_resnet20_parameter_count_and_layers():
  v = resnet.init_variables(jax.random.PRNGKey(0))
  assert resnet.param_count(v['params']) == _expected_resnet20_params() == 271954
  names = resnet.conv_layer_names()
  assert len(names) == 19
  assert names[:3] == ['conv1', 'stage1_block1/conv1', 'stage1_block1/conv2']
  assert names[-1] == 'stage3_block3/conv2'
  shapes = [k.shape for k in resnet.conv_kernels(v['params'])]
  expected = ([(3, 3, 3, 16)] + [(3, 3, 16, 16)] * 6 + [(3, 3, 16, 32)] + [(3, 3, 32, 32)] * 5
              + [(3, 3, 32, 64)] + [(3, 3, 64, 64)] * 5)
  assert shapes == expected
  # Shortcuts and the dense layer are not among the listed kernels.
  assert not any('shortcut' in n or 'dense' in n for n in names)
  assert 'shortcut_conv' in v['params']['stage2_block1']


def test_unknown_layer_name_is_a_clear_error():
  v = resnet.init_variables(jax.random.PRNGKey(0))
  with pytest.raises(KeyError, match='unknown conv layer'):
    resnet.get_kernel(v['params'], 'stage9_block1/conv1')


def test_im2col_equals_lax_conv():
  cfg = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))
  v = resnet.init_variables(jax.random.PRNGKey(1), cfg)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32, 3))
  a = resnet.ResNet(cfg, 'lax').apply(v, x)
  b = resnet.ResNet(cfg, 'im2col').apply(v, x)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  feats = resnet.ResNet(cfg).apply(v, x, features=True)
  assert feats.shape == (3, 8)
  # bfloat16 convs: close to float32 (bf16 rounding only), float32 out, not identical.
  c = resnet.ResNet(cfg, 'lax_bf16').apply(v, x)
  assert c.dtype == jnp.float32
  assert not np.allclose(a, c, rtol=0, atol=1e-7)
  np.testing.assert_allclose(a, c, rtol=0.05, atol=0.05)
