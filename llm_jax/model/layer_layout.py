"""Converts parameter trees between stacked (scan_layers=True) and unrolled decoder layers.

With `scan_layers=True` the Transformer holds its decoder layers as one `layers` subtree whose
arrays carry a leading [L] axis (logical axis 'layers'); with `scan_layers=False` it holds
`layers_0` ... `layers_{L-1}`, each without that axis. The two compute the same function, so a
checkpoint written with one setting fine-tunes or resumes with the other after
`convert_layer_layout`.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SCANNED_KEY = 'layers'
_UNROLLED_KEY = re.compile(r'layers_(\d+)')


def _unrolled_keys(num_layers: int) -> list[str]:
  return [f'layers_{i}' for i in range(num_layers)]


def _is_box(node) -> bool:
  return isinstance(node, nn.LogicallyPartitioned)


def _stack(*leaves):
  """Stacks one leaf per layer along a new leading axis (boxes get the 'layers' axis name)."""
  if _is_box(leaves[0]):
    return leaves[0].replace(value=jnp.stack([b.value for b in leaves]),
                             names=(SCANNED_KEY,) + tuple(leaves[0].names))
  return jnp.stack(leaves)


def _take(leaf, index: int):
  if _is_box(leaf):
    return leaf.replace(value=leaf.value[index], names=tuple(leaf.names)[1:])
  return leaf[index]


def _to_scanned(node: dict, num_layers: int) -> dict:
  found = sorted((k for k in node if _UNROLLED_KEY.fullmatch(k)),
                 key=lambda k: int(_UNROLLED_KEY.fullmatch(k).group(1)))
  expected = _unrolled_keys(num_layers)
  if found != expected:
    raise ValueError(f'cannot stack decoder layers: expected {expected[0]} ... {expected[-1]} '
                     f'(num_layers={num_layers}); the tree has {found}')
  result = {k: v for k, v in node.items() if k not in expected}
  result[SCANNED_KEY] = jax.tree.map(_stack, *[node[k] for k in expected], is_leaf=_is_box)
  return result


def _to_unrolled(node: dict, num_layers: int) -> dict:
  stacked = node[SCANNED_KEY]
  lengths = {(b.value if _is_box(b) else b).shape[0]
             for b in jax.tree.leaves(stacked, is_leaf=_is_box)}
  if lengths != {num_layers}:
    raise ValueError(f"cannot unroll decoder layers: the leading axes of '{SCANNED_KEY}' are "
                     f'{sorted(lengths)}, not num_layers={num_layers}')
  result = {k: v for k, v in node.items() if k != SCANNED_KEY}
  for i, key in enumerate(_unrolled_keys(num_layers)):
    result[key] = jax.tree.map(lambda leaf, i=i: _take(leaf, i), stacked, is_leaf=_is_box)
  return result


def _holds_layers(node) -> bool:
  return isinstance(node, dict) and (SCANNED_KEY in node or 'layers_0' in node)


def _convert(tree, num_layers: int, to_scanned: bool):
  def convert(node):
    if not _holds_layers(node):
      return node
    if to_scanned:
      return node if SCANNED_KEY in node else _to_scanned(node, num_layers)
    return _to_unrolled(node, num_layers) if SCANNED_KEY in node else node

  return jax.tree.map(convert, tree, is_leaf=lambda n: _holds_layers(n) or _is_box(n))


def convert_layer_layout(params: Any, num_layers: int, to_scanned: bool) -> Any:
  """Returns `params` with its decoder layers stacked (to_scanned) or unrolled.

  Every dict in the tree that holds `layers` or `layers_0`... is converted, so the same call
  converts a parameter tree, an optimizer state built from one (Adam's mu and nu), or a tree
  of boxed (nn.LogicallyPartitioned) parameters, whose logical axis names gain or lose the
  leading 'layers'. A tree already in the requested layout is returned as it is.

  Leaves may be arrays (converted with jnp.stack / indexing, outside jit: the result is on the
  default device layout, so place it with the target config's shardings afterwards) or
  jax.ShapeDtypeStructs (converted abstractly, without shardings).

  Args:
    params: a parameter tree (or any tree containing parameter-shaped dicts).
    num_layers: the model's L.
    to_scanned: True for `layers` with a leading [L] axis (scan_layers=True), False for
      `layers_0` ... `layers_{L-1}` (scan_layers=False).

  Returns:
    The converted tree.

  Raises:
    ValueError: the layers found do not match num_layers.
  """
  leaves = jax.tree.leaves(params, is_leaf=_is_box)
  values = [leaf.value if _is_box(leaf) else leaf for leaf in leaves]
  if any(isinstance(v, jax.ShapeDtypeStruct) for v in values):
    return jax.eval_shape(lambda tree: _convert(tree, num_layers, to_scanned), params)
  return _convert(params, num_layers, to_scanned)
