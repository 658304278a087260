"""RMSNorm as in Llama: normalise in float32, scale, then cast back to the compute dtype."""

import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """Root-mean-square layer norm with a learned per-feature scale (no bias, no centering)."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
    # The reference casts the normalised activations to the input dtype before scaling.
    return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)
