"""host_memory.retain_freed_memory: XLA:CPU's per-execution temporaries stop page-faulting."""

import statistics
import subprocess
import sys
import textwrap

import pytest

_PROGRAM = textwrap.dedent("""
    import resource, sys
    from llm_jax import host_memory
    if sys.argv[1] == 'retain':
      assert host_memory.retain_freed_memory()
    import jax, jax.numpy as jnp

    @jax.jit
    def step(x, w):
      # y [4096, 4096] (64 MiB) feeds two reductions: a temporary buffer of the execution.
      y = x @ w
      return y.sum() + (y * y).sum()

    x, w = jnp.ones((4096, 256), jnp.float32), jnp.ones((256, 4096), jnp.float32)
    for _ in range(3):  # compilation, then the heap grows to the step's peak
      step(x, w).block_until_ready()
    for _ in range(17):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step(x, w).block_until_ready()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _median_page_faults_per_step(mode: str) -> float:
  result = subprocess.run([sys.executable, '-c', _PROGRAM, mode], capture_output=True, text=True,
                          env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'}, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return statistics.median(int(line) for line in result.stdout.split())


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning')
def test_retained_memory_stops_per_step_page_faults():
  buffer_pages = 64 * 2 ** 20 // 4096
  # Default glibc: the 64 MiB buffer is a fresh mmap each step, faulted in page by page.
  assert _median_page_faults_per_step('default') > 0.9 * buffer_pages
  # Retained: steps reuse heap pages (now and then the heap still grows by a buffer, when a
  # step's allocation comes before the previous one's asynchronous free).
  assert _median_page_faults_per_step('retain') < 0.1 * buffer_pages
