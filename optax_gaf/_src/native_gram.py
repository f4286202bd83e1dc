"""A native XLA:CPU kernel for the Gram matrix of a float32 ``[..., K, n]`` array.

XLA:CPU multiplies ``[K, n] x [n, K]`` with a general matrix kernel that
vectorises over the tiny ``K x K`` output; ``native/gram_kernel.cc``
vectorises over ``n``, computes only the tiles on and above the diagonal and
keeps a block of columns in L1 (see ``benchmarks/bench_gram.py``).

The kernel is compiled on first use with the system C++ compiler against
jaxlib's XLA FFI headers (``jax.ffi.include_dir()``), cached under
``$OPTAX_GAF_CACHE_DIR`` (default ``~/.cache/optax_gaf``) by a hash of the
source, jaxlib version, compiler and flags, and registered as an XLA FFI
target for the CPU platform. Without a compiler, or with
``OPTAX_GAF_NATIVE_GRAM=0``, :func:`available` returns False and callers use
XLA's own products; the results agree up to float summation order.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp

TARGET = "optax_gaf_gram_f32"
GRAM_SUM_TARGET = "optax_gaf_gram_sum_f32"
COMBINE_TARGET = "optax_gaf_combine_f32"
_SYMBOLS = {TARGET: "OptaxGafGramF32", GRAM_SUM_TARGET: "OptaxGafGramSumF32",
            COMBINE_TARGET: "OptaxGafCombineF32"}
_SOURCE = pathlib.Path(__file__).resolve().parent / "native" / "gram_kernel.cc"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def enabled() -> bool:
  """False when ``OPTAX_GAF_NATIVE_GRAM`` is set to ``0``, ``false`` or ``no``."""
  return os.environ.get("OPTAX_GAF_NATIVE_GRAM", "1").strip().lower() not in ("0", "false", "no")


def _compiler() -> list[str] | None:
  """The C++ compiler command: ``$CXX`` (may hold arguments), else the first found."""
  cxx = shlex.split(os.environ.get("CXX", ""))
  if cxx and shutil.which(cxx[0]):
    return [shutil.which(cxx[0]), *cxx[1:]]
  for name in ("c++", "g++", "clang++"):
    if shutil.which(name):
      return [shutil.which(name)]
  return None


def _host_fingerprint() -> bytes:
  """What ``-march=native`` depends on: the CPU model and feature flags.

  Part of the cache key, so a cache directory shared between different
  machines never hands one a kernel built for another's instruction set.
  """
  parts = {"platform": sys.platform, "machine": platform.machine(),
           "processor": platform.processor()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in parts:
          parts[key] = value.strip()
  except OSError:
    pass
  return repr(sorted(parts.items())).encode()


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("OPTAX_GAF_CACHE_DIR")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "optax_gaf"


def _build(cxx: list[str]) -> pathlib.Path:
  """Compiles the kernel (once per source/jaxlib/compiler/flags) and returns the .so path."""
  import jaxlib
  include = jax.ffi.include_dir()
  source = _SOURCE.read_bytes()
  attempts = [_FLAGS + ("-march=native",), _FLAGS]
  key = hashlib.sha256(b"\0".join([
      source, jaxlib.__version__.encode(), repr(cxx).encode(), repr(attempts).encode(),
      _host_fingerprint()])).hexdigest()[:16]
  out = _cache_dir() / f"gram_kernel-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  errors = []
  for flags in attempts:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      tmp_out = pathlib.Path(tmp) / out.name
      cmd = [*cxx, *flags, f"-I{include}", str(_SOURCE), "-o", str(tmp_out)]
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if proc.returncode == 0:
        os.replace(tmp_out, out)  # atomic: concurrent builders agree
        return out
      errors.append(f"$ {' '.join(cmd)}\n{proc.stderr[-2000:]}")
  raise RuntimeError("compiling the native Gram kernel failed:\n" + "\n".join(errors))


def available() -> bool:
  """Whether the native kernel is built and registered (builds it on first call).

  Returns False, with one warning, if it cannot be built or loaded; never raises.
  """
  if not enabled():
    return False
  with _LOCK:
    if "ok" not in _STATE:
      _STATE["ok"] = False
      cxx = _compiler()
      if cxx is None:
        _STATE["error"] = "no C++ compiler found (set CXX)"
      else:
        try:
          lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
          for target, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
          _STATE["lib"] = lib
          _STATE["ok"] = True
        except Exception as e:  # noqa: BLE001 - fall back to XLA's products
          _STATE["error"] = f"{type(e).__name__}: {e}"
          warnings.warn(
              "optax_gaf: the native CPU Gram kernel is unavailable, using XLA's "
              f"matrix products instead (slower on CPU): {_STATE['error']}",
              RuntimeWarning, stacklevel=2)
    return bool(_STATE["ok"])


def usable() -> bool:
  """Whether traced computations should use the kernels: a single-device CPU
  run with the kernels :func:`available`.

  They are opaque to XLA's SPMD partitioner (it would gather sharded
  operands), hence the single device.
  """
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def gram(x: jax.Array) -> jax.Array:
  """``x @ swapaxes(x, -1, -2)`` for float32 ``x`` of shape ``[..., K, n]`` (CPU only).

  Call only when :func:`available` is True, inside a computation lowered for
  CPU. Batches (``vmap``) are handled by the kernel's loop over leading axes.
  """
  out = jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-2]), jnp.float32)
  return _like(x, jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(x))


def gram_and_sum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Gram matrix of ``x`` (as :func:`gram`) and its row sum, in one pass.

  Args:
    x: float32 ``[..., K, n]``.

  Returns:
    ``(x @ swapaxes(x, -1, -2), sum(x, axis=-2))``: ``[..., K, K]`` and
    ``[..., n]``, both float32. Call only as :func:`gram`.
  """
  outs = (jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-2]), jnp.float32),
          jax.ShapeDtypeStruct((*x.shape[:-2], x.shape[-1]), jnp.float32))
  g, s = jax.ffi.ffi_call(GRAM_SUM_TARGET, outs, vmap_method="broadcast_all")(x)
  return _like(x, g), _like(x, s)


def combine(x: jax.Array, total: jax.Array, coef: jax.Array, a0: jax.Array) -> jax.Array:
  """``a0 * total + sum_{r: coef_r != 0} coef_r * x_r``, reading only those rows.

  Args:
    x: float32 ``[..., K, n]``.
    total: float32 ``[..., n]`` (read only when ``a0 != 0``).
    coef: float32 ``[..., K]``; rows with a zero coefficient are not read.
    a0: float32 ``[...]``.

  Returns:
    float32 ``[..., n]``. Call only as :func:`gram`.
  """
  # Writing the result over ``total`` (input_output_aliases) was tried: with
  # with_gaf's select it grew XLA's temporary buffer by 4 MiB (MLP, K = 4:
  # 28.4 -> 32.5 MiB, past glibc's 32 MiB mmap threshold).
  out = jax.ShapeDtypeStruct((*x.shape[:-2], x.shape[-1]), jnp.float32)
  y = jax.ffi.ffi_call(COMBINE_TARGET, out, vmap_method="broadcast_all")(x, total, coef, a0)
  return _like(x, y)


def _like(x: jax.Array, y: jax.Array) -> jax.Array:
  """Inside shard_map, marks ``y`` as varying over the same manual axes as ``x``."""
  varying = tuple(sorted(_varying_axes(x)))
  return jax.lax.pcast(y, varying, to="varying") if varying else y


def _varying_axes(x: jax.Array) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))
