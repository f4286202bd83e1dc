"""Filter overhead: the jitted ``gaf`` update alone vs the cheapest plain mean.

For each K and P, times (medians, interleaved, same process)

* ``mean``: ``jnp.tensordot(jnp.full(K, 1/K), g, 1)`` per leaf, jitted (the
  cheapest plain average on XLA:CPU; ``jnp.mean(axis=0)`` is slower);
* ``gaf``: ``optax_gaf.gaf(tau).update(grads, state)``, jitted;

on float32 microgradients of P parameters spread over a realistic pytree of
tens of leaves (dense and conv kernels with biases). The physical floor for
GAF is about two passes over the K x P gradients (Gram matrix, weighted sum)
against one for the mean, i.e. a ratio near 2.

Usage::

  python benchmarks/bench_filter.py                 # full grid (~5 min)
  python benchmarks/bench_filter.py --quick         # small smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def leaf_shapes(num_params: int) -> list[tuple[int, ...]]:
  """Shapes of a CNN + MLP-like pytree (24 leaves) with about ``num_params`` entries.

  Eight conv kernels ``(3, 3, c, c)`` and four dense kernels ``(d, d)`` with
  their biases; ``c`` and ``d`` (multiples of 16, as channel counts usually
  are) are chosen so that the convs hold about 40% and the dense kernels
  about 60% of the parameters.
  """
  c = max(16, 16 * round((0.4 * num_params / (8 * 9)) ** 0.5 / 16))
  d = max(16, 16 * round((0.6 * num_params / 4) ** 0.5 / 16))
  shapes: list[tuple[int, ...]] = []
  for _ in range(8):
    shapes += [(3, 3, c, c), (c,)]
  for _ in range(4):
    shapes += [(d, d), (d,)]
  return shapes


def make_grads(key, k: int, shapes, dtype):
  """Correlated microgradients: a shared direction plus per-microbatch noise."""
  import jax
  import jax.numpy as jnp
  grads = {}
  for i, shape in enumerate(shapes):
    key, k1, k2 = jax.random.split(key, 3)
    common = jax.random.normal(k1, shape, dtype)
    noise = jax.random.normal(k2, (k, *shape), dtype)
    grads[f"layer{i // 2:02d}/{'kernel' if i % 2 == 0 else 'bias'}"] = common + 1.5 * noise
  return grads


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
  parser.add_argument("--ps", type=float, nargs="+", default=[1e5, 1e6, 1e7])
  parser.add_argument("--repeats", type=int, default=0,
                      help="timed calls per contender (0: by size)")
  parser.add_argument("--threads", type=int, default=None,
                      help="pin to this many cores before importing jax")
  parser.add_argument("--combine", default="mean", choices=["mean", "pairwise"])
  parser.add_argument("--quick", action="store_true", help="tiny grid, no result files")
  parser.add_argument("--out", default="filter", help="results/<out>.{md,json}")
  args = parser.parse_args(argv)
  if args.quick:
    args.ks, args.ps = [2, 8], [1e5, 1e6]
  _common.pin_threads(args.threads)

  import jax
  import jax.numpy as jnp
  import optax_gaf

  dtype = jnp.float32
  gaf = optax_gaf.gaf(1.0, combine=args.combine)

  @jax.jit
  def mean_fn(grads):
    k = jax.tree.leaves(grads)[0].shape[0]
    return jax.tree.map(lambda g: jnp.tensordot(jnp.full((k,), 1 / k, g.dtype), g, 1), grads)

  @jax.jit
  def gaf_fn(grads, state):
    return gaf.update(grads, state)

  rows = []
  print(f"{'P':>10} {'K':>3} {'leaves':>6} {'mean ms':>9} {'gaf ms':>9} {'gaf/mean':>8} {'GB/s mean':>9}")
  for p in args.ps:
    shapes = leaf_shapes(int(p))
    for k in args.ks:
      grads = make_grads(jax.random.key(0), k, shapes, dtype)
      grads = jax.block_until_ready(grads)
      n = sum(x.size for x in jax.tree.leaves(grads)) // k
      state = gaf.init(None)
      reps = args.repeats or (30 if k * n <= 2e7 else 10)
      t = _common.time_interleaved(
          {"mean": lambda: mean_fn(grads), "gaf": lambda: gaf_fn(grads, state)},
          warmup=2, repeats=reps)
      ratio = t["gaf"] / t["mean"]
      gbps = k * n * 4 / t["mean"] / 1e9
      print(f"{n:>10d} {k:>3d} {len(shapes):>6d} {t['mean'] * 1e3:>9.3f} "
            f"{t['gaf'] * 1e3:>9.3f} {ratio:>8.2f} {gbps:>9.1f}", flush=True)
      rows.append([n, k, len(shapes), t["mean"] * 1e3, t["gaf"] * 1e3, ratio])
      del grads

  if not args.quick:
    info = _common.header({"timing": "contenders interleaved call by call",
                           "threads": args.threads or "all allowed",
                           "combine": args.combine, "dtype": "float32"})
    notes = ["Target: gaf/mean <= 2.5 at K=8, P=1e6 and 1e7 (floor ~2: two passes "
             "over K x P memory vs one).", _common.NOISE_NOTE]
    md = _common.write_results(
        args.out, "Filter overhead: jitted gaf update vs tensordot mean", info,
        ["P", "K", "leaves", "mean ms", "gaf ms", "gaf/mean"], rows, notes)
    print("\n" + md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
