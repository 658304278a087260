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
import ctypes.util

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2 ** 31 - 1


def retain_freed_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse instead of returning it to the kernel.

  One arena (XLA allocates from worker threads, whose arenas could not hold the buffer), no
  mmap for large blocks, and no trimming of the heap top. The process's resident memory then
  stays at its peak, which a training job reaches in its first step anyway. Call it before
  JAX starts its threads (before the first computation). Returns whether glibc accepted the
  settings (False, changing nothing, when the C library is not glibc).
  """
  name = ctypes.util.find_library('c')
  libc = ctypes.CDLL(name) if name else None
  if libc is None or not hasattr(libc, 'mallopt') or not hasattr(libc, 'gnu_get_libc_version'):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
