"""Label-noise sweep: averaging vs GAF, with the two controls that matter.

For each configuration (data set, model, K microbatches of m examples, fold
rule, noise kind) and each noise level, over ``--seeds`` seeds:

1. tau is chosen on a held-out 20% split of the noisy TRAIN data (never the
   test set): GAF is trained on the other 80% for every tau of ``--tau-grid``
   (3 seeds) and the tau with the best mean final accuracy on the held-out
   noisy labels wins.
2. On the full training set, with the same initialization, data order and
   microbatches per seed, four methods train:
   ``averaging``; ``gaf`` (``optax_gaf.with_gaf``, the chosen tau);
   ``random_skip`` (averaging that skips exactly as many steps as GAF did in
   that seed, at uniformly random steps, optimizer state untouched); and
   ``avg_at_gaf_updates`` (averaging that stops after GAF's update count, i.e.
   averaging read at the same number of updates); and ``random_subset``
   (averaging at exactly GAF's update steps, each over a uniformly random
   subset of as many microgradients as GAF used at that step: the filter's
   choice replaced by chance, everything else equal).
3. It reports mean and std of final and best clean test accuracy, GAF's skip
   fraction, and GAF minus each other method with a paired 95% t-interval
   over seeds.

Suites: ``main`` (the issue's grid), ``explore`` (larger K with both fold
rules, pair-flip noise, MNIST-1D with the 1-D CNN), ``subset`` (K > 2 cells,
where the random-subset control differs from random skipping), ``quick`` (a
smoke run). Result files of runs before ``random_subset`` existed lack it.
Writes benchmarks/results/label_noise[_explore].{json,md,png}; the JSON is
rewritten after every configuration, so an interrupted run leaves real,
partial results. Not part of the test suite. Example::

  python benchmarks/label_noise.py --suite main --seeds 5
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optax_gaf._src import experiment as ex  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("averaging", "gaf", "random_skip", "avg_at_gaf_updates", "random_subset")
NOISES = (0.0, 0.2, 0.4, 0.6)


def suite_configs(suite: str) -> list[dict]:
  """The configurations of a suite (each runs every noise level)."""
  base = dict(dataset="digits", model="mlp", k=2, m=32, combine="pairwise",
              noise_kind="symmetric", noises=NOISES, epochs=60)
  if suite == "quick":
    return [dict(base, noises=(0.0, 0.4), epochs=3)]
  if suite == "main":
    # MNIST-1D runs the MLP here: the vmapped 1-D CNN costs about 0.07 s per
    # step for 5 replicas on the shared 2-core machine (measured), too slow for
    # the full grid; the CNN is in the "explore" suite at one noise level.
    return [
        dict(base, k=2, m=32), dict(base, k=2, m=10), dict(base, k=4, m=32),
        dict(base, dataset="mnist1d", model="mlp", k=2, m=32, epochs=30),
    ]
  if suite == "explore":
    out = []
    for k in (4, 8, 16):
      for combine in ("mean", "pairwise"):
        out.append(dict(base, k=k, m=8, combine=combine, noises=(0.4, 0.6)))
    out.append(dict(base, noise_kind="pairflip", noises=(0.2, 0.4)))
    out.append(dict(base, k=8, m=8, combine="mean", noise_kind="pairflip", noises=(0.2, 0.4)))
    out.append(dict(base, dataset="mnist1d", model="cnn", k=2, m=32, epochs=15, noises=(0.4,),
                    seeds=3, tau_grid=(0.85, 0.9, 0.95)))
    return out
  if suite == "subset":
    return [dict(base, k=4, m=32, noises=(0.4, 0.6)),
            dict(base, k=4, m=8, combine="mean", noises=(0.4, 0.6)),
            dict(base, k=8, m=8, combine="mean", noises=(0.4, 0.6))]
  raise ValueError(f"unknown suite {suite!r}")


def config_name(c: dict) -> str:
  return (f"{c['dataset']}/{c['model']} K={c['k']}x{c['m']} {c['combine']} "
          f"{c['noise_kind']} {c['epochs']}ep")


def _steps(n: int, c: dict) -> int:
  return c["epochs"] * (n // (c["k"] * c["m"]))


def _noisy(data: ex.Data, noise: float, kind: str, seeds) -> np.ndarray:
  return np.stack([ex.add_label_noise(data.y_train, noise, data.num_classes, 10_000 + s, kind)
                   for s in seeds])


def run_config(data: ex.Data, c: dict, seeds, grid, tau_seeds) -> dict:
  """Runs one configuration over all its noise levels; returns per-seed records."""
  n = data.x_train.shape[0]
  steps = _steps(n, c)
  batch = c["k"] * c["m"]
  out = {"config": dict(c, noises=list(c["noises"]), steps=steps, seeds=list(seeds)), "noise": {}}
  for noise in c["noises"]:
    t0 = time.time()
    tau, tau_scores = select_tau(data, c, noise, grid, tau_seeds)
    y_noisy = _noisy(data, noise, c["noise_kind"], seeds)
    order = np.stack([ex.data_order(s, n, batch, steps) for s in seeds])
    graphdef, params = ex.init_replicas(c["model"], data, seeds)
    common = dict(num_microbatches=c["k"], combine=c["combine"], tau=tau,
                  eval_every=max(1, n // batch))
    curves = {}
    curves["averaging"] = ex.train(data, y_noisy, order, graphdef, params, method="averaging", **common)
    curves["gaf"] = ex.train(data, y_noisy, order, graphdef, params, method="gaf", **common)
    skipped = curves["gaf"].skipped
    curves["random_skip"] = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                                     mask=ex.random_skip_mask(skipped, 30_000 + int(100 * noise)),
                                     **common)
    curves["avg_at_gaf_updates"] = ex.train(data, y_noisy, order, graphdef, params,
                                            method="averaging", mask=ex.truncation_mask(skipped),
                                            **common)
    subset = ex.random_subset_weights(curves["gaf"].num_used, c["k"], 40_000 + int(100 * noise))
    curves["random_subset"] = ex.train(data, y_noisy, order, graphdef, params,
                                       method="averaging", weights=subset, **common)
    rec = {"tau": tau, "tau_scores": tau_scores, "seconds": round(time.time() - t0, 1)}
    for m, cv in curves.items():
      rec[m] = {k: np.asarray(v).tolist() for k, v in ex.summarize(cv).items()}
      rec[m]["mean_test_curve"] = np.round(cv.test_acc.mean(0), 4).tolist()
      rec[m]["eval_steps"] = cv.eval_steps.tolist()
    out["noise"][f"{noise:g}"] = rec
    print(f"  {config_name(c)} noise={noise:g} tau={tau:g}: "
          + ", ".join(f"{m} {100 * np.mean(rec[m]['final_test_acc']):.1f}" for m in METHODS)
          + f", GAF uses {np.mean(curves['gaf'].num_used[~skipped]):.2f} of {c['k']}"
          + f", skip {100 * np.mean(rec['gaf']['skip_fraction']):.0f}% ({rec['seconds']} s)",
          flush=True)
  return out


def select_tau(data: ex.Data, c: dict, noise: float, grid, seeds) -> tuple[float, dict]:
  """Chooses tau on a held-out 20% split of the noisy training data.

  Label noise is drawn on the whole training set and then split, so the
  held-out labels are as noisy as the training labels. GAF trains on the other
  80% for each tau and seed; the tau with the best mean final held-out (noisy)
  accuracy wins (ties: the larger tau, which skips less).
  """
  n = data.x_train.shape[0]
  perm = np.random.default_rng(123).permutation(n)
  n_fit = int(0.8 * n)
  fit, held = perm[:n_fit], perm[n_fit:]
  y_noisy = _noisy(data, noise, c["noise_kind"], seeds)
  reps = [(t, s) for t in grid for s in seeds]
  rows = [list(seeds).index(s) for _, s in reps]
  batch = c["k"] * c["m"]
  steps = _steps(n_fit, c)
  x_fit, x_held = data.x_train[fit], data.x_train[held]
  sub = ex.Data(x_fit, data.y_train[fit], x_held, data.y_train[held], data.num_classes)
  order = np.stack([ex.data_order(s + 1000, n_fit, batch, steps) for _, s in reps])
  graphdef, params = ex.init_replicas(c["model"], sub, [s + 1000 for _, s in reps])
  curves = ex.train(
      sub, y_noisy[rows][:, fit], order, graphdef, params, method="gaf",
      num_microbatches=c["k"], combine=c["combine"], tau=np.array([t for t, _ in reps]),
      eval_every=steps, y_test=y_noisy[rows][:, held])
  acc = curves.test_acc[:, -1]
  scores = {}
  for t in grid:
    scores[f"{t:g}"] = float(np.mean([a for a, (tt, _) in zip(acc, reps) if tt == t]))
  best = max(grid, key=lambda t: (round(scores[f"{t:g}"], 6), t))
  return float(best), scores


def paired_ci(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """Mean of a - b and its paired 95% t-interval (half width)."""
  from scipy import stats
  d = np.asarray(a) - np.asarray(b)
  if d.size < 2:
    return float(d.mean()), float("nan"), float("nan")
  half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def render_markdown(results: dict) -> str:
  """The results tables (percent; mean +- std over seeds; paired 95% intervals)."""
  meta = results["meta"]
  lines = [
      f"# Label-noise sweep ({meta['suite']})", "",
      f"Command: `{meta['command']}`  ",
      f"jax {meta['jax']}, {meta['platform']}; "
      f"tau grid {meta['tau_grid']} (unless the config sets its own) chosen per cell on a held-out 20% split of the noisy TRAIN data "
      f"({meta['tau_seeds']} seeds); SGD lr 0.01, momentum 0.9, Nesterov; wall time "
      f"{meta.get('seconds', '?')} s.", ""]
  if meta.get("note"):
    lines += [meta["note"], ""]
  lines += [
      "Clean test accuracy in %, mean +- std over seeds. `rand skip`: averaging skipping as many "
      "steps as GAF did, at random steps. `avg@upd`: averaging stopped after GAF's update count. "
      "`rand subset`: averaging at GAF's update steps over a random subset of as many "
      "microgradients as GAF used (`-` in runs made before this control existed). "
      "Differences: GAF minus that method, mean [paired 95% t-interval] of final accuracy.", ""]
  head = ("| config | noise | seeds | tau | avg final | GAF final | rand skip final | avg@upd final | "
          "rand subset final | avg best | GAF best | GAF skip % | GAF-avg | GAF-rand skip | "
          "GAF-avg@upd | GAF-rand subset |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  ms = lambda v: f"{100 * np.mean(v):.1f} +- {100 * np.std(v, ddof=1) if len(v) > 1 else 0:.1f}"
  for entry in results["configs"]:
    name = config_name(entry["config"])
    for noise, r in entry["noise"].items():
      diffs = []
      for other in ("averaging", "random_skip", "avg_at_gaf_updates", "random_subset"):
        if other not in r:
          diffs.append("-")
          continue
        mean, lo, hi = paired_ci(r["gaf"]["final_test_acc"], r[other]["final_test_acc"])
        diffs.append(f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
      subset = ms(r["random_subset"]["final_test_acc"]) if "random_subset" in r else "-"
      lines.append(
          f"| {name} | {noise} | {len(r['gaf']['final_test_acc'])} | {r['tau']:g} | "
          f"{ms(r['averaging']['final_test_acc'])} | "
          f"{ms(r['gaf']['final_test_acc'])} | {ms(r['random_skip']['final_test_acc'])} | "
          f"{ms(r['avg_at_gaf_updates']['final_test_acc'])} | {subset} | "
          f"{ms(r['averaging']['best_test_acc'])} | "
          f"{ms(r['gaf']['best_test_acc'])} | {100 * np.mean(r['gaf']['skip_fraction']):.0f} | "
          + " | ".join(diffs) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
  """Final clean test accuracy vs noise, one panel per configuration."""
  from matplotlib.figure import Figure
  configs = results["configs"]
  cols = min(3, len(configs))
  rows = -(-len(configs) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  styles = {"averaging": ("tab:blue", "o", "-"), "gaf": ("tab:red", "s", "-"),
            "random_skip": ("tab:gray", "^", "--"), "avg_at_gaf_updates": ("tab:green", "v", ":"),
            "random_subset": ("tab:purple", "D", "-.")}
  for ax, entry in zip(axes, configs):
    noises = [float(k) for k in entry["noise"]]
    for m in (m for m in METHODS if m in next(iter(entry["noise"].values()))):
      vals = [100 * np.array(entry["noise"][k][m]["final_test_acc"]) for k in entry["noise"]]
      color, marker, ls = styles[m]
      ax.errorbar(noises, [v.mean() for v in vals], yerr=[v.std(ddof=1) if v.size > 1 else 0 for v in vals],
                  color=color, marker=marker, ls=ls, capsize=3, label=m)
    ax.set_title(config_name(entry["config"]), fontsize=9)
    ax.set_xlabel(f"{entry['config']['noise_kind']} label noise")
    ax.set_ylabel("final clean test acc (%)")
  for ax in axes[len(configs):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--suite", choices=("main", "explore", "subset", "quick"), default="main")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--tau-seeds", type=int, default=3)
  p.add_argument("--tau-grid", default="0.75,0.8,0.85,0.9,0.95,1.0,1.05")
  p.add_argument("--only", type=int, nargs="*", default=None, help="run only these config indices")
  p.add_argument("--append", action="store_true",
                 help="add these configurations to the existing results file")
  p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/label_noise[_explore])")
  args = p.parse_args(argv)
  import jax
  grid = [float(t) for t in args.tau_grid.split(",")]
  seeds = list(range(args.seeds))
  tau_seeds = list(range(args.tau_seeds))
  suffix = {"main": "", "explore": "_explore", "subset": "_subset", "quick": "_quick"}[args.suite]
  prefix = pathlib.Path(args.out) if args.out else RESULTS / f"label_noise{suffix}"
  prefix.parent.mkdir(parents=True, exist_ok=True)
  configs = suite_configs(args.suite)
  if args.only is not None:
    configs = [configs[i] for i in args.only]
  results = {"meta": {"suite": args.suite, "command": "python " + " ".join(
      ["benchmarks/label_noise.py"] + (argv if argv is not None else sys.argv[1:])),
      "jax": jax.__version__, "platform": platform.platform(), "seeds": args.seeds,
      "tau_seeds": args.tau_seeds, "tau_grid": grid}, "configs": []}
  if args.append and prefix.with_suffix(".json").exists():
    previous = json.loads(prefix.with_suffix(".json").read_text())
    results["configs"] = previous["configs"]
    results["meta"]["command"] = previous["meta"]["command"] + " ; then " + results["meta"]["command"]
  t0 = time.time() - (previous["meta"].get("seconds", 0) if args.append and results["configs"] else 0)
  cache: dict[str, ex.Data] = {}
  for c in configs:
    data = cache.setdefault(c["dataset"], ex.load_data(c["dataset"]))
    print(f"[{time.time() - t0:.0f} s] {config_name(c)}", flush=True)
    c_seeds = list(range(c["seeds"])) if "seeds" in c else seeds
    c_grid = list(c.get("tau_grid", grid))
    results["configs"].append(run_config(data, c, c_seeds, c_grid, tau_seeds))
    results["meta"]["seconds"] = round(time.time() - t0)
    prefix.with_suffix(".json").write_text(json.dumps(results))
    prefix.with_suffix(".md").write_text(render_markdown(results))
    plot(results, prefix.with_suffix(".png"))
  print(render_markdown(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
