"""The compute floor behind the missed PyTorch target, measured on this machine.

A train step of a dense MLP cannot take less than its multiply-adds divided by
the best rate XLA:CPU's matrix product reaches here (``[m, 1024] x [1024,
1024]``, best call of ``--repeats``). The issue's target of 5x against the
authors' ``step_GAF`` at K = 4 needs the step below ``step_GAF``'s time / 5;
this script prints both. ``--step-gaf-ms`` defaults to ``step_GAF``'s time
in ``results/torch.json`` when that file has it (written by
``bench_torch.py``), else 34.9 ms (28.6 steps/s, its run of 2026-11-25 05:45 UTC).

Usage::

  python benchmarks/bench_floor.py --threads 1
"""

from __future__ import annotations

import argparse
import json

import _common

MLP = (784, 1024, 1024, 10)


def mlp_step_multiply_adds(sizes: tuple[int, ...], batch: int) -> int:
  """Multiply-adds of one forward + backward pass of a dense MLP over ``batch`` examples.

  Forward and weight gradients: ``sum(in * out)`` each; input gradients: the
  same for every layer but the first (the data needs no gradient).
  """
  layers = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
  return batch * (2 * sum(layers) + sum(layers[1:]))


def recorded_step_gaf_ms(default: float = 34.9) -> float:
  """``step_GAF``'s ms per step on the MLP at K = 4, from ``results/torch.json``."""
  try:
    rows = json.loads((_common.RESULTS / "torch.json").read_text())["rows"]
    row = next(r for r in rows if r["MLP"] == "-".join(map(str, MLP)) and r["K"] == 4)
    return round(1e3 / float(row["step_GAF steps/s"]), 1)
  except (OSError, KeyError, StopIteration, ValueError, ZeroDivisionError):
    return default


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--threads", type=int, default=None,
                      help="pin to this many cores before importing jax")
  parser.add_argument("--step-gaf-ms", type=float, default=None,
                      help="authors' step_GAF on the MLP at K = 4 (default: results/torch.json)")
  parser.add_argument("--microbatch", type=int, default=32)
  parser.add_argument("--out", default="floor", help="results/<out>.md and .json")
  args = parser.parse_args(argv)
  if args.step_gaf_ms is None:
    args.step_gaf_ms = recorded_step_gaf_ms()
  _common.pin_threads(args.threads)

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  rows = []
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

  fmas = mlp_step_multiply_adds(MLP, 4 * args.microbatch)
  floor = fmas / max(matmul_rates) / 1e6
  notes = [
      f"5x against step_GAF, same MLP at K = 4 ({4 * args.microbatch} examples): the step needs "
      f"{fmas / 1e9:.3f} G multiply-adds, at most {max(matmul_rates):.1f} GFMA/s here, so at least "
      f"{floor:.1f} ms; 5x over step_GAF's {args.step_gaf_ms} ms would need "
      f"{args.step_gaf_ms / 5:.1f} ms.",
      "Times are the best of the calls (a floor, not a typical time).",
  ]
  md = _common.write_results(
      args.out, "Compute floor: XLA:CPU matrix-product rate on this machine",
      _common.header({"repeats": args.repeats}), ["what", "best time", "rate"], rows, notes)
  print(md)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
