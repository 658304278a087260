"""Optimizer: AdamW with warmup + cosine/linear decay, clipping and a weight-decay mask."""

import flax
import ml_collections
import optax

SCHEDULES = ('cosine', 'linear', 'constant')


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak rate, then decay to peak * end_lr_ratio at num_steps."""
  if optim.schedule not in SCHEDULES:
    raise ValueError(f'optim.schedule={optim.schedule!r}; expected one of {SCHEDULES}')
  peak, warmup = optim.learning_rate, optim.warmup_steps
  decay_steps = max(num_steps - warmup, 1)
  end = peak * optim.end_lr_ratio
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_lr_ratio)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  return optax.join_schedules([warm, decay], [warmup])


def weight_decay_mask(params, decay_embeddings: bool):
  """True where weight decay applies: matrices, not norm scales, embeddings only by option."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {}
  for path, _ in flat.items():
    is_norm = path[-1] == 'scale'
    is_embedding = 'embedder' in path
    mask[path] = not is_norm and (decay_embeddings or not is_embedding)
  return flax.traverse_util.unflatten_dict(mask)


def create_optimizer(optim: ml_collections.ConfigDict, num_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(optim, num_steps)
  chain = []
  if optim.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  chain.append(optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
      mask=lambda p: weight_decay_mask(p, optim.decay_embeddings)))
  return optax.chain(*chain), schedule
