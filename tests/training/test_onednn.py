"""oneDNN convolutions as XLA FFI custom calls: each pass equals XLA's on every ResNet-20 conv
shape and on odd ones, under jit and vmap; bf16 stays close; what is missing is said in one line;
two processes building the extension at once do not race."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import requires_onednn
from lps_jax.training import config as train_config
from lps_jax.training.onednn import build

pytestmark = requires_onednn
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (side, c_in, c_out, kernel, stride): the stem, each stage's 3x3 convs, the stride-2 3x3 and
# 1x1 shortcut convs of ResNet-20; then odd sizes, rectangular images, stride 2 on odd sides.
RESNET20 = [(32, 3, 16, 3, 1), (32, 16, 16, 3, 1), (32, 16, 32, 3, 2), (32, 16, 32, 1, 2),
            (16, 32, 32, 3, 1), (16, 32, 64, 3, 2), (16, 32, 64, 1, 2), (8, 64, 64, 3, 1)]
ODD = [(7, 5, 6, 3, 2), (9, 4, 3, 1, 1), (11, 3, 8, 3, 1), (5, 2, 7, 1, 2), (6, 8, 8, 5, 1)]


def _lax(stride):
  return lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _ours(stride, threads=0, bf16=False):
  from lps_jax.training.onednn import conv
  return lambda x, k: conv.conv(x, k, stride, threads, bf16)


def _passes(fn, x, k, dy):
  y, vjp = jax.vjp(fn, x, k)
  return (y,) + vjp(dy)


def _inputs(rng, n, h, w, c, o, kk, stride):
  x = rng.normal(size=(n, h, w, c)).astype(np.float32)
  k = (rng.normal(size=(kk, kk, c, o)) / np.sqrt(kk * kk * c)).astype(np.float32)
  dy = rng.normal(size=(n, -(-h // stride), -(-w // stride), o)).astype(np.float32)
  return x, k, dy


@pytest.mark.parametrize('shape', RESNET20 + ODD, ids=lambda s: 'x'.join(map(str, s)))
def test_each_pass_equals_xla(shape):
  side, c, o, kk, stride = shape
  rng = np.random.default_rng(sum(shape))
  x, k, dy = _inputs(rng, 4, side, side + (side % 2), c, o, kk, stride)
  want = jax.jit(lambda *a: _passes(_lax(stride), *a))(x, k, dy)
  for threads in (1, 2):
    got = jax.jit(lambda *a: _passes(_ours(stride, threads), *a))(x, k, dy)
    for name, g, w in zip(('forward', 'input grad', 'weight grad'), got, want):
      assert g.shape == w.shape and g.dtype == jnp.float32, name
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()),
                                 err_msg=f'{name} {shape} threads={threads}')


def test_vmap_over_models_is_the_per_model_call():
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(3, 4, 8, 8, 16)).astype(np.float32)
  ks = rng.normal(size=(3, 3, 3, 16, 32)).astype(np.float32)
  dys = rng.normal(size=(3, 4, 4, 4, 32)).astype(np.float32)
  fn = lambda x, k, dy: _passes(_ours(2, 1), x, k, dy)
  batched = jax.jit(jax.vmap(fn))(xs, ks, dys)
  for m in range(3):
    single = jax.jit(fn)(xs[m], ks[m], dys[m])
    for b, s in zip(batched, single):
      np.testing.assert_array_equal(b[m], s)        # one primitive, looped: the same bits
  shared = jax.jit(jax.vmap(fn, in_axes=(0, None, 0)))(xs, ks[0], dys)   # kernel not batched
  np.testing.assert_array_equal(shared[0][1], jax.jit(fn)(xs[1], ks[0], dys[1])[0])
  assert shared[2].shape == (3, 3, 3, 16, 32)      # one kernel gradient per model


def test_bf16_is_close_to_float32():
  rng = np.random.default_rng(2)
  x, k, dy = _inputs(rng, 8, 16, 16, 32, 32, 3, 1)
  want = jax.jit(lambda *a: _passes(_lax(1), *a))(x, k, dy)
  got = jax.jit(lambda *a: _passes(_ours(1, 0, bf16=True), *a))(x, k, dy)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    rel = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
    assert 1e-5 < rel < 2e-2, rel                   # rounded to bf16, accumulated in f32


def test_bad_shapes_are_refused():
  from lps_jax.training.onednn import conv
  with pytest.raises(ValueError, match='NHWC x and HWIO kernel'):
    conv.conv(jnp.zeros((8, 8, 3)), jnp.zeros((3, 3, 3, 4)))
  with pytest.raises(ValueError, match='3 channels but the kernel expects 5'):
    conv.conv(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 5, 4)))


def test_missing_pieces_are_named_in_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setattr(build, '_prefixes', lambda: [str(tmp_path)])
  with pytest.raises(build.OneDNNUnavailable, match='libdnnl.so.3 from the onednn-cpu-gomp'):
    build.library_path()
  monkeypatch.undo()
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(build.OneDNNUnavailable, match="compiler 'no-such-compiler' was not found"):
    build.library_path()
  # Asked for: an error. Not asked for (auto): lax / flax, and the log says why.
  from lps_jax.training.onednn import library
  def unavailable():
    raise build.OneDNNUnavailable('test: no oneDNN here')
  monkeypatch.setattr(library, 'load', unavailable)
  train_config.auto_onednn.cache_clear()
  try:
    for flag in ('conv_impl', 'norm_impl'):
      with pytest.raises(build.OneDNNUnavailable, match='no oneDNN here'):
        train_config.ExecutionConfig(**{flag: 'onednn'}).resolve('cpu')
    resolved = train_config.ExecutionConfig().resolve('cpu')
    assert (resolved.conv_impl, resolved.norm_impl) == ('lax', 'flax')
  finally:
    train_config.auto_onednn.cache_clear()
  with pytest.raises(ValueError, match='run on the CPU'):
    train_config.ExecutionConfig('vmap', 'onednn').resolve('gpu')
  with pytest.raises(ValueError, match='--norm_impl=onednn run on the CPU'):
    train_config.ExecutionConfig('vmap', 'lax', norm_impl='onednn').resolve('gpu')


@pytest.mark.slow
def test_two_processes_build_once(tmp_path):
  env = dict(os.environ, **{build.CACHE_ENV: str(tmp_path)})
  cmd = [sys.executable, '-m', 'lps_jax.training.onednn.build']
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
           for _ in range(2)]
  paths = [p.communicate(timeout=300)[0].strip() for p in procs]
  assert [p.returncode for p in procs] == [0, 0] and paths[0] == paths[1]
  built = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if '.so' in f]
  assert built == [paths[0]], built                 # one library, no half-written leftovers


@pytest.mark.slow
def test_app_names_what_is_missing(tmp_path):
  env = dict(os.environ, **{build.CACHE_ENV: str(tmp_path), 'CXX': 'no-such-compiler'})
  r = subprocess.run([sys.executable, '-m', 'experiments.train_population', '--task_ids=0',
                      '--conv_impl=onednn', f'--workdir={tmp_path}/wd', '--dataset=npz'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: --conv_impl=onednn is built')
