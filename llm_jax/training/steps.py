"""Train state, loss, and the jit-compiled train/eval steps partitioned over a mesh."""

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from llm_jax import model as model_lib
from llm_jax import sharding

BATCH_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def cross_entropy(logits, targets, loss_mask, z_loss: float = 0.0):
  """Summed next-token cross-entropy (float32) and z-loss over masked positions, token count."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss_mask = loss_mask.astype(jnp.float32)
  ce_sum = jnp.sum((log_z - target_logits) * loss_mask)
  z_sum = z_loss * jnp.sum(jnp.square(log_z) * loss_mask)
  return ce_sum, z_sum, jnp.sum(loss_mask)


def _summed_loss(params, batch, model_config, z_loss):
  logits = model_lib.Transformer(model_config).apply(
      {'params': params}, batch['inputs'], positions=batch['positions'],
      segment_ids=batch['segment_ids'])
  ce_sum, z_sum, tokens = cross_entropy(logits, batch['targets'], batch['loss_mask'], z_loss)
  return ce_sum + z_sum, (ce_sum, tokens)


def accumulate_gradients(params, batch, model_config, z_loss: float, accum_steps: int):
  """Gradient of the summed loss, accumulated over `accum_steps` microbatches in float32.

  Summing (not averaging) per microbatch and dividing once by the total token count makes k
  microbatches of size b give the same update as one batch of size k*b.
  """
  grad_fn = jax.value_and_grad(_summed_loss, has_aux=True)
  if accum_steps == 1:
    (_, (ce_sum, tokens)), grads = grad_fn(params, batch, model_config, z_loss)
    return grads, ce_sum, tokens

  def split(x):  # [B, T] -> [k, B/k, T], keeping the batch dimension sharded.
    x = x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])
    return nn.with_logical_constraint(x, (None, 'act_batch', 'act_seq'))

  micro = jax.tree.map(split, batch)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def body(carry, microbatch):
    grads_sum, ce_total, token_total = carry
    (_, (ce_sum, tokens)), grads = grad_fn(params, microbatch, model_config, z_loss)
    grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
    return (grads_sum, ce_total + ce_sum, token_total + tokens), None

  (grads, ce_sum, tokens), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
  return grads, ce_sum, tokens


def apply_guarded_update(state: TrainState, grads, ce_sum, tokens, *, tx, schedule: Callable):
  """The update for summed gradients of `tokens` target tokens, skipped when non-finite.

  Returns (new state, metrics): a non-finite loss or gradient leaves the parameters and the
  optimizer state untouched (the step counter still advances).
  """
  denom = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  loss = ce_sum / denom
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply_update(_):
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), new_opt_state

  # A branch, not a where over every leaf: selecting element-wise costs a full pass over the
  # parameters and moments each step.
  params, opt_state = jax.lax.cond(finite, apply_update,
                                   lambda _: (state.params, state.opt_state), None)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'tokens': tokens, 'finite': finite,
             'learning_rate': schedule(state.step)}
  return new_state, metrics


def train_step(state: TrainState, batch, *, model_config, tx, schedule: Callable,
               z_loss: float = 0.0, accum_steps: int = 1):
  """One optimizer update. A non-finite loss or gradient leaves the state untouched."""
  grads, ce_sum, tokens = accumulate_gradients(state.params, batch, model_config, z_loss,
                                               accum_steps)
  return apply_guarded_update(state, grads, ce_sum, tokens, tx=tx, schedule=schedule)


def eval_step(params, batch, *, model_config):
  """Summed cross-entropy (nats) and scored-token count of one batch."""
  _, (ce_sum, tokens) = _summed_loss(params, batch, model_config, 0.0)
  return {'loss_sum': ce_sum, 'tokens': tokens}


def abstract_train_state(model_config, tx, batch_shape=(1, 8)):
  """TrainState of ShapeDtypeStructs whose leaves keep their logical-axis boxes."""

  def init(key):
    tokens = jnp.zeros(batch_shape, jnp.int32)
    params = model_lib.Transformer(model_config).init(key, tokens)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.eval_shape(init, jax.random.key(0)), init


def create_train_state(model_config, tx, mesh, rules, seed: int):
  """Initialises the state directly sharded over the mesh; returns (state, state_shardings)."""
  abstract, init = abstract_train_state(model_config, tx)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  with sharding.activate(mesh, rules):
    state = jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(
        jax.random.key(seed))
  return state, shardings


def batch_shardings(mesh, rules, shape):
  spec = sharding.logical_to_spec(('act_batch', 'act_seq'), shape, mesh, rules)
  return {key: NamedSharding(mesh, spec) for key in BATCH_KEYS}


def jit_train_step(model_config, tx, schedule, state_shardings, mesh, rules, batch_shape,
                   z_loss=0.0, accum_steps=1):
  """train_step compiled with explicit shardings; the input state is donated."""
  if batch_shape[0] % accum_steps:
    raise ValueError(f'global batch {batch_shape[0]} is not divisible by '
                     f'grad_accum_steps={accum_steps}')
  step = functools.partial(train_step, model_config=model_config, tx=tx, schedule=schedule,
                           z_loss=z_loss, accum_steps=accum_steps)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings(mesh, rules, batch_shape)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(model_config, param_shardings, mesh, rules, batch_shape):
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(functools.partial(eval_step, model_config=model_config),
                 in_shardings=(param_shardings, batch_shardings(mesh, rules, batch_shape)),
                 out_shardings=replicated)
