"""The single-device CPU filter: one pass over the microgradients, not two.

The plain filter reads the K microgradients twice: once for the Gram matrix,
once for the weighted sum ``sum_i w_i g_i``. Plain averaging reads them once.
On CPU, where a pass over ``K x P`` floats is bound by memory bandwidth, that
second pass is most of GAF's cost in a train step.

Here the native kernel computes each leaf's Gram matrix and the plain sum
``S = sum_i g_i`` in the same pass (``native_gram.gram_and_sum``). When every
microgradient is finite and accepted, the update is written as
``a0 * S + sum_i (w_i - a0) g_i`` with ``a0`` the smallest weight, and the
combine kernel (``native_gram.combine``) reads only the rows whose
coefficient ``w_i - a0`` is not zero. With ``combine="mean"`` all weights are
equal, so when all agree the update is ``S / K`` and no microgradient is read
a second time. All coefficients are then non-negative, so every element has
the same rounding-error bound as the direct sum. Otherwise (a rejected or
dropped microgradient, or no saving) the update is the direct
``sum_i w_i g_i`` over the nonzero weights only. A rejected microgradient is
never subtracted from ``S``: where it is large and the accepted ones are
small (or zero, as in the rows of an embedding that a microbatch does not
touch), ``S - g_r`` would leave rounding error, or even the wrong sign, in
elements whose true update is tiny or zero, and an optimizer that scales
each element (Adam) would turn that into a full step. Rows with zero weight
are never read, so dropped NaN/Inf cannot leak into the update.

Small leaves (biases, norm scales) are concatenated into one matrix first,
so that they take one call of each kernel in all (``group_small_leaves``).

Used for float32 microgradients on single-device CPU runs when the native
kernel is available (the same conditions as the native Gram matrix).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from optax_gaf._src import agreement as agreement_lib
from optax_gaf._src import base
from optax_gaf._src import combine as combine_lib
from optax_gaf._src import gram as gram_lib
from optax_gaf._src import native_gram

# Leaves of at most this many values (K x n) share one kernel call with the
# other small leaves (see group_small_leaves).
_SMALL_ELEMENTS = 8192

# Weights at least this many float32 epsilons apart (relative; more at large
# K, see split_weights) count as different.
_SAME_ULPS = 4


def applicable(grads: base.MicroGrads) -> bool:
  """Whether :func:`filter_microgradients` runs natively for these gradients."""
  leaves = jax.tree.leaves(grads)
  return (bool(leaves) and all(jnp.result_type(x) == jnp.float32 for x in leaves)
          and native_gram.usable())


def filter_microgradients(
    grads: base.MicroGrads, tau: jax.Array, combine: base.Combine
) -> tuple[base.Updates, agreement_lib.Agreement]:
  """``transform.filter_microgradients`` in one pass (see the module docstring).

  Args:
    grads: float32 microgradients with a leading axis K (validated).
    tau: threshold at this step.
    combine: fold rule.

  Returns:
    ``(filtered, agreement)`` as ``transform.filter_microgradients``.
  """
  leaves, treedef = jax.tree.flatten(grads)
  blocks = group_small_leaves([gram_lib.as_matrix(x) for x in leaves])
  grams, sums = zip(*(_gram_and_sum(m) for _, m in blocks))
  gram = functools.reduce(jnp.add, grams)
  agreement = agreement_lib.weights_from_gram(gram, tau, combine)
  coef, a0 = split_weights(agreement.weights, agreement.finite)
  outs = [None] * len(leaves)
  for (members, m), total in zip(blocks, sums):
    out = _combine(m, total, coef, a0)
    starts = np.cumsum([0] + [math.prod(leaves[i].shape[1:]) for i in members])
    for i, start, stop in zip(members, starts[:-1], starts[1:]):
      piece = out if len(members) == 1 else out[start:stop]
      outs[i] = jnp.reshape(piece, leaves[i].shape[1:])
  return jax.tree.unflatten(treedef, outs), agreement


def group_small_leaves(mats: list[jax.Array]) -> list[tuple[list[int], jax.Array]]:
  """Joins the small ``[K, n]`` leaves into one matrix, side by side.

  Each kernel call costs about a microsecond besides its work, as much as
  copying a few tens of kilobytes; models have many small leaves (biases,
  norm scales). Leaves with at most ``_SMALL_ELEMENTS`` values (K x n) are
  concatenated along n into one matrix, so they take one Gram-and-sum call
  and one combine call in all; each larger leaf keeps its own calls (and is
  never copied).

  Args:
    mats: the leaves as ``[K, n_i]`` matrices.

  Returns:
    ``[(leaf indices, matrix), ...]``: each larger leaf alone, then the small
    leaves (if there are at least two) as one block in leaf order.
  """
  small = [i for i, m in enumerate(mats) if m.size <= _SMALL_ELEMENTS]
  if len(small) < 2:
    return [([i], m) for i, m in enumerate(mats)]
  group = (small, jnp.concatenate([mats[i] for i in small], axis=1))
  return [([i], m) for i, m in enumerate(mats) if m.size > _SMALL_ELEMENTS] + [group]


def split_weights(weights: jax.Array, finite: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes ``sum_i w_i g_i`` as ``a0 * sum_i g_i + sum_i coef_i g_i``.

  Args:
    weights: ``[K]`` filter weights (zero for rejected and dropped ones).
    finite: ``[K]`` mask of finite microgradients.

  Returns:
    ``(coef, a0)``: float32 ``[K]`` and scalar. When every microgradient is
    finite and has a nonzero weight, and this reads fewer rows than the
    direct sum, ``a0`` is the smallest weight and ``coef = w - a0 >= 0``
    (zero for weights within a few ulps of ``a0``). Otherwise ``a0 = 0`` and
    ``coef = w`` (zero for non-finite rows).
  """
  w = weights.astype(jnp.float32)
  everyone = jnp.all(finite) & jnp.all(w != 0)
  smallest = jnp.min(w)
  # The fold's weights for one count differ in their last bits, by about
  # K / 40 ulps at large K; weights within max(4, K) ulps of the smallest
  # count as equal to it (a change within the K-term sum's own rounding
  # bound of about K ulps).
  tol = max(_SAME_ULPS, w.shape[0]) * jnp.finfo(jnp.float32).eps
  shared = jnp.abs(w - smallest) <= tol * jnp.abs(smallest)
  rest = jnp.where(shared, 0.0, w - smallest)
  reads_split = jnp.sum(~shared) + 1  # + the sum S; the direct sum reads all K
  split = everyone & (reads_split < w.shape[0])
  a0 = jnp.where(split, smallest, 0.0)
  coef = jnp.where(split, rest, jnp.where(finite, w, 0.0))
  return coef, a0


@jax.custom_jvp
def _gram_and_sum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x @ x.T, sum(x, 0))`` of a float32 ``[K, n]`` leaf in one pass on CPU."""
  return lax.platform_dependent(
      x, cpu=native_gram.gram_and_sum,
      default=lambda x: (gram_lib.dot(x, x, jnp.dtype(jnp.float32)), jnp.sum(x, axis=0)))


@_gram_and_sum.defjvp
def _gram_and_sum_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _gram_and_sum(x), (gram_lib.gram_tangent(x, dx), jnp.sum(dx, axis=0))


@jax.custom_jvp
def _combine(x: jax.Array, total: jax.Array, coef: jax.Array, a0: jax.Array) -> jax.Array:
  """``a0 * total + sum_{coef_i != 0} coef_i x_i``; the kernel skips unused rows."""
  return lax.platform_dependent(
      x, total, coef, a0, cpu=native_gram.combine, default=_combine_xla)


def _combine_xla(x, total, coef, a0):
  rows = combine_lib.unrolled_leaf(coef, x, coef != 0)
  return jnp.where(a0 != 0, a0 * total, 0.0) + rows


@_combine.defjvp
def _combine_jvp(primals, tangents):
  x, total, coef, a0 = primals
  dx, dtotal, dcoef, da0 = tangents
  # Rows that are not finite have zero coefficients and must stay out of the
  # tangent too (0 * nan = nan); ``a0`` is nonzero only when all are finite.
  rows = jnp.all(jnp.isfinite(x), axis=1)
  dx = jnp.where(rows[:, None], dx, 0.0)
  xs = jnp.where(rows[:, None], x, 0.0)
  # ``total`` is finite whenever ``a0 != 0``; where it is not, the a0 tangent
  # is taken as zero (a0 is a piecewise-constant choice of the filter).
  dout = jnp.where(a0 != 0, a0 * dtotal, 0.0) + da0 * jnp.where(jnp.isfinite(total), total, 0.0)
  dout = dout + jnp.dot(dcoef, xs, precision=lax.Precision.HIGHEST)
  dout = dout + jnp.dot(coef, dx, precision=lax.Precision.HIGHEST)
  return _combine(x, total, coef, a0), dout
