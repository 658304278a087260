"""LoRA: low-rank adapters trained on a frozen base model, without a second Transformer.

Adapters are their own parameter tree, mirroring the base tree at each targeted kernel:

  base   layers/attention/q_proj          [L, D, N, H]   (no L without scan_layers)
  adapter layers/attention/q_proj/lora_a  [L, D, r]      (the kernel's input dims, then r)
          layers/attention/q_proj/lora_b  [L, r, N, H]   (r, then the kernel's output dims)

and `merge` returns the base tree with W + (alpha / r) * A @ B at those kernels, so the model
is the unchanged `Transformer` applied to merged parameters. The loss is a pure function of
(adapters, base) differentiated with respect to the adapters only: the base gets no gradient
and no optimizer state, may be bfloat16, and is never copied into the train state. Adapter
dimensions carry the logical axes of the kernel dimensions they pair with (`embed`, `heads`,
`mlp`...; the rank is unsharded), so the same rules shard them.

The numbers are peft's: y = x W + (alpha / r) * dropout(x) A B with A ~ U(-1/sqrt(in),
1/sqrt(in)) (peft's Kaiming-uniform default) and B = 0, so training starts at the base model.
Dropout differs in its granularity: a merged weight cannot drop per-token inputs, so each step
drops whole input features of A (one mask per layer and step, scaled by 1 / (1 - p)).
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from llm_jax import sharding
from llm_jax.model import transformer
from llm_jax.model.config import ModelConfig
from llm_jax.training import steps

# Target name -> (path of its kernel in a decoder layer, number of leading input dims).
KERNELS = {
    'q': (('attention', 'q_proj'), 1),
    'k': (('attention', 'k_proj'), 1),
    'v': (('attention', 'v_proj'), 1),
    'o': (('attention', 'o_proj'), 2),
    'gate': (('mlp', 'gate_proj'), 1),
    'up': (('mlp', 'up_proj'), 1),
    'down': (('mlp', 'down_proj'), 1),
}
TARGETS = tuple(KERNELS)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, scaling, dropout and the projections that get adapters."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = ('q', 'v')

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'lora.rank={self.rank}; expected a positive integer')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'lora.dropout={self.dropout}; expected 0 <= dropout < 1')
    unknown = [t for t in self.targets if t not in KERNELS]
    if unknown or not self.targets:
      raise ValueError(f'lora.targets={self.targets}: expected a non-empty subset of {TARGETS}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_section(cls, section: ml_collections.ConfigDict) -> 'LoraConfig':
    """From `config.lora` (rank, alpha, dropout, targets as a tuple or comma-separated text)."""
    targets = section.targets
    if isinstance(targets, str):
      targets = tuple(t.strip() for t in targets.split(',') if t.strip())
    return cls(int(section.rank), float(section.alpha), float(section.dropout), tuple(targets))


def layer_prefixes(config: ModelConfig) -> list[tuple[str, ...]]:
  """Where decoder layers live in the parameter tree: one stacked subtree, or one per layer."""
  if config.scan_layers:
    return [('layers',)]
  return [(f'layers_{i}',) for i in range(config.num_layers)]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def adapter_specs(model_config: ModelConfig, lora_config: LoraConfig):
  """(kernel path, A shape, A axes, B shape, B axes, fan-in) of every adapter.

  Read from the base's boxed abstract parameters, so adapters follow its layout and axes.
  """
  base = transformer.abstract_params(model_config)
  specs = []
  for prefix in layer_prefixes(model_config):
    for target in lora_config.targets:
      kernel_path, num_in = KERNELS[target]
      boxed = _get(base, prefix + kernel_path)
      shape, names = boxed.value.shape, tuple(boxed.names)
      lead = 1 if model_config.scan_layers else 0
      cut = lead + num_in
      a_shape = shape[:cut] + (lora_config.rank,)
      b_shape = shape[:lead] + (lora_config.rank,) + shape[cut:]
      specs.append((prefix + kernel_path, a_shape, names[:cut] + (None,), b_shape,
                    names[:lead] + (None,) + names[cut:], math.prod(shape[lead:cut])))
  return specs


def init_adapters(key: jax.Array, model_config: ModelConfig, lora_config: LoraConfig):
  """Adapters boxed with logical axes: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0."""
  adapters = {}
  specs = adapter_specs(model_config, lora_config)
  for i, (path, a_shape, a_axes, b_shape, b_axes, fan_in) in enumerate(specs):
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
    node = adapters
    for part in path:
      node = node.setdefault(part, {})
    node['lora_a'] = nn.LogicallyPartitioned(a, a_axes)
    node['lora_b'] = nn.LogicallyPartitioned(jnp.zeros(b_shape, jnp.float32), b_axes)
  return adapters


def abstract_adapters(model_config: ModelConfig, lora_config: LoraConfig):
  """The boxed adapter tree as ShapeDtypeStructs (no memory)."""
  return jax.eval_shape(lambda k: init_adapters(k, model_config, lora_config),
                        jax.random.key(0))


def flatten_adapters(adapters) -> dict[tuple[str, ...], tuple[Any, Any]]:
  """{kernel path: (A, B)} of an (unboxed) adapter tree."""
  flat = {}

  def visit(node, path):
    if 'lora_a' in node:
      flat[path] = (node['lora_a'], node['lora_b'])
      return
    for key, child in node.items():
      visit(child, path + (key,))

  visit(nn.unbox(adapters), ())
  return flat


def merge(base, adapters, lora_config: LoraConfig, dropout_key: Optional[jax.Array] = None,
          dtype=None):
  """The base tree with W + scale * A @ B at every adapted kernel (other leaves shared).

  With `dropout_key` and lora_config.dropout > 0, input features of A are dropped (see the
  module docstring). The sum is formed in float32 and stored in `dtype` (default: the base
  kernel's). Steps pass the model's compute dtype, so a bfloat16 base computing in float32 does
  not round small adapter updates away.
  """
  merged = jax.tree.map(lambda x: x, nn.unbox(base))
  for index, (path, (a, b)) in enumerate(flatten_adapters(adapters).items()):
    kernel = _get(merged, path)
    num_lead = a.ndim + b.ndim - 2 - kernel.ndim  # the stacked layer axis, in both A and B
    lead = a.shape[:num_lead]
    a2 = a.reshape(lead + (-1, a.shape[-1])).astype(jnp.float32)  # [lead.., in, r]
    if dropout_key is not None and lora_config.dropout > 0:
      keep = 1.0 - lora_config.dropout
      mask = jax.random.bernoulli(jax.random.fold_in(dropout_key, index), keep,
                                  a2.shape[:-1] + (1,))
      a2 = a2 * mask.astype(jnp.float32) / keep
    b2 = b.reshape(lead + (b.shape[num_lead], -1)).astype(jnp.float32)  # [lead.., r, out]
    delta = lora_config.scale * jnp.matmul(a2, b2)
    node = merged
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(
        dtype or kernel.dtype)
  return merged


def apply(model_config: ModelConfig, lora_config: LoraConfig, base, adapters, tokens,
          **kwargs):
  """Logits of the adapted model: `Transformer.apply` on the merged parameters."""
  params = merge(base, adapters, lora_config, dtype=model_config.dtype)
  return transformer.Transformer(model_config).apply({'params': params}, tokens, **kwargs)


def summed_loss(adapters, base, batch, model_config: ModelConfig, lora_config: LoraConfig,
                z_loss: float = 0.0, dropout_key: Optional[jax.Array] = None):
  """(summed loss, (summed cross-entropy, token count)) of a batch; differentiable in adapters."""
  params = merge(base, adapters, lora_config, dropout_key, dtype=model_config.dtype)
  logits = transformer.Transformer(model_config).apply(
      {'params': params}, batch['inputs'], positions=batch['positions'],
      segment_ids=batch['segment_ids'])
  ce_sum, z_sum, tokens = steps.cross_entropy(logits, batch['targets'], batch['loss_mask'],
                                              z_loss)
  return ce_sum + z_sum, (ce_sum, tokens)


def train_step(state: steps.TrainState, base, batch, *, model_config: ModelConfig,
               lora_config: LoraConfig, tx, schedule, z_loss: float = 0.0, seed: int = 0):
  """One optimizer update of the adapters (`state.params`); the base is read, never written.

  As `steps.train_step`: the mean loss over target tokens, and a non-finite loss or gradient
  leaves the state untouched.
  """
  dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
  (_, (ce_sum, tokens)), grads = grad_fn(state.params, base, batch, model_config, lora_config,
                                         z_loss, dropout_key)
  return steps.apply_guarded_update(state, grads, ce_sum, tokens, tx=tx, schedule=schedule)


def abstract_state(model_config: ModelConfig, lora_config: LoraConfig, tx):
  """TrainState of boxed ShapeDtypeStructs holding adapters and their optimizer state only."""

  def init(key):
    adapters = init_adapters(key, model_config, lora_config)
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                            opt_state=tx.init(nn.unbox(adapters)))

  return jax.eval_shape(init, jax.random.key(0)), init


def create_state(model_config: ModelConfig, lora_config: LoraConfig, tx, mesh, rules,
                 seed: int):
  """Adapters and optimizer state initialised sharded over the mesh; (state, shardings)."""
  abstract, init = abstract_state(model_config, lora_config, tx)
  shardings = _state_shardings(abstract, mesh, rules)
  with sharding.activate(mesh, rules):
    state = jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(
        jax.random.key(seed))
  return state, shardings


def _state_shardings(abstract_state_tree, mesh, rules):
  """Optimizer moments are plain trees shaped like the adapters: give them the same shardings."""
  adapter_shardings = sharding.tree_shardings(abstract_state_tree.params, mesh, rules)
  unboxed = nn.unbox(abstract_state_tree)
  adapter_structure = jax.tree.structure(unboxed.params)

  def opt_sharding(node):
    if jax.tree.structure(node) == adapter_structure:
      return adapter_shardings
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), node)

  opt_shardings = jax.tree.map(opt_sharding, unboxed.opt_state,
                               is_leaf=lambda n: jax.tree.structure(n) == adapter_structure)
  return steps.TrainState(step=NamedSharding(mesh, PartitionSpec()), params=adapter_shardings,
                          opt_state=opt_shardings)


def base_shardings(model_config: ModelConfig, mesh, rules):
  """Shardings of the base parameters by the logical-axis rules."""
  return sharding.tree_shardings(transformer.abstract_params(model_config), mesh, rules)


def jit_train_step(model_config: ModelConfig, lora_config: LoraConfig, tx, schedule,
                   state_shardings, mesh, rules, batch_shape: Sequence[int],
                   z_loss: float = 0.0, seed: int = 0):
  """`train_step` compiled with explicit shardings; the state is donated, the base is not."""
  step = functools.partial(train_step, model_config=model_config, lora_config=lora_config,
                           tx=tx, schedule=schedule, z_loss=z_loss, seed=seed)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, base_shardings(model_config, mesh, rules),
                                     steps.batch_shardings(mesh, rules, batch_shape)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def eval_step(adapters, base, batch, *, model_config: ModelConfig, lora_config: LoraConfig):
  """Summed cross-entropy (nats) and scored-token count of one batch, as `steps.eval_step`."""
  _, (ce_sum, tokens) = summed_loss(adapters, base, batch, model_config, lora_config)
  return {'loss_sum': ce_sum, 'tokens': tokens}


def build_program(config: ml_collections.ConfigDict, program, base):
  """The training program of `builder.build(config)` turned into a LoRA one over `base`.

  Its state holds the adapters and their optimizer state; its steps read `base` (already
  placed in `base_shardings`) and never write it. Eval steps take the adapters as `params`.
  """
  if config.optim.grad_accum_steps != 1:
    raise ValueError('LoRA training takes optim.grad_accum_steps=1; got '
                     f'{config.optim.grad_accum_steps}')
  model_config, mesh, rules = program.model_config, program.mesh, program.rules
  lora_config = LoraConfig.from_section(config.lora)
  abstract, init = abstract_state(model_config, lora_config, program.tx)
  state_shardings = _state_shardings(abstract, mesh, rules)
  step = jit_train_step(model_config, lora_config, program.tx, program.schedule,
                        state_shardings, mesh, rules, program.batch_shape,
                        config.optim.z_loss, config.seed)
  replicated = NamedSharding(mesh, PartitionSpec())
  evaluate = jax.jit(
      functools.partial(eval_step, model_config=model_config, lora_config=lora_config),
      in_shardings=(state_shardings.params, base_shardings(model_config, mesh, rules),
                    steps.batch_shardings(mesh, rules, program.eval_batch_shape)),
      out_shardings=replicated)
  return dataclasses.replace(
      program, abstract_state=abstract, state_shardings=state_shardings,
      train_step=lambda state, batch: step(state, base, batch),
      eval_step=lambda adapters, batch: evaluate(adapters, base, batch), _init=init)
