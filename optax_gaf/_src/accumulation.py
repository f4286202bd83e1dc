"""``gaf_accumulate``: GAF one microgradient per call, at the memory of MultiSteps.

The sequential filter only ever compares the running aggregate ``g`` with the
next microgradient ``g_i``. So instead of holding K microgradients (K x P
memory), :class:`RunningFilter` carries ``g`` (one gradient-sized buffer), its
squared norm and the fold count, and folds each ``g_i`` in as it arrives with
the core's shared decision :func:`~optax_gaf._src.agreement.fold_step`:
``<g, g_i>`` and ``|g_i|^2`` are summed over all leaves in float32 (or wider),
then ``g <- alpha g + beta g_i`` through ``jnp.where`` so that a dropped NaN
``g_i`` never leaks. The same running filter drives the scan-based
:func:`~optax_gaf._src.scan.gaf_value_and_grad`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_gaf._src import agreement as agreement_lib
from optax_gaf._src import base
from optax_gaf._src import gram as gram_lib
from optax_gaf._src import transform
from optax_gaf._src import wrapper


class RunningFilter(NamedTuple):
  """The GAF filter while microgradients arrive one at a time.

  Attributes:
    aggregate: the running filtered gradient ``g`` (shaped like the
      parameters, each leaf in float32 or wider); zeros before the first
      finite microgradient.
    norm2: ``|g|^2`` over all leaves, carried by ``fold_step``'s recurrence
      (the same numbers the Gram-matrix path computes).
    count: microgradients folded into ``g`` so far (the reference included).
    weights: ``[K]`` with ``g = sum_i weights[i] g_i`` (the Gram path's
      weights, for logging).
    distances: ``[K]`` cosine distances, as in
      :class:`~optax_gaf._src.agreement.Agreement`.
    accepted: ``[K]`` bool, folded into ``g`` so far (reference included).
    finite: ``[K]`` bool, microgradients without NaN/Inf (True until seen).
  """
  aggregate: optax.Updates
  norm2: jax.Array
  count: jax.Array
  weights: jax.Array
  distances: jax.Array
  accepted: jax.Array
  finite: jax.Array


def init_running(like: Any, num_microbatches: int) -> RunningFilter:
  """An empty :class:`RunningFilter` for gradients shaped like ``like``.

  Args:
    like: parameters or gradients (arrays or ``jax.ShapeDtypeStruct``).
    num_microbatches: K, the length of the per-microbatch fields.

  Returns:
    A :class:`RunningFilter` with a zero aggregate in each leaf's
    accumulation dtype (float32 or wider) and statistics in the widest one.
  """
  acc = gram_lib.tree_accumulation_dtype(like)
  k = num_microbatches
  return RunningFilter(
      aggregate=jax.tree.map(
          lambda x: jnp.zeros(x.shape, gram_lib.accumulation_dtype(x.dtype)), like),
      norm2=jnp.zeros([], acc), count=jnp.zeros([], jnp.int32),
      weights=jnp.zeros([k], acc), distances=jnp.zeros([k], acc),
      accepted=jnp.zeros([k], bool), finite=jnp.ones([k], bool))


def _tree_dot(a: optax.Updates, b: optax.Updates, acc: jnp.dtype) -> jax.Array:
  """``sum_leaves <a, b>`` accumulated in ``acc`` at full precision."""
  total = jnp.zeros([], acc)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    total = total + lax.dot_general(
        jnp.ravel(x).astype(acc), jnp.ravel(y).astype(acc),
        (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
        preferred_element_type=acc)
  return total


def check_single_microgradient(grads: optax.Updates, running: RunningFilter,
                               caller: str) -> None:
  """Raises ValueError unless ``grads`` matches the aggregate leaf by leaf."""
  g_leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
  a_leaves, a_treedef = jax.tree_util.tree_flatten(running.aggregate)
  if treedef.num_leaves != a_treedef.num_leaves:
    raise ValueError(
        f"`{caller}` got a gradient pytree with {treedef.num_leaves} leaves, "
        f"but the parameters it was initialised with have {a_treedef.num_leaves}")
  for (path, g), a in zip(g_leaves, a_leaves):
    name = jax.tree_util.keystr(path) or "<root>"
    base.check_floating_leaf(g, name)
    if tuple(jnp.shape(g)) != tuple(a.shape):
      raise ValueError(
          f"`{caller}` takes ONE microgradient per call, shaped like the "
          f"parameters: leaf {name} has shape {tuple(jnp.shape(g))} but its "
          f"parameter has shape {tuple(a.shape)}. For stacked [K, ...] "
          "microgradients use `optax_gaf.with_gaf`.")


def fold_microgradient(
    running: RunningFilter,
    grad: optax.Updates,
    index: jax.Array,
    tau: jax.Array,
    combine: base.Combine,
) -> RunningFilter:
  """Folds microgradient number ``index`` into the running filter.

  Computes ``<g, g_i>`` and ``|g_i|^2`` over all leaves, lets the core's
  :func:`~optax_gaf._src.agreement.fold_step` decide, and updates
  ``g <- alpha g + beta g_i`` with ``jnp.where`` (a rejected or non-finite
  ``g_i`` leaves ``g`` bit-for-bit unchanged). The first finite
  microgradient becomes the reference, whatever its index.

  Args:
    running: the filter so far.
    grad: one microgradient, shaped like ``running.aggregate``.
    index: its position in ``[0, K)`` (may be traced).
    tau: cosine distance threshold at this step.
    combine: ``"mean"`` or ``"pairwise"``.

  Returns:
    The updated :class:`RunningFilter` (same dtypes and shapes).
  """
  acc = running.norm2.dtype
  norm2_i = _tree_dot(grad, grad, acc)
  dot = _tree_dot(running.aggregate, grad, acc)
  finite_i = jnp.isfinite(norm2_i)
  step = agreement_lib.fold_step(
      agreement_lib.FoldCarry(running.count, running.norm2), dot, norm2_i,
      finite_i, tau, combine)
  is_ref = step.accepted & ~step.compared

  def fold_leaf(g, gi):
    gi = gi.astype(g.dtype)
    folded = step.alpha.astype(g.dtype) * g + step.beta.astype(g.dtype) * gi
    return jnp.where(is_ref, gi, jnp.where(step.accepted, folded, g))

  k = running.weights.shape[0]
  onehot = (jnp.arange(k) == index).astype(acc)
  return RunningFilter(
      aggregate=jax.tree.map(fold_leaf, running.aggregate, grad),
      norm2=step.carry.norm2.astype(acc),
      count=step.carry.count,
      weights=(step.alpha * running.weights + step.beta * onehot).astype(acc),
      distances=running.distances.at[index].set(step.distance.astype(acc)),
      accepted=running.accepted.at[index].set(step.accepted),
      finite=running.finite.at[index].set(finite_i))


def finish_running(
    running: RunningFilter, like: Any
) -> tuple[optax.Updates, agreement_lib.Agreement]:
  """The filtered gradient and the :class:`~optax_gaf.Agreement` of a finished filter.

  Args:
    running: the filter after all K microgradients were folded.
    like: gradients (or shapes) giving the output dtypes.

  Returns:
    ``(filtered, agreement)``; ``filtered`` is in the dtypes of ``like`` and
    all zeros on a skip.
  """
  agreement = agreement_lib.conclude(
      running.count, running.weights, running.distances, running.accepted,
      running.finite)
  filtered = jax.tree.map(
      lambda g, x: jnp.where(agreement.skipped, jnp.zeros([], g.dtype), g).astype(x.dtype),
      running.aggregate, like)
  return filtered, agreement


class GafAccumulateState(NamedTuple):
  """State of :func:`gaf_accumulate`.

  Attributes:
    mini_step: position in the current cycle, in ``[0, every_k)``: the number
      of microgradients received since the last cycle ended.
    running: the :class:`RunningFilter` of the current cycle (the running
      aggregate, its squared norm ``norm2``, the acceptance ``count`` and the
      per-microbatch fields so far); reset when a cycle ends.
    gaf_state: a :class:`~optax_gaf.GafState` with the statistics of the last
      completed cycle (``distances``, ``accepted`` and ``finite`` of length
      ``every_k``, ``num_accepted``, ``skipped``, ``num_skipped``,
      ``num_dropped``) and ``count``, the number of completed cycles (the step
      ``tau`` schedules see). The same as ``with_gaf``'s ``gaf_state`` for
      the same microgradients stacked, up to float32 rounding of the
      distances (the running reference is summed in another order).
    inner_state: the inner optimizer's state; unchanged on mini-steps and on
      skipped cycles.
    has_updated: True iff the last call ended a cycle and applied ``inner``.
  """
  mini_step: jax.Array
  running: RunningFilter
  gaf_state: transform.GafState
  inner_state: Any
  has_updated: jax.Array


def find_gaf_states(state: Any) -> list[Any]:
  """The GAF states inside ``state``, looking only through pass-through containers.

  Pass-through containers always run what they hold: ``optax.chain``'s
  tuples, ``optax.named_chain``'s dicts, ``optax.inject_hyperparams`` and
  ``optax.masked``. Other wrappers (``optax.apply_if_finite``,
  ``optax.MultiSteps``) may not call the inner update, so their inner state
  could tell a stale story and is not searched.
  """
  if isinstance(state, (GafAccumulateState, wrapper.WithGafState)):
    return [state]
  if isinstance(state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState,
                        optax.MaskedState)):
    return find_gaf_states(state.inner_state)
  if type(state) in (tuple, list):
    return [found for part in state for found in find_gaf_states(part)]
  if type(state) is dict:
    return [found for part in state.values() for found in find_gaf_states(part)]
  return []


def has_updated(state: Any) -> jax.Array:
  """Whether the last ``update`` applied the inner optimizer.

  Works for the states of :func:`gaf_accumulate` (True only on the last call
  of a cycle that was not skipped) and of :func:`~optax_gaf.with_gaf` /
  :func:`~optax_gaf.apply_if_agreed` (True after a step that was not skipped),
  also where they sit inside ``optax.chain``, ``optax.named_chain``,
  ``optax.inject_hyperparams`` or ``optax.masked``. Inside wrappers that may
  not run the inner update (``optax.apply_if_finite``, ``optax.MultiSteps``)
  it raises instead of answering from a possibly stale inner state.

  Args:
    state: a :class:`GafAccumulateState` or a
      :class:`~optax_gaf.WithGafState`, or a state holding exactly one of them.

  Raises:
    ValueError: ``state`` holds none or several of them.

  Returns:
    A boolean scalar array.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> opt = optax_gaf.gaf_accumulate(optax.sgd(1.0), every_k=2)
    >>> state = opt.init({'w': jnp.zeros(2)})
    >>> _, state = opt.update({'w': jnp.array([1., 0.])}, state)
    >>> bool(optax_gaf.has_updated(state))
    False
    >>> _, state = opt.update({'w': jnp.array([1., 1.])}, state)
    >>> bool(optax_gaf.has_updated(state))
    True
  """
  found = find_gaf_states(state)
  if len(found) != 1:
    raise ValueError(
        "`has_updated(state)` takes a state that holds one state of gaf_accumulate, "
        "with_gaf or apply_if_agreed (also inside optax.chain, optax.named_chain, "
        "optax.inject_hyperparams or optax.masked, not inside wrappers that may skip "
        f"the inner update), got {type(state).__name__} holding {len(found)}")
  state = found[0]
  if isinstance(state, GafAccumulateState):
    return state.has_updated
  gaf_state = state.gaf_state
  return (gaf_state.count > 0) & ~gaf_state.skipped


def check_every_k(every_k: Any) -> int:
  """Returns ``every_k`` as an int >= 2, or raises ValueError naming it."""
  if every_k is None:
    raise ValueError("`gaf_accumulate(every_k=...)` must be an int >= 2, got None")
  if isinstance(every_k, jax.core.Tracer):
    raise ValueError(
        "`gaf_accumulate(every_k=...)` must be a static Python int >= 2, got a "
        "traced value (with `optax.inject_hyperparams`, pass "
        "`static_args=('every_k',)`)")
  k = base.check_num_microbatches(every_k, "every_k")
  assert k is not None
  return k


def gaf_accumulate(
    inner: optax.GradientTransformation,
    every_k: int,
    tau: base.TauLike = 0.97,
    *,
    combine: base.Combine = "mean",
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient Agreement Filtering over ``every_k`` calls, memory flat in K.

  In the spirit of ``optax.MultiSteps``: each ``update`` call receives ONE
  microbatch gradient (shaped like the parameters, no leading axis). The
  transformation folds it into a running aggregate with the GAF rule
  (arXiv 2412.18052):

  .. math::

    d_i = 1 - \frac{\langle g, g_i \rangle}{\|g\|\,\|g_i\|},\quad
    g \leftarrow \alpha g + \beta g_i \text{ if } d_i \le \tau

  (``combine="mean"``: ``g <- (c g + g_i) / (c + 1)``; ``"pairwise"``:
  ``g <- (g + g_i) / 2``), keeping only ``g``, ``|g|^2`` and the count: one
  gradient-sized buffer whatever ``every_k``. Calls ``1 .. every_k - 1`` of a
  cycle return zero updates and leave ``inner`` alone; call ``every_k``
  applies ``inner`` to the filtered gradient if anything agreed, and
  otherwise skips it (zero updates, inner state bit-for-bit unchanged).

  The result equals ``with_gaf(inner, tau, combine=combine)`` applied to the
  same ``every_k`` microgradients stacked in the same order, including the
  state's statistics: non-finite microgradients are dropped (the first finite
  one becomes the reference), fewer than two agreeing ones skip the cycle.
  The decisions use the core's single fold rule; inner products are summed
  over all leaves in float32 (or wider), so results agree with the Gram path
  up to float32 rounding.

  Args:
    inner: the optimizer applied once per cycle to the filtered gradient.
    every_k: microgradients per cycle (K), a Python int >= 2.
    tau: cosine distance threshold in [0, 2], or a schedule of the number of
      completed cycles (``state.gaf_state.count``).
    combine: ``"mean"`` or ``"pairwise"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`GafAccumulateState`; extra keyword arguments of ``update`` are
    passed to ``inner``.

  Raises:
    ValueError: ``every_k`` not an int or < 2, ``tau`` outside [0, 2],
      unknown ``combine``; at update, a gradient leaf not shaped like its
      parameter (e.g. stacked microgradients).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> opt = optax_gaf.gaf_accumulate(optax.sgd(1.0), every_k=2)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({'w': jnp.array([1., 0.])}, state, params)
    >>> updates['w'], int(state.mini_step)
    (Array([0., 0.], dtype=float32), 1)
    >>> updates, state = opt.update({'w': jnp.array([1., 1.])}, state, params)
    >>> updates['w'], bool(state.has_updated), state.gaf_state.accepted
    (Array([-1. , -0.5], dtype=float32), True, Array([ True,  True], dtype=bool))

    With Flax NNX, ``nnx.Optimizer`` calls ``update`` once per microbatch:

    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax_gaf.gaf_accumulate(optax.adam(1e-2), every_k=2),
    ...     wrt=nnx.Param)
    >>> loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> x, y = jnp.ones((4, 3)), jnp.ones((4, 1))
    >>> for i in range(2):  # two microbatches, one optimizer step
    ...   grads = nnx.grad(loss)(model, x[2 * i:2 * i + 2], y[2 * i:2 * i + 2])
    ...   _ = optimizer.update(model, grads)
    >>> int(optimizer.opt_state.gaf_state.count[...])
    1

  References:
    Chaubard, Eddy and Kochenderfer, 2024. https://arxiv.org/abs/2412.18052
  """
  k = check_every_k(every_k)
  base.check_tau(tau)
  base.check_combine(combine)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> GafAccumulateState:
    return GafAccumulateState(
        mini_step=jnp.zeros([], jnp.int32),
        running=init_running(params, k),
        gaf_state=transform.init_gaf_state(k),
        inner_state=inner.init(params),
        has_updated=jnp.zeros([], bool))

  def update_fn(grads, state: GafAccumulateState, params=None, **extra_args):
    check_single_microgradient(grads, state.running, "gaf_accumulate")
    tau_t = transform.current_tau(tau, state.gaf_state.count)
    running = fold_microgradient(
        state.running, grads, state.mini_step, tau_t, combine)

    # The cycle end is selected with jnp.where rather than an outer lax.cond:
    # a cond copies its gradient-sized outputs (aggregate, inner state) into
    # fresh buffers (4P temporaries vs P, measured in bench_memory.py). The
    # inner optimizer itself still runs under a cond: it is due on only one
    # microstep in K.
    emit = state.mini_step >= k - 1
    filtered, agreement = finish_running(running, grads)
    updates, inner_state = wrapper.apply_or_skip(
        inner, ~emit | agreement.skipped, filtered,
        state.inner_state, params, "cond", extra_args)
    select = lambda new, old: jax.tree.map(lambda a, b: jnp.where(emit, a, b), new, old)
    return updates, GafAccumulateState(
        mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
        running=select(init_running(running.aggregate, k), running),
        gaf_state=select(
            transform.next_gaf_state(state.gaf_state, tau_t, agreement),
            state.gaf_state),
        inner_state=inner_state,
        has_updated=emit & ~agreement.skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
