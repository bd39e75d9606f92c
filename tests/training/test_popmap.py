"""popmap: every strategy computes the per-model function, places and gathers exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lps_jax.training import popmap


def _fn(x, w, s):
  return {'y': jnp.tanh(x @ w) * s, 'n': jnp.sum(x)}, x * 2


@pytest.mark.parametrize('strategy,devices', [('loop', 1), ('loop', 2), ('vmap', 2),
                                              ('unroll', 2)])
def test_map_equals_per_model_calls(strategy, devices):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3, 5)).astype(np.float32)
  w = rng.normal(size=(4, 5, 2)).astype(np.float32)
  pop = popmap.Population(strategy, popmap.make_mesh(devices))
  assert pop.padded_size(3) == (3 if strategy == 'loop' else 4)
  mapped = pop.map(_fn, (0, 0, None))
  out, doubled = mapped(pop.place(x), pop.place(w), np.float32(3.0))
  got, got2 = pop.gather(out), pop.gather(doubled)
  for m in range(4):
    want, want2 = _fn(x[m], w[m], np.float32(3.0))
    np.testing.assert_allclose(got['y'][m], want['y'], rtol=1e-6)
    np.testing.assert_allclose(got['n'][m], want['n'], rtol=1e-6)
    np.testing.assert_array_equal(got2[m], want2)
  assert isinstance(got['y'], np.ndarray) and got['y'].shape == (4, 3, 2)
  if strategy == 'loop':  # Models alternate over the mesh's devices.
    placed = pop.place(x).models
    assert [a.devices() for a in placed] == [{pop.devices[m % devices]} for m in range(4)]
  else:
    assert len(pop.place(x).sharding.device_set) == devices
  programs = devices if strategy == 'loop' else 1     # loop: one executable per device
  assert popmap.compiled_count(mapped) == programs
  mapped(pop.place(x + 1), pop.place(w), np.float32(2.0))   # same shapes: no new program
  assert popmap.compiled_count(mapped) == programs


def test_shared_values_and_python_pieces():
  pop = popmap.Population('loop', popmap.make_mesh(2))
  table = np.arange(10, dtype=np.float32)
  first = jax.jit(lambda i, t: t[i] * 2)
  second = jax.jit(lambda v: v + 1)
  run = pop.map(lambda i, t: second(first(i, t)), (0, None), compile=False)
  got = pop.gather(run(pop.place(np.asarray([1, 4, 7])), pop.place(table, shared=True)))
  np.testing.assert_array_equal(got, [3, 9, 15])


def test_bad_uses_are_clear_errors():
  with pytest.raises(ValueError, match='unknown strategy'):
    popmap.Population('pmap')
  with pytest.raises(ValueError, match='does not fit'):
    popmap.make_mesh(3)
  pop = popmap.Population('vmap')
  with pytest.raises(ValueError, match='loop strategy'):
    pop.map(lambda x: x, (0,), compile=False)
  with pytest.raises(ValueError, match='model axis'):
    pop.map(lambda x: x, (None,))
