"""host_memory.retain_freed_memory: XLA:CPU's per-execution temporaries stop page-faulting."""

import os
import platform
import statistics
import subprocess
import sys
import textwrap

import pytest

from llm_jax import host_memory

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


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _huge_pages_always() -> bool:
  """Transparent huge pages 'always' fault a fresh buffer in 2 MiB pieces: few faults."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled', encoding='utf-8') as f:
      return '[always]' in f.read()
  except OSError:
    return False


def _median_page_faults_per_step(mode: str) -> float:
  # This checkout's package, whatever is installed; no inherited XLA_FLAGS (8 fake devices).
  result = subprocess.run([sys.executable, '-c', _PROGRAM, mode], capture_output=True, text=True,
                          cwd=_REPO, env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin',
                                          'PYTHONPATH': _REPO}, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return statistics.median(int(line) for line in result.stdout.split())


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='tunes glibc malloc')
def test_retained_memory_stops_per_step_page_faults():
  buffer_pages = 64 * 2 ** 20 // 4096
  if not _huge_pages_always():
    # Default glibc: the 64 MiB buffer is a fresh mmap each step, faulted in page by page.
    assert _median_page_faults_per_step('default') > 0.9 * buffer_pages
  # Retained: steps reuse heap pages (now and then the heap still grows by a buffer, when a
  # step's allocation comes before the previous one's asynchronous free).
  assert _median_page_faults_per_step('retain') < 0.1 * buffer_pages


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.runs_on_cpu_only()
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu,cpu')
  assert not host_memory.runs_on_cpu_only()
