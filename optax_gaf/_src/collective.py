"""GAF across devices: a cross-device Gram matrix, then one weighted all-reduce.

Inside ``jax.shard_map`` or ``jax.pmap`` every device holds ``K_local``
microgradients (total ``K = devices x K_local``, ordered device-major: device
``d`` holds global microgradients ``d * K_local ... (d + 1) * K_local - 1``).
The filter only needs the K x K Gram matrix, so the data flow is:

1. every device computes its own rows of ``G`` (the inner products of its
   microgradients with all others; how the others' gradients travel is the
   ``mode``), and the rows are summed into the same ``G`` on every device by
   a ``psum`` of a K x K matrix (K^2 scalars, so the result is replicated and
   bit-for-bit identical on all devices);
2. every device runs the same :func:`~optax_gaf._src.agreement.agreement_weights`
   on that ``G``: same weights, same skip decision everywhere;
3. the update is ``psum_d(sum_{i on d} w_i g_i)``: one weighted all-reduce of
   the size of the parameters, i.e. the all-reduce that ``lax.pmean`` of the
   gradients already costs, with a replicated result.

Modes (how the inner products of step 1 travel):

- ``"all_gather"`` (exact): all-gather the microgradients (K x P memory and
  ``(devices - 1) x K_local x P`` received values per device), then one
  ``[K_local, K]`` matrix product. Fewest collectives (lowest latency); the
  right choice while K x P fits in memory.
- ``"ring"`` (exact, memory-lean): ``floor(devices / 2)`` steps of
  ``lax.ppermute`` pass one ``K_local x P`` block around a ring; after step
  ``s`` device ``d`` holds device ``d - s``'s block and computes that block of
  ``G``. Since ``G`` is symmetric, half a ring covers every pair of devices, so
  the ring also moves about half the bytes of the all-gather, and holds only
  O(P) extra memory (the block in flight) instead of K x P.
- ``"sketch"`` (approximate): every microgradient is compressed to a shared
  ``sketch_dim``-dimensional count-sketch (random signs from a hash seeded
  identically on all devices, coordinate ``j`` of the concatenated parameters
  goes to bucket ``j mod sketch_dim``), so only ``K x sketch_dim`` values
  travel for the Gram matrix; inner products are unbiased estimates (exact
  when ``sketch_dim >= P``). Finiteness is still decided exactly, from exact
  squared norms that travel along (K scalars).

Collectives are never inside ``lax.cond``; every decision comes from the
reduced ``G``.
"""

from __future__ import annotations

from typing import Any, Hashable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_gaf._src import agreement as agreement_lib
from optax_gaf._src import base
from optax_gaf._src import combine as combine_lib
from optax_gaf._src import gram as gram_lib

Mode = Literal["all_gather", "ring", "sketch"]
MODES: tuple[str, ...] = ("all_gather", "ring", "sketch")


class CollectiveConfig(NamedTuple):
  """Static multi-device settings of :func:`gaf` / :func:`with_gaf`.

  Attributes:
    axis_name: the mapped axis (a ``shard_map`` mesh axis or ``pmap`` name).
    mode: ``"all_gather"``, ``"ring"`` or ``"sketch"``.
    sketch_dim: sketch size d (sketch mode only).
    sketch_seed: seed of the shared random signs (sketch mode only); an int
      or an integer array (``optax.inject_hyperparams`` makes it one).
    local_axis: whether each device's leaves have a leading ``K_local`` axis.
  """
  axis_name: Any
  mode: str
  sketch_dim: int | None
  sketch_seed: int
  local_axis: bool


def make_config(
    axis_name: Hashable | None,
    mode: str = "all_gather",
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    local_axis: bool = True,
    caller: str = "gaf",
) -> CollectiveConfig | None:
  """Validates the multi-device keyword arguments; None for a single device.

  Raises:
    ValueError: unknown ``mode``, ``sketch_dim`` missing or not a positive int
      in sketch mode (or given in another mode), or multi-device options given
      without ``axis_name``.
  """
  base.check_choice(mode, MODES, f"{caller}(mode=...)")
  if sketch_dim is not None:
    if (isinstance(sketch_dim, bool) or not isinstance(sketch_dim, (int, np.integer))
        or sketch_dim < 1):
      raise ValueError(
          f"`{caller}(sketch_dim=...)` must be a static positive int, got "
          f"{sketch_dim!r} (with `optax.inject_hyperparams`, pass "
          "`static_args=('sketch_dim',)`)")
    if mode != "sketch":
      raise ValueError(
          f"`{caller}(sketch_dim={sketch_dim})` is only used with mode='sketch', "
          f"got mode={mode!r}")
  if mode == "sketch" and sketch_dim is None:
    raise ValueError(f"`{caller}(mode='sketch')` needs `sketch_dim` (e.g. 1024)")
  if isinstance(sketch_seed, bool) or not (
      isinstance(sketch_seed, (int, np.integer))
      or jnp.issubdtype(jnp.result_type(sketch_seed), jnp.integer)):
    raise ValueError(f"`{caller}(sketch_seed=...)` must be an int, got {sketch_seed!r}")
  if not isinstance(local_axis, bool):
    raise ValueError(f"`{caller}(local_axis=...)` must be a bool, got {local_axis!r}")
  if axis_name is None:
    if mode != "all_gather" or not local_axis:
      raise ValueError(
          f"`{caller}(mode={mode!r}, local_axis={local_axis})` only applies "
          "across devices: also pass `axis_name` (the shard_map/pmap axis)")
    return None
  return CollectiveConfig(axis_name, mode, None if sketch_dim is None else int(sketch_dim),
                          sketch_seed, local_axis)


def bound_axis_size(axis_name: Hashable, caller: str = "gaf") -> int:
  """``lax.axis_size(axis_name)``, with a clear error when it is not bound.

  Raises:
    ValueError: naming ``axis_name`` if it is not a mapped axis of the
      current trace (not inside ``jax.shard_map`` / ``jax.pmap`` over it).
  """
  try:
    return int(lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
        f"`{caller}(axis_name={axis_name!r})`: the axis name {axis_name!r} is not "
        "bound in the current trace. Call the update inside "
        f"`jax.shard_map` over a mesh with an axis {axis_name!r} or inside "
        f"`jax.pmap(..., axis_name={axis_name!r})`"
        + (", or pass `axis_name=None` for single-device GAF." if caller in ("gaf", "with_gaf")
           else ".")) from e


def local_microgradients(
    grads: base.MicroGrads, params: Any, local_axis: bool
) -> tuple[base.MicroGrads, int]:
  """This device's microgradients with a leading ``K_local`` axis, and K_local.

  With ``local_axis=False`` every leaf is one microgradient shaped like its
  parameter and gets a size-1 leading axis (a free reshape).
  """
  if local_axis:
    return grads, gram_lib.num_microbatches(grads, params, local=True)
  if params is not None:
    g_leaves = jax.tree_util.tree_leaves_with_path(grads)
    p_leaves = jax.tree.leaves(params)
    if len(g_leaves) == len(p_leaves):
      for (path, g), p in zip(g_leaves, p_leaves):
        if jnp.shape(g) != jnp.shape(p):
          name = jax.tree_util.keystr(path) or "<root>"
          raise ValueError(
              f"With `local_axis=False` each device holds one microgradient "
              f"shaped like the parameters, but leaf {name} has shape "
              f"{jnp.shape(g)} and its parameter {jnp.shape(p)}. Use "
              "`local_axis=True` for leaves with a leading local microbatch axis.")
  expanded = jax.tree.map(lambda x: jnp.expand_dims(x, 0), grads)
  return expanded, gram_lib.num_microbatches(expanded, local=True)


def _replicate_rows(rows: jax.Array, axis_name: Any, index: jax.Array,
                    num_devices: int) -> jax.Array:
  """Sums every device's ``rows[...]`` into slot ``index`` of a replicated array.

  A ``psum`` of a zero array with one slot filled per device: each entry is
  written by exactly one device, so the sum is exact and identical on every
  device (and typed as replicated under ``shard_map``).
  """
  full = jnp.zeros((num_devices, *rows.shape), rows.dtype)
  full = lax.dynamic_update_index_in_dim(full, rows, index, 0)
  return lax.psum(full, axis_name)


def gram_all_gather(local: base.MicroGrads, axis_name: Any) -> jax.Array:
  """Exact K x K Gram matrix via an all-gather of the microgradients.

  Args:
    local: this device's microgradients, leaves ``[K_local, ...]``.
    axis_name: the mapped axis.

  Returns:
    The replicated ``[K, K]`` Gram matrix, ``K = devices x K_local``.
  """
  num_devices = bound_axis_size(axis_name)
  gathered = jax.tree.map(lambda x: lax.all_gather(x, axis_name, tiled=True), local)
  rows = gram_lib.cross_products(local, gathered)  # [K_local, K]
  full = _replicate_rows(rows, axis_name, lax.axis_index(axis_name), num_devices)
  return jnp.reshape(full, (-1, full.shape[-1]))


def _ring_block_index(num_devices: int, steps: int):
  """Static tables mapping block ``(a, b)`` of G to a ring result.

  Device ``a`` at step ``s`` holds block ``(a, (a - s) mod D)``. Returns
  ``(dev, step, transpose)`` arrays of shape ``[D, D]``.
  """
  a, b = np.meshgrid(np.arange(num_devices), np.arange(num_devices), indexing="ij")
  fwd = (a - b) % num_devices
  bwd = (b - a) % num_devices
  use_fwd = fwd <= steps
  dev = np.where(use_fwd, a, b)
  step = np.where(use_fwd, fwd, bwd)
  return dev, step, ~use_fwd


def gram_ring(local: base.MicroGrads, axis_name: Any) -> jax.Array:
  """Exact K x K Gram matrix via half a ring of ``lax.ppermute`` steps.

  Args:
    local: this device's microgradients, leaves ``[K_local, ...]``.
    axis_name: the mapped axis.

  Returns:
    The replicated ``[K, K]`` Gram matrix, ``K = devices x K_local``.
  """
  num_devices = bound_axis_size(axis_name)
  steps = num_devices // 2
  perm = [(j, (j + 1) % num_devices) for j in range(num_devices)]
  blocks = [gram_lib.gram_matrix(local)]
  buf = local
  for _ in range(steps):
    buf = lax.ppermute(buf, axis_name, perm)
    blocks.append(gram_lib.cross_products(local, buf))
  mine = jnp.stack(blocks)  # [steps + 1, K_local, K_local]
  every = _replicate_rows(mine, axis_name, lax.axis_index(axis_name), num_devices)
  dev, step, transpose = _ring_block_index(num_devices, steps)
  g = every[dev, step]  # [D, D, K_local, K_local]
  g = jnp.where(transpose[:, :, None, None], jnp.swapaxes(g, -1, -2), g)
  k_local = mine.shape[-1]
  g = jnp.transpose(g, (0, 2, 1, 3))
  return jnp.reshape(g, (num_devices * k_local, num_devices * k_local))


def _as_uint32(x: Any) -> jax.Array:
  """An int or integer array as uint32 (Python ints wrap modulo 2**32)."""
  if isinstance(x, (int, np.integer)):
    return jnp.uint32(int(x) % 2**32)
  return jnp.asarray(x).astype(jnp.uint32)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a cheap, well-mixed integer hash."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def count_sketch(
    grads: base.MicroGrads, sketch_dim: int, seed: int = 0, step: Any = 0
) -> jax.Array:
  """Count-sketches of microgradients: ``[K, ...]`` leaves -> ``[K, sketch_dim]``.

  Coordinate ``j`` of the concatenated (leaf-order) parameter vector is
  multiplied by a random sign ``s_j = +-1`` (a hash of ``seed``, ``step`` and
  ``j``, so all devices agree without communication) and added to bucket
  ``j mod sketch_dim``. ``<S a, S b>`` is an unbiased estimate of ``<a, b>``
  with variance at most ``(|a|^2 |b|^2 + <a, b>^2) / sketch_dim`` roughly, and
  exact when ``sketch_dim >= P``. Costs O(P) work, no random matrix.

  Args:
    grads: pytree with leading axis K.
    sketch_dim: number of buckets d.
    seed: shared seed.
    step: step counter (int scalar, may be traced); fresh signs every step.

  Returns:
    ``[K, sketch_dim]`` sketches in float32 (or float64 for float64 grads).
  """
  acc = gram_lib.tree_accumulation_dtype(grads)
  key = _fmix32(_as_uint32(seed) * jnp.uint32(0x9E3779B9)
                + _as_uint32(step) * jnp.uint32(0x632BE5AB) + jnp.uint32(0x7F4A7C15))
  total = None
  offset = 0
  for leaf in jax.tree.leaves(grads):
    x = jnp.reshape(leaf, (leaf.shape[0], -1))
    n = x.shape[1]
    idx = jnp.arange(offset, offset + n, dtype=jnp.uint32)
    h = _fmix32(idx ^ key)
    sign = jnp.where((h >> 31) == 0, 1, -1).astype(acc)
    y = x.astype(acc) * sign
    start = offset % sketch_dim
    m = -(-(start + n) // sketch_dim)
    y = jnp.pad(y, ((0, 0), (start, m * sketch_dim - start - n)))
    s = jnp.sum(jnp.reshape(y, (y.shape[0], m, sketch_dim)), axis=1)
    total = s if total is None else total + s
    offset += n
  return total


def _squared_norms(grads: base.MicroGrads) -> jax.Array:
  """``[K]`` exact squared norms over all leaves, accumulated in float32+."""
  acc = gram_lib.tree_accumulation_dtype(grads)
  total = None
  for leaf in jax.tree.leaves(grads):
    x = jnp.reshape(leaf, (leaf.shape[0], -1)).astype(acc)
    n2 = jnp.sum(x * x, axis=1)
    total = n2 if total is None else total + n2
  return total


def gram_sketch(
    local: base.MicroGrads, axis_name: Any, sketch_dim: int, seed: int = 0,
    step: Any = 0,
) -> tuple[jax.Array, jax.Array]:
  """Estimated K x K Gram matrix from count-sketches, and the exact finite mask.

  Only ``K x (sketch_dim + 1)`` values travel: each device's sketches and
  exact squared norms (for an exact NaN/Inf test).

  Returns:
    ``(gram, finite)``: replicated ``[K, K]`` estimate and ``[K]`` bool.
  """
  num_devices = bound_axis_size(axis_name)
  sk = count_sketch(local, sketch_dim, seed, step)  # [K_local, d]
  norm2 = _squared_norms(local).astype(sk.dtype)
  mine = jnp.concatenate([sk, norm2[:, None]], axis=1)
  every = _replicate_rows(mine, axis_name, lax.axis_index(axis_name), num_devices)
  every = jnp.reshape(every, (-1, sketch_dim + 1))
  sketches, norms = every[:, :-1], every[:, -1]
  finite = jnp.isfinite(norms)
  safe = jnp.where(finite[:, None], sketches, 0)
  gram = lax.dot_general(safe, safe, (((1,), (1,)), ((), ())),
                         precision=lax.Precision.HIGHEST)
  return gram, finite


def cross_device_gram(
    local: base.MicroGrads,
    axis_name: Hashable,
    *,
    mode: Mode = "all_gather",
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    step: Any = 0,
) -> tuple[jax.Array, jax.Array]:
  """The replicated K x K Gram matrix of microgradients held across devices.

  Call inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name``. Device
  ``d``'s ``K_local`` microgradients are rows ``d * K_local ...`` of the
  result (device-major order); every device gets the same matrix.

  Args:
    local: this device's microgradients, every leaf ``[K_local, ...]``.
    axis_name: the mapped axis, or a tuple of mesh axes (e.g.
      ``("host", "device")``; devices are then ordered row-major over them).
    mode: ``"all_gather"`` (exact), ``"ring"`` (exact, O(P) extra memory,
      about half the bytes) or ``"sketch"`` (estimate from count-sketches).
    sketch_dim: sketch size (sketch mode).
    sketch_seed: shared seed of the sketch signs.
    step: step counter mixed into the sketch signs.

  Returns:
    ``(gram, finite)``: ``[K, K]`` Gram matrix (float32 or wider) and ``[K]``
    bool mask of finite microgradients.

  Raises:
    ValueError: if ``axis_name`` is not bound, the mode is unknown, or the
      leaves of ``local`` are not floating point with one shared leading
      size ``K_local`` (naming the leaf).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax_gaf
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
    >>> grads = {'w': jnp.array([[1., 0.], [1., 1.]])}  # K_local = 2
    >>> f = jax.shard_map(
    ...     lambda g: optax_gaf.cross_device_gram(g, 'data', mode='ring'),
    ...     mesh=mesh, in_specs=P('data'), out_specs=P())
    >>> gram, finite = f(grads)
    >>> gram
    Array([[1., 1.],
           [1., 2.]], dtype=float32)
  """
  if axis_name is None:
    raise ValueError(
        "`cross_device_gram` needs `axis_name`, the shard_map/pmap axis the "
        "microgradients are spread over; on one device use `gram_matrix`")
  cfg = make_config(axis_name, mode, sketch_dim, sketch_seed, True, "cross_device_gram")
  bound_axis_size(axis_name, "cross_device_gram")
  gram_lib.num_microbatches(local, local=True)
  return _gram_and_finite(local, cfg, step)


def _gram_and_finite(
    local: base.MicroGrads, cfg: CollectiveConfig, step: Any
) -> tuple[jax.Array, jax.Array]:
  """:func:`cross_device_gram` for an already validated config and bound axis."""
  if cfg.mode == "sketch":
    return gram_sketch(local, cfg.axis_name, cfg.sketch_dim, cfg.sketch_seed, step)
  gram = (gram_all_gather if cfg.mode == "all_gather" else gram_ring)(local, cfg.axis_name)
  return gram, agreement_lib.finite_from_gram(gram)


def weighted_psum(
    weights: jax.Array, local: base.MicroGrads, finite: jax.Array, axis_name: Any
) -> base.Updates:
  """``sum_i w_i g_i`` over all devices' microgradients: one ``psum``.

  Args:
    weights: replicated ``[K]`` weights.
    local: this device's ``[K_local, ...]`` microgradients.
    finite: replicated ``[K]`` finite mask (non-finite ones are zeroed first).
    axis_name: the mapped axis.

  Returns:
    The replicated combination, leaves shaped like one microgradient, in the
    gradients' dtype (the all-reduce runs in that dtype, like ``lax.pmean``).
  """
  k_local = jax.tree.leaves(local)[0].shape[0]
  start = lax.axis_index(axis_name) * k_local
  w = lax.dynamic_slice_in_dim(weights, start, k_local)
  f = lax.dynamic_slice_in_dim(finite, start, k_local)
  return lax.psum(combine_lib.weighted_sum(w, local, f), axis_name)


def filter_across_devices(
    grads: base.MicroGrads,
    tau: jax.Array,
    combine: base.Combine,
    config: CollectiveConfig,
    *,
    params: Any = None,
    step: Any = 0,
    caller: str = "gaf",
) -> tuple[base.Updates, agreement_lib.Agreement]:
  """Multi-device counterpart of ``transform.filter_microgradients``.

  Args:
    grads: this device's microgradients (see ``config.local_axis``).
    tau: threshold at this step.
    combine: fold rule.
    config: a :class:`CollectiveConfig`.
    params: optional parameters, to check leaf shapes.
    step: step counter (seeds the sketch signs).
    caller: name used in error messages.

  Returns:
    ``(filtered, agreement)``, both replicated over ``config.axis_name``;
    the agreement covers all ``K = devices x K_local`` microgradients.
  """
  num_devices = bound_axis_size(config.axis_name, caller)
  local, k_local = local_microgradients(grads, params, config.local_axis)
  if num_devices * k_local < 2:
    raise ValueError(
        f"GAF needs at least 2 microbatches, got {num_devices} device(s) x "
        f"{k_local} local microbatch(es) over axis {config.axis_name!r}")
  gram, finite = _gram_and_finite(local, config, step)
  agreement = agreement_lib.weights_from_gram(gram, tau, combine, finite)
  filtered = weighted_psum(agreement.weights, local, agreement.finite, config.axis_name)
  return filtered, agreement
