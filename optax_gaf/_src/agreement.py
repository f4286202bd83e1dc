"""The sequential agreement filter, run on scalars only.

GAF folds microgradients into a running reference ``g`` one at a time. Every
decision needs only three numbers: ``<g, g_i>``, ``|g|^2`` and ``|g_i|^2``.
:func:`fold_step` is that decision (shared by the vmapped, multi-device and
streaming paths); :func:`agreement_weights` runs it over a K x K Gram matrix
and returns the weights ``w`` with ``g = sum_i w_i g_i``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_gaf._src import base


# Cosine distances up to this many machine epsilons count as 0 (parallel).
_PARALLEL_EPS = 16


class FoldCarry(NamedTuple):
  """Scalar state of the sequential fold.

  Attributes:
    count: number of microgradients folded into the reference (0 until the
      first finite microgradient becomes the reference).
    norm2: squared norm ``|g|^2`` of the running reference.
  """
  count: jax.Array
  norm2: jax.Array


class FoldStep(NamedTuple):
  """One decision of the filter: ``g <- alpha * g + beta * g_i``.

  Attributes:
    carry: the updated :class:`FoldCarry`.
    alpha: coefficient of the old reference.
    beta: coefficient of the new microgradient.
    distance: cosine distance ``1 - cos(g, g_i)`` (0 when nothing was
      compared: for the reference itself and for non-finite ``g_i``).
    accepted: True if ``g_i`` was folded in (reference included).
    compared: True if ``g_i`` was compared with a reference.
  """
  carry: FoldCarry
  alpha: jax.Array
  beta: jax.Array
  distance: jax.Array
  accepted: jax.Array
  compared: jax.Array


def init_carry(dtype=jnp.float32) -> FoldCarry:
  return FoldCarry(count=jnp.zeros([], jnp.int32), norm2=jnp.zeros([], dtype))


def cosine_distance(dot: jax.Array, norm2_a: jax.Array, norm2_b: jax.Array) -> jax.Array:
  """``1 - cos`` from an inner product and squared norms; cos is 0 at zero norm.

  The denominator is ``sqrt(|a|^2 |b|^2)``, which is exactly ``|a|^2`` when
  the two norms are equal, so identical microgradients have distance exactly
  0 (``sqrt(|a|^2) * sqrt(|b|^2)`` can round above ``<a, a>``, and then even
  ``tau = 0`` would reject a copy). Where that product over- or underflows
  the two square roots are multiplied instead. The cosine is clipped to
  [-1, 1] against rounding, and a distance within ``_PARALLEL_EPS`` machine
  epsilons of 0 is 0: the running reference's norm carries a few roundings,
  so copies of one microgradient come out 1-2 epsilons apart after the
  third fold (float32: 16 eps = 1.9e-6, far below any cosine the Gram
  matrix resolves). No NaN for zero norms.
  """
  dtype = jnp.result_type(dot, norm2_a, norm2_b, jnp.float32)
  dot = jnp.asarray(dot, dtype)
  norm2_a = jnp.maximum(jnp.asarray(norm2_a, dtype), 0)
  norm2_b = jnp.maximum(jnp.asarray(norm2_b, dtype), 0)
  product = norm2_a * norm2_b
  exact = jnp.isfinite(product) & (product >= jnp.finfo(product.dtype).tiny)
  # Square roots of zero are taken of 1 instead (and the result zeroed), so
  # derivatives stay finite at zero norms (d sqrt(x) / dx is infinite at 0).
  root = lambda x: jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1)), 0)
  denom = jnp.where(exact, jnp.sqrt(jnp.where(exact, product, 1)),
                    root(norm2_a) * root(norm2_b))
  ok = denom > 0
  cos = jnp.where(ok, dot / jnp.where(ok, denom, 1), 0)
  distance = 1 - jnp.clip(cos, -1, 1)
  return jnp.where(distance <= _PARALLEL_EPS * jnp.finfo(distance.dtype).eps, 0, distance)


def fold_step(
    carry: FoldCarry,
    dot: jax.Array,
    norm2_i: jax.Array,
    finite_i: jax.Array,
    tau: jax.Array,
    combine: base.Combine,
) -> FoldStep:
  """Decides whether microgradient ``g_i`` joins the running reference ``g``.

  Args:
    carry: the fold so far.
    dot: ``<g, g_i>`` (ignored when ``finite_i`` is False or no reference yet).
    norm2_i: ``|g_i|^2``.
    finite_i: whether ``g_i`` is finite; a non-finite ``g_i`` is dropped.
    tau: cosine distance threshold; accept when ``1 - cos(g, g_i) <= tau``.
    combine: ``"mean"`` (running mean ``(c g + g_i) / (c + 1)``) or
      ``"pairwise"`` (``(g + g_i) / 2``).

  Returns:
    A :class:`FoldStep`; the new reference is ``alpha * g + beta * g_i``.
  """
  dtype = carry.norm2.dtype
  dot = jnp.where(finite_i, dot, 0).astype(dtype)
  norm2_i = jnp.where(finite_i, norm2_i, 0).astype(dtype)
  has_ref = carry.count > 0
  compared = finite_i & has_ref
  distance = jnp.where(compared, cosine_distance(dot, carry.norm2, norm2_i), 0)
  is_ref = finite_i & ~has_ref
  accept = compared & (distance <= jnp.asarray(tau, dtype))
  c = carry.count.astype(dtype)
  if combine == "mean":
    a_acc, b_acc = c / (c + 1), 1 / (c + 1)
  else:
    a_acc, b_acc = jnp.asarray(0.5, dtype), jnp.asarray(0.5, dtype)
  alpha = jnp.where(is_ref, 0, jnp.where(accept, a_acc, 1)).astype(dtype)
  beta = jnp.where(is_ref, 1, jnp.where(accept, b_acc, 0)).astype(dtype)
  norm2 = alpha**2 * carry.norm2 + 2 * alpha * beta * dot + beta**2 * norm2_i
  norm2 = jnp.where(is_ref | accept, jnp.maximum(norm2, 0), carry.norm2)
  count = carry.count + (is_ref | accept).astype(jnp.int32)
  return FoldStep(FoldCarry(count, norm2), alpha, beta, distance,
                  is_ref | accept, compared)


class Agreement(NamedTuple):
  """Outcome of the filter over K microgradients.

  Attributes:
    weights: ``[K]`` weights; the filtered gradient is ``sum_i w_i g_i``.
      All zeros when the step is skipped.
    distances: ``[K]`` cosine distances to the running reference at the time
      each microgradient was compared (0 for the reference and for dropped
      non-finite microgradients).
    accepted: ``[K]`` bool, microgradients that contribute to the update
      (the reference included; all False on a skip).
    finite: ``[K]`` bool, microgradients without NaN/Inf.
    num_accepted: number of True entries of ``accepted``.
    skipped: True when fewer than two microgradients agreed.
  """
  weights: jax.Array
  distances: jax.Array
  accepted: jax.Array
  finite: jax.Array
  num_accepted: jax.Array
  skipped: jax.Array


def conclude(
    count: jax.Array,
    weights: jax.Array,
    distances: jax.Array,
    accepted: jax.Array,
    finite: jax.Array,
) -> Agreement:
  """The :class:`Agreement` once every microgradient has been folded.

  Shared by the Gram-matrix path (:func:`agreement_weights`) and the
  streaming paths: fewer than two folded microgradients make a skip, which
  zeroes the weights and the acceptance.

  Args:
    count: microgradients folded into the reference (the reference included).
    weights: ``[K]`` weights of the reference, ``g = sum_i weights[i] g_i``.
    distances: ``[K]`` cosine distances at the time of each comparison.
    accepted: ``[K]`` bool, folded into the reference (reference included).
    finite: ``[K]`` bool, microgradients without NaN/Inf.

  Returns:
    An :class:`Agreement`.
  """
  skipped = count < 2
  accepted = accepted & ~skipped
  return Agreement(
      weights=jnp.where(skipped, 0, weights).astype(weights.dtype),
      distances=distances, accepted=accepted, finite=finite,
      num_accepted=jnp.sum(accepted, dtype=jnp.int32), skipped=skipped)


def finite_from_gram(gram: jax.Array) -> jax.Array:
  """Microgradient ``i`` is finite iff ``G[i, i] = |g_i|^2`` is finite."""
  return jnp.isfinite(jnp.diagonal(gram))


def agreement_weights(
    gram: jax.Array,
    tau: jax.Array,
    combine: base.Combine,
    finite: jax.Array | None = None,
) -> Agreement:
  """Runs the sequential GAF filter on a Gram matrix.

  The reference is tracked as a weight vector ``v`` (``g = sum_j v_j g_j``) so
  that ``<g, g_i> = (G v)_i`` needs no gradient memory; ``|g|^2`` is carried
  by :func:`fold_step`.

  Args:
    gram: ``[K, K]`` inner products (float32 or wider).
    tau: cosine distance threshold (scalar).
    combine: ``"mean"`` or ``"pairwise"``.
    finite: optional ``[K]`` mask of finite microgradients; by default read off
      the Gram diagonal.

  Returns:
    An :class:`Agreement`.

  Raises:
    ValueError: ``gram`` is not a square floating-point matrix, ``finite``
      is not ``[K]``, ``combine`` is unknown, or ``tau`` is a Python or
      NumPy number outside [0, 2] (a jax array, possibly traced, is used as
      given).
  """
  base.check_combine(combine)
  if not isinstance(tau, jax.Array):
    base.check_tau(tau)  # a Python or NumPy number; arrays may be traced
  shape = tuple(jnp.shape(gram))
  if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
    raise ValueError(f"`gram` must be a square [K, K] matrix with K >= 1, got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(gram), jnp.floating):
    raise ValueError(f"`gram` must be floating point, got dtype {jnp.result_type(gram)}")
  if finite is not None:
    finite = jnp.asarray(finite)
    if finite.shape != shape[:1] or finite.dtype != jnp.bool_:
      raise ValueError(
          f"`finite` must be a bool array of shape {shape[:1]} (one flag per "
          f"microgradient), got shape {finite.shape} and dtype {finite.dtype}")
  return weights_from_gram(gram, tau, combine, finite)


def weights_from_gram(
    gram: jax.Array,
    tau: jax.Array,
    combine: base.Combine,
    finite: jax.Array | None = None,
) -> Agreement:
  """:func:`agreement_weights` without its argument checks.

  For the library's own callers, which have validated ``combine`` and the
  gradients already and pass ``tau`` as evaluated at this step (a schedule's
  value is used as given, as under ``jit``, also when running eagerly).
  """
  k = gram.shape[0]
  dtype = gram.dtype
  if finite is None:
    finite = finite_from_gram(gram)
  both = finite[:, None] & finite[None, :]
  g = jnp.where(both, gram, 0).astype(dtype)
  diag = jnp.diagonal(g)
  eye = jnp.eye(k, dtype=dtype)

  def body(i, state):
    carry, v, distances, accepted = state
    dot = jnp.dot(v, g[:, i], precision=lax.Precision.HIGHEST)
    step = fold_step(carry, dot, diag[i], finite[i], tau, combine)
    v = step.alpha * v + step.beta * eye[i]
    return (step.carry, v, distances.at[i].set(step.distance),
            accepted.at[i].set(step.accepted))

  state = (init_carry(dtype), jnp.zeros([k], dtype), jnp.zeros([k], dtype),
           jnp.zeros([k], bool))
  carry, v, distances, accepted = lax.fori_loop(0, k, body, state)
  return conclude(carry.count, v, distances, accepted, finite)
