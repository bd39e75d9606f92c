"""Test setup: two simulated CPU devices so sharded strategies are exercised for real."""
import jax

jax.config.update('jax_num_cpu_devices', 2)
