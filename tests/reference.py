"""A float64 NumPy loop oracle of Gradient Agreement Filtering (arXiv 2412.18052).

Written straight from the algorithm, independently of ``optax_gaf``: each
microgradient is one flat vector (all leaves concatenated), the filter is a
plain Python loop, and every quantity is float64.

  g <- first finite g_i, c <- 1
  for each later finite g_i:
    d_i = 1 - <g, g_i> / (|g| |g_i|)      (cos = 0 if either norm is 0)
    accept iff d_i <= tau:
      "mean":     g <- (c g + g_i) / (c + 1)
      "pairwise": g <- (g + g_i) / 2
      c <- c + 1
  c < 2 (nothing accepted, or < 2 finite microgradients) -> skip, update = 0.

Microgradients containing NaN/Inf are dropped: never the reference, never
accepted, distance reported as 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class Reference(NamedTuple):
  """What the oracle computes for one step.

  Attributes:
    update: ``[D]`` float64 filtered gradient (zeros on a skip).
    distances: ``[K]`` cosine distances at comparison time (0 if not compared).
    compared: ``[K]`` bool, compared with a reference.
    accepted: ``[K]`` bool, in the update (reference included; all False on skip).
    finite: ``[K]`` bool.
    num_accepted: int.
    skipped: bool.
  """
  update: np.ndarray
  distances: np.ndarray
  compared: np.ndarray
  accepted: np.ndarray
  finite: np.ndarray
  num_accepted: int
  skipped: bool


def flatten_micro(grads) -> np.ndarray:
  """Pytree with leading axis K -> ``[K, D]`` float64 (leaves concatenated)."""
  leaves = jax.tree.leaves(grads)
  k = np.shape(leaves[0])[0]
  return np.concatenate(
      [np.asarray(x, dtype=np.float64).reshape(k, -1) for x in leaves], axis=1)


def unflatten_like(vector: np.ndarray, params):
  """``[D]`` vector -> pytree shaped like ``params`` (float64 numpy leaves)."""
  leaves, treedef = jax.tree.flatten(params)
  out, start = [], 0
  for leaf in leaves:
    size = int(np.prod(np.shape(leaf), dtype=np.int64))
    out.append(vector[start:start + size].reshape(np.shape(leaf)))
    start += size
  assert start == vector.size
  return jax.tree.unflatten(treedef, out)


def gaf_reference(micro: np.ndarray, tau: float, combine: str) -> Reference:
  """Runs the sequential filter on ``micro`` (``[K, D]``) in float64."""
  if combine not in ("mean", "pairwise"):
    raise ValueError(combine)
  micro = np.asarray(micro, dtype=np.float64)
  k = micro.shape[0]
  finite = np.array([bool(np.all(np.isfinite(row))) for row in micro])
  distances = np.zeros(k)
  compared = np.zeros(k, bool)
  accepted = np.zeros(k, bool)
  g = None
  c = 0
  for i in range(k):
    if not finite[i]:
      continue
    gi = micro[i]
    if g is None:
      g, c = gi.copy(), 1
      accepted[i] = True
      continue
    norm_g = np.sqrt(np.dot(g, g))
    norm_i = np.sqrt(np.dot(gi, gi))
    cos = 0.0 if norm_g == 0 or norm_i == 0 else np.dot(g, gi) / (norm_g * norm_i)
    cos = min(1.0, max(-1.0, cos))
    d = 1.0 - cos
    distances[i] = d
    compared[i] = True
    if d <= tau:
      if combine == "mean":
        g = (c * g + gi) / (c + 1)
      else:
        g = (g + gi) / 2
      c += 1
      accepted[i] = True
  skipped = c < 2
  if skipped:
    update = np.zeros(micro.shape[1])
    accepted[:] = False
  else:
    update = g
  return Reference(update=update, distances=distances, compared=compared,
                   accepted=accepted, finite=finite,
                   num_accepted=int(accepted.sum()), skipped=bool(skipped))


def gaf_reference_tree(grads, tau: float, combine: str):
  """Oracle on a pytree of microgradients; returns ``(update_tree, Reference)``."""
  ref = gaf_reference(flatten_micro(grads), tau, combine)
  one = jax.tree.map(lambda x: np.zeros(np.shape(x)[1:]), grads)
  return unflatten_like(ref.update, one), ref


def decision_margin(ref: Reference, tau: float) -> float:
  """Smallest ``|d_i - tau|`` over compared microgradients (inf if none).

  Float32 and float64 may legitimately decide differently when a distance
  sits on the threshold; tests avoid such draws with this margin.
  """
  if not ref.compared.any():
    return float("inf")
  return float(np.min(np.abs(ref.distances[ref.compared] - tau)))


# ---------------------------------------------------------------------------
# Test data (not part of the oracle).


def correlated_micrograds(rng: np.random.Generator, k: int, shapes, rho: float,
                          scale_spread: float = 0.0, dtype=np.float32):
  """A dict pytree of K microgradients sharing a direction with weight ``rho``.

  ``g_i = s_i * (rho * u + sqrt(1 - rho^2) * n_i)`` for one common Gaussian
  ``u`` and independent ``n_i``; ``s_i = exp(scale_spread * N(0, 1))``.
  ``rho`` near 1 makes the microgradients agree, 0 makes them independent,
  negative values anti-correlate them with ``u``.
  """
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  d = sum(sizes)
  u = rng.standard_normal(d)
  noise = rng.standard_normal((k, d))
  scales = np.exp(scale_spread * rng.standard_normal(k))[:, None]
  flat = scales * (rho * u[None] + np.sqrt(max(0.0, 1 - rho**2)) * noise)
  out, start = {}, 0
  for j, (shape, size) in enumerate(zip(shapes, sizes)):
    out[f"p{j}"] = flat[:, start:start + size].reshape((k, *shape)).astype(dtype)
    start += size
  return out
