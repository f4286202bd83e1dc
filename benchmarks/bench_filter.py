"""Filter overhead: the jitted ``gaf`` update alone vs the cheapest plain mean.

For each K and P, times (medians, interleaved, same process)

* ``mean``: ``jnp.tensordot(jnp.full(K, 1/K), g, 1)`` per leaf, jitted (the
  cheapest plain average on XLA:CPU; ``jnp.mean(axis=0)`` is slower);
* ``gaf``: ``optax_gaf.gaf(tau).update(grads, state)``, jitted;

on float32 microgradients of P parameters spread over a realistic pytree of
tens of leaves (dense and conv kernels with biases). A filter that reads the
K x P gradients twice (Gram matrix, then weighted sum) has a floor near 2
passes against one for the mean. On single-device CPU the one-pass filter
(``native_filter.py``) reads them once when all agree and once plus the
accepted ones otherwise; ``--scenario`` picks which agree.

Usage::

  python benchmarks/bench_filter.py                 # full grid (~5 min)
  python benchmarks/bench_filter.py --scenario half --ks 8 --ps 1e6 1e7 --out filter_half
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


SCENARIOS = ("agree", "half", "one", "outlier")


def make_grads(key, k: int, shapes, dtype, scenario: str = "agree"):
  """Correlated microgradients: a shared direction plus per-microbatch noise.

  At ``tau = 1`` (cosine distance about 0.7 to the reference) all K agree
  (``scenario="agree"``). ``"half"`` flips the sign of every second one, so
  half are rejected; ``"one"`` flips the last one only (rejected, of
  ordinary length); ``"outlier"`` makes the last one a rejected outlier of
  100x the norm. They are the best and worst cases of the one-pass CPU
  filter (``native_filter.py``): all agreeing, its update is the column sum S
  over K and no microgradient is read twice; otherwise it reads the accepted
  ones again.
  """
  import jax
  import jax.numpy as jnp
  sign = jnp.ones((k,), dtype)
  if scenario == "half":
    sign = jnp.where(jnp.arange(k) % 2 == 1, -1.0, 1.0).astype(dtype)
  elif scenario == "one":
    sign = sign.at[k - 1].set(-1.0)
  elif scenario == "outlier":
    sign = sign.at[k - 1].set(-100.0)
  elif scenario != "agree":
    raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
  grads = {}
  for i, shape in enumerate(shapes):
    key, k1, k2 = jax.random.split(key, 3)
    common = jax.random.normal(k1, shape, dtype)
    noise = jax.random.normal(k2, (k, *shape), dtype)
    g = (common + 1.5 * noise) * jnp.reshape(sign, (k,) + (1,) * len(shape))
    grads[f"layer{i // 2:02d}/{'kernel' if i % 2 == 0 else 'bias'}"] = g
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
  parser.add_argument("--scenario", default="agree", choices=SCENARIOS,
                      help="which microgradients agree (see make_grads)")
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

  mean_fn = jax.jit(_common.tensordot_mean)

  @jax.jit
  def gaf_fn(grads, state):
    return gaf.update(grads, state)

  rows = []
  print(f"{'P':>10} {'K':>3} {'leaves':>6} {'mean ms':>9} {'gaf ms':>9} {'gaf/mean':>8} "
        f"{'GB/s mean':>9} {'accepted':>8}")
  for p in args.ps:
    shapes = leaf_shapes(int(p))
    for k in args.ks:
      grads = make_grads(jax.random.key(0), k, shapes, dtype, args.scenario)
      grads = jax.block_until_ready(grads)
      n = sum(x.size for x in jax.tree.leaves(grads)) // k
      state = gaf.init(None)
      reps = args.repeats or (30 if k * n <= 2e7 else 10)
      t = _common.time_interleaved(
          {"mean": lambda: mean_fn(grads), "gaf": lambda: gaf_fn(grads, state)},
          warmup=2, repeats=reps)
      ratio = t["gaf"] / t["mean"]
      gbps = k * n * 4 / t["mean"] / 1e9
      accepted = int(gaf_fn(grads, state)[1].num_accepted)
      print(f"{n:>10d} {k:>3d} {len(shapes):>6d} {t['mean'] * 1e3:>9.3f} "
            f"{t['gaf'] * 1e3:>9.3f} {ratio:>8.2f} {gbps:>9.1f} {accepted:>8d}", flush=True)
      rows.append([n, k, len(shapes), t["mean"] * 1e3, t["gaf"] * 1e3, ratio, accepted])
      del grads

  if not args.quick:
    info = _common.header({"timing": "contenders interleaved call by call",
                           "threads": args.threads or "all allowed",
                           "combine": args.combine, "dtype": "float32",
                           "scenario": args.scenario, "tau": 1.0})
    notes = ["Target: gaf/mean <= 2.5 at K=8, P=1e6 and 1e7 (floor ~2 for a filter that "
             "reads the microgradients twice: Gram matrix, then weighted sum). accepted: "
             f"microgradients in the update (scenario {args.scenario!r}; see make_grads).",
             _common.NOISE_NOTE]
    md = _common.write_results(
        args.out, "Filter overhead: jitted gaf update vs tensordot mean", info,
        ["P", "K", "leaves", "mean ms", "gaf ms", "gaf/mean", "accepted"], rows, notes)
    print("\n" + md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
