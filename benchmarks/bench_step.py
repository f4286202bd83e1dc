"""Whole train step: ``with_gaf(sgd)`` vs plain averaging, same jitted step.

Each step computes K microbatch gradients with ``optax_gaf.microbatch_grads``
(vmap of ``jax.grad`` over K microbatches), then either

* ``mean``: averages them (``tensordot(full(K, 1/K), g, 1)`` per leaf) and
  applies ``optax.sgd(lr, momentum=0.9)``;
* ``gaf``: ``optax_gaf.with_gaf(optax.sgd(lr, momentum=0.9), tau)``;

plus, for reference, ``full``: one ``jax.grad`` over the whole batch (no
microbatch axis) with the same optimizer. Every timed call is one step from
the same initial parameters and optimizer state, so all calls do the same
work; the table reports how many microgradients GAF accepted there. Models: an MLP and a small CNN,
each with more than 1M parameters (target: gaf/mean <= 1.05), and, with
``--models mlp_small``, the 0.10M-parameter MLP of ``bench_torch.py``, or
with ``--models mlp_ln``, a 1.0M-parameter residual MLP with LayerNorm and 52
leaves (12 blocks of width 256).

Usage::

  python benchmarks/bench_step.py --threads 1
  python benchmarks/bench_step.py --threads 1 --models mlp_small --out step_small
  python benchmarks/bench_step.py --threads 1 --models mlp --ks 8 --ablation --out step_ablation
  python benchmarks/bench_step.py --threads 1 --models mlp_ln --out step_ln
  python benchmarks/bench_step.py --quick
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def init_mlp(key, sizes):
  import jax
  import jax.numpy as jnp
  params = []
  for a, b in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (a, b)) / jnp.sqrt(a), "b": jnp.zeros((b,))})
  return params


def mlp_apply(params, x):
  import jax
  h = x.reshape(x.shape[0], -1)
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


def init_mlp_ln(key, width=256, depth=12, d_in=784, classes=10):
  """dense(width) -> depth x residual [dense + LayerNorm + gelu] -> dense(classes).

  Many leaves (4 per block: kernel, bias, norm scale and bias; 52 in all), most
  of them small, as in transformers and normalised MLPs.
  """
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(key, depth + 2)
  dense = lambda k, a, b: {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros((b,))}
  blocks = [{**dense(k, width, width), "scale": jnp.ones((width,)), "shift": jnp.zeros((width,))}
            for k in ks[1:-1]]
  return {"inp": dense(ks[0], d_in, width), "blocks": blocks, "out": dense(ks[-1], width, classes)}


def mlp_ln_apply(params, x):
  import jax
  import jax.numpy as jnp
  h = x.reshape(x.shape[0], -1) @ params["inp"]["w"] + params["inp"]["b"]
  for p in params["blocks"]:
    z = h @ p["w"] + p["b"]
    z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-5)
    h = h + jax.nn.gelu(z * p["scale"] + p["shift"])
  return h @ params["out"]["w"] + params["out"]["b"]


def init_cnn(key, image=32, channels=3, classes=10):
  """conv3x3(32) -> conv3x3(64, stride 2) -> dense(64) -> dense(classes)."""
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(key, 4)
  flat = (image // 2) * (image // 2) * 64
  return {
      "conv1": {"w": jax.random.normal(ks[0], (3, 3, channels, 32)) / 5.0, "b": jnp.zeros((32,))},
      "conv2": {"w": jax.random.normal(ks[1], (3, 3, 32, 64)) / 17.0, "b": jnp.zeros((64,))},
      "dense1": {"w": jax.random.normal(ks[2], (flat, 64)) / jnp.sqrt(flat), "b": jnp.zeros((64,))},
      "dense2": {"w": jax.random.normal(ks[3], (64, classes)) / 8.0, "b": jnp.zeros((classes,))},
  }


def cnn_apply(params, x):
  import jax
  from jax import lax
  dn = ("NHWC", "HWIO", "NHWC")
  h = lax.conv_general_dilated(x, params["conv1"]["w"], (1, 1), "SAME", dimension_numbers=dn)
  h = jax.nn.relu(h + params["conv1"]["b"])
  h = lax.conv_general_dilated(h, params["conv2"]["w"], (2, 2), "SAME", dimension_numbers=dn)
  h = jax.nn.relu(h + params["conv2"]["b"])
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params["dense1"]["w"] + params["dense1"]["b"])
  return h @ params["dense2"]["w"] + params["dense2"]["b"]


def make_steps(apply_fn, k, lr=0.01, tau=0.97):
  import jax
  import jax.numpy as jnp
  import optax
  import optax_gaf

  def loss(params, batch):
    logits = apply_fn(params, batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  sgd = optax.sgd(lr, momentum=0.9)
  gaf = optax_gaf.with_gaf(optax.sgd(lr, momentum=0.9), tau, num_microbatches=k)
  micro = optax_gaf.microbatch_grads(loss, k)

  @jax.jit
  def mean_step(params, state, batch):
    grads = _common.tensordot_mean(micro(params, batch))
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def gaf_step(params, state, batch):
    updates, state = gaf.update(micro(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def full_step(params, state, batch):
    updates, state = sgd.update(jax.grad(loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def gram_sum_step(params, state, batch):
    # Ablation: the one-pass filter's first sweep (each leaf's Gram matrix and
    # column sum S from the native kernel), then S / K as the update; no
    # agreement loop and no combine. Its Gram matrix is returned so it is kept.
    from optax_gaf._src import gram as gram_lib
    from optax_gaf._src import native_filter
    grads = micro(params, batch)
    leaves, treedef = jax.tree.flatten(grads)
    pairs = [native_filter._gram_and_sum(gram_lib.as_matrix(x)) for x in leaves]
    mean = jax.tree.unflatten(treedef, [jnp.reshape(s / k, x.shape[1:])
                                        for (_, s), x in zip(pairs, leaves)])
    updates, state = sgd.update(mean, state, params)
    return optax.apply_updates(params, updates), state, sum(g for g, _ in pairs)

  return {"mean": (mean_step, sgd), "gaf": (gaf_step, gaf), "full": (full_step, sgd),
          "gram_sum": (gram_sum_step, sgd)}


def temp_mib(step_and_opt, params, batch) -> float:
  """XLA's temporary buffer of a compiled step, in MiB (``memory_analysis``)."""
  step, opt = step_and_opt
  analysis = step.lower(params, opt.init(params), batch).compile().memory_analysis()
  return analysis.temp_size_in_bytes / 2**20


ABLATION_NOTE = (
    "gram_sum/mean (--ablation): the one-pass filter's first sweep alone (each leaf's Gram "
    "matrix and column sum S from the native kernel, then S / K and sgd; no agreement loop, "
    "no combine), over the averaging step; medians.")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
  parser.add_argument("--models", nargs="+", default=["mlp", "cnn"],
                      choices=["mlp", "cnn", "mlp_small", "mlp_ln"])
  parser.add_argument("--microbatch", type=int, default=32, help="examples per microbatch")
  parser.add_argument("--repeats", type=int, default=40)
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--quick", action="store_true", help="small run, no result files")
  parser.add_argument("--out", default="step")
  parser.add_argument("--ablation", action="store_true",
                      help="also time gram_sum: the Gram + S sweep with S / K as the update "
                           "(native CPU kernel only)")
  args = parser.parse_args(argv)
  if args.quick:
    args.ks, args.repeats, args.microbatch = [4], 3, 8
  _common.pin_threads(args.threads)

  import jax
  import jax.numpy as jnp

  models = {
      "mlp": (lambda key: init_mlp(key, [784, 1024, 1024, 10]), mlp_apply, (28, 28, 1)),
      # The small MLP of bench_torch.py (not a target of this script).
      "mlp_small": (lambda key: init_mlp(key, [784, 128, 10]), mlp_apply, (28, 28, 1)),
      "cnn": (lambda key: init_cnn(key), cnn_apply, (32, 32, 3)),
      # 52 leaves, 38 of them small (not a target of this script).
      "mlp_ln": (lambda key: init_mlp_ln(key), mlp_ln_apply, (28, 28, 1)),
  }
  rows = []
  print(f"{'model':>5} {'params':>8} {'K':>2} {'full ms':>8} {'mean ms':>8} {'gaf ms':>8} "
        f"{'gaf/mean':>8} {'min/min':>8} {'mean MiB':>8} {'gaf MiB':>8} {'mean tmp':>8} "
        f"{'gaf tmp':>8} {'accepted':>8}")
  for name in args.models:
    init, apply_fn, shape = models[name]
    params = init(jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(params))
    for k in args.ks:
      b = k * args.microbatch
      kx, ky = jax.random.split(jax.random.key(1))
      batch = {"x": jax.random.normal(kx, (b, *shape)), "y": jax.random.randint(ky, (b,), 0, 10)}
      fns = {}
      steps = make_steps(apply_fn, k)
      for label, (step, opt) in steps.items():
        if label == "gram_sum" and not args.ablation:
          continue
        # Every call is one step from the same parameters and state, so every
        # call does the same work (the same microgradients agree).
        fns[label] = functools.partial(step, params, opt.init(params), batch)
      all_times = _common.time_interleaved_all(fns, warmup=2, repeats=args.repeats)
      t = {label: statistics.median(v) for label, v in all_times.items()}
      ratio = t["gaf"] / t["mean"]
      # Noise from other processes only adds time: the fastest calls are a
      # second, steadier estimate of the intrinsic ratio.
      ratio_min = min(all_times["gaf"]) / min(all_times["mean"])
      faults = {label: _common.page_faults_per_call(fns[label]) * 4096 / 2**20
                for label in ("mean", "gaf")}
      temp = {label: temp_mib(steps[label], params, batch)
              for label in ("mean", "gaf")}
      accepted = int(fns["gaf"]()[1].gaf_state.num_accepted)
      print(f"{name:>5} {n:>8d} {k:>2d} {t['full'] * 1e3:>8.2f} {t['mean'] * 1e3:>8.2f} "
            f"{t['gaf'] * 1e3:>8.2f} {ratio:>8.3f} {ratio_min:>8.3f} {faults['mean']:>8.1f} "
            f"{faults['gaf']:>8.1f} {temp['mean']:>8.1f} {temp['gaf']:>8.1f} {accepted:>8d}",
            flush=True)
      rows.append([name, n, k, b, t["full"] * 1e3, t["mean"] * 1e3, t["gaf"] * 1e3, ratio,
                   ratio_min, faults["mean"], faults["gaf"], temp["mean"], temp["gaf"],
                   accepted])
      if args.ablation:
        rows[-1].append(t["gram_sum"] / t["mean"])
        print(f"      gram_sum/mean {rows[-1][-1]:.3f}", flush=True)

  if not args.quick:
    info = _common.header({"timing": "contenders interleaved call by call",
                           "threads": args.threads or "all allowed",
                           "microbatch": args.microbatch, "optimizer": "sgd(0.01, momentum=0.9)",
                           "tau": 0.97})
    notes = ["mean: vmap microgradients + tensordot mean + sgd; gaf: vmap microgradients + "
             "with_gaf(sgd); full: one grad over the whole batch + sgd (reference only). "
             "Target (mlp, cnn): gaf/mean <= 1.05. mean/gaf faulted MiB: memory freshly mapped (minor "
             "page faults x 4 KiB) per step; glibc maps buffers above its mmap threshold "
             "(32 MiB at most by default) afresh on every allocation; XLA temp MiB: the "
             "compiled step's temporary buffer (memory_analysis; XLA:CPU allocates it in one "
             "piece per call, so above 32 MiB it is mapped afresh each step); run with "
             "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:"
             "glibc.malloc.trim_threshold=4294967296 to keep them. Each timed call is one step "
             "from the same initial parameters and state; accepted: microgradients in GAF's "
             "update there (random data). ms columns and gaf/mean: medians; gaf/mean (fastest "
             "calls): the fastest GAF call over the fastest averaging call (noise from other "
             "processes only adds time).",
             _common.NOISE_NOTE]
    md = _common.write_results(
        args.out, "Train step: with_gaf(sgd) vs plain averaging (jitted)", info,
        ["model", "params", "K", "batch", "full ms", "mean ms", "gaf ms", "gaf/mean",
         "gaf/mean (fastest calls)", "mean faulted MiB", "gaf faulted MiB",
         "mean XLA temp MiB", "gaf XLA temp MiB", "accepted"]
        + (["gram_sum/mean"] if args.ablation else []),
        rows, notes + ([ABLATION_NOTE] if args.ablation else []))
    print("\n" + md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
