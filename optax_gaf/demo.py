"""Offline label-noise demo: plain averaging vs GAF on noisy labels.

Run ``python -m optax_gaf.demo`` (or ``optax-gaf-demo``). It trains a Flax NNX
model on scikit-learn's digits (default) or locally generated MNIST-1D with
symmetric label noise on the TRAIN labels only, once with plain averaging of K
microbatch gradients and once with ``optax_gaf.with_gaf`` on the same K
microgradients (same data order, same microbatches, same optimizer, same
initialization). Two controls run beside them, because GAF's gain under label
noise can come from updating less often: averaging that skips steps at random,
as many as GAF skipped, and averaging that stops after GAF's number of updates.

Per-microbatch gradients come from ``optax_gaf.microbatch_grads``; the skip
decisions and cosine distances are read from ``WithGafState.gaf_state``
(``skipped``, ``distances``, ``finite``). It prints a table, and writes
``summary.json`` and ``label_noise.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Sequence

METHODS = ("averaging", "gaf", "random_skip", "averaging_at_gaf_updates")
METHOD_LABELS = {
    "averaging": "averaging",
    "gaf": "GAF",
    "random_skip": "control: random skips",
    "averaging_at_gaf_updates": "control: avg @ GAF #updates",
}


def _ranged(name: str, lo: float, hi: float, *, hi_open: bool = False, cast=float):
  def parse(text: str):
    try:
      value = cast(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if value != value or not ok:
      bracket = ")" if hi_open else "]"
      raise argparse.ArgumentTypeError(f"{name} must be in [{lo}, {hi}{bracket}, got {text}")
    return value
  return parse


def _at_least(name: str, lo, cast=int):
  def parse(text: str):
    try:
      value = cast(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
    if value != value or value < lo:
      raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {text}")
    return value
  return parse


def _positive_float(name: str):
  def parse(text: str):
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
      raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text}")
    return value
  return parse


def build_parser() -> argparse.ArgumentParser:
  """The demo's command line."""
  p = argparse.ArgumentParser(
      prog="optax-gaf-demo",
      description="Plain averaging vs Gradient Agreement Filtering under label noise (offline).")
  p.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",
                 help="digits: scikit-learn 8x8 digits; mnist1d: generated locally (default: digits)")
  p.add_argument("--model", choices=("auto", "mlp", "cnn"), default="auto",
                 help="auto: MLP on digits, the 1-D CNN on MNIST-1D")
  p.add_argument("--noise", type=_ranged("--noise", 0.0, 1.0, hi_open=True), default=0.4,
                 help="fraction of TRAIN labels corrupted, in [0, 1) (default 0.4)")
  p.add_argument("--noise-kind", choices=("symmetric", "pairflip"), default="symmetric",
                 help="symmetric: a random other class; pairflip: class y -> y + 1")
  p.add_argument("--tau", type=_ranged("--tau", 0.0, 2.0), default=0.9,
                 help="GAF cosine distance threshold in [0, 2] (default 0.9)")
  p.add_argument("--combine", choices=("pairwise", "mean"), default="pairwise",
                 help="GAF fold rule (default pairwise, the authors' code)")
  p.add_argument("--num-microbatches", type=_at_least("--num-microbatches", 2), default=2,
                 help="K, microbatches per step (default 2, as in the paper)")
  p.add_argument("--microbatch-size", type=_at_least("--microbatch-size", 1), default=32,
                 help="examples per microbatch (default 32)")
  p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd",
                 help="sgd: momentum 0.9, Nesterov (default)")
  p.add_argument("--lr", type=_positive_float("--lr"), default=0.01, help="learning rate (default 0.01)")
  p.add_argument("--steps", type=_at_least("--steps", 1), default=None,
                 help="training steps (default: 60 epochs)")
  p.add_argument("--eval-every", type=_at_least("--eval-every", 1), default=None,
                 help="evaluate every this many steps (default: once per epoch)")
  p.add_argument("--seed", type=_at_least("--seed", 0), default=0,
                 help="seed of the initialization, data order and label noise")
  p.add_argument("--no-controls", action="store_true",
                 help="skip the two averaging controls (random skips, GAF's update count)")
  p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
  return p


def _table(methods: dict[str, dict]) -> str:
  cols = [("final test", "final_test_acc", "{:.1%}"), ("best test", "best_test_acc", "{:.1%}"),
          ("train (noisy)", "final_train_acc_noisy", "{:.1%}"),
          ("skipped", "skip_fraction", "{:.1%}"), ("updates", "num_updates", "{:d}"),
          ("mean cos dist", "mean_cosine_distance", "{:.3f}")]
  width = max(len(METHOD_LABELS[m]) for m in methods) + 2
  head = "method".ljust(width) + "".join(c[0].rjust(15) for c in cols)
  lines = [head, "-" * len(head)]
  for m, s in methods.items():
    lines.append(METHOD_LABELS[m].ljust(width) + "".join(f.format(s[k]).rjust(15) for _, k, f in cols))
  return "\n".join(lines)


def _plot(path: pathlib.Path, curves: dict, tau: float, title: str) -> None:
  import numpy as np
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4))
  ax1, ax2 = fig.subplots(1, 2)
  styles = {"averaging": ("tab:blue", "-"), "gaf": ("tab:red", "-"),
            "random_skip": ("tab:gray", "--"), "averaging_at_gaf_updates": ("tab:green", ":")}
  for m, c in curves.items():
    color, ls = styles[m]
    ax1.plot(c.eval_steps, 100 * c.test_acc[0], color=color, ls=ls, label=METHOD_LABELS[m])
  ax1.set(xlabel="step", ylabel="clean test accuracy (%)", title="test accuracy")
  ax1.legend()
  for m in ("averaging", "gaf"):
    d = curves[m].distance[0]
    window = max(1, min(25, d.size // 4))
    smooth = np.convolve(d, np.ones(window) / window, mode="valid")
    ax2.plot(np.arange(1, d.size + 1), d, color=styles[m][0], alpha=0.15, lw=0.5)
    ax2.plot(np.arange(window, d.size + 1), smooth, color=styles[m][0],
             label=f"{METHOD_LABELS[m]} ({window}-step mean)")
  ax2.axhline(tau, color="k", lw=0.8, ls="--", label=f"tau = {tau}")
  ax2.set(xlabel="step", ylabel="cosine distance 1 - cos(g, g_i)",
          title="microgradient cosine distance")
  ax2.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> dict:
  """Runs the demo for parsed ``args``; returns the summary written to ``summary.json``."""
  import jax
  import numpy as np

  import optax_gaf
  from optax_gaf._src import experiment as ex

  t0 = time.time()
  data = ex.load_data(args.dataset)
  model = args.model if args.model != "auto" else ("mlp" if args.dataset == "digits" else "cnn")
  k, m = args.num_microbatches, args.microbatch_size
  batch = k * m
  n = data.x_train.shape[0]
  if batch > n:
    raise SystemExit(f"error: K * microbatch size = {batch} exceeds the {n} training examples")
  per_epoch = n // batch
  steps = args.steps if args.steps is not None else 60 * per_epoch
  eval_every = args.eval_every or per_epoch
  y_noisy = ex.add_label_noise(data.y_train, args.noise, data.num_classes,
                               seed=10_000 + args.seed, kind=args.noise_kind)[None]
  order = ex.data_order(args.seed, n, batch, steps)[None]
  graphdef, params = ex.init_replicas(model, data, [args.seed])
  common = dict(optimizer=args.optimizer, lr=args.lr, num_microbatches=k,
                combine=args.combine, tau=args.tau, eval_every=eval_every)
  print(f"{args.dataset}: {n} train / {data.x_test.shape[0]} test, {model}, "
        f"{args.noise:.0%} {args.noise_kind} label noise (train only), K={k} x {m}, "
        f"{args.optimizer} lr={args.lr}, {steps} steps ({steps / per_epoch:.1f} epochs), "
        f"GAF tau={args.tau} combine={args.combine}")
  curves = {}
  curves["averaging"] = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                                 progress="averaging", **common)
  curves["gaf"] = ex.train(data, y_noisy, order, graphdef, params, method="gaf",
                           progress="GAF", **common)
  if not args.no_controls:
    skipped = curves["gaf"].skipped
    curves["random_skip"] = ex.train(
        data, y_noisy, order, graphdef, params, method="averaging",
        mask=ex.random_skip_mask(skipped, seed=20_000 + args.seed),
        progress="control: random skips", **common)
    curves["averaging_at_gaf_updates"] = ex.train(
        data, y_noisy, order, graphdef, params, method="averaging",
        mask=ex.truncation_mask(skipped), progress="control: avg @ GAF #updates", **common)
  methods = {}
  for name, c in curves.items():
    s = ex.summarize(c)
    methods[name] = {key: (int(v[0]) if key == "num_updates" else float(v[0])) for key, v in s.items()}
    methods[name]["eval_steps"] = c.eval_steps.tolist()
    methods[name]["test_acc_curve"] = [round(float(a), 4) for a in c.test_acc[0]]
  config = {k_: v for k_, v in vars(args).items()}
  config.update(model=model, steps=steps, eval_every=eval_every, steps_per_epoch=per_epoch,
                num_train=n, num_test=int(data.x_test.shape[0]), batch_size=batch,
                versions={"optax_gaf": optax_gaf.__version__, "jax": jax.__version__},
                seconds=round(time.time() - t0, 1))
  summary = {"config": config, "methods": methods}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  title = (f"{args.dataset}, {args.noise:.0%} {args.noise_kind} label noise, K={k} x {m}, "
           f"tau={args.tau}, seed {args.seed}")
  _plot(out / "label_noise.png", curves, args.tau, title)
  print()
  print(_table(methods))
  gain = methods["gaf"]["final_test_acc"] - methods["averaging"]["final_test_acc"]
  print(f"\nGAF - averaging, final clean test accuracy: {100 * gain:+.1f} points (one seed).")
  if "random_skip" in methods:
    for ctl in ("random_skip", "averaging_at_gaf_updates"):
      d = methods["gaf"]["final_test_acc"] - methods[ctl]["final_test_acc"]
      print(f"GAF - {METHOD_LABELS[ctl]}: {100 * d:+.1f} points.")
  print(f"Wrote {out / 'summary.json'} and {out / 'label_noise.png'} "
        f"({time.time() - t0:.0f} s). Seeds and intervals: benchmarks/label_noise.py.")
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m optax_gaf.demo`` and ``optax-gaf-demo``.

  Args:
    argv: command line arguments (default ``sys.argv[1:]``).

  Returns:
    The exit status, 0 on success. Bad flags exit with status 2 and write nothing.

  Examples:
    >>> args = build_parser().parse_args(["--noise", "0.6", "--dataset", "mnist1d"])
    >>> args.noise, args.dataset, args.tau, args.num_microbatches
    (0.6, 'mnist1d', 0.9, 2)
  """
  args = build_parser().parse_args(argv)
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
