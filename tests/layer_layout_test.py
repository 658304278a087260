"""Stacked and unrolled decoder layers convert into each other and compute the same logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import model as model_lib
from llm_jax.model import layer_layout

SCANNED = model_lib.ModelConfig(vocab_size=128, embed_dim=32, num_layers=3, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64,
                                scan_layers=True)
UNROLLED = SCANNED.replace(scan_layers=False)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, SCANNED.vocab_size)


@functools.lru_cache(maxsize=None)
def _init(config):
  init = jax.jit(lambda key: model_lib.unbox(model_lib.Transformer(config).init(key, TOKENS)))
  return init(jax.random.key(0))['params']


def _logits(config, params):
  return jax.jit(model_lib.Transformer(config).apply)({'params': params}, TOKENS)


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), model_lib.unbox(tree))


@pytest.mark.parametrize('source,target', [(SCANNED, UNROLLED), (UNROLLED, SCANNED)],
                         ids=['stacked_to_unrolled', 'unrolled_to_stacked'])
def test_converted_params_give_the_same_logits(source, target):
  params = _init(source)
  converted = layer_layout.convert_layer_layout(params, source.num_layers,
                                                to_scanned=target.scan_layers)
  assert _shapes(converted) == _shapes(model_lib.abstract_params(target))
  np.testing.assert_allclose(_logits(target, converted), _logits(source, params),
                             rtol=1e-5, atol=1e-6)
  back = layer_layout.convert_layer_layout(converted, source.num_layers,
                                           to_scanned=source.scan_layers)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('source,target', [(SCANNED, UNROLLED), (UNROLLED, SCANNED)],
                         ids=['stacked_to_unrolled', 'unrolled_to_stacked'])
def test_abstract_boxed_tree_matches_the_other_layout(source, target):
  converted = layer_layout.convert_layer_layout(model_lib.abstract_params(source),
                                                source.num_layers, to_scanned=target.scan_layers)
  expected = model_lib.abstract_params(target)
  assert _shapes(converted) == _shapes(expected)
  is_box = lambda x: hasattr(x, 'names')
  names = lambda tree: [tuple(b.names) for b in jax.tree.leaves(tree, is_leaf=is_box)]
  assert names(converted) == names(expected)


def test_optimizer_state_converts_like_params():
  tx = optax.adamw(1e-3)
  params = _init(SCANNED)
  # One update, so that Adam's moments differ from layer to layer.
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                       params)
  state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[1])(grads, params)
  converted = layer_layout.convert_layer_layout(state, SCANNED.num_layers, to_scanned=False)
  unrolled_params = layer_layout.convert_layer_layout(params, SCANNED.num_layers, False)
  assert jax.tree.structure(converted) == jax.tree.structure(
      jax.eval_shape(tx.init, unrolled_params))
  for i in range(SCANNED.num_layers):
    jax.tree.map(lambda unrolled, stacked, i=i: np.testing.assert_array_equal(unrolled,
                                                                              stacked[i]),
                 converted[0].mu[f'layers_{i}'], state[0].mu['layers'])


def test_same_layout_is_unchanged_and_wrong_count_is_named():
  params = _init(UNROLLED)
  jax.tree.map(np.testing.assert_array_equal,
               layer_layout.convert_layer_layout(params, 3, to_scanned=False), params)
  with pytest.raises(ValueError, match=r'expected layers_0 \.\.\. layers_3 \(num_layers=4\); '
                                       r"the tree has \['layers_0', 'layers_1', 'layers_2'\]"):
    layer_layout.convert_layer_layout(params, 4, to_scanned=True)
  stacked = layer_layout.convert_layer_layout(params, 3, to_scanned=True)
  with pytest.raises(ValueError, match=r'leading axes of .layers. are \[3\], not num_layers=2'):
    layer_layout.convert_layer_layout(stacked, 2, to_scanned=False)
