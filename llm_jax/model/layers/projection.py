"""Dense projections of [B, T, ...] activations with the batch and sequence dims folded.

`project(x, w)` computes what `jnp.einsum('BTD,DNH->BTNH', x, w)` (or 'BTNH,NHD->BTD') does, but
first folds the leading dimensions into one row dimension. The values are the same; the
backward pass is not: the weight gradient of the 3-D einsum contracts two activation dimensions
(B and T), which XLA's CPU backend lowered with transposing copies around its matmul kernel,
whereas with one row dimension it is a single matmul. Measured on a 2-core CPU, a SwiGLU block's
forward + backward took 61-68 ms as 3-D einsums and 41 ms with folded rows (PyTorch: 36-41 ms).
The kernel keeps its own dimensions (heads, head_dim, ...), so tensor-parallel shardings of the
weights are untouched: compiled for a (1, 2, 4) mesh, the train step has the same collectives as
with the 3-D einsums (merging the kernel's heads and head_dim too added ~70% more).
"""

import math

import jax
import jax.numpy as jnp

_LETTERS = 'abcdefgh'


def project(x: jax.Array, kernel: jax.Array, contracting: int = 1,
            kernel_transposed: bool = False, preferred_element_type=None) -> jax.Array:
  """Contracts the last `contracting` dims of x with the first ones of `kernel`.

  x: [..., C1..Cn]; kernel: [C1..Cn, O1..Om] -> [..., O1..Om]. With `kernel_transposed`,
  kernel is [O, C] (one dim each, e.g. a [V, D] embedding table used as output layer).
  """
  lead = x.shape[:x.ndim - contracting]
  rows = x.reshape(math.prod(lead), *x.shape[x.ndim - contracting:])
  if kernel_transposed:
    out = jnp.einsum('XC,OC->XO', rows, kernel, preferred_element_type=preferred_element_type)
    return out.reshape(*lead, kernel.shape[0])
  contracted, kept = _LETTERS[:contracting], _LETTERS[contracting:kernel.ndim]
  out = jnp.einsum(f'X{contracted},{contracted}{kept}->X{kept}', rows, kernel,
                   preferred_element_type=preferred_element_type)
  return out.reshape(*lead, *kernel.shape[contracting:])
