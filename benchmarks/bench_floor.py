"""Hardware floors behind the two missed step targets, measured on this machine.

Two numbers decide whether a target can be met at all here:

* the read rate of XLA:CPU over a ``[K, P]`` float32 stack of microgradients
  (jitted row sums, the tensordot mean and the total sum; best call). GAF at
  K = 8 must read the MLP's 8 x 1.86M microgradients at least once for the
  Gram matrix; the train-step target (GAF/averaging <= 1.05) leaves 5% of the
  averaging step for that.
* the multiply-add rate of XLA:CPU's matrix product (``[m, 1024] x [1024,
  1024]``; best call). A train step of an MLP cannot take less than its
  multiply-adds divided by that rate; the issue's 5x target against the
  authors' ``step_GAF`` needs the step below ``step_GAF``'s time / 5.

The floors printed under the table combine these with the step times measured
by ``bench_step.py`` / ``bench_torch.py`` (passed in, or their defaults: the
medians recorded in ``results/step_malloc.md`` and ``results/torch.md``).

Usage::

  python benchmarks/bench_floor.py --threads 1
"""

from __future__ import annotations

import argparse

import _common

MLP = (784, 1024, 1024, 10)


def mlp_step_multiply_adds(sizes: tuple[int, ...], batch: int) -> int:
  """Multiply-adds of one forward + backward pass of a dense MLP over ``batch`` examples.

  Forward and weight gradients: ``sum(in * out)`` each; input gradients: the
  same for every layer but the first (the data needs no gradient).
  """
  layers = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
  return batch * (2 * sum(layers) + sum(layers[1:]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--threads", type=int, default=None,
                      help="pin to this many cores before importing jax")
  parser.add_argument("--mean-step-ms", type=float, default=35.7,
                      help="averaging step of the MLP at K = 8, malloc tuned (step_malloc.md)")
  parser.add_argument("--step-gaf-ms", type=float, default=44.2,
                      help="authors' step_GAF on the MLP at K = 4 (torch.md: 22.6 steps/s)")
  parser.add_argument("--microbatch", type=int, default=32)
  args = parser.parse_args(argv)
  _common.pin_threads(args.threads)

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  params = sum(a * b + b for a, b in zip(MLP[:-1], MLP[1:]))
  stack = jnp.asarray(rng.standard_normal((args.k, params)).astype(np.float32))
  weights = jnp.full((args.k,), 1 / args.k, jnp.float32)
  reads = {
      "row sums": jax.jit(lambda a: jnp.sum(a, axis=1)),
      "tensordot mean": jax.jit(lambda a: jnp.tensordot(weights, a, 1)),
      "total sum": jax.jit(jnp.sum),
  }
  rows = []
  read_rates = []
  for name, fn in reads.items():
    best = min(_common.time_fn(lambda fn=fn: fn(stack), repeats=args.repeats))
    rate = stack.nbytes / best / 1e9
    read_rates.append(rate)
    rows.append([f"read [{args.k}, {params}] float32: {name}", f"{best * 1e3:.2f} ms",
                 f"{rate:.1f} GB/s"])
  matmul_rates = []
  for m in (128, 512, 1024):
    a = jnp.asarray(rng.standard_normal((m, 1024)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((1024, 1024)).astype(np.float32))
    fn = jax.jit(jnp.matmul)
    best = min(_common.time_fn(lambda: fn(a, b), repeats=args.repeats))
    rate = m * 1024 * 1024 / best / 1e9
    matmul_rates.append(rate)
    rows.append([f"matmul [{m}, 1024] x [1024, 1024]", f"{best * 1e3:.2f} ms",
                 f"{rate:.1f} GFMA/s"])

  read_ms = [stack.nbytes / r / 1e6 for r in read_rates]
  budget = 0.05 * args.mean_step_ms
  fmas = mlp_step_multiply_adds(MLP, 4 * args.microbatch)
  floor = fmas / max(matmul_rates) / 1e6
  notes = [
      f"Train-step target, MLP {'-'.join(map(str, MLP))} at K = {args.k}: GAF/averaging <= 1.05 "
      f"leaves {budget:.2f} ms over the {args.mean_step_ms} ms averaging step; one read of the "
      f"{stack.nbytes / 1e6:.1f} MB microgradient stack takes {min(read_ms):.2f}-{max(read_ms):.2f} ms "
      "at the read rates above, and GAF reads it once for the Gram matrix and its accepted rows again.",
      f"5x against step_GAF, same MLP at K = 4 ({4 * args.microbatch} examples): the step needs "
      f"{fmas / 1e9:.3f} G multiply-adds, at most {max(matmul_rates):.1f} GFMA/s here, so at least "
      f"{floor:.1f} ms; 5x over step_GAF's {args.step_gaf_ms} ms would need "
      f"{args.step_gaf_ms / 5:.1f} ms.",
      "Times are the best of the calls (a floor, not a typical time).",
  ]
  md = _common.write_results(
      "floor", "Hardware floors: XLA:CPU read and multiply-add rates on this machine",
      _common.header({"repeats": args.repeats}), ["what", "best time", "rate"], rows, notes)
  print(md)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
