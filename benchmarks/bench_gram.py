"""Where the filter's time goes: its parts, each against the tensordot mean.

For the grid points of the filter target (K = 8, P = 1e6 and 1e7, the pytree
of ``bench_filter.py``) times, interleaved in one process:

* ``mean``: ``jnp.tensordot(jnp.full(K, 1/K), g, 1)`` per leaf (the baseline);
* ``gram``: ``optax_gaf.gram_matrix`` as shipped (chunked multiply-reduce for
  large leaves);
* ``gram_dot``: one ``[K, n] x [n, K]`` ``dot_general`` per leaf (what
  ``gram_matrix`` did before the chunked path);
* ``wsum``: the weighted sum ``sum_i w_i g_i`` with the NaN mask;
* ``gaf``: the whole jitted ``gaf`` update.

With ``--single-leaves`` it instead times the two Gram strategies on one
``[K, n]`` leaf over a range of sizes (what sets ``gram._CHUNKED_MIN_BYTES``).

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
                      help="chunked vs one product on single [K, n] leaves of growing size")
  args = parser.parse_args(argv)
  _common.pin_threads(args.threads)
  if args.single_leaves:
    return single_leaves(args)

  import jax
  import jax.numpy as jnp
  import optax_gaf
  from optax_gaf._src import combine as combine_lib
  from optax_gaf._src import gram as gram_lib

  gaf = optax_gaf.gaf(1.0)

  def as_matrix(x):
    return jnp.reshape(x, (x.shape[0], -1))

  fns = {
      "mean": jax.jit(lambda g: jax.tree.map(
          lambda x: jnp.tensordot(jnp.full((x.shape[0],), 1 / x.shape[0], x.dtype), x, 1), g)),
      "gram": jax.jit(gram_lib.gram_matrix),
      "gram_dot": jax.jit(lambda g: sum(
          gram_lib._dot_gram(as_matrix(x), as_matrix(x), jnp.float32)
          for x in jax.tree.leaves(g))),
      "wsum": jax.jit(lambda g, w, f: combine_lib.weighted_sum(w, g, f)),
      "gaf": jax.jit(lambda g, s: gaf.update(g, s)[0]),
  }
  columns = ["P", "K", "mean ms"] + [f"{name}/mean" for name in fns if name != "mean"]
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
      calls = {
          "mean": lambda: fns["mean"](grads),
          "gram": lambda: fns["gram"](grads),
          "gram_dot": lambda: fns["gram_dot"](grads),
          "wsum": lambda: fns["wsum"](grads, w, finite),
          "gaf": lambda: fns["gaf"](grads, state),
      }
      t = _common.time_interleaved(calls, warmup=2, repeats=args.repeats)
      row = [n, k, t["mean"] * 1e3] + [t[name] / t["mean"] for name in calls if name != "mean"]
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


def single_leaves(args) -> int:
  """Chunked multiply-reduce vs one ``dot_general`` on single leaves."""
  import jax
  import jax.numpy as jnp
  from optax_gaf._src import gram as gram_lib

  mean = jax.jit(lambda x: jnp.tensordot(jnp.full((x.shape[0],), 1 / x.shape[0], x.dtype), x, 1))
  chunked = jax.jit(lambda x: gram_lib._chunked_gram_impl(
      jnp.reshape(x, (x.shape[0], -1, gram_lib._chunk_size(x.shape[1])))))
  dot = jax.jit(lambda x: gram_lib._dot_gram(x, x, jnp.float32))
  columns = ["K", "n", "leaf MiB", "mean ms", "chunked/mean", "dot/mean"]
  rows = []
  print(" ".join(f"{c:>12}" for c in columns))
  for k in (4, 8, 16):
    for n in (1 << 14, 1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 22):
      x = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
      t = _common.time_interleaved({"mean": lambda: mean(x), "chunked": lambda: chunked(x),
                                    "dot": lambda: dot(x)}, warmup=2, repeats=args.repeats)
      row = [k, n, k * n * 4 / 2**20, t["mean"] * 1e3, t["chunked"] / t["mean"],
             t["dot"] / t["mean"]]
      rows.append(row)
      print(" ".join(f"{v:>12.3g}" if isinstance(v, float) else f"{v:>12}" for v in row),
            flush=True)
  info = _common.header({"timing": "contenders interleaved call by call",
                         "threads": args.threads or "all allowed", "dtype": "float32"})
  md = _common.write_results(
      "gram_leaves", "Gram of one [K, n] leaf: chunked multiply-reduce vs one dot_general",
      info, columns, rows, [_common.NOISE_NOTE])
  print("\n" + md)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
