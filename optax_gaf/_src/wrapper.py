"""``with_gaf``: filter microgradients, then run an inner optimizer or skip it."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_gaf._src import base
from optax_gaf._src import collective
from optax_gaf._src import transform


class WithGafState(NamedTuple):
  """State of :func:`with_gaf`.

  Attributes:
    gaf_state: the filter's :class:`GafState` (distances, acceptance, skips).
    inner_state: the inner optimizer's state; bit-for-bit unchanged on a skip.
  """
  gaf_state: transform.GafState
  inner_state: Any


SkipMode = Literal["select", "cond"]
SKIP_MODES: tuple[str, ...] = ("select", "cond")


def apply_or_skip(
    inner: optax.GradientTransformation,
    skip: jax.Array,
    updates: optax.Updates,
    inner_state: Any,
    params: optax.Params | None,
    mode: SkipMode = "select",
    extra_args: dict[str, Any] | None = None,
) -> tuple[optax.Updates, Any]:
  """Runs ``inner.update`` unless ``skip``; on a skip returns zeros and the old state.

  The new inner state is cast back to the old state's dtypes, as
  ``optax.MultiSteps`` does, so both outcomes have the same types.

  Args:
    inner: the optimizer.
    skip: scalar bool.
    updates: the (filtered) gradient, finite (zeros on a skip).
    inner_state: ``inner``'s state.
    params: passed to ``inner.update``.
    mode: ``"select"`` evaluates ``inner.update`` on every step and keeps
      either its results or zeros and the old state, elementwise, so XLA can
      fuse the optimizer with what produced ``updates`` and with the
      parameter update. ``"cond"`` runs ``inner.update`` under ``lax.cond``:
      a skip costs nothing and differentiation never enters the skipped
      branch, but the outputs go to fresh buffers. Under ``jit`` both make
      the same decisions and return the same values up to float rounding
      (XLA may fuse the inner update differently in the two programs).
    extra_args: keyword arguments for ``inner.update``.

  Returns:
    ``(updates, inner_state)``.
  """
  inner = optax.with_extra_args_support(inner)
  extra_args = {} if extra_args is None else extra_args

  def cast(new, old):
    new, old = jnp.asarray(new), jnp.asarray(old)
    return new if new.dtype == old.dtype else new.astype(old.dtype)

  def do_update(_):
    new_updates, new_state = inner.update(updates, inner_state, params, **extra_args)
    return new_updates, jax.tree.map(cast, new_state, inner_state)

  if mode == "select":
    new_updates, new_state = do_update(None)
    keep = lambda new, old: jnp.where(skip, old, new)
    return (jax.tree.map(lambda u: keep(u, jnp.zeros_like(u)), new_updates),
            jax.tree.map(keep, new_state, inner_state))

  def skip_update(_):
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda: inner.update(updates, inner_state, params, **extra_args)[0]))
    return zeros, inner_state

  return lax.cond(skip, skip_update, do_update, None)


def with_gaf(
    inner: optax.GradientTransformation,
    tau: base.TauLike = 0.97,
    *,
    combine: base.Combine = "mean",
    num_microbatches: int | None = None,
    axis_name: Any = None,
    mode: collective.Mode = "all_gather",
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    local_axis: bool = True,
    skip_mode: SkipMode = "select",
) -> optax.GradientTransformationExtraArgs:
  """Gradient Agreement Filtering in front of an optimizer, with true skips.

  Filters the K microgradients exactly like :func:`gaf`, then applies
  ``inner`` to the filtered gradient. When nothing agreed (a skip), ``inner``'s
  step does not happen: its state stays bit-for-bit unchanged and the
  returned updates are zeros, as the authors' code skips ``optimizer.step()``.
  By default (``skip_mode="select"``) ``inner.update`` is still evaluated on
  a skip and its results are discarded elementwise with ``jnp.where``, so
  XLA fuses the optimizer with the filter and the parameter update.

  Args:
    inner: the optimizer to run on the filtered gradient (e.g.
      ``optax.adamw(1e-3)``).
    tau: cosine distance threshold in [0, 2], or a schedule of the step count.
    combine: ``"mean"`` or ``"pairwise"``; see :func:`gaf`.
    num_microbatches: K, if known; see :func:`gaf`.
    axis_name: data-parallel axis (``jax.shard_map`` / ``jax.pmap``); see
      :func:`gaf`. The skip decision comes from the replicated Gram matrix, so
      it is identical on all devices and the inner states stay in sync.
    mode: ``"all_gather"``, ``"ring"`` or ``"sketch"``; see :func:`gaf`.
    sketch_dim: sketch size for ``mode="sketch"``.
    sketch_seed: seed of the sketch signs.
    local_axis: whether each device's leaves have a local microbatch axis.
    skip_mode: ``"select"`` (default) or ``"cond"``: how a skip keeps the
      inner optimizer from stepping. ``"select"`` evaluates ``inner`` every
      step and discards its results on a skip (less memory, and on CPU
      slightly faster: see the README's Semantics). ``"cond"`` runs ``inner``
      under ``lax.cond``: choose it when differentiating through the update
      (the skipped branch's derivative is then never evaluated; with the
      select, an inner whose derivative is infinite at a zero gradient, such
      as ``optax.adam`` with ``eps_root=0``, gives NaN derivatives on skipped
      steps), for an inner whose update is expensive, or to run eagerly
      with ``jax_debug_nans`` (with the select, an inner that divides by the
      gradient's norm makes a discarded NaN on every skip), or when the
      inner has side effects (``jax.debug.callback``) that must not run on
      skipped steps. Under ``jit`` both return the same values up to float
      rounding (skips are identical: zeros and the untouched state).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`WithGafState`. ``update(grads, state, params)`` takes
    microgradients with a leading axis K and returns updates without it.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> opt = optax_gaf.with_gaf(optax.adam(1e-2), tau=0.5)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> disagree = {'w': jnp.array([[1., 0.], [-1., 0.]])}
    >>> updates, state = opt.update(disagree, state, params)
    >>> updates['w'], state.gaf_state.skipped
    (Array([0., 0.], dtype=float32), Array(True, dtype=bool))

  References:
    Chaubard, Eddy and Kochenderfer, 2024. https://arxiv.org/abs/2412.18052
  """
  gaf = transform.make_gaf(tau, combine, num_microbatches, axis_name, mode,
                           sketch_dim, sketch_seed, local_axis, caller="with_gaf")
  base.check_choice(skip_mode, SKIP_MODES, "with_gaf(skip_mode=...)")

  def init_fn(params: optax.Params) -> WithGafState:
    return WithGafState(gaf_state=gaf.init(params), inner_state=inner.init(params))

  def update_fn(grads, state: WithGafState, params=None, **extra_args):
    filtered, gaf_state = gaf.update(grads, state.gaf_state, params)
    updates, inner_state = apply_or_skip(
        inner, gaf_state.skipped, filtered, state.inner_state, params, skip_mode, extra_args)
    return updates, WithGafState(gaf_state=gaf_state, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
