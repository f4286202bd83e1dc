"""Shared types, constants and argument checks for optax_gaf."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

MicroGrads = optax.Updates
"""Updates whose every leaf has a leading microbatch axis of size K."""

Combine = Literal["mean", "pairwise"]
COMBINE_RULES: tuple[str, ...] = ("mean", "pairwise")

TauLike = Any  # float in [0, 2], a jax scalar, or an optax schedule.


def check_tau(tau: TauLike, name: str = "tau") -> None:
  """Raises ValueError if a concrete ``tau`` is not a finite number in [0, 2].

  Schedules (callables) and traced values (e.g. under
  ``optax.inject_hyperparams`` inside ``jit``) are accepted without a check.
  """
  if callable(tau) or isinstance(tau, jax.core.Tracer):
    return
  try:
    value = np.asarray(tau)
  except Exception as e:  # pragma: no cover - defensive
    raise TypeError(f"`{name}` must be a float in [0, 2] or a schedule, got {tau!r}") from e
  if value.ndim != 0 or not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
    raise ValueError(
        f"`{name}` must be a real scalar in [0, 2] or a schedule, got {tau!r}")
  v = float(value)
  if math.isnan(v) or not 0.0 <= v <= 2.0:
    raise ValueError(
        f"`{name}` must be in [0, 2] (cosine distance threshold), got {v}")


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
  """Raises ValueError naming argument ``name`` unless ``value`` is in ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def check_combine(combine: str) -> None:
  """Raises ValueError if ``combine`` is not one of the fold rules."""
  check_choice(combine, COMBINE_RULES, "combine")


def check_floating_leaf(leaf: Any, name: str) -> None:
  """Raises ValueError naming leaf ``name`` unless its dtype is floating point."""
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"GAF needs floating-point gradients; leaf {name} has dtype {dtype}")


def check_num_microbatches(k: Any, name: str = "num_microbatches") -> int | None:
  """Validates an optional static microbatch count; returns it as int.

  A traced count (``optax.inject_hyperparams`` makes numeric arguments part
  of the state) gives None: an ``update`` under ``jit`` takes K from the
  gradients. Creating a state from it gives empty statistics, with a
  warning (:func:`warn_if_unsized`).
  """
  if k is None or isinstance(k, jax.core.Tracer):
    return None
  if isinstance(k, bool) or not np.issubdtype(np.asarray(k).dtype, np.integer) or np.ndim(k):
    raise ValueError(f"`{name}` must be an int >= 2, got {k!r}")
  k = int(k)
  if k < 2:
    raise ValueError(f"GAF needs at least 2 microbatches; `{name}` is {k}")
  return k


def warn_if_unsized(k: Any, caller: str) -> None:
  """Warns if ``k`` is traced when a state is created from it.

  ``init`` under ``jit`` (or ``eval_shape``, ``pmap``) of
  ``optax.inject_hyperparams(gaf)(num_microbatches=K)`` sees a traced K. The
  per-microbatch statistics then start empty, as with
  ``num_microbatches=None``, and take length K at the first update: one
  extra trace of a jitted step, but a shape mismatch inside ``lax.scan``.
  """
  if isinstance(k, jax.core.Tracer):
    warnings.warn(
        f"`{caller}(num_microbatches=...)` is a traced value when the state is "
        "created, so the per-microbatch statistics start empty (as with "
        "`num_microbatches=None`) and take length K at the first update. To size "
        "them at init (needed inside `lax.scan`), pass "
        "`static_args=('num_microbatches',)` to `optax.inject_hyperparams`, or "
        "call `init` outside `jit`.", stacklevel=3)
