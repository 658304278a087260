"""Test setup: 8 simulated CPU devices, configured before jax is imported anywhere."""

import os

# Tests are dominated by compilation of tiny programs: skipping XLA's CPU backend
# optimisations halves the suite's time without changing what the programs compute.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')
