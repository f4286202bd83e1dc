"""What the filter's state costs per step: three arrays against nine.

``GafState`` stores its nine statistics in three arrays (one per dtype).
Every array of an optimizer state is one more buffer that a jitted step
takes in and hands out. This script times, side by side in one process, a
training loop's jitted step (parameters and state carried from call to
call) on the small MLP of ``bench_torch.py`` (784-128-10, microbatches of
32, SGD with momentum 0.9, ``combine="pairwise"``, ``tau = 1``):

* ``averaging``: the K microgradients averaged (``tensordot`` mean), no GAF;
* ``with_gaf``: ``with_gaf(sgd)`` with its ``GafState`` of three arrays;
* ``nine arrays``: the same ``with_gaf`` step, but the statistics travel in
  and out of the jitted step as nine separate arrays (``as_dict()``, packed
  back with ``GafState.from_statistics`` inside), the layout before the packing.

Usage::

  python benchmarks/bench_state.py --threads 1
  python benchmarks/bench_state.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SIZES = (784, 128, 10)


def make_calls(k: int, microbatch: int, tau: float = 1.0, lr: float = 0.01):
  """No-argument calls of the three steps, each carrying its own state."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import optax_gaf

  import bench_torch

  rng = np.random.default_rng(0)
  params = [(jnp.asarray(rng.normal(size=(b, a)).astype(np.float32) / np.sqrt(a)),
             jnp.zeros(b)) for a, b in zip(SIZES[:-1], SIZES[1:])]
  xs, ys = bench_torch.make_data(1, k, microbatch, SIZES[0], SIZES[-1], 7)
  batch = {"x": jnp.asarray(xs[0]), "y": jnp.asarray(ys[0])}
  sgd = optax.sgd(lr, momentum=0.9)
  gaf = optax_gaf.with_gaf(sgd, tau, combine="pairwise", num_microbatches=k)
  grads = optax_gaf.microbatch_grads(bench_torch.jax_mlp_loss, k)

  @jax.jit
  def averaging(p, s):
    updates, s = sgd.update(_common.tensordot_mean(grads(p, batch)), s, p)
    return optax.apply_updates(p, updates), s

  @jax.jit
  def packed(p, s):
    updates, s = gaf.update(grads(p, batch), s, p)
    return optax.apply_updates(p, updates), s

  @jax.jit
  def nine(p, inner, stats):
    state = optax_gaf.WithGafState(optax_gaf.GafState.from_statistics(**stats), inner)
    updates, state = gaf.update(grads(p, batch), state, p)
    return optax.apply_updates(p, updates), state.inner_state, state.gaf_state.as_dict()

  def carried(step, *state):
    box = [params, *state]

    def call():
      box[:] = step(*box)
      return box[0]
    return call

  start = gaf.init(params)
  return {"averaging": carried(averaging, sgd.init(params)),
          "with_gaf": carried(packed, start),
          "nine arrays": carried(nine, start.inner_state, start.gaf_state.as_dict())}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--microbatch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=1000)
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--quick", action="store_true", help="small run, no result files")
  parser.add_argument("--out", default="state")
  args = parser.parse_args(argv)
  if args.quick:
    args.ks, args.repeats = [4], 20
  _common.pin_threads(args.threads)

  rows = []
  print(f"{'K':>3} {'averaging us':>13} {'with_gaf us':>12} {'nine us':>9} "
        f"{'with_gaf/avg':>13} {'nine/avg':>9} {'nine - with_gaf us':>19}")
  for k in args.ks:
    calls = make_calls(k, args.microbatch)
    times = _common.time_interleaved_all(calls, warmup=20, repeats=args.repeats)
    t = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    row = [k, t["averaging"], t["with_gaf"], t["nine arrays"],
           t["with_gaf"] / t["averaging"], t["nine arrays"] / t["averaging"],
           t["nine arrays"] - t["with_gaf"]]
    print(f"{k:>3d} {row[1]:>13.1f} {row[2]:>12.1f} {row[3]:>9.1f} {row[4]:>13.3f} "
          f"{row[5]:>9.3f} {row[6]:>19.1f}", flush=True)
    rows.append(row)

  if not args.quick:
    info = _common.header({"timing": "contenders interleaved call by call, medians",
                           "threads": args.threads or "all allowed", "model": "MLP 784-128-10",
                           "microbatch": args.microbatch, "repeats": args.repeats,
                           "optimizer": "sgd(0.01, momentum=0.9)", "tau": 1.0,
                           "combine": "pairwise"})
    notes = ["Each call is one training step carrying its parameters and state to the next. "
             "with_gaf: the GafState of three arrays; nine arrays: the same step with the nine "
             "statistics as separate arrays in and out of the jitted step (the layout before "
             "the packing).", _common.NOISE_NOTE]
    md = _common.write_results(
        args.out, "Filter state: three arrays against nine (jitted train step)", info,
        ["K", "averaging us", "with_gaf us", "nine arrays us", "with_gaf/averaging",
         "nine arrays/averaging", "nine arrays - with_gaf us"], rows, notes)
    print("\n" + md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
