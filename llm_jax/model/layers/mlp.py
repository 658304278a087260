"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.layers.projection import project


class Mlp(nn.Module):
  """Gated MLP with SiLU activation, as in Llama."""
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [B, T, D]
    embed_dim = x.shape[-1]
    init = nn.initializers.lecun_normal()

    def kernel(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(self.dtype)

    gate = kernel('gate_proj', (embed_dim, self.mlp_dim), ('embed', 'mlp'))
    up = kernel('up_proj', (embed_dim, self.mlp_dim), ('embed', 'mlp'))
    down = kernel('down_proj', (self.mlp_dim, embed_dim), ('mlp', 'embed'))
    x = x.astype(self.dtype)
    hidden = jax.nn.silu(project(x, gate)) * project(x, up)  # [B, T, F]
    hidden = nn.with_logical_constraint(hidden, ('act_batch', 'act_seq', 'act_mlp'))
    return project(hidden, down)
