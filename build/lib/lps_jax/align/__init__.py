"""The paper's LPS: Eq. 5-8 as pure functions, the second-order network (Flax branches) and
its fit (Eq. 9).

`lps_jax.align` itself is Eq. 5-8 (`lps_jax.align.alignment`).
"""
from lps_jax.align.alignment import *  # noqa: F401,F403
from lps_jax.align.alignment import __all__  # noqa: F401
