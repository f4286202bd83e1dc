"""The native XLA:CPU Gram kernel (native_gram.py, native/gram_kernel.cc)."""

import os
import pathlib
import platform
import shutil
import subprocess
import sys
import warnings
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gaf
from optax_gaf._src import gram as gram_lib
from optax_gaf._src import native_gram
from tests import reference as ref_lib
from tests.native_paths import run_on_path

needs_kernel = pytest.mark.skipif(
    not native_gram.available(),
    reason=f"native Gram kernel unavailable: {native_gram._STATE.get('error')}")


def _exact(x):
  x = np.asarray(x, np.float64)
  return np.einsum("...kn,...jn->...kj", x, x)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 33])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 8191, 8192, 8209, 40000])
def test_kernel_equals_float64_and_is_exactly_symmetric(k, n):
  # n spans: empty, scalar tails, whole vectors, one block (8192 columns),
  # a block plus a tail, and several blocks (more than one flush at 16 blocks
  # needs n > 131072; see the large test below).
  x = np.random.default_rng(k * 100_003 + n).standard_normal((k, n)).astype(np.float32)
  g = np.asarray(jax.jit(native_gram.gram)(x))
  assert g.shape == (k, k) and g.dtype == np.float32
  exact = _exact(x)
  np.testing.assert_allclose(g, exact, rtol=2e-6, atol=2e-6 * max(1.0, np.abs(exact).max()))
  np.testing.assert_array_equal(g, g.T)


@needs_kernel
def test_kernel_across_flushes_is_more_accurate_than_float32_sums():
  # 16 blocks of 8192 columns per flush: 300_000 columns cross two flushes.
  # All-ones rows: the exact products are integers; a float32 running sum of
  # 300_000 ones per lane would still be exact, so use 1 + 2^-12 to make
  # float32-only accumulation lose bits while float64 totals do not.
  x = np.full((4, 300_000), 1 + 2.0**-12, np.float32)
  g = np.asarray(native_gram.gram(x))
  exact = _exact(x)
  # Without the float64 flushes the error is ~1.5e-4; with them it is two to
  # three float32 ulps (1e-7 with FMA, 1.1e-7 in a build without FMA).
  np.testing.assert_allclose(g, exact, rtol=3e-7)


@needs_kernel
def test_kernel_under_vmap_and_nan_inf_propagate_like_a_dot():
  rng = np.random.default_rng(0)
  xb = rng.standard_normal((3, 2, 5, 1000)).astype(np.float32)
  g = jax.jit(jax.vmap(jax.vmap(native_gram.gram)))(xb)
  np.testing.assert_allclose(g, _exact(xb), rtol=1e-5, atol=1e-3)
  x = rng.standard_normal((4, 100)).astype(np.float32)
  x[1, 7] = np.nan
  x[2, 3] = np.inf
  g = np.asarray(native_gram.gram(x))
  dot = np.asarray(gram_lib.dot(jnp.asarray(x), jnp.asarray(x), jnp.dtype(jnp.float32)))
  np.testing.assert_array_equal(np.isfinite(g), np.isfinite(dot))
  assert np.isnan(g[1]).all() and np.isinf(g[2, 2])


@needs_kernel
def test_gram_matrix_uses_the_kernel_for_float32_on_cpu():
  grads = {"w": jnp.ones((4, 300)), "b": jnp.ones((4, 3), jnp.bfloat16)}
  hlo = jax.jit(optax_gaf.gram_matrix).lower(grads).as_text()
  assert native_gram.TARGET in hlo
  np.testing.assert_array_equal(jax.jit(optax_gaf.gram_matrix)(grads), np.full((4, 4), 303.0))


@needs_kernel
def test_kernel_inside_shard_map_on_a_one_device_mesh():
  # The result must carry the input's varying manual axes (pcast), or
  # lax.platform_dependent rejects the branches.
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1,), ("data",))
  x = np.random.default_rng(4).standard_normal((4, 300)).astype(np.float32)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
  f = jax.jit(jax.shard_map(lambda g: optax_gaf.gram_matrix({"w": g}), mesh=mesh,
                            in_specs=P("data"), out_specs=P("data")))
  assert native_gram.TARGET in f.lower(xs).as_text()
  np.testing.assert_allclose(f(xs), _exact(x), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_gaf_update_and_gradients_match_the_xla_path():
  rng = np.random.default_rng(3)
  grads = ref_lib.correlated_micrograds(rng, 8, [(30, 40), (40,), (7, 3, 3)], 0.6, 1.0)
  grads = jax.tree.map(jnp.asarray, grads)
  gaf = optax_gaf.gaf(0.95)

  def run(native):
    update = jax.jit(lambda g: gaf.update(g, gaf.init(None))[0])
    grad = jax.jit(jax.grad(lambda g: jnp.sum(optax_gaf.gram_matrix(g) ** 2)))
    return (run_on_path(update, grads, native=native), run_on_path(grad, grads, native=native))

  native_update, native_grad = run(True)
  xla_update, xla_grad = run(False)
  chex.assert_trees_all_close(native_update, xla_update, rtol=1e-5, atol=1e-6)
  # Gradients are up to ~4e4 here; compare at float32 precision of that scale
  # (the two paths sum in different orders).
  scale = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(xla_grad))
  chex.assert_trees_all_close(native_grad, xla_grad, rtol=1e-5, atol=1e-6 * scale)


def test_failed_build_falls_back_with_one_warning(tmp_path):
  saved = dict(native_gram._STATE)
  native_gram._STATE.clear()
  env = {"CXX": "false", "OPTAX_GAF_CACHE_DIR": str(tmp_path), "OPTAX_GAF_NATIVE_GRAM": "1"}
  try:
    with mock.patch.dict(os.environ, env), \
         mock.patch.object(native_gram, "_compiler", return_value=["/bin/false"]):
      with pytest.warns(RuntimeWarning, match="native CPU Gram kernel is unavailable"):
        assert not native_gram.available()
      with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert not native_gram.available()
      assert "compiling the native Gram kernel failed" in native_gram._STATE["error"]
      x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
      fresh = jax.jit(lambda g: optax_gaf.gram_matrix(g))  # traced anew, on the fallback
      assert native_gram.TARGET not in fresh.lower({"w": x}).as_text()
      np.testing.assert_allclose(fresh({"w": x}), _exact(x), rtol=1e-6)
  finally:
    native_gram._STATE.clear()
    native_gram._STATE.update(saved)


def test_disabled_by_environment():
  with mock.patch.dict(os.environ, {"OPTAX_GAF_NATIVE_GRAM": "0"}):
    assert not native_gram.enabled() and not native_gram.available()
  with mock.patch.dict(os.environ, {"OPTAX_GAF_NATIVE_GRAM": "1"}):
    assert native_gram.enabled()


_NARROW_RUN = "OPTAX_GAF_TEST_NARROW_BUILD"


@needs_kernel
@pytest.mark.skipif(os.environ.get(_NARROW_RUN) == "1", reason="inside a narrower build's run")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
@pytest.mark.parametrize("flag", ["-mno-avx512f", "-mno-avx"])
def test_kernels_built_for_narrower_vector_units(flag, tmp_path):
  # The kernels pick their vector width from the build's instruction set (16
  # floats with AVX-512, 8 with AVX2, 4 with SSE). The build uses
  # -march=native; an explicit -mno-... in CXX narrows it (explicit ISA flags
  # win over -march). Runs the kernel tests of both native test files against
  # that build, in a subprocess with its own kernel cache.
  cxx = native_gram._compiler()
  env = dict(os.environ, CXX=f"{cxx[0]} {flag}", OPTAX_GAF_CACHE_DIR=str(tmp_path),
             OPTAX_GAF_NATIVE_GRAM="1", **{_NARROW_RUN: "1"})
  root = pathlib.Path(__file__).resolve().parent.parent
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
       "tests/test_native_gram.py", "tests/test_native_filter.py",
       "-k", "(kernel or combine or gram_and_sum) and not narrower"],
      cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
  (lib,) = tmp_path.glob("gram_kernel-*.so")
  if shutil.which("objdump"):
    asm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "zmm" not in asm
    assert ("ymm" in asm) == (flag == "-mno-avx512f")
