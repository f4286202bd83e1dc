"""optax_gaf against the authors' PyTorch ``step_GAF``, side by side on CPU.

Same MLP (same layer sizes, same initial weights copied from PyTorch), same
data, same K microbatches, SGD with momentum 0.9, ``combine="pairwise"`` (the
authors' fold), equal thread counts. Times per step (medians; contenders alternate in blocks of
steps, see ``_common.time_rounds``):

* ``torch step_GAF``: ``gradient_agreement_filtering.step_GAF`` as published
  (one ``DataLoader`` per microbatch, sequential forward/backward per
  microbatch, flatten + ``cosine_similarity`` per comparison);
* ``torch loop``: the same algorithm on pre-collated tensors (no
  ``DataLoader``), using the package's own ``_filter_gradients_cosine_sim``,
  to show how much of the gap is data loading;
* ``optax_gaf``: one jitted step: ``microbatch_grads`` (vmap over K),
  ``with_gaf(optax.sgd(lr, momentum=0.9), combine="pairwise")``,
  ``optax.apply_updates``;
* ``jax averaging`` (reference, no GAF): the same jitted step with the K
  microgradients averaged (``tensordot`` mean) instead of filtered: how fast
  GAF could be at most, with this JAX forward and backward pass.

Before timing it checks that a few steps of both from the same weights and
microbatches give the same parameters (max abs difference reported).

Threads: the process is pinned to ``--threads`` cores before importing jax
and torch (``os.sched_setaffinity``; XLA:CPU sizes its pool from it, and for
one thread ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``), and
``torch.set_num_threads(--threads)``, ``torch.set_num_interop_threads(1)``.

Needs the optional packages in benchmarks/requirements-torch.txt::

  pip install torch==2.13.0
  pip install --no-deps gradient-agreement-filtering==0.1.3
  python benchmarks/bench_torch.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def torch_mlp(sizes, seed):
  import torch
  torch.manual_seed(seed)
  layers = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    layers.append(torch.nn.Linear(a, b))
    if i < len(sizes) - 2:
      layers.append(torch.nn.ReLU())
  return torch.nn.Sequential(*layers)


def jax_params_from_torch(model):
  """``[(W [out, in], b [out]), ...]`` as jax arrays, copied from PyTorch."""
  import jax.numpy as jnp
  import torch
  linears = [m for m in model if isinstance(m, torch.nn.Linear)]
  return [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
          for m in linears]


def jax_mlp_loss(params, batch):
  """Mean cross-entropy of the MLP ``x @ W.T + b`` (ReLU between layers)."""
  import jax
  import jax.numpy as jnp
  import optax
  h = batch["x"]
  for i, (w, b) in enumerate(params):
    h = h @ w.T + b
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h, batch["y"]))


def make_jax_step(k, lr, momentum, tau):
  """A jitted step: K vmapped microgradients, then GAF (or plain averaging if
  ``tau`` is None), SGD with momentum. Returns ``(optimizer, step)``."""
  import jax
  import optax
  import optax_gaf
  sgd = optax.sgd(lr, momentum=momentum)
  opt = sgd if tau is None else optax_gaf.with_gaf(sgd, tau, combine="pairwise",
                                                   num_microbatches=k)
  grad_fn = optax_gaf.microbatch_grads(jax_mlp_loss, k)

  @jax.jit
  def step(params, state, batch):
    grads = grad_fn(params, batch)
    if tau is None:
      grads = _common.tensordot_mean(grads)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return opt, step


def boxed_step(k, lr, momentum, tau, params, batch):
  """A no-argument call of :func:`make_jax_step`'s step that carries its own
  parameters and state from call to call, as a training loop does."""
  opt, step = make_jax_step(k, lr, momentum, tau)
  box = {"params": params, "state": opt.init(params)}

  def call():
    box["params"], box["state"] = step(box["params"], box["state"], batch)
    return box["params"]

  return call


def make_data(num_steps, k, mb, d_in, classes, seed):
  import numpy as np
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(num_steps, k * mb, d_in)).astype(np.float32)
  ys = rng.integers(0, classes, size=(num_steps, k * mb)).astype(np.int64)
  return xs, ys


def torch_microbatches(x, y, k):
  import torch
  from torch.utils.data import TensorDataset
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)
  mb = x.shape[0] // k
  return [TensorDataset(xt[i * mb:(i + 1) * mb], yt[i * mb:(i + 1) * mb]) for i in range(k)]


def torch_loop_step(model, optimizer, criterion, x, y, k, tau):
  """The authors' step_GAF algorithm on pre-collated tensors (no DataLoader)."""
  import gradient_agreement_filtering as gaf_torch
  import torch
  mb = x.shape[0] // k
  current = None
  agreed = 0
  for i in range(k):
    optimizer.zero_grad()
    loss = criterion(model(x[i * mb:(i + 1) * mb]), y[i * mb:(i + 1) * mb])
    loss.backward()
    g = [p.grad.clone() for p in model.parameters()]
    if current is None:
      current = g
      continue
    fused, _ = gaf_torch._filter_gradients_cosine_sim(current, g, tau)
    if fused is not None:
      current, agreed = fused, agreed + 1
  optimizer.zero_grad()
  if agreed > 0:
    with torch.no_grad():
      for p, g in zip(model.parameters(), current):
        p.grad = g
    optimizer.step()


def parity(sizes, k, mb, lr, momentum, tau, num_steps, seed=0):
  """Runs ``num_steps`` of step_GAF and of optax_gaf from the same start.

  Returns ``(max_abs_diff, max_abs_param, agreed_counts, jax_num_accepted)``.
  """
  import gradient_agreement_filtering as gaf_torch
  import jax.numpy as jnp
  import numpy as np
  import torch
  model = torch_mlp(sizes, seed)
  params = jax_params_from_torch(model)
  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
  criterion = torch.nn.CrossEntropyLoss()
  opt, step = make_jax_step(k, lr, momentum, tau)
  state = opt.init(params)
  xs, ys = make_data(num_steps, k, mb, sizes[0], sizes[-1], seed + 1)
  agreed, accepted = [], []
  for t in range(num_steps):
    res = gaf_torch.step_GAF(model, optimizer, criterion, torch_microbatches(xs[t], ys[t], k),
                             wandb=False, verbose=False, cos_distance_thresh=tau)
    agreed.append(res["agreed_count"])
    params, state = step(params, state, {"x": jnp.asarray(xs[t]), "y": jnp.asarray(ys[t])})
    accepted.append(int(state.gaf_state.num_accepted))
  torch_params = jax_params_from_torch(model)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for pa, pb in zip(params, torch_params) for a, b in zip(pa, pb))
  scale = max(float(np.max(np.abs(np.asarray(a)))) for pa in params for a in pa)
  return diff, scale, agreed, accepted


def _sizes(spec: str) -> list[int]:
  return [int(v) for v in spec.split("-")]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--models", nargs="+", default=["784-1024-1024-10", "784-128-10"],
                      help="MLP layer sizes as IN-HIDDEN...-CLASSES, one run per model")
  parser.add_argument("--microbatch", type=int, default=32, help="examples per microbatch")
  parser.add_argument("--tau", type=float, default=1.0)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--rounds", type=int, default=8,
                      help="rounds of timing; each runs --calls steps of every contender")
  parser.add_argument("--calls", type=int, default=25, help="timed steps per contender per round")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--out", default="torch")
  parser.add_argument("--quick", action="store_true", help="small model, no result files")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.ks, args.rounds, args.calls = ["64-128-10"], [2, 4], 2, 3
  _common.pin_threads(args.threads)

  import gradient_agreement_filtering as gaf_torch
  import jax
  import jax.numpy as jnp
  import torch
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)

  momentum = 0.9
  rows, checks = [], []
  for spec in args.models:
    sizes = _sizes(spec)
    num_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    print(f"\nMLP {spec}: {num_params} parameters, {args.microbatch} examples per "
          f"microbatch, threads={args.threads}, torch threads={torch.get_num_threads()}")

    # Numerical check: three steps from the same weights and microbatches.
    for tau in (2.0, args.tau, 0.0):
      diff, scale, agreed, accepted = parity(sizes, 4, args.microbatch, args.lr, momentum,
                                             tau, num_steps=3)
      checks.append((spec, tau, diff, scale, agreed, accepted))
      print(f"parity K=4 tau={tau}: max |theta_jax - theta_torch| = {diff:.2e} "
            f"(max |theta| = {scale:.2f}); torch agreed_count per step {agreed}, "
            f"optax_gaf num_accepted {accepted}")

    print(f"{'K':>3} {'step_GAF ms':>12} {'torch loop ms':>14} {'optax_gaf ms':>13} "
          f"{'step_GAF/optax_gaf':>19} {'(per round)':>13} {'loop/optax_gaf':>15} "
          f"{'step_GAF/jax avg':>17}")
    for k in args.ks:
      xs, ys = make_data(1, k, args.microbatch, sizes[0], sizes[-1], 7)
      model = torch_mlp(sizes, 0)
      params = jax_params_from_torch(model)
      optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum)
      criterion = torch.nn.CrossEntropyLoss()
      mbs = torch_microbatches(xs[0], ys[0], k)
      xt, yt = torch.from_numpy(xs[0]), torch.from_numpy(ys[0])
      batch = {"x": jnp.asarray(xs[0]), "y": jnp.asarray(ys[0])}
      fns = {
          "step_GAF": lambda: gaf_torch.step_GAF(
              model, optimizer, criterion, mbs, wandb=False, verbose=False,
              cos_distance_thresh=args.tau),
          "torch loop": lambda: torch_loop_step(model, optimizer, criterion, xt, yt, k, args.tau),
          "optax_gaf": boxed_step(k, args.lr, momentum, args.tau, params, batch),
          "jax averaging": boxed_step(k, args.lr, momentum, None, params, batch),
      }
      block = lambda out: out if isinstance(out, (dict, type(None))) else jax.block_until_ready(out)
      # Blocks of consecutive calls, alternating between contenders round by
      # round: alternating on every call would slow both runtimes (each one's
      # worker threads spin-wait after a call), which no single-framework user
      # sees; blocks still spread the machine's slow spells over all of them.
      times = _common.time_rounds(fns, rounds=args.rounds, calls=args.calls, block=block)
      t = {name: statistics.median(v for r in rs for v in r) for name, rs in times.items()}
      per_round = [statistics.median(a) / statistics.median(b)
                   for a, b in zip(times["step_GAF"], times["optax_gaf"])]
      r1, r2 = t["step_GAF"] / t["optax_gaf"], t["torch loop"] / t["optax_gaf"]
      r3 = t["step_GAF"] / t["jax averaging"]
      spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
      print(f"{k:>3d} {t['step_GAF'] * 1e3:>12.2f} {t['torch loop'] * 1e3:>14.2f} "
            f"{t['optax_gaf'] * 1e3:>13.2f} {r1:>19.2f} {spread:>13} {r2:>15.2f} "
            f"{r3:>17.2f}", flush=True)
      rows.append([spec, num_params, k, 1 / t["step_GAF"], 1 / t["torch loop"],
                   1 / t["optax_gaf"], r1, spread, r2, 1 / t["jax averaging"], r3])

  if not args.quick:
    info = _common.header({
        "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "model": "MLP (sizes per row), ReLU, mean cross-entropy",
        "microbatch": args.microbatch, "optimizer": f"SGD lr={args.lr} momentum={momentum}",
        "tau": args.tau, "combine": "pairwise",
        "timing": f"{args.rounds} rounds of {args.calls} consecutive steps per contender "
                  "(3 warm-up steps each), contenders alternating round by round; medians "
                  "over all steps"})
    notes = [
        "Steps/second (higher is better); the ratios are time per step of the PyTorch "
        "side over optax_gaf's (> 1: optax_gaf faster). Target: >= 5x faster than "
        "step_GAF at K = 4. per round: the lowest and highest step_GAF/optax_gaf ratio "
        "of the medians within one round. jax averaging: the same jitted JAX step with the "
        "K microgradients averaged instead of filtered (no GAF), a bound on what any GAF "
        "step built on this forward and backward pass can reach.",
        "Parity (K=4, 3 steps from the same weights and microbatches): " + "; ".join(
            f"{spec} tau={tau}: max abs param diff {diff:.1e} (max |param| {scale:.2f}), "
            f"torch agreed_count {agreed}, optax_gaf num_accepted {acc}"
            for spec, tau, diff, scale, agreed, acc in checks) + ".",
        _common.NOISE_NOTE]
    md = _common.write_results(
        args.out, "optax_gaf vs the authors' PyTorch step_GAF (CPU, equal threads)", info,
        ["MLP", "params", "K", "step_GAF steps/s", "torch loop steps/s", "optax_gaf steps/s",
         "step_GAF/optax_gaf time", "step_GAF/optax_gaf per round", "torch loop/optax_gaf time",
         "jax averaging steps/s", "step_GAF/jax averaging time"],
        rows, notes)
    print("\n" + md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
