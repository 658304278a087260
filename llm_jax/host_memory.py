"""Host allocator settings for jobs that run XLA's CPU backend.

XLA's CPU runtime allocates the temporaries of each execution as one buffer (about 390 MB for
the tiny preset's train step at batch 16 x 256) and frees it when the step ends. glibc serves
an allocation that large with a fresh `mmap` and returns it with `munmap`, so every step
page-faults through the whole buffer again while the kernel zeroes it: on a 2-core VM that was
~0.2 s of system time in a 0.45 s step. Keeping freed memory in the heap lets the next step
reuse the same pages (now and then the heap still grows by one buffer, when a step allocates
before the previous step's buffer has been freed on a worker thread).
"""

import ctypes
import glob
import os
import platform

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2 ** 31 - 1
# Device nodes of NVIDIA GPUs and of TPUs (v2/v3 accel, v4+ vfio).
_ACCELERATOR_NODES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def runs_on_cpu_only() -> bool:
  """Whether JAX will compute on the CPU, decided without starting JAX's backends.

  JAX_PLATFORMS decides when set; otherwise a host without GPU or TPU device nodes is CPU-only.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def retain_freed_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse instead of returning it to the kernel.

  One arena (XLA allocates from worker threads, whose arenas could not hold the buffer), no
  mmap for large blocks, and no trimming of the heap top. The process's resident memory then
  never shrinks, and can grow past the peak when differently sized allocations fragment the
  heap: meant for CPU training jobs, which reach their working set in the first steps. Call it
  before JAX starts its threads (before the first computation); afterwards it has little
  effect. Returns whether glibc accepted the settings (False, changing nothing, without glibc).
  """
  if platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(None)  # the C library this process already uses
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
