"""The filtered gradient ``sum_i w_i g_i``, leaf by leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from optax_gaf._src import base
from optax_gaf._src import gram as gram_lib


def _weighted_leaf(weights: jax.Array, leaf: jax.Array, mask: jax.Array | None) -> jax.Array:
  acc = gram_lib.accumulation_dtype(leaf.dtype)
  x = jnp.reshape(leaf, (leaf.shape[0], -1))
  if mask is not None:
    x = jnp.where(mask[:, None], x, jnp.zeros([], x.dtype))
  if x.dtype != acc:
    x = x.astype(acc)
  out = lax.dot_general(
      weights.astype(acc), x, (((0,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST, preferred_element_type=acc)
  return jnp.reshape(out, leaf.shape[1:]).astype(leaf.dtype)


def weighted_sum(
    weights: jax.Array, grads: base.MicroGrads, finite: jax.Array | None = None
) -> base.MicroGrads:
  """Returns ``sum_i weights[i] * grads[i]`` per leaf, in each leaf's dtype.

  Args:
    weights: ``[K]`` weights (zero for dropped microgradients).
    grads: pytree with leading axis K.
    finite: optional ``[K]`` bool mask. Where some entry is False, those
      microgradients are zeroed before the sum so their NaN/Inf cannot leak
      through a zero weight (``0 * nan = nan``). The masking pass only runs
      when a non-finite microgradient is present.

  Returns:
    A pytree shaped like one microgradient.
  """
  plain = lambda: jax.tree.map(lambda x: _weighted_leaf(weights, x, None), grads)
  if finite is None:
    return plain()
  masked = lambda: jax.tree.map(lambda x: _weighted_leaf(weights, x, finite), grads)
  return lax.cond(jnp.all(finite), plain, masked)
