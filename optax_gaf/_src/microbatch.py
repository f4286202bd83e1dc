"""``microbatch_grads``: per-microbatch gradients with a leading K axis."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_gaf._src import base


def split_batch(batch: Any, num_microbatches: int, caller: str = "microbatch_grads") -> Any:
  """Reshapes every leaf of ``batch`` from ``[B, ...]`` to ``[K, B // K, ...]``.

  Raises:
    ValueError: a leaf without a batch axis, leaves with different batch sizes,
      or a batch size not divisible by ``num_microbatches``.
  """
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError(f"`{caller}` got an empty batch")
  b, first = None, None
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path) or "<root>"
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(f"Batch leaf {name} is a scalar: it has no batch axis to split")
    if b is None:
      b, first = shape[0], name
    elif shape[0] != b:
      raise ValueError(
          f"Batch leaves disagree on the batch size: {first} has {b} rows, "
          f"{name} has {shape[0]}")
  if b % num_microbatches:
    raise ValueError(
        f"The batch size {b} is not divisible by num_microbatches="
        f"{num_microbatches}; use a batch of a multiple of {num_microbatches} rows")
  return jax.tree.map(
      lambda x: jnp.reshape(x, (num_microbatches, b // num_microbatches, *jnp.shape(x)[1:])),
      batch)


def microbatch_grads(
    loss_fn: Callable[..., Any],
    num_microbatches: int,
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Turns a loss over a batch into a function of per-microbatch gradients.

  ``loss_fn(params, batch, *args)`` returns a scalar loss (or ``(loss, aux)``
  with ``has_aux=True``). The returned function splits the batch's leading
  dimension ``B`` into ``[K, B / K]`` and vmaps ``jax.grad(loss_fn)`` over the
  K microbatches; extra positional arguments are shared by all microbatches.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``).
    num_microbatches: K >= 2.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(params, batch, *args)`` returning gradients whose every leaf has
    shape ``[K, *param.shape]`` (and, with ``has_aux``, ``(grads, aux)`` with
    aux stacked along K). A batch size not divisible by K raises ValueError.

  Examples:
    >>> import jax.numpy as jnp, optax_gaf
    >>> loss = lambda p, b: jnp.mean((b['x'] * p['w'] - b['y']) ** 2)
    >>> grad_fn = optax_gaf.microbatch_grads(loss, 2)
    >>> batch = {'x': jnp.arange(4.), 'y': jnp.zeros(4)}
    >>> grad_fn({'w': jnp.ones(())}, batch)['w']
    Array([ 1., 13.], dtype=float32)
  """
  k = base.check_num_microbatches(num_microbatches)
  if k is None:
    raise ValueError(f"`num_microbatches` must be an int >= 2, got {num_microbatches!r}")
  grad = jax.grad(loss_fn, has_aux=has_aux)

  def grad_fn(params, batch, *args):
    micro = split_batch(batch, k)
    return jax.vmap(lambda b: grad(params, b, *args))(micro)

  return grad_fn
