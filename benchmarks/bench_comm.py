"""Communication of multi-device GAF vs a plain ``lax.pmean`` of gradients.

Two parts (both by default):

``--part comm`` (8 simulated CPU devices, one microgradient per device, K = 8):
  * bytes moved per step, read from the compiled HLO of one update step: the
    result sizes of every all-reduce / all-gather / collective-permute /
    reduce-scatter / all-to-all, per device. "payload" is the plain sum of
    those sizes; "wire" is what a bandwidth-optimal ring implementation moves
    per device: 2 (D-1)/D x size for an all-reduce, (D-1)/D x output for an
    all-gather, the operand for a collective-permute. Exact, not timed.
  * temporary memory per device (``compiled.memory_analysis()``).
  * step time of each mode / pmean, measured side by side (interleaved) on
    the 8 simulated devices. On simulated CPU devices a collective is a
    memcpy, so this mostly measures the extra compute (Gram rows, sketches);
    it says nothing about network time on a real cluster.
  Writes ``results/comm.md`` and ``results/comm.json``.

``--part sketch`` (one device): an MLP (64-256-256-10, 85k parameters) on
  sklearn digits (40% of labels randomized, the paper's label-noise setting,
  so the cosines sit near 0) trained with exact GAF (K = 8 microbatches of
  32, tau = 0.97, SGD); at every step the exact Gram matrix of the 8 real microgradients is
  compared with count-sketch estimates for several ``sketch_dim``: the error of
  the pairwise cosines, and how often the acceptance decisions (``accepted``
  vector / skip) of the sketch differ from the exact ones, at several tau.
  Writes ``results/sketch.md`` and ``results/sketch.json``.

Run::

  python benchmarks/bench_comm.py                 # both parts
  python benchmarks/bench_comm.py --part comm --sizes 1e5 1e6 1e7
  python benchmarks/bench_comm.py --part sketch --steps 300
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import _common  # noqa: E402
import optax_gaf  # noqa: E402
from optax_gaf._src import agreement as agreement_lib  # noqa: E402
from optax_gaf._src import collective  # noqa: E402

AXIS = "data"
_OPS = ("all-reduce", "all-gather", "collective-permute", "reduce-scatter", "all-to-all")
_COLL = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_OPS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Per-device bytes of the collectives in an HLO module (see module doc)."""
  out = {op: 0 for op in _OPS}
  out.update(payload=0, wire=0.0, count=0)
  for line in hlo_text.splitlines():
    m = _COLL.search(line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):  # async *-start: (operand(s), result(s), ...) -> count the result once
      shapes = shapes[len(shapes) // 2:len(shapes) // 2 + 1]
    size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for t, dims in shapes)
    op = m.group(2)
    out[op] += size
    out["payload"] += size
    out["count"] += 1
    frac = (num_devices - 1) / num_devices
    out["wire"] += {"all-reduce": 2 * frac, "all-gather": frac, "reduce-scatter": frac,
                    "all-to-all": frac, "collective-permute": 1.0}[op] * size
  return out


def _modes(sketch_dims):
  modes = [("pmean", None), ("all_gather", dict(mode="all_gather")),
           ("ring", dict(mode="ring"))]
  modes += [(f"sketch d={d}", dict(mode="sketch", sketch_dim=d)) for d in sketch_dims]
  return modes


def _step_fn(mesh, kw, k):
  """jit(shard_map(update)) on one microgradient [P] per device."""
  if kw is None:
    body = lambda g, s: (lax.pmean(g[0], AXIS), s)
    state = jnp.zeros([], jnp.int32)
  else:
    opt = optax_gaf.gaf(0.97, axis_name=AXIS, local_axis=False, num_microbatches=k, **kw)
    body = lambda g, s: opt.update(g[0], s)
    state = opt.init(None)
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=(P(), P())))
  return f, state


def part_comm(args):
  mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,))
  d_count = mesh.size
  rows, payload = [], {}
  for size in args.sizes:
    p = int(float(size))
    spec = jax.ShapeDtypeStruct((d_count, p), jnp.float32,
                                sharding=NamedSharding(mesh, P(AXIS)))
    base_b = None
    timed = {}
    for name, kw in _modes(args.sketch_dims):
      f, state = _step_fn(mesh, kw, d_count)
      compiled = f.lower(spec, state).compile()
      b = collective_bytes(compiled.as_text(), d_count)
      mem = compiled.memory_analysis()
      if base_b is None:
        base_b = b
      row = {"P": p, "mode": name, "collectives": b["count"],
             "payload_bytes": b["payload"], "wire_bytes": round(b["wire"]),
             "payload_vs_pmean": b["payload"] / base_b["payload"],
             "wire_vs_pmean": b["wire"] / base_b["wire"],
             "all_reduce_B": b["all-reduce"], "all_gather_B": b["all-gather"],
             "permute_B": b["collective-permute"],
             "temp_MB": mem.temp_size_in_bytes / 2**20}
      rows.append(row)
      if p <= args.max_timed_size:
        timed[name] = (compiled, state)
      print(row, flush=True)
    if timed:
      x = jax.device_put(np.random.default_rng(0).normal(size=(d_count, p)).astype(np.float32),
                         NamedSharding(mesh, P(AXIS)))
      fns = {name: (lambda c=c, s=s: c(x, s)) for name, (c, s) in timed.items()}
      t = _common.time_interleaved(fns, warmup=2, repeats=args.repeats)
      for row in rows:
        if row["P"] == p and row["mode"] in t:
          row["step_ms"] = 1e3 * t[row["mode"]]
          row["time_vs_pmean"] = t[row["mode"]] / t["pmean"]
          print(row["mode"], f"{row['step_ms']:.3f} ms  x{row['time_vs_pmean']:.2f}", flush=True)
  cols = ["P", "mode", "collectives", "payload_bytes", "wire_bytes", "payload_vs_pmean",
          "wire_vs_pmean", "all_reduce_B", "all_gather_B", "permute_B", "temp_MB",
          "step_ms", "time_vs_pmean"]
  table = [[r.get(c, "-") for c in cols] for r in rows]
  info = _common.header({"devices": f"{d_count} simulated CPU devices (XLA host platform)",
                         "K": f"{d_count} (one microgradient per device)",
                         "dtype": "float32", "timing_repeats": args.repeats})
  sketch_ok = {r["P"]: r["wire_vs_pmean"] for r in rows
               if r["mode"] == f"sketch d={max(args.sketch_dims)}"}
  notes = [
      "Bytes are per device per step, read from the compiled HLO of one "
      "`gaf(axis_name=..., local_axis=False).update` step inside `jax.shard_map` "
      "(the filtered gradient is replicated like `lax.pmean`'s), vs `lax.pmean(g)`. "
      "payload = sum of collective result sizes; wire = bandwidth-optimal ring "
      "estimate (all-reduce 2(D-1)/D x size, all-gather (D-1)/D x output, "
      "collective-permute = operand).",
      "all_gather: every device receives all K microgradients (K x P memory). "
      "ring: floor(D/2) = 4 collective-permutes of one microgradient (the Gram "
      "matrix is symmetric, half a ring covers all pairs), O(P) memory. sketch: "
      "one all-reduce of K x (d + 1) numbers (sketches and exact squared norms) "
      "plus the weighted all-reduce of P numbers that pmean also needs. All modes "
      "also all-reduce K x K numbers (the Gram rows) except sketch, whose Gram "
      "is built from the gathered sketches.",
      f"Sketch (d = {max(args.sketch_dims)}) wire bytes vs pmean: "
      + ", ".join(f"P={p:.0e}: {v:.3f}x" for p, v in sketch_ok.items())
      + " (target <= 1.1x).",
      "temp_MB: XLA temporary buffer size per device (memory_analysis).",
      "Step times: median of interleaved calls on 8 simulated CPU devices sharing "
      f"this machine's cores (sizes <= {args.max_timed_size:.0e} only). Simulated "
      "collectives are memcpys, so these ratios measure GAF's extra compute, not "
      "network time. " + _common.NOISE_NOTE,
  ]
  md = _common.write_results("comm", "Multi-device GAF: communication per step vs lax.pmean",
                             info, cols, table, notes)
  print(md)


def _digits(label_noise: float, seed: int = 0):
  """sklearn digits in [0, 1]; a fraction ``label_noise`` of labels replaced at random."""
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  rng = np.random.default_rng(seed)
  noisy = rng.random(len(y)) < label_noise
  y = np.where(noisy, rng.integers(0, 10, len(y)), y).astype(np.int32)
  return x, y


def _init_mlp(key, sizes):
  params = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    k = jax.random.fold_in(key, i)
    params.append({"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros(b)})
  return params


def _loss(params, batch):
  h = batch["x"]
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = h @ params[-1]["w"] + params[-1]["b"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))


def part_sketch(args):
  import optax
  x, y = _digits(args.label_noise)
  rng = np.random.default_rng(0)
  k, micro = 8, 32
  params = _init_mlp(jax.random.key(0), [64, 256, 256, 10])
  num_params = sum(l.size for l in jax.tree.leaves(params))
  grad_fn = optax_gaf.microbatch_grads(_loss, k)
  taus = args.taus
  dims = args.sketch_dims_study
  opt = optax_gaf.with_gaf(optax.sgd(args.lr), args.train_tau, num_microbatches=k)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch, count):
    grads = grad_fn(params, batch)
    gram = optax_gaf.gram_matrix(grads)
    iu = jnp.triu_indices(k, 1)
    norm = jnp.sqrt(jnp.diagonal(gram))
    cos = (gram / norm[:, None] / norm[None, :])[iu]
    out = {"cos": cos, "exact": {}, "sketch": {}}
    for tau in taus:
      out["exact"][tau] = agreement_lib.agreement_weights(gram, tau, "mean").accepted
    for d in dims:
      sk = collective.count_sketch(grads, d, seed=1, step=count)
      sg = sk @ sk.T
      sn = jnp.sqrt(jnp.diagonal(sg))
      out["sketch"][d] = {"cos": (sg / sn[:, None] / sn[None, :])[iu], "acc": {
          tau: agreement_lib.agreement_weights(sg, tau, "mean").accepted for tau in taus}}
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, out

  cos_err = {d: [] for d in dims}
  differ = {(d, tau): 0 for d in dims for tau in taus}
  differ_mb = {(d, tau): 0 for d in dims for tau in taus}
  skip_exact = {tau: 0 for tau in taus}
  acc_rate = {tau: 0.0 for tau in taus}
  cos_all = []
  for t in range(args.steps):
    idx = rng.choice(len(x), k * micro, replace=False)
    params, state, out = step(params, state, {"x": x[idx], "y": y[idx]}, t)
    out = jax.device_get(out)
    cos_all.append(out["cos"])
    for tau in taus:
      ex = np.asarray(out["exact"][tau])
      skip_exact[tau] += int(ex.sum() == 0)
      acc_rate[tau] += ex.mean()
      for d in dims:
        sk = np.asarray(out["sketch"][d]["acc"][tau])
        differ[(d, tau)] += int(not np.array_equal(ex, sk))
        differ_mb[(d, tau)] += int((ex != sk).sum())
    for d in dims:
      cos_err[d].append(np.abs(out["sketch"][d]["cos"] - out["cos"]))
  cos_all = np.concatenate(cos_all)
  rows = []
  for d in dims:
    e = np.concatenate(cos_err[d])
    row = [d, f"{d / num_params:.4f}", float(np.mean(e)), float(np.quantile(e, 0.95)),
           float(np.max(e)), float(1 / np.sqrt(d))]
    for tau in taus:
      row += [differ[(d, tau)] / args.steps, differ_mb[(d, tau)] / (args.steps * k)]
    rows.append(row)
  cols = ["sketch_dim", "d/P", "mean |cos err|", "p95 |cos err|", "max |cos err|", "1/sqrt(d)"]
  for tau in taus:
    cols += [f"steps differing (tau={tau})", f"microbatches differing (tau={tau})"]
  info = _common.header({
      "model": f"MLP 64-256-256-10 ({num_params} parameters), sklearn digits",
      "label_noise": args.label_noise,
      "K": k, "microbatch": micro, "steps": args.steps, "train_tau": args.train_tau,
      "optimizer": f"with_gaf(sgd({args.lr}))", "sketch": "count-sketch, fresh signs each step"})
  notes = [
      f"The model is trained with exact GAF (tau = {args.train_tau}); at each of the "
      f"{args.steps} steps the same 8 real microgradients are filtered exactly and from "
      "count-sketches (`optax_gaf._src.collective.count_sketch`, the sketch of "
      "`gaf(mode='sketch')`). 'steps differing': fraction of steps whose accepted "
      "set differs; 'microbatches differing': fraction of (step, microbatch) "
      "decisions that differ.",
      "Exact pairwise cosines over the run: mean "
      f"{cos_all.mean():.3f}, 5%-95% [{np.quantile(cos_all, 0.05):.3f}, "
      f"{np.quantile(cos_all, 0.95):.3f}]. Exact acceptance rate per microbatch: "
      + ", ".join(f"tau={tau}: {acc_rate[tau] / args.steps:.3f} "
                  f"(skips {skip_exact[tau]}/{args.steps})" for tau in taus) + ".",
  ]
  md = _common.write_results("sketch", "Sketch mode: cosine error and decision changes vs sketch_dim",
                             info, cols, rows, notes)
  print(md)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("comm", "sketch", "all"), default="all")
  parser.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "1e7"])
  parser.add_argument("--sketch-dims", nargs="+", type=int, default=[256, 1024])
  parser.add_argument("--max-timed-size", type=float, default=1e6)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--train-tau", type=float, default=0.97)
  parser.add_argument("--taus", nargs="+", type=float, default=[0.9, 0.97, 1.0])
  parser.add_argument("--label-noise", type=float, default=0.4,
                      help="fraction of digits labels replaced at random (sketch part)")
  parser.add_argument("--sketch-dims-study", nargs="+", type=int,
                      default=[64, 256, 1024, 4096, 16384])
  args = parser.parse_args()
  if args.part in ("comm", "all"):
    part_comm(args)
  if args.part in ("sketch", "all"):
    part_sketch(args)


if __name__ == "__main__":
  main()
