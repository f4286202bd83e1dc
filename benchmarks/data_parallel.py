"""Data-parallel training with multi-device GAF on a ``jax.sharding.Mesh``.

Every device computes its own microgradient(s) on its shard of the batch;
``optax_gaf.with_gaf(..., axis_name="data")`` shares the K x K Gram matrix,
filters, and applies the optimizer to the replicated filtered gradient (one
weighted all-reduce, like ``lax.pmean``). Parameters and optimizer state stay
replicated and identical on all devices, skips included.

Single machine, 8 simulated CPU devices (the default here)::

  python benchmarks/data_parallel.py --steps 200
  python benchmarks/data_parallel.py --mode ring --k-local 2
  python benchmarks/data_parallel.py --mode sketch --sketch-dim 1024
  python benchmarks/data_parallel.py --label-noise 0.4 --tau 0.97

Multi-host (GPU/TPU cluster): start the same script once per host (process)
with ``--distributed``. It calls ``jax.distributed.initialize()`` before any
other JAX call; on SLURM, Cloud TPU and Open MPI the coordinator address,
process count and process id are detected automatically, otherwise pass them
(``--coordinator host0:1234 --num-processes 4 --process-id $RANK``, the same
coordinator on every host). ``jax.devices()`` then lists the devices of *all*
hosts, the Mesh spans them, and each host feeds only its own slice of the
global batch (``jax.make_array_from_process_local_data``)::

  # on host i of N (e.g. under srun / mpirun, or by hand):
  python benchmarks/data_parallel.py --distributed \\
      --coordinator host0:1234 --num-processes N --process-id i --no-simulate

``--no-simulate`` keeps the real accelerators (no
``--xla_force_host_platform_device_count``). The training code is the same
for one host and many: collectives over the "data" mesh axis run over
NCCL/ICI/Gloo as the platform provides.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--k-local", type=int, default=1, help="microbatches per device")
  p.add_argument("--micro", type=int, default=16, help="examples per microbatch")
  p.add_argument("--tau", type=float, default=0.97)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--mode", choices=("all_gather", "ring", "sketch"), default="all_gather")
  p.add_argument("--sketch-dim", type=int, default=None)
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  p.add_argument("--no-simulate", action="store_true",
                 help="use the real devices (no simulated CPU devices)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host)")
  p.add_argument("--coordinator", default=None)
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--label-noise", type=float, default=0.0,
                 help="fraction of training labels replaced at random")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


ARGS = _parse()
if not ARGS.no_simulate:  # must happen before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if ARGS.distributed:  # before any other JAX call
  jax.distributed.initialize(coordinator_address=ARGS.coordinator,
                             num_processes=ARGS.num_processes, process_id=ARGS.process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_gaf  # noqa: E402


def load_digits_split(seed):
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  y_train = y[:1500].copy()
  rng = np.random.default_rng(seed + 1)
  noisy = rng.random(len(y_train)) < ARGS.label_noise
  y_train[noisy] = rng.integers(0, 10, int(noisy.sum()))
  return (x[:1500], y_train), (x[1500:], y[1500:])


def init_mlp(key, sizes=(64, 128, 10)):
  params = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2 / a),
                   "b": jnp.zeros(b)})
  return params


def logits_fn(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
  logp = jax.nn.log_softmax(logits_fn(params, batch["x"]))
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], 1))


def main():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  n_dev = mesh.size
  k_local = ARGS.k_local
  k = n_dev * k_local
  opt = optax_gaf.with_gaf(
      optax.sgd(ARGS.lr, momentum=0.9), ARGS.tau, num_microbatches=k,
      axis_name="data", mode=ARGS.mode, sketch_dim=ARGS.sketch_dim,
      local_axis=k_local > 1)
  grad_fn = (optax_gaf.microbatch_grads(loss_fn, k_local) if k_local > 1
             else jax.grad(loss_fn))

  def train_step(params, state, batch):
    # Runs on every device with its own [k_local * micro] slice of the batch.
    grads = grad_fn(params, batch)
    updates, state = opt.update(grads, state, params)
    loss = jax.lax.pmean(loss_fn(params, batch), "data")
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(jax.shard_map(
      train_step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P(), P())))

  (x, y), (x_test, y_test) = load_digits_split(ARGS.seed)
  params = init_mlp(jax.random.key(ARGS.seed))
  state = opt.init(params)
  rng = np.random.default_rng(ARGS.seed + jax.process_index())
  global_batch = k * ARGS.micro
  local_rows = global_batch // jax.process_count()
  batch_sharding = NamedSharding(mesh, P("data"))
  t0 = time.perf_counter()
  skips = 0
  for t in range(ARGS.steps):
    # Each process draws only its own rows; on one host this is the whole batch.
    idx = rng.choice(len(x), local_rows, replace=False)
    local = {"x": x[idx], "y": y[idx]}
    batch = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(batch_sharding, a), local)
    params, state, loss = step(params, state, batch)
    skips += int(state.gaf_state.skipped)
    if t % 50 == 0 or t == ARGS.steps - 1:
      print(f"step {t:4d} loss {float(loss):.4f} accepted "
            f"{int(state.gaf_state.num_accepted)}/{k} skipped so far {skips}", flush=True)
  elapsed = time.perf_counter() - t0
  acc = float(jnp.mean(jnp.argmax(logits_fn(params, x_test), -1) == y_test))
  if jax.process_index() == 0:
    print(f"devices={n_dev} processes={jax.process_count()} K={k} (K_local={k_local}) "
          f"mode={ARGS.mode} tau={ARGS.tau}: test accuracy {acc:.3f}, "
          f"skipped {skips}/{ARGS.steps} steps, dropped (non-finite) "
          f"{int(state.gaf_state.num_dropped)}, {elapsed:.1f} s")


if __name__ == "__main__":
  main()
