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


# Up to this many microgradients the weighted sum is one fused elementwise
# pass (with the NaN mask built in); above it, a matrix-vector product per leaf.
_UNROLL_MAX_K = 16


def unrolled_leaf(weights: jax.Array, leaf: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``sum_i where(mask_i, w_i * x_i, 0)`` as one loop fusion over the leaf."""
  acc = gram_lib.accumulation_dtype(leaf.dtype)
  w = weights.astype(acc)
  out = None
  for i in range(leaf.shape[0]):
    term = w[i] * leaf[i].astype(acc)
    if mask is not None:
      term = jnp.where(mask[i], term, jnp.zeros([], acc))
    out = term if out is None else out + term
  return out.astype(leaf.dtype)


def weighted_sum(
    weights: jax.Array, grads: base.MicroGrads, finite: jax.Array | None = None
) -> base.MicroGrads:
  """Returns ``sum_i weights[i] * grads[i]`` per leaf, in each leaf's dtype.

  For K <= 16 each leaf is one fused elementwise pass
  ``sum_i where(finite_i, w_i g_i, 0)`` (the select costs nothing extra, and
  no ``lax.cond`` copies the outputs); for larger K, one matrix-vector product
  per leaf, with a masking pass under ``lax.cond`` that only runs when a
  non-finite microgradient is present.

  Args:
    weights: ``[K]`` weights (zero for dropped microgradients).
    grads: pytree with leading axis K.
    finite: optional ``[K]`` bool mask. Microgradients where it is False are
      left out of the sum so their NaN/Inf cannot leak through a zero weight
      (``0 * nan = nan``).

  Returns:
    A pytree shaped like one microgradient.
  """
  leaves = jax.tree.leaves(grads)
  if leaves and leaves[0].shape[0] <= _UNROLL_MAX_K:
    return jax.tree.map(lambda x: unrolled_leaf(weights, x, finite), grads)
  plain = lambda: jax.tree.map(lambda x: _weighted_leaf(weights, x, None), grads)
  if finite is None:
    return plain()
  masked = lambda: jax.tree.map(lambda x: _weighted_leaf(weights, x, finite), grads)
  return lax.cond(jnp.all(finite), plain, masked)
