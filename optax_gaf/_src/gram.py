"""Gram matrix of microbatch gradients: ``G[i, j] = <g_i, g_j>`` over all leaves."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optax_gaf._src import base
from optax_gaf._src import native_gram


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype inner products are accumulated in: float32 or wider."""
  return jnp.promote_types(dtype, jnp.float32)


def tree_accumulation_dtype(grads: base.MicroGrads) -> jnp.dtype:
  """The widest accumulation dtype over the leaves of ``grads``."""
  dtype = jnp.dtype(jnp.float32)
  for leaf in jax.tree.leaves(grads):
    dtype = jnp.promote_types(dtype, accumulation_dtype(leaf.dtype))
  return dtype


def num_microbatches(
    grads: base.MicroGrads, params: Any = None, *, local: bool = False
) -> int:
  """Returns the size K of the leading microbatch axis shared by every leaf.

  Args:
    grads: a pytree whose every leaf has a leading microbatch axis.
    params: optional parameters (without the microbatch axis); when given,
      each gradient leaf must have shape ``(K, *param.shape)``.
    local: if True, K may be 1 (a per-device slice of a larger K).

  Returns:
    K, a Python int.

  Raises:
    ValueError: if a leaf has no leading axis, leaves disagree on K, a leaf
      does not match its parameter, or K < 2.
  """
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  if not leaves:
    raise ValueError("GAF got an empty gradient pytree")
  names = [jax.tree_util.keystr(path) or "<root>" for path, _ in leaves]
  for name, (_, leaf) in zip(names, leaves):
    base.check_floating_leaf(leaf, name)
  if params is not None:
    _check_against_params(names, [leaf for _, leaf in leaves], params)
  k = None
  first = None
  for name, (_, leaf) in zip(names, leaves):
    shape = tuple(jnp.shape(leaf))
    if len(shape) == 0:
      raise ValueError(
          f"Gradient leaf {name} is a scalar: it has no leading microbatch "
          "axis. GAF expects every leaf to have shape (K, *param_shape), e.g. "
          "from `jax.vmap(jax.grad(loss))` or `optax_gaf.microbatch_grads`.")
    if k is None:
      k, first = shape[0], (name, shape)
    elif shape[0] != k:
      raise ValueError(
          "Gradient leaves disagree on the leading microbatch axis: leaf "
          f"{first[0]} has shape {first[1]} but leaf {name} has shape {shape}. "
          "Every leaf needs the same leading size K.")
  if k < (1 if local else 2):
    raise ValueError(f"GAF needs at least 2 microbatches, got K={k}")
  return k


def _check_against_params(names: list[str], grads: list[Any], params: Any) -> None:
  """Raises ValueError unless each gradient leaf is ``(K, *param.shape)``.

  With as many params leaves as gradient leaves they are paired in order
  (as optax pairs updates with params; the paths may differ, e.g. Flax NNX
  variables against their values). Otherwise only leaves with the same path
  are paired: params may hold leaves that have no gradient (an Equinox
  model's integer buffers or functions, where ``eqx.filter_grad`` gives
  None), and those are not checked.
  """
  p_leaves = jax.tree_util.tree_leaves_with_path(params)
  if len(p_leaves) == len(grads):
    pairs = [(name, g, p) for name, g, (_, p) in zip(names, grads, p_leaves)]
  else:
    by_path = {jax.tree_util.keystr(path) or "<root>": p for path, p in p_leaves}
    pairs = [(name, g, by_path[name]) for name, g in zip(names, grads) if name in by_path]
  shapes = [(name, tuple(jnp.shape(g)), tuple(jnp.shape(p)))
            for name, g, p in pairs if hasattr(p, "shape")]
  fits = lambda g_shape, p_shape: len(g_shape) == len(p_shape) + 1 and g_shape[1:] == p_shape
  k = next((g[0] for _, g, p in shapes if fits(g, p)), None)  # from a leaf that fits
  for name, g_shape, p_shape in shapes:
    if not fits(g_shape, p_shape):
      want = f"(K, *{p_shape})" if k is None else str((k, *p_shape))
      missing = " Is the microbatch axis missing on this leaf?" if g_shape == p_shape else ""
      raise ValueError(
          f"Gradient leaf {name} has shape {g_shape} but its parameter has shape "
          f"{p_shape}: expected {want}, with a leading microbatch axis.{missing}")


def as_matrix(leaf: jax.Array) -> jax.Array:
  """A free ``[K, n]`` view of a ``[K, ...]`` leaf."""
  return jnp.reshape(leaf, (leaf.shape[0], -1))


def gram_matrix(grads: base.MicroGrads) -> jax.Array:
  """Computes the K x K Gram matrix of microgradients summed over leaves.

  Leaf by leaf on a reshaped ``[K, n]`` view (no flatten and
  concatenate), accumulated in float32 (or float64 for float64 gradients)
  at full precision, so bf16/fp16 gradients do not lose the inner products.
  On CPU, float32 leaves go to a native kernel (``native_gram``) when it can
  be built, and otherwise large leaves are multiplied in column blocks (see
  :func:`leaf_products`). It supports ``jit``, ``vmap``, and forward and
  reverse differentiation.

  Args:
    grads: pytree of arrays with a leading microbatch axis K.

  Returns:
    ``G`` of shape ``[K, K]`` with ``G[i, j] = sum_leaves <g_i, g_j>``.

  Raises:
    ValueError: an empty pytree, a scalar or non-floating leaf, or leaves
      with different leading sizes (naming the leaves).
  """
  num_microbatches(grads, local=True)
  return summed_gram(grads)


def summed_gram(grads: base.MicroGrads) -> jax.Array:
  """:func:`gram_matrix` without its argument checks.

  For the library's own callers, which have validated the microgradients
  already (``transform.filter_step`` through :func:`num_microbatches`).
  """
  acc = tree_accumulation_dtype(grads)
  native = acc == jnp.float32 and native_gram.usable()
  total = None
  for leaf in jax.tree.leaves(grads):
    x = as_matrix(leaf)
    if native and x.dtype == jnp.float32:
      g = _native_or_xla_gram(x)
    else:
      g = leaf_products(x, x, acc)
    total = g if total is None else total + g
  return total


@jax.custom_jvp
def _native_or_xla_gram(x: jax.Array) -> jax.Array:
  """``x @ x.T`` of a float32 ``[K, n]`` leaf: the native kernel on CPU.

  Other platforms lower :func:`leaf_products`. The JVP rule keeps
  differentiation off the kernel: the tangent ``dx x^T + x dx^T`` is a plain
  contraction.
  """
  f32 = jnp.dtype(jnp.float32)
  return lax.platform_dependent(
      x, cpu=native_gram.gram, default=lambda x: leaf_products(x, x, f32))


@_native_or_xla_gram.defjvp
def _native_or_xla_gram_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _native_or_xla_gram(x), gram_tangent(x, dx)


def gram_tangent(x: jax.Array, dx: jax.Array) -> jax.Array:
  """The tangent ``dx x^T + x dx^T`` of a float32 leaf's ``x x^T``, a plain contraction.

  The JVP rule of the native kernels: linear in ``dx``, so reverse mode
  transposes it without touching the kernels. Non-finite values of ``x``
  are taken as 0 (see :func:`finite_or_zero`).
  """
  cross = dot(dx, finite_or_zero(x), jnp.dtype(jnp.float32))
  return cross + cross.T


def finite_or_zero(x: jax.Array) -> jax.Array:
  """``x`` with NaN/Inf replaced by 0: the primal factor of the products' tangents.

  A non-finite microgradient is dropped by the filter, so no derivative
  depends on its inner products; but reverse mode multiplies their zero
  cotangents by the primal row, and ``0 * nan`` would put NaN into the
  derivatives of the finite microgradients (e.g. of ``GafState.distances``).
  Tangents of products that involve finite rows only are unchanged. When
  differentiating, reverse mode keeps this copy of the K x P microgradients
  for the transposed products: derivatives through the filter's statistics
  cost that much more memory.
  """
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def cross_products(grads: base.MicroGrads, other: base.MicroGrads) -> jax.Array:
  """Inner products between two stacks of microgradients, summed over leaves.

  Args:
    grads: pytree of arrays with a leading axis of size ``Ki``.
    other: pytree of the same structure and leaf sizes, leading axis ``Kj``.

  Returns:
    ``C`` of shape ``[Ki, Kj]`` with ``C[i, j] = sum_leaves <grads_i, other_j>``,
    accumulated in the widest accumulation dtype of the two.
  """
  acc = jnp.promote_types(tree_accumulation_dtype(grads), tree_accumulation_dtype(other))
  total = None
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other)):
    c = leaf_products(as_matrix(a), as_matrix(b), acc)
    total = c if total is None else total + c
  return total


# One ``[Ki, n] x [n, Kj]`` product with a tiny output is slow on XLA:CPU once
# the operands leave the cache (measured, one thread, K = 8: 7-18x one pass
# over the leaf at 16-48 MiB, against 3-4x at 2-5 MiB). Leaves of at least
# ``_BLOCKED_MIN_BYTES`` (both operands counted, in the accumulation dtype;
# 8 MiB of K microgradients for a Gram matrix) are therefore multiplied in
# column blocks of about ``_BLOCK_BYTES`` (both operands again), which stay
# in cache: 3.6-4x a pass at 16-48 MiB (``benchmarks/bench_gram.py
# --single-leaves``). Other platforms keep one product (a GEMM on GPU/TPU).
_BLOCKED_MIN_BYTES = 16 << 20
_BLOCK_BYTES = 2 << 20
_MIN_BLOCK_COLUMNS = 1024


def block_columns(rows: int, n: int, itemsize: int) -> int:
  """Columns per block: a power of two with about ``_BLOCK_BYTES`` per block."""
  c = max(_MIN_BLOCK_COLUMNS, _BLOCK_BYTES // (rows * itemsize))
  return min(1 << (c.bit_length() - 1), n)


def leaf_products(a: jax.Array, b: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``a @ b.T`` for ``[Ki, n]`` and ``[Kj, n]`` leaves, accumulated in ``acc``.

  Args:
    a: ``[Ki, n]`` array.
    b: ``[Kj, n]`` array.
    acc: accumulation (and result) dtype.

  Returns:
    ``[Ki, Kj]`` inner products. Large leaves on CPU are summed over column
    blocks (same products up to float summation order).
  """
  return _products(a, b, jnp.dtype(acc))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _products(a: jax.Array, b: jax.Array, acc: jnp.dtype) -> jax.Array:
  """One product, or blocked products for large leaves on CPU.

  The JVP rule keeps differentiation (forward and reverse) off the blocked
  loop: the tangent ``da b^T + a db^T`` is two plain contractions, with
  non-finite values of ``a`` and ``b`` taken as 0 (:func:`finite_or_zero`).
  """
  rows = a.shape[0] + b.shape[0]
  if rows * a.shape[1] * acc.itemsize < _BLOCKED_MIN_BYTES:
    return dot(a, b, acc)
  return lax.platform_dependent(
      a, b, cpu=functools.partial(_blocked_products, acc=acc),
      default=functools.partial(dot, acc=acc))


@_products.defjvp
def _products_jvp(acc, primals, tangents):
  (a, b), (da, db) = primals, tangents
  return (_products(a, b, acc),
          dot(da, finite_or_zero(b), acc) + dot(finite_or_zero(a), db, acc))


def _blocked_products(a: jax.Array, b: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``a @ b.T`` as a loop over column blocks that each fit in cache."""
  n = a.shape[1]
  c = block_columns(a.shape[0] + b.shape[0], n, jnp.dtype(acc).itemsize)
  blocks, rest = divmod(n, c)

  def add_block(i, total):
    start = i * c
    return total + dot(lax.dynamic_slice_in_dim(a, start, c, axis=1),
                        lax.dynamic_slice_in_dim(b, start, c, axis=1), acc)

  # Start from the first block, not from zeros: the carry then has the
  # operands' type, including shard_map's varying manual axes.
  total = lax.fori_loop(1, blocks, add_block, dot(a[:, :c], b[:, :c], acc))
  if rest:
    total = total + dot(a[:, blocks * c:], b[:, blocks * c:], acc)
  return total


def dot(a: jax.Array, b: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``a @ b.T`` for ``[Ki, n]`` and ``[Kj, n]`` as one full-precision product in ``acc``."""
  return lax.dot_general(
      a, b, (((1,), (1,)), ((), ())),
      precision=lax.Precision.HIGHEST, preferred_element_type=acc)
