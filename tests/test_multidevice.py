"""Multi-device GAF (``axis_name``): 8 simulated CPU devices in one subprocess.

The checks live in ``tests/multidevice_worker.py`` and run once per session
in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the main pytest process keeps one device); each check is reported as its own
test here. Argument checks and single-device behaviour run in-process.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_gaf

WORKER = pathlib.Path(__file__).with_name("multidevice_worker.py")
CHECK_NAMES = re.findall(r"^def check_(\w+)\(", WORKER.read_text(), flags=re.M)


@pytest.fixture(scope="module")
def worker_results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = str(WORKER.parents[1])
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, str(WORKER)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=900)
  results = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      results[r["name"]] = r
  if not results:
    pytest.fail(f"multi-device worker produced no results (rc={proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return results


def test_worker_defines_the_required_checks():
  for name in ("shard_map_equals_vmapped", "pmap_equals_vmapped",
               "ring_equals_all_gather", "sharded_params_jit_equals_unsharded",
               "sketch_large_d_decides_like_exact",
               "unbound_axis_name_inside_other_mesh"):
    assert name in CHECK_NAMES


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_on_8_devices(worker_results, name):
  assert name in worker_results, f"check {name} did not report (worker crashed?)"
  r = worker_results[name]
  assert r["ok"], r["error"]


# In-process (one device): argument checks and unbound axis names.

def test_unbound_axis_name_raises_value_error_naming_it():
  opt = optax_gaf.gaf(0.5, axis_name="batch")
  grads = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"gaf\(axis_name='batch'\).*'batch' is not bound"):
    opt.update(grads, opt.init(None))
  wopt = optax_gaf.with_gaf(optax.sgd(0.1), axis_name="batch", mode="ring")
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"with_gaf\(axis_name='batch'\)"):
    jax.jit(wopt.update)(grads, wopt.init(params), params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(axis_name="d", mode="tree"), r"`gaf\(mode=...\)` must be one of"),
    (dict(axis_name="d", mode="sketch"), r"needs `sketch_dim`"),
    (dict(axis_name="d", mode="sketch", sketch_dim=0), r"sketch_dim=...\)` must be a static positive int, got 0"),
    (dict(axis_name="d", sketch_dim=64), r"only used with mode='sketch'"),
    (dict(mode="ring"), r"also pass `axis_name`"),
    (dict(local_axis=False), r"also pass `axis_name`"),
    (dict(axis_name="d", local_axis="yes"), r"local_axis=...\)` must be a bool"),
    (dict(axis_name="d", sketch_seed=1.5), r"sketch_seed=...\)` must be an int, got 1.5"),
])
def test_bad_multidevice_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_gaf.gaf(0.5, **kwargs)


def _one_device_run(mode, **kw):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  opt = optax_gaf.with_gaf(optax.sgd(1.0), 0.9, axis_name="data", mode=mode,
                           num_microbatches=4, **kw)
  params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
  f = jax.jit(jax.shard_map(opt.update, mesh=mesh, in_specs=(P("data"), P(), P()),
                            out_specs=(P(), P())))
  return opt, params, f


@pytest.mark.parametrize("mode, kw", [("all_gather", {}), ("ring", {}),
                                      ("sketch", dict(sketch_dim=9))])
def test_one_device_mesh_equals_single_device(mode, kw):
  rng = np.random.default_rng(0)
  common = rng.normal(size=9)
  flat = np.stack([s * common + 0.3 * rng.normal(size=9) for s in (1, 1, -1, 1)])
  flat[3, 1] = np.nan
  grads = {"w": jnp.asarray(flat[:, :6].reshape(4, 2, 3), jnp.float32),
           "b": jnp.asarray(flat[:, 6:], jnp.float32)}
  opt, params, f = _one_device_run(mode, **kw)
  u, s = f(grads, opt.init(params), params)
  ref_opt = optax_gaf.with_gaf(optax.sgd(1.0), 0.9, num_microbatches=4)
  ru, rs = ref_opt.update(grads, ref_opt.init(params), params)
  np.testing.assert_array_equal(s.gaf_state.accepted, [True, True, False, False])
  np.testing.assert_array_equal(s.gaf_state.finite, rs.gaf_state.finite)
  np.testing.assert_array_equal(s.gaf_state.accepted, rs.gaf_state.accepted)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ru)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_local_axis_false_checks_leaf_shapes():
  opt, params, _ = _one_device_run("all_gather", local_axis=False)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  f = jax.shard_map(lambda g, s, p: opt.update(g, s, p), mesh=mesh,
                    in_specs=(P(), P(), P()), out_specs=(P(), P()))
  bad = {"w": jnp.ones((4, 2, 3)), "b": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=r"local_axis=False.*leaf \['b'\] has shape \(4, 3\)"):
    f(bad, opt.init(params), params)


@pytest.mark.parametrize("kwargs, static", [
    (dict(mode="ring"), ()),
    (dict(mode="sketch", sketch_dim=16, sketch_seed=3), ("sketch_dim",)),
])
def test_inject_hyperparams_with_axis_name(kwargs, static):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  opt = optax.inject_hyperparams(optax_gaf.gaf, static_args=static)(
      tau=0.9, axis_name="data", **kwargs)
  f = jax.jit(jax.shard_map(lambda g, s: opt.update(g, s), mesh=mesh,
                            in_specs=(P("data"), P()), out_specs=(P(), P())))
  grads = {"w": jnp.array([[1., 0., 0.], [1., 1., 0.]])}
  u, s = f(grads, opt.init({"w": jnp.zeros(3)}))
  np.testing.assert_allclose(u["w"], [1., 0.5, 0.], rtol=1e-6)
  assert int(s.inner_state.num_accepted) == 2


def test_traced_sketch_dim_error_names_static_args():
  opt = optax.inject_hyperparams(optax_gaf.gaf)(
      tau=0.9, axis_name="data", mode="sketch", sketch_dim=16)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  f = jax.shard_map(lambda g, s: opt.update(g, s), mesh=mesh,
                    in_specs=(P("data"), P()), out_specs=(P(), P()))
  with pytest.raises(ValueError, match=r"static_args=\('sketch_dim',\)"):
    f({"w": jnp.ones((2, 3))}, opt.init({"w": jnp.zeros(3)}))


@pytest.mark.parametrize("mode, extra", [("all_gather", {}), ("ring", {}),
                                         ("sketch", {"sketch_dim": 8})])
def test_cross_device_gram_checks_its_leaves_in_every_mode(mode, extra):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

  def run(local):
    return jax.shard_map(lambda g: optax_gaf.cross_device_gram(g, "data", mode=mode, **extra),
                         mesh=mesh, in_specs=P(), out_specs=P())(local)

  with pytest.raises(ValueError, match=r"leaf \['a'\] has shape \(2, 3\) but leaf \['b'\] "
                                       r"has shape \(1, 3\)"):
    run({"a": jnp.ones((2, 3)), "b": jnp.ones((1, 3))})
  with pytest.raises(ValueError, match=r"leaf \['a'\] has dtype int32"):
    run({"a": jnp.ones((2, 3), jnp.int32)})
  with pytest.raises(ValueError, match="needs `axis_name`"):
    optax_gaf.cross_device_gram({"a": jnp.ones((2, 3))}, None)
