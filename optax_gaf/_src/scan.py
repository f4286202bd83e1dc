"""Scan-based GAF for one jitted step: K microgradients, O(P) gradient memory.

:func:`gaf_value_and_grad` computes the K microbatch gradients one at a time
inside ``lax.scan`` and folds each into the running filtered gradient
(:func:`~optax_gaf._src.accumulation.fold_microgradient`, the same shared
decision as every other path), so only one microgradient and the aggregate
are alive at a time instead of K stacked ones. :func:`apply_if_agreed` then
runs an inner optimizer on the result, or skips it, exactly as ``with_gaf``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_gaf._src import accumulation
from optax_gaf._src import agreement as agreement_lib
from optax_gaf._src import base
from optax_gaf._src import microbatch
from optax_gaf._src import transform
from optax_gaf._src import wrapper


def gaf_value_and_grad(
    loss_fn: Callable[..., Any],
    num_microbatches: int,
    tau: base.TauLike = 0.97,
    *,
    combine: base.Combine = "mean",
    has_aux: bool = False,
) -> Callable[..., tuple[Any, optax.Updates, agreement_lib.Agreement]]:
  """Loss and GAF-filtered gradient over K microbatches, one at a time.

  The returned function splits the batch's leading dimension ``B`` into K
  microbatches of ``B / K`` (as :func:`~optax_gaf.microbatch_grads`), and runs
  ``jax.value_and_grad(loss_fn)`` on them one after the other in a
  ``lax.scan``, folding each microgradient into the running filtered gradient
  as soon as it is computed. Peak gradient memory is that of two gradients
  (aggregate + current), independent of K; the result equals the vmapped path
  ``gaf(...)`` applied to ``microbatch_grads(loss_fn, K)(params, batch)`` up
  to float32 rounding of the inner products.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``).
    num_microbatches: K >= 2.
    tau: cosine distance threshold in [0, 2], or an optax schedule of the
      step (see ``step`` below).
    combine: ``"mean"`` or ``"pairwise"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``fn(params, batch, *args, step=0) -> (value, grads, agreement)`` where
    ``value`` is the mean loss over the K microbatches (with ``has_aux``:
    ``(mean_loss, aux)``, aux stacked along K), ``grads`` is the filtered
    gradient shaped like ``params`` (all zeros on a skip, never NaN from a
    dropped microgradient) and ``agreement`` an
    :class:`~optax_gaf.Agreement` (``skipped``, ``accepted``, ...). ``step``
    is the step a ``tau`` schedule is evaluated at, e.g.
    ``opt_state.gaf_state.count`` of :func:`apply_if_agreed`. Extra
    positional ``args`` are shared by all microbatches.

  Raises:
    ValueError: ``num_microbatches`` not an int >= 2, bad ``tau`` or
      ``combine``; at call time, a batch size not divisible by K.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_gaf
    >>> loss = lambda p, b: jnp.mean((b['x'] @ p['w'] - b['y']) ** 2)
    >>> grad_fn = optax_gaf.gaf_value_and_grad(loss, 2, tau=0.97)
    >>> opt = optax_gaf.apply_if_agreed(optax.sgd(0.1), num_microbatches=2)
    >>> params = {'w': jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> batch = {'x': jnp.tile(jnp.eye(2), (2, 1)), 'y': jnp.ones(4)}
    >>> @jax.jit
    ... def train_step(params, state, batch):
    ...   loss, grads, agreement = grad_fn(params, batch)
    ...   updates, state = opt.update(grads, state, params, agreement=agreement)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> params, state, loss = train_step(params, state, batch)
    >>> loss, state.gaf_state.accepted   # the two microbatches agree
    (Array(1., dtype=float32), Array([ True,  True], dtype=bool))

    With Flax NNX, differentiate a function of the ``nnx.Param`` state and
    hand ``agreement`` to ``nnx.Optimizer.update`` as a keyword:

    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> graphdef, _ = nnx.split(model)
    >>> def nnx_loss(params, b):
    ...   return jnp.mean((nnx.merge(graphdef, params)(b['x'])[:, 0] - b['y']) ** 2)
    >>> nnx_grad_fn = optax_gaf.gaf_value_and_grad(nnx_loss, 2)
    >>> optimizer = nnx.Optimizer(
    ...     model, optax_gaf.apply_if_agreed(optax.adam(1e-2), num_microbatches=2),
    ...     wrt=nnx.Param)
    >>> loss, grads, agreement = nnx_grad_fn(nnx.state(model, nnx.Param), batch)
    >>> _ = optimizer.update(model, grads, agreement=agreement)
    >>> int(optimizer.opt_state.gaf_state.count[...])
    1

  References:
    Chaubard, Eddy and Kochenderfer, 2024. https://arxiv.org/abs/2412.18052
  """
  k = base.check_num_microbatches(num_microbatches)
  if k is None:
    raise ValueError(
        f"`gaf_value_and_grad(num_microbatches=...)` must be an int >= 2, got "
        f"{num_microbatches!r}")
  base.check_tau(tau)
  base.check_combine(combine)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, batch, *args, step=0):
    micro = microbatch.split_batch(batch, k, "gaf_value_and_grad")
    tau_t = transform.current_tau(tau, jnp.asarray(step))
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: value_and_grad(params, first, *args)[1])

    def body(running, xs):
      index, mb = xs
      value, grad = value_and_grad(params, mb, *args)
      running = accumulation.fold_microgradient(running, grad, index, tau_t, combine)
      return running, value

    running, values = lax.scan(
        body, accumulation.init_running(shapes, k), (jnp.arange(k), micro))
    grads, agreement = accumulation.finish_running(running, shapes)
    if has_aux:
      losses, aux = values
      return (jnp.mean(losses), aux), grads, agreement
    return jnp.mean(values), grads, agreement

  return fn


def apply_if_agreed(
    inner: optax.GradientTransformation,
    *,
    num_microbatches: int | None = None,
    skip_mode: wrapper.SkipMode = "select",
) -> optax.GradientTransformationExtraArgs:
  """Runs ``inner`` on an already filtered gradient unless the filter skipped.

  The optimizer half of :func:`with_gaf`, for filters that run elsewhere
  (:func:`gaf_value_and_grad`): ``update(grads, state, params,
  agreement=agreement, tau=None)`` applies ``inner`` when
  ``agreement.skipped`` is False and otherwise returns zeros with the inner
  state bit-for-bit unchanged (as :func:`with_gaf`). The state is a
  :class:`~optax_gaf.WithGafState`, so ``state.gaf_state`` logs the same
  statistics as ``with_gaf``; its ``count`` is the step to pass to a ``tau``
  schedule.

  Args:
    inner: the optimizer to run on the filtered gradient.
    num_microbatches: K, if known: gives ``gaf_state``'s per-microbatch
      fields their length at ``init`` (pass it to carry the state through
      ``lax.scan``).
    skip_mode: ``"select"`` (default) or ``"cond"``, as in :func:`with_gaf`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update`` requires the
    keyword ``agreement`` (an :class:`~optax_gaf.Agreement`); the optional
    keyword ``tau`` is only recorded in ``gaf_state.tau`` (without it,
    ``gaf_state.tau`` keeps its previous value, 0 from ``init``: the
    ``Agreement`` does not carry the threshold). Other extra keyword
    arguments are passed to ``inner``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> opt = optax_gaf.apply_if_agreed(optax.sgd(1.0), num_microbatches=2)
    >>> params = {'w': jnp.zeros(2)}
    >>> gram = jnp.array([[1., -1.], [-1., 1.]])   # two opposite gradients
    >>> agreement = optax_gaf.agreement_weights(gram, 0.5, "mean")
    >>> updates, state = opt.update(
    ...     {'w': jnp.zeros(2)}, opt.init(params), params, agreement=agreement)
    >>> bool(state.gaf_state.skipped), bool(optax_gaf.has_updated(state))
    (True, False)
  """
  k_static = base.check_num_microbatches(num_microbatches)
  base.check_choice(skip_mode, wrapper.SKIP_MODES, "apply_if_agreed(skip_mode=...)")

  def init_fn(params: optax.Params) -> wrapper.WithGafState:
    base.warn_if_unsized(num_microbatches, "apply_if_agreed")
    return wrapper.WithGafState(
        gaf_state=transform.init_gaf_state(k_static),
        inner_state=inner.init(params))

  def update_fn(grads, state: wrapper.WithGafState, params=None, *,
                agreement: agreement_lib.Agreement | None = None, tau=None,
                **extra_args):
    if not isinstance(agreement, agreement_lib.Agreement):
      raise ValueError(
          "`apply_if_agreed(...).update` needs the keyword `agreement=` (the "
          "Agreement returned by `gaf_value_and_grad`), got "
          f"{type(agreement).__name__}")
    transform.check_state_size(
        state.gaf_state, agreement.weights.shape[0], k_static)
    updates, inner_state = wrapper.apply_or_skip(
        inner, agreement.skipped, grads, state.inner_state, params, skip_mode, extra_args)
    tau_logged = state.gaf_state.tau if tau is None else tau
    gaf_state = transform.next_gaf_state(state.gaf_state, tau_logged, agreement)
    return updates, wrapper.WithGafState(gaf_state=gaf_state, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
