"""Where the filter's time goes: its parts, each against the tensordot mean.

For the grid points of the filter target (K = 8, P = 1e6 and 1e7, the pytree
of ``bench_filter.py``) times, interleaved in one process:

* ``mean``: ``jnp.tensordot(jnp.full(K, 1/K), g, 1)`` per leaf (the baseline);
* ``gram``: ``optax_gaf.gram_matrix`` as shipped (on CPU, the native kernel
  of ``native_gram.py`` when it can be built);
* ``gram_xla``: what ``gram_matrix`` falls back to without the native kernel
  (one product per leaf, blocked products for leaves of >= 8 MiB);
* ``gram_dot``: one ``[K, n] x [n, K]`` ``dot_general`` per leaf (what
  ``gram_matrix`` does for small leaves and on GPU/TPU);
* ``gram_mulreduce``: the earlier path, a fused multiply-reduce over 64-column
  chunks for leaves of >= 8 MiB, one product for the others;
* ``wsum``: the weighted sum ``sum_i w_i g_i`` with the NaN mask;
* ``gram_sum``: the one-pass filter's first pass (``native_filter.py``): each
  leaf's Gram matrix and column sum S from the native kernel;
* ``combine_all``: its second pass when all K agree (``S / K``, no
  microgradient read);
* ``combine_half``: its second pass when half agree (those K/2 read);
* ``gaf``: the whole jitted ``gaf`` update (all K agree here; see
  ``bench_filter.py --scenario`` for the other cases).

With ``--single-leaves`` it instead times three Gram strategies on one
``[K, n]`` leaf over a range of sizes (what sets ``gram._BLOCKED_MIN_BYTES``):
one product, the earlier chunked multiply-reduce, the blocked loop (the XLA
fallback) and the native kernel.

With ``--alternatives`` it times other XLA formulations that were tried on
single K = 8 leaves (the symmetric half via row blocks, a gather of the upper
triangle, a batched product over column chunks, blocked row halves) and
NumPy's ``x @ x.T`` (its BLAS) against NumPy's own mean, and reports the
arithmetic rate of the XLA fallback and of the native kernel (K(K+1)/2 n
multiply-adds per leaf).

Usage::

  python benchmarks/bench_gram.py --threads 1
  python benchmarks/bench_gram.py --threads 1 --single-leaves
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import bench_filter  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=[8])
  parser.add_argument("--ps", type=float, nargs="+", default=[1e6, 1e7])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--threads", type=int, default=None,
                      help="pin to this many cores before importing jax")
  parser.add_argument("--single-leaves", action="store_true",
                      help="one product vs multiply-reduce vs blocked on single [K, n] leaves")
  parser.add_argument("--alternatives", action="store_true",
                      help="other Gram formulations (and NumPy's BLAS) on single K = 8 leaves")
  args = parser.parse_args(argv)
  _common.pin_threads(args.threads)
  if args.single_leaves:
    return single_leaves(args)
  if args.alternatives:
    return alternatives(args)

  import jax
  import jax.numpy as jnp
  import optax_gaf
  from optax_gaf._src import combine as combine_lib
  from optax_gaf._src import gram as gram_lib
  from optax_gaf._src import native_filter

  gaf = optax_gaf.gaf(1.0)

  def as_matrix(x):
    return jnp.reshape(x, (x.shape[0], -1))

  fns = {
      "mean": jax.jit(_common.tensordot_mean),
      "gram": jax.jit(gram_lib.gram_matrix),
      "gram_xla": jax.jit(lambda g: sum(
          gram_lib.leaf_products(as_matrix(x), as_matrix(x), jnp.dtype(jnp.float32))
          for x in jax.tree.leaves(g))),
      "gram_dot": jax.jit(lambda g: sum(
          gram_lib.dot(as_matrix(x), as_matrix(x), jnp.float32)
          for x in jax.tree.leaves(g))),
      "gram_mulreduce": jax.jit(lambda g: sum(
          _multiply_reduce_gram(as_matrix(x)) if x.size * 4 >= 8 << 20 and x.size % (64 * x.shape[0]) == 0
          else gram_lib.dot(as_matrix(x), as_matrix(x), jnp.float32)
          for x in jax.tree.leaves(g))),
      "wsum": jax.jit(lambda g, w, f: combine_lib.weighted_sum(w, g, f)),
      "gram_sum": jax.jit(lambda g: [native_filter._gram_and_sum(as_matrix(x))
                                     for x in jax.tree.leaves(g)]),
      "combine": jax.jit(lambda g, s, c, a: [native_filter._combine(as_matrix(x), t, c, a)
                                             for x, t in zip(jax.tree.leaves(g), s)]),
      "gaf": jax.jit(lambda g, s: gaf.update(g, s)[0]),
  }
  parts = ["gram", "gram_xla", "gram_dot", "gram_mulreduce", "wsum", "gram_sum", "combine_all",
           "combine_half", "gaf"]  # the keys of ``calls`` below, after "mean"
  columns = ["P", "K", "mean ms"] + [f"{name}/mean" for name in parts]
  rows = []
  print(" ".join(f"{c:>13}" for c in columns))
  for p in args.ps:
    shapes = bench_filter.leaf_shapes(int(p))
    for k in args.ks:
      grads = jax.block_until_ready(
          bench_filter.make_grads(jax.random.key(0), k, shapes, jnp.float32))
      n = sum(x.size for x in jax.tree.leaves(grads)) // k
      w = jnp.full((k,), 1 / k)
      finite = jnp.ones((k,), bool)
      state = gaf.init(None)
      sums = [jnp.sum(as_matrix(x), axis=0) for x in jax.tree.leaves(grads)]
      half = jnp.where(jnp.arange(k) % 2 == 0, 2 / k, 0.0)
      calls = {
          "mean": lambda: fns["mean"](grads),
          "gram": lambda: fns["gram"](grads),
          "gram_xla": lambda: fns["gram_xla"](grads),
          "gram_dot": lambda: fns["gram_dot"](grads),
          "gram_mulreduce": lambda: fns["gram_mulreduce"](grads),
          "wsum": lambda: fns["wsum"](grads, w, finite),
          "gram_sum": lambda: fns["gram_sum"](grads),
          "combine_all": lambda: fns["combine"](grads, sums, jnp.zeros((k,)), 1 / k),
          "combine_half": lambda: fns["combine"](grads, sums, half, 0.0),
          "gaf": lambda: fns["gaf"](grads, state),
      }
      t = _common.time_interleaved(calls, warmup=2, repeats=args.repeats)
      row = [n, k, t["mean"] * 1e3] + [t[name] / t["mean"] for name in parts]
      rows.append(row)
      print(" ".join(f"{v:>13.3g}" if isinstance(v, float) else f"{v:>13}" for v in row),
            flush=True)
      del grads

  info = _common.header({"timing": "contenders interleaved call by call",
                         "threads": args.threads or "all allowed", "dtype": "float32"})
  md = _common.write_results(
      "gram", "Filter parts (Gram matrix, weighted sum) vs tensordot mean", info, columns,
      rows, [_common.NOISE_NOTE])
  print("\n" + md)
  return 0


def _multiply_reduce_gram(x, c=64):
  """The previous large-leaf path, kept here for comparison.

  ``[K, n // c, c]`` chunks, one fused multiply-reduce to ``[K, K, n // c]``
  partial products, then a second sum (an optimization barrier keeps the two
  sums apart).
  """
  import jax.numpy as jnp
  from jax import lax
  k, n = x.shape
  y = jnp.reshape(x, (k, n // c, c))
  partial = jnp.sum(y[:, None] * y[None, :], axis=-1)
  return jnp.sum(lax.optimization_barrier(partial), axis=-1)


def single_leaves(args) -> int:
  """One product vs multiply-reduce vs blocked products on single leaves."""
  import jax
  import jax.numpy as jnp
  from optax_gaf._src import gram as gram_lib

  f32 = jnp.dtype(jnp.float32)
  mean = jax.jit(_common.tensordot_mean)
  from optax_gaf._src import native_gram
  fns = {
      "dot": jax.jit(lambda x: gram_lib.dot(x, x, f32)),
      "mulreduce": jax.jit(_multiply_reduce_gram),
      "blocked": jax.jit(lambda x: gram_lib._blocked_products(x, x, f32)),
  }
  if native_gram.available():
    fns["native"] = jax.jit(native_gram.gram)
  columns = ["K", "n", "leaf MiB", "mean ms"] + [f"{name}/mean" for name in fns]
  rows = []
  print(" ".join(f"{c:>12}" for c in columns))
  for k in args.ks if args.ks != [8] else (2, 4, 8, 16):
    for n in (1 << 14, 1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 22):
      x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
      calls = {"mean": lambda: mean(x)}
      calls.update({name: (lambda f=f: f(x)) for name, f in fns.items()})
      t = _common.time_interleaved(calls, warmup=2, repeats=args.repeats)
      row = [k, n, k * n * 4 / 2**20, t["mean"] * 1e3] + [t[name] / t["mean"] for name in fns]
      rows.append(row)
      print(" ".join(f"{v:>12.3g}" if isinstance(v, float) else f"{v:>12}" for v in row),
            flush=True)
  info = _common.header({"timing": "contenders interleaved call by call",
                         "threads": args.threads or "all allowed", "dtype": "float32",
                         "blocked": f"columns per block = gram.block_columns(2K, n, 4)"})
  notes = ["dot: one [K, n] x [n, K] dot_general; mulreduce: the earlier chunked "
           "multiply-reduce (c = 64); blocked: the XLA fallback on CPU for leaves of "
           ">= 8 MiB (a loop of dots over column blocks of about 1 MiB of the leaf); native: "
           "the native kernel gram_matrix uses on CPU for float32 leaves.",
           _common.NOISE_NOTE]
  md = _common.write_results(
      "gram_leaves", "Gram of one [K, n] leaf: one product, multiply-reduce, blocked, native",
      info, columns, rows, notes)
  print("\n" + md)
  return 0


def _alternative_grams():
  """Gram formulations that were tried and not shipped, keyed by name."""
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from optax_gaf._src import gram as gram_lib
  f32 = jnp.dtype(jnp.float32)
  dot = lambda a, b: gram_lib.dot(a, b, f32)

  def row_halves(x):  # 3 of the 4 (K/2 x K/2) blocks: 3/4 of the multiply-adds
    h = x.shape[0] // 2
    top, bottom = x[:h], x[h:]
    tb = dot(top, bottom)
    return jnp.block([[dot(top, top), tb], [tb.T, dot(bottom, bottom)]])

  def upper_gather(x, c=256):  # K(K+1)/2 pairs via a static gather, multiply-reduce
    k, n = x.shape
    i, j = np.triu_indices(k)
    y = jnp.reshape(x, (k, n // c, c))
    s = jnp.sum(jnp.sum(y[i] * y[j], axis=-1), axis=-1)
    g = jnp.zeros((k, k), f32).at[i, j].set(s)
    return g + jnp.triu(g, 1).T

  def batched_chunks(x, c=4096):  # [K, m, c] with m as a batch dimension
    k, n = x.shape
    y = jnp.reshape(x, (k, n // c, c))
    return jnp.sum(lax.dot_general(y, y, (((2,), (2,)), ((1,), (1,))),
                                   precision=lax.Precision.HIGHEST), axis=0)

  def blocked_row_halves(x, c=32768):  # row halves inside each column block
    k, n = x.shape
    h = k // 2

    def body(b, acc):
      top = lax.dynamic_slice(x, (0, b * c), (h, c))
      bottom = lax.dynamic_slice(x, (h, b * c), (k - h, c))
      return acc[0] + dot(top, top), acc[1] + dot(top, bottom), acc[2] + dot(bottom, bottom)

    z = lambda a, b: jnp.zeros((a, b), f32)
    tt, tb, bb = lax.fori_loop(0, n // c, body, (z(h, h), z(h, k - h), z(k - h, k - h)))
    return jnp.block([[tt, tb], [tb.T, bb]])

  return {"row_halves": row_halves, "upper_gather": upper_gather,
          "batched_chunks": batched_chunks, "blocked_row_halves": blocked_row_halves}


def alternatives(args) -> int:
  """Formulations that were tried, and NumPy's BLAS, on single K = 8 leaves."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from optax_gaf._src import gram as gram_lib

  k = 8
  f32 = jnp.dtype(jnp.float32)
  mean = jax.jit(_common.tensordot_mean)
  from optax_gaf._src import native_gram
  fns = {"xla": jax.jit(lambda x: gram_lib.leaf_products(x, x, f32))}
  if native_gram.available():
    fns["native"] = jax.jit(native_gram.gram)
  fns.update({name: jax.jit(f) for name, f in _alternative_grams().items()})
  columns = (["n", "leaf MiB", "mean ms"] + [f"{name}/mean" for name in fns]
             + ["numpy x@x.T / numpy mean"] + [f"{name} GFMA/s" for name in fns if name in ("xla", "native")])
  rows = []
  print(" ".join(f"{c:>14}" for c in columns))
  for n in (1 << 16, 1 << 18, 1 << 20):
    x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    exact = np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
    for name, f in fns.items():  # every formulation computes the same matrix
      np.testing.assert_allclose(f(x), exact, rtol=1e-4, atol=1e-3 * np.abs(exact).max(),
                                 err_msg=name)
    calls = {"mean": lambda: mean(x)}
    calls.update({name: (lambda f=f: f(x)) for name, f in fns.items()})
    t = _common.time_interleaved(calls, warmup=2, repeats=args.repeats)
    xn, wn = np.asarray(x), np.full((k,), 1 / k, np.float32)
    tn = _common.time_interleaved({"mean": lambda: wn @ xn, "gram": lambda: xn @ xn.T},
                                  warmup=2, repeats=args.repeats, block=lambda r: r)
    row = ([n, k * n * 4 / 2**20, t["mean"] * 1e3] + [t[name] / t["mean"] for name in fns]
           + [tn["gram"] / tn["mean"]]
           + [k * (k + 1) / 2 * n / t[name] / 1e9 for name in fns if name in ("xla", "native")])
    rows.append(row)
    print(" ".join(f"{v:>14.3g}" if isinstance(v, float) else f"{v:>14}" for v in row),
          flush=True)
  info = _common.header({"timing": "contenders interleaved call by call",
                         "threads": args.threads or "all allowed", "dtype": "float32",
                         "numpy": np.__version__})
  notes = ["xla: gram.leaf_products, the fallback without the native kernel (one product "
           "below 8 MiB, blocked above). native: the native kernel (native_gram.py). GFMA/s "
           "counts the K(K+1)/2 distinct products per column (K^2 for a full product would "
           "read 1.8x higher). "
           "row_halves: the three distinct (K/2)-row blocks (3/4 of the multiply-adds; XLA:CPU "
           "copies the row slices). upper_gather: the K(K+1)/2 pairs through a static gather "
           "and one multiply-reduce. batched_chunks: [K, n/c, c] with the chunk index as a "
           "dot batch dimension. blocked_row_halves: row halves inside each column block. "
           "numpy: NumPy's x @ x.T (its BLAS) over NumPy's w @ x.",
           _common.NOISE_NOTE]
  md = _common.write_results(
      "gram_alternatives", "Gram of one [8, n] leaf: formulations tried, each / tensordot mean",
      info, columns, rows, notes)
  print("\n" + md)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
