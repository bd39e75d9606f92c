import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lps_jax.common.errors import UserError
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


def _numpy_conv(x, kernel, stride, pad):
  """Plain numpy NHWC x HWIO conv, `pad` zeros on each side."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for i in range(ho):
    for j in range(wo):
      win = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum('nhwc,hwco->no', win, kernel)
  return out


@pytest.mark.parametrize('size,stride', [(3, 1), (3, 2), (1, 2)])
def test_symmetric_padding_is_pytorchs_and_differs_from_same_only_at_stride_2(size, stride):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)), np.float64)
  conv = resnet.Conv(5, size, stride, padding='symmetric')
  v = conv.init(jax.random.PRNGKey(1), jnp.asarray(x, jnp.float32))
  got = conv.apply(v, jnp.asarray(x, jnp.float32))
  want = _numpy_conv(x, np.asarray(v['params']['kernel'], np.float64), stride, size // 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  same = resnet.Conv(5, size, stride).apply(v, jnp.asarray(x, jnp.float32))
  assert np.allclose(same, got, atol=1e-6) == (size == 1 or stride == 1)


def test_padding_is_checked():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(UserError, match="unknown conv padding 'valid'"):
    resnet.Conv(4, 3, padding='valid').init(jax.random.PRNGKey(0), x)
  with pytest.raises(UserError, match="padding 'symmetric' runs with conv impl lax"):
    resnet.Conv(4, 3, impl='onednn', padding='symmetric').init(jax.random.PRNGKey(0), x)
