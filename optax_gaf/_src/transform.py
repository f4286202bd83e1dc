"""``gaf``: Gradient Agreement Filtering as a chainable Optax transformation."""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gaf._src import agreement as agreement_lib
from optax_gaf._src import base
from optax_gaf._src import collective
from optax_gaf._src import combine as combine_lib
from optax_gaf._src import gram as gram_lib
from optax_gaf._src import native_filter


class GafState(NamedTuple):
  """State of :func:`gaf`, also the filter statistics of :func:`with_gaf`.

  The statistics are read as attributes (``state.num_accepted``,
  ``state.distances``, ...; listed below) and are stored in three arrays, one
  per dtype: every array in an optimizer state is one more buffer for a
  jitted step to take in and hand out, and on CPU nine separate statistics
  cost about 35 us per step more than three (``benchmarks/bench_torch.py``'s
  small MLP). The state is a pytree of arrays: it can be logged
  (:meth:`as_dict`), checkpointed (``flax.serialization``), carried through
  ``lax.scan`` and batched with ``vmap`` (the attributes index the last axes,
  so a batch of states gives batches of statistics).

  Attributes:
    counters: int32 ``[5]``: ``count``, ``num_accepted``, ``skipped`` (0/1),
      ``num_skipped``, ``num_dropped``.
    measures: float32 ``[1 + K]``: ``tau``, then the K ``distances``.
    masks: bool ``[2, K]``: ``accepted``, ``finite``.

  Statistics (properties):
    count: number of ``update`` calls so far (int32); the step that
      ``tau`` schedules see.
    tau: the threshold used at the last step (float32).
    distances: ``[K]`` float32 cosine distances ``1 - cos(g, g_i)`` of the last
      step, each measured against the running reference when ``g_i`` was
      compared; 0 for the reference itself and for dropped microgradients.
    accepted: ``[K]`` bool, the microgradients that make up the last update
      (the reference included); all False on a skipped step.
    finite: ``[K]`` bool, False for microgradients dropped for NaN/Inf.
    num_accepted: number of microgradients in the last update (0 on a skip).
    skipped: whether the last step was skipped (nothing agreed).
    num_skipped: running total of skipped steps.
    num_dropped: running total of microgradients dropped for NaN/Inf.
  """
  counters: jax.Array
  measures: jax.Array
  masks: jax.Array

  @property
  def count(self) -> jax.Array:
    return self.counters[..., 0]

  @property
  def num_accepted(self) -> jax.Array:
    return self.counters[..., 1]

  @property
  def skipped(self) -> jax.Array:
    return self.counters[..., 2] != 0

  @property
  def num_skipped(self) -> jax.Array:
    return self.counters[..., 3]

  @property
  def num_dropped(self) -> jax.Array:
    return self.counters[..., 4]

  @property
  def tau(self) -> jax.Array:
    return self.measures[..., 0]

  @property
  def distances(self) -> jax.Array:
    return self.measures[..., 1:]

  @property
  def accepted(self) -> jax.Array:
    return self.masks[..., 0, :]

  @property
  def finite(self) -> jax.Array:
    return self.masks[..., 1, :]

  def as_dict(self) -> dict[str, jax.Array]:
    """The nine statistics by name, e.g. for a logger."""
    return {name: getattr(self, name) for name in STATISTICS}

  @classmethod
  def from_statistics(cls, **statistics: Any) -> GafState:
    """Packs the nine statistics (the keyword names of :meth:`as_dict`).

    ``GafState.from_statistics(**state.as_dict())`` rebuilds ``state``, also
    a batched one (from ``vmap``: the scalar statistics then have a batch
    shape ``B`` and the per-microbatch ones ``B + (K,)``); it also restores
    the statistics of a checkpoint written before they were packed (nine
    stored fields), e.g. from ``flax.serialization.msgpack_restore``.

    Raises:
      ValueError: a statistic is missing or unknown, or the shapes do not
        fit together (naming the statistic).
    """
    if set(statistics) != set(STATISTICS):
      raise ValueError(
          f"GafState.from_statistics needs exactly {STATISTICS}; missing "
          f"{sorted(set(STATISTICS) - set(statistics))}, unknown "
          f"{sorted(set(statistics) - set(STATISTICS))}")
    arrays = {name: jnp.asarray(value) for name, value in statistics.items()}
    batch, k = _shared_shapes(arrays)
    for name, value in arrays.items():
      want = batch + k if name in _PER_MICROBATCH else batch
      if value.shape != want:
        raise ValueError(
            f"GafState.from_statistics: `{name}` has shape {value.shape}, expected "
            f"{want} (the batch shape {batch} of most scalar statistics"
            + (f", and K = {k[0]} of most per-microbatch ones)" if name in _PER_MICROBATCH
               else ")"))
    ints = [arrays[name].astype(jnp.int32) for name in
            ("count", "num_accepted", "skipped", "num_skipped", "num_dropped")]
    return cls(
        counters=jnp.stack(ints, axis=-1),
        measures=jnp.concatenate([arrays["tau"].astype(jnp.float32)[..., None],
                                  arrays["distances"].astype(jnp.float32)], axis=-1),
        masks=jnp.stack([arrays["accepted"].astype(bool), arrays["finite"].astype(bool)],
                        axis=-2))

  def __repr__(self) -> str:
    try:
      stats = self.as_dict()
    except (TypeError, IndexError, AttributeError):
      # Not arrays (jax.eval_shape output, a tree of specs): the stored fields.
      stats = self._asdict()
    return "GafState(" + ", ".join(f"{name}={value!r}" for name, value in stats.items()) + ")"


STATISTICS: tuple[str, ...] = (
    "count", "tau", "distances", "accepted", "finite", "num_accepted", "skipped",
    "num_skipped", "num_dropped")
_PER_MICROBATCH = ("distances", "accepted", "finite")


def _shared_shapes(arrays: dict[str, jax.Array]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The batch shape and ``(K,)`` that most statistics agree on.

  Taken by majority, so that a single misshapen statistic is the one named
  in :meth:`GafState.from_statistics`'s error (ties go to the first in
  :data:`STATISTICS` order).
  """
  scalars = [arrays[name].shape for name in STATISTICS if name not in _PER_MICROBATCH]
  batch = collections.Counter(scalars).most_common(1)[0][0]
  lengths = [arrays[name].shape[-1:] for name in _PER_MICROBATCH
             if arrays[name].ndim == len(batch) + 1]
  if lengths:
    k = collections.Counter(lengths).most_common(1)[0][0]
  else:  # none has the batch shape plus one axis, so `distances` fails the
    # check; its last axis (if any) is the K its message shows
    k = arrays["distances"].shape[-1:] or (0,)
  return batch, k


def init_gaf_state(num_microbatches: int | None) -> GafState:
  """The initial :class:`GafState`; per-microbatch statistics have length K (or 0)."""
  k = num_microbatches or 0
  zero = jnp.zeros([], jnp.int32)
  return GafState.from_statistics(
      count=zero, tau=jnp.zeros([], jnp.float32),
      distances=jnp.zeros([k], jnp.float32), accepted=jnp.zeros([k], bool),
      finite=jnp.ones([k], bool), num_accepted=zero,
      skipped=jnp.zeros([], bool), num_skipped=zero, num_dropped=zero)


def current_tau(tau: base.TauLike, count: jax.Array) -> jax.Array:
  """``tau`` at step ``count`` (evaluates schedules)."""
  return jnp.asarray(tau(count) if callable(tau) else tau)


def next_gaf_state(state: GafState, tau: jax.Array, agreement: agreement_lib.Agreement) -> GafState:
  """Folds one step's :class:`~optax_gaf._src.agreement.Agreement` into the state."""
  dropped = jnp.sum(~agreement.finite, dtype=jnp.int32)
  return GafState.from_statistics(
      count=optax.safe_increment(state.count),
      tau=tau,
      distances=agreement.distances,
      accepted=agreement.accepted,
      finite=agreement.finite,
      num_accepted=agreement.num_accepted,
      skipped=agreement.skipped,
      num_skipped=saturating_add(state.num_skipped, agreement.skipped.astype(jnp.int32)),
      num_dropped=saturating_add(state.num_dropped, dropped))


def saturating_add(total: jax.Array, increment: jax.Array) -> jax.Array:
  """``total + increment`` for non-negative int32 counters, stopping at the int32 maximum
  (as ``optax.safe_increment`` does for ``count``) instead of wrapping negative."""
  top = jnp.iinfo(jnp.int32).max
  return jnp.where(total > top - increment, top, total + increment).astype(jnp.int32)


def check_state_size(state: GafState, k: int, num_microbatches: int | None,
                     axis_name: Any = None) -> None:
  """Raises ValueError if the built-in ``num_microbatches`` is not the K seen."""
  if num_microbatches is not None and k != num_microbatches:
    seen = (f"the gradients have a leading microbatch axis of size {k}" if axis_name is None
            else f"{k} microgradients were gathered over the devices of axis {axis_name!r}")
    raise ValueError(
        f"GAF was built with `num_microbatches={num_microbatches}` but {seen}")


def filter_microgradients(
    grads: base.MicroGrads, tau: jax.Array, combine: base.Combine
) -> tuple[base.Updates, agreement_lib.Agreement]:
  """Gram matrix -> agreement weights -> weighted sum, on one device.

  On single-device CPU runs with float32 gradients this is
  ``native_filter.filter_microgradients`` (one pass over the microgradients
  instead of two).

  Args:
    grads: microgradients with a leading axis K (validated by the caller).
    tau: threshold at this step.
    combine: fold rule.

  Returns:
    ``(filtered, agreement)``; ``filtered`` is all zeros on a skip and never
    contains NaN/Inf coming from dropped microgradients.
  """
  if native_filter.applicable(grads):
    return native_filter.filter_microgradients(grads, tau, combine)
  gram = gram_lib.summed_gram(grads)
  agreement = agreement_lib.weights_from_gram(gram, tau, combine)
  filtered = combine_lib.weighted_sum(agreement.weights, grads, agreement.finite)
  return filtered, agreement


def filter_step(
    grads: base.MicroGrads,
    state: GafState,
    tau_t: jax.Array,
    combine: base.Combine,
    k_static: int | None,
    config: collective.CollectiveConfig | None,
    params: Any = None,
    caller: str = "gaf",
) -> tuple[base.Updates, agreement_lib.Agreement]:
  """Validates the microgradients and filters them on one or many devices."""
  if config is None:
    k = gram_lib.num_microbatches(grads, params)
    check_state_size(state, k, k_static)
    return filter_microgradients(grads, tau_t, combine)
  filtered, agreement = collective.filter_across_devices(
      grads, tau_t, combine, config, params=params, step=state.count, caller=caller)
  check_state_size(state, agreement.weights.shape[0], k_static, config.axis_name)
  return filtered, agreement


def gaf(
    tau: base.TauLike = 0.97,
    *,
    combine: base.Combine = "mean",
    num_microbatches: int | None = None,
    axis_name: Any = None,
    mode: collective.Mode = "all_gather",
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    local_axis: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient Agreement Filtering over a leading microbatch axis.

  Takes K microbatch gradients (every leaf shaped ``[K, *param_shape]``) and
  returns one gradient made only of the microgradients that agree:

  .. math::

    g \leftarrow g_1;\quad \text{for } i = 2..K:\;
    d_i = 1 - \frac{\langle g, g_i \rangle}{\|g\|\,\|g_i\|},\;
    \text{accept } g_i \text{ iff } d_i \le \tau

  with the norms and inner products taken over all leaves as one vector.
  An accepted ``g_i`` is folded in by the running mean
  ``g <- (c g + g_i) / (c + 1)`` (``combine="mean"``) or by the authors'
  pairwise average ``g <- (g + g_i) / 2`` (``combine="pairwise"``). If no
  ``g_i`` was accepted the step is a skip and the update is all zeros; use
  :func:`with_gaf` to also leave the following optimizer untouched.

  The filter runs on the K x K Gram matrix (computed leaf by leaf,
  accumulated in float32 or wider) and returns ``sum_i w_i g_i`` in the
  gradients' dtype; no gradient is flattened or copied. Microgradients with
  NaN/Inf are dropped (never the reference, never accepted); with fewer than
  two finite ones the step is a skip. Zero-norm microgradients have cosine 0.
  Distances within 16 machine epsilons of 0 count as 0, so copies of one
  microgradient agree even at ``tau = 0``.

  Args:
    tau: cosine distance threshold in [0, 2], or an optax schedule of the step
      count. Works with ``optax.inject_hyperparams``.
    combine: ``"mean"`` or ``"pairwise"``.
    num_microbatches: K, if known. It gives the state's per-microbatch statistics
      (``distances``, ``accepted``, ``finite``) their length at ``init``;
      without it they start empty and take length K at the first update (one
      extra trace under ``jit``; pass K to use the state in ``lax.scan``).
      With ``axis_name`` this is the total K over all devices.
    axis_name: for data parallelism: the ``jax.shard_map`` mesh axis or
      ``jax.pmap`` axis the microgradients are spread over. Each device passes
      its own microgradients; all devices return the same filtered gradient
      (replicated, like ``lax.pmean``), equal to single-device ``gaf`` over
      all ``K = devices x K_local`` microgradients in device-major order.
      A tuple of mesh axes (e.g. ``("host", "device")``) spans them all.
      The K x K Gram matrix is shared first, then the update is one weighted
      all-reduce. Calling ``update`` outside a trace binding the axis raises
      ValueError naming it.
    mode: how the cross-device inner products travel: ``"all_gather"``
      (exact; gathers all microgradients, K x P memory per device),
      ``"ring"`` (exact; half a ring of ``ppermute`` steps, O(P) extra memory
      and about half the bytes, for large models) or ``"sketch"`` (estimated
      cosines from ``sketch_dim``-dimensional count-sketches: only K x
      ``sketch_dim`` values travel besides the all-reduce). See
      :func:`cross_device_gram`.
    sketch_dim: the sketch size d for ``mode="sketch"``.
    sketch_seed: seed of the sketch's random signs (identical on all devices;
      fresh signs every step).
    local_axis: with ``axis_name``: True if each device's leaves have a
      leading local microbatch axis ``K_local``; False if each device holds
      one microgradient shaped like the parameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``init(params)`` takes
    parameters without the microbatch axis and whose
    ``update(grads, state, params=None)`` takes microgradients with it. The
    state is a :class:`GafState`.

  Raises:
    ValueError: ``tau`` outside [0, 2] or NaN, unknown ``combine``,
      ``num_microbatches < 2``, unknown ``mode``, ``sketch_dim`` missing or
      invalid; at update, leaves without the microbatch axis, leaves with
      different K, K < 2, or ``axis_name`` not bound.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_gaf
    >>> opt = optax.chain(optax_gaf.gaf(0.97), optax.sgd(0.1))
    >>> params = {'w': jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> grads = {'w': jnp.array([[1., 0., 0.], [1., 1., 0.]])}  # K = 2
    >>> updates, state = opt.update(grads, state, params)
    >>> updates['w']
    Array([-0.1 , -0.05, -0.  ], dtype=float32)

  References:
    Chaubard, Eddy and Kochenderfer, *Beyond Gradient Averaging in Parallel
    Optimization: Improved Robustness through Gradient Agreement Filtering*,
    2024. https://arxiv.org/abs/2412.18052

  .. warning::
    Place ``gaf`` first in a chain: it needs per-microbatch gradients, and it
    emits zeros on a skip, which later stateful transformations (momentum,
    Adam) still count as a step. :func:`with_gaf` skips them properly.
  """
  return make_gaf(tau, combine, num_microbatches, axis_name, mode, sketch_dim,
                  sketch_seed, local_axis, caller="gaf")


def make_gaf(
    tau: base.TauLike,
    combine: base.Combine,
    num_microbatches: int | None,
    axis_name: Any,
    mode: str,
    sketch_dim: int | None,
    sketch_seed: int,
    local_axis: bool,
    caller: str,
) -> optax.GradientTransformationExtraArgs:
  """:func:`gaf`, with ``caller`` naming the public function in error messages.

  Validates every argument once; :func:`~optax_gaf.with_gaf` builds on it.
  """
  base.check_tau(tau)
  base.check_combine(combine)
  k_static = base.check_num_microbatches(num_microbatches)
  config = collective.make_config(
      axis_name, mode, sketch_dim, sketch_seed, local_axis, caller=caller)

  def init_fn(params: optax.Params) -> GafState:
    del params
    base.warn_if_unsized(num_microbatches, caller)
    return init_gaf_state(k_static)

  def update_fn(grads, state: GafState, params=None, **extra_args):
    del extra_args
    tau_t = current_tau(tau, state.count)
    filtered, agreement = filter_step(
        grads, state, tau_t, combine, k_static, config, params, caller=caller)
    return filtered, next_gaf_state(state, tau_t, agreement)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
