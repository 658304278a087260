"""Learning-rate schedules and the weight-decay mask."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from configs import default
from llm_jax import model as model_lib
from llm_jax.training import optim


def _optim_config(**overrides):
  config = default.get_config().optim
  config.unlock()
  config.update(overrides)
  return config


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
def test_schedule_warms_up_then_decays_to_the_end_ratio(schedule):
  config = _optim_config(learning_rate=1e-3, warmup_steps=10, schedule=schedule,
                         end_lr_ratio=0.1)
  lr = optim.learning_rate_schedule(config, num_steps=110)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-5)
  middle = float(lr(60))
  expected = 1e-4 + 0.5 * 9e-4  # both schedules pass the midpoint of peak and end halfway
  np.testing.assert_allclose(middle, expected, rtol=1e-5)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match='warmup_cosine'):
    optim.learning_rate_schedule(_optim_config(schedule='warmup_cosine'), 10)


@pytest.mark.parametrize('decay_embeddings', [False, True])
def test_weight_decay_skips_norms_and_optionally_embeddings(decay_embeddings):
  config = model_lib.get_preset('tiny', num_layers=1)
  params = model_lib.unbox(model_lib.Transformer(config).init(
      jax.random.key(0), np.zeros((1, 4), np.int32))['params'])
  tx, _ = optim.create_optimizer(
      _optim_config(learning_rate=1.0, warmup_steps=0, schedule='constant', weight_decay=0.5,
                    decay_embeddings=decay_embeddings, grad_clip_norm=0.0), num_steps=1)
  zero_grads = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # With zero gradients only weight decay moves a parameter: p <- p * (1 - lr * wd).
  np.testing.assert_allclose(new['final_norm']['scale'], params['final_norm']['scale'])
  np.testing.assert_allclose(new['layers']['mlp_norm']['scale'],
                             params['layers']['mlp_norm']['scale'])
  np.testing.assert_allclose(new['lm_head'], 0.5 * params['lm_head'], rtol=1e-6)
  embedding = params['embedder']['embedding']
  np.testing.assert_allclose(new['embedder']['embedding'],
                             0.5 * embedding if decay_embeddings else embedding, rtol=1e-6)
  assert not isinstance(params['lm_head'], nn.LogicallyPartitioned)
