"""Shared helpers for the benchmark scripts: timing, headers, result files.

Timings are medians over ``repeats`` calls after ``warmup`` calls, each call
followed by ``jax.block_until_ready`` (or a no-op for PyTorch, which is
synchronous on CPU). Ratios are always measured side by side in one process.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

NOISE_NOTE = (
    "Measured on a shared 2-core machine: other processes (other engineers' "
    "tests) may have been running, so absolute times are noisy; ratios are "
    "measured side by side in one process.")


def pin_threads(num_threads: int | None) -> None:
  """Restricts this process (and so XLA and PyTorch) to ``num_threads`` cores.

  Must run before ``jax`` (and ``torch``) are imported. Pins the CPU affinity
  to the first ``num_threads`` allowed cores (XLA:CPU sizes its thread pool
  from the affinity mask) and, for one thread, also sets
  ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` so Eigen runs single
  threaded. PyTorch callers must also call ``torch.set_num_threads``.
  """
  if num_threads is None:
    return
  if "jax" in sys.modules:
    raise RuntimeError("pin_threads must run before jax is imported")
  allowed = sorted(os.sched_getaffinity(0))
  if num_threads > len(allowed):
    raise ValueError(
        f"`--threads={num_threads}` but only {len(allowed)} cores are allowed")
  os.sched_setaffinity(0, allowed[:num_threads])
  if num_threads == 1:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
      os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10,
            block: Callable[[Any], Any] | None = None) -> list[float]:
  """Seconds per call of ``fn()`` for ``repeats`` calls after ``warmup`` calls."""
  if block is None:
    import jax
    block = jax.block_until_ready
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return times


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 2,
                     repeats: int = 10, block=None) -> dict[str, float]:
  """Median seconds per call of each function, calls interleaved round-robin.

  Interleaving makes a burst of load from other processes hit all contenders
  alike, so the ratios are steadier than the absolute times.
  """
  times = time_interleaved_all(fns, warmup=warmup, repeats=repeats, block=block)
  return {name: statistics.median(t) for name, t in times.items()}


def time_interleaved_all(fns: dict[str, Callable[[], Any]], *, warmup: int = 2,
                         repeats: int = 10, block=None) -> dict[str, list[float]]:
  """Like :func:`time_interleaved`, but every call's seconds."""
  if block is None:
    import jax
    block = jax.block_until_ready
  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - t0)
  return times


def tensordot_mean(grads: Any) -> Any:
  """The benchmarks' averaging baseline: ``tensordot(full(K, 1/K), g, 1)`` per leaf.

  Leaves (or a single array) have a leading microbatch axis K; on XLA:CPU this
  is much faster than ``jnp.mean(g, axis=0)``.
  """
  import jax
  import jax.numpy as jnp
  return jax.tree.map(
      lambda g: jnp.tensordot(jnp.full((g.shape[0],), 1 / g.shape[0], g.dtype), g, 1), grads)


def time_rounds(fns: dict[str, Callable[[], Any]], *, rounds: int = 8, calls: int = 25,
                warmup: int = 3, block=None) -> dict[str, list[list[float]]]:
  """Seconds per call of each function, in alternating blocks of calls.

  Each of ``rounds`` rounds runs ``calls`` consecutive calls of every
  function (the order rotating from round to round), so a slow spell of the
  machine falls on all contenders alike, while each function still runs
  back to back as a single-framework user would run it (no switching
  between runtimes on every call).

  Returns:
    For each function, ``rounds`` lists of ``calls`` times.
  """
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(time_fn(fns[name], warmup=warmup, repeats=calls, block=block))
  return times


def page_faults_per_call(fn: Callable[[], Any], calls: int = 5, block=None) -> float:
  """Minor page faults of this process per call of ``fn()`` (after one warm call).

  Each fault maps a fresh (zeroed) page: on Linux glibc, buffers larger than
  its mmap threshold (at most 32 MiB by default) are mapped afresh on every
  allocation, so an XLA temporary of that size faults on every step.
  """
  import resource
  if block is None:
    import jax
    block = jax.block_until_ready
  block(fn())
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    block(fn())
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def header(extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Machine, versions, date and the exact command line."""
  info: dict[str, Any] = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpu": _cpu_name(),
      "cores_allowed": len(os.sched_getaffinity(0)),
      "cores_total": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "(unset: default malloc)"),
  }
  for mod in ("jax", "jaxlib", "optax", "numpy", "torch", "gradient_agreement_filtering"):
    if mod in sys.modules:
      info[mod] = _version(mod)
  if "jax" in sys.modules:
    import jax
    info["jax_device"] = str(jax.devices()[0].device_kind)
  info["note"] = NOISE_NOTE
  if extra:
    info.update(extra)
  return info


def _version(mod: str) -> str:
  try:
    from importlib import metadata
    name = {"gradient_agreement_filtering": "gradient-agreement-filtering"}.get(mod, mod)
    return metadata.version(name)
  except Exception:  # pragma: no cover
    return getattr(sys.modules[mod], "__version__", "?")


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:  # pragma: no cover
    pass
  return platform.processor() or "?"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(name: str, title: str, info: dict[str, Any], columns: list[str],
                  rows: list[list[Any]], notes: list[str] = ()) -> str:
  """Writes ``results/<name>.md`` and ``results/<name>.json``; returns the markdown."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  table = markdown_table(columns, rows)
  meta = "\n".join(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}"
                   for k, v in info.items())
  md = f"# {title}\n\n{table}\n\n" + "".join(f"{n}\n\n" for n in notes) + meta + "\n"
  (RESULTS / f"{name}.md").write_text(md)
  payload = {"title": title, "info": info, "notes": list(notes),
             "rows": [dict(zip(columns, r)) for r in rows]}
  (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
  return md
