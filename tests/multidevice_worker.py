"""Multi-device GAF checks, run by tests/test_multidevice.py in a subprocess.

The subprocess gets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before jax starts (the main pytest process keeps one device). Each check is a
function ``check_<name>()`` that raises AssertionError on failure; the script
prints one JSON line ``{"name": ..., "ok": ..., "error": ...}`` per check.

Run by hand::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_worker.py [names...]
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gaf
from optax_gaf._src import collective
from optax_gaf._src import gram as gram_lib

RTOL, ATOL = 2e-5, 1e-6
AXIS = "data"


def _mesh(n: int = 8, name: str = AXIS) -> Mesh:
  return Mesh(np.array(jax.devices()[:n]), (name,))


def _params():
  return {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}


def _grads(k: int, seed: int, case: str):
  """Microgradients ``[K, ...]``: agreeing / disagreeing mix, all-disagree, NaN."""
  rng = np.random.default_rng(seed)
  p = 17
  common = rng.normal(size=p)
  flat = np.empty((k, p))
  for i in range(k):
    if case == "skip":  # orthogonal or opposite: nothing agrees at tau < 1
      flat[i] = (-1) ** i * np.eye(p)[i % p] * (1 + i)
    else:
      sign = 1.0 if rng.random() < 0.6 else -1.0
      flat[i] = sign * common + 0.6 * rng.normal(size=p)
  if case == "nan":
    flat[3, 5] = np.nan  # device 3's microgradient (K_local = 1) or device 1's
    flat[k - 1, 0] = np.inf
  flat = flat.astype(np.float32)
  return {"w": jnp.asarray(flat[:, :12].reshape(k, 3, 4)),
          "b": jnp.asarray(flat[:, 12:])}


def _close(a, b, what):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape, f"{what}{jax.tree_util.keystr(path)}: {x.shape} vs {y.shape}"
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
      assert np.array_equal(x, y), f"{what}{jax.tree_util.keystr(path)}: {x} vs {y}"
    else:
      np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL,
                                 err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _single(opt, grads, steps=2, params=None):
  """Reference: the vmapped single-device optimizer on all K microgradients."""
  params = _params() if params is None else params
  state = opt.init(params)
  f = jax.jit(opt.update)
  out = []
  for _ in range(steps):
    u, state = f(grads, state, params)
    out.append((u, state))
  return out


def _sharded_fn(opt, mesh, local_axis):
  def step(g, s, p):
    if not local_axis:
      g = jax.tree.map(lambda x: x[0], g)  # one microgradient shaped like params
    return opt.update(g, s, p)

  # [K, ...] is split device-major: each device gets [K_local, ...].
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(AXIS), P(), P()),
                               out_specs=(P(), P())))


def _sharded_run(opt, grads, mesh, local_axis, steps=2, params=None, fn=None):
  """The same optimizer under shard_map, microgradients split device-major."""
  params = _params() if params is None else params
  state = opt.init(params)
  f = fn or _sharded_fn(opt, mesh, local_axis)
  out = []
  for _ in range(steps):
    u, state = f(grads, state, params)
    out.append((u, state))
  return out


def _pmap_run(opt, grads, n, local_axis, steps=2, fn=None):
  params = _params()
  state = opt.init(params)
  k = jax.tree.leaves(grads)[0].shape[0]
  g_in = jax.tree.map(lambda x: np.reshape(np.asarray(x), (n, k // n, *x.shape[1:])), grads)
  if not local_axis:
    g_in = jax.tree.map(lambda x: x[:, 0], g_in)
  rep = lambda t: jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), t)
  f = fn or jax.pmap(opt.update, axis_name=AXIS)
  out = []
  for _ in range(steps):
    u, state_n = f(g_in, rep(state), rep(params))
    for leaf in jax.tree.leaves((u, state_n)):  # replicated over devices
      leaf = np.asarray(leaf)
      assert np.array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape), equal_nan=True), \
          "pmap results differ between devices"
    u, state = jax.tree.map(lambda x: np.asarray(x[0]), (u, state_n))
    out.append((u, state))
  return out


def _compare(ref, got, what):
  for t, ((u1, s1), (u2, s2)) in enumerate(zip(ref, got)):
    _close(u2, u1, f"{what} step {t} updates")
    _close(s2, s1, f"{what} step {t} state")


def _optimizers(combine, k, mode, local_axis, runner_kind):
  """(name, single-device optimizer, multi-device optimizer); tau = 0.8."""
  kw = dict(combine=combine, num_microbatches=k)
  dist = dict(axis_name=AXIS, mode=mode, local_axis=local_axis)
  opts = [("with_gaf", optax_gaf.with_gaf(optax.adam(0.1), 0.8, **kw),
           optax_gaf.with_gaf(optax.adam(0.1), 0.8, **kw, **dist))]
  if runner_kind == "shard_map" and local_axis == (mode == "ring"):
    opts.append(("gaf", optax.chain(optax_gaf.gaf(0.8, **kw), optax.sgd(0.1)),
                 optax.chain(optax_gaf.gaf(0.8, **kw, **dist), optax.sgd(0.1))))
  return opts


def _run_cases(runner_kind):
  """shard_map or pmap vs vmapped single-device GAF; returns #comparisons."""
  n = 8
  mesh = _mesh(n)
  count = 0
  for combine in ("mean", "pairwise"):
    for local_axis, k in ((False, 8), (True, 16)):
      if runner_kind == "shard_map":
        modes = ("all_gather", "ring")
      else:
        modes = ("ring",) if local_axis else ("all_gather",)
      for mode in modes:
        for name, single, multi in _optimizers(combine, k, mode, local_axis, runner_kind):
          if runner_kind == "shard_map":
            fn = _sharded_fn(multi, mesh, local_axis)
          else:
            fn = jax.pmap(multi.update, axis_name=AXIS)
          for case in ("mixed", "nan", "skip"):
            grads = _grads(k, seed=k + len(case), case=case)
            ref = _single(single, grads)
            if runner_kind == "shard_map":
              got = _sharded_run(multi, grads, mesh, local_axis, fn=fn)
            else:
              got = _pmap_run(multi, grads, n, local_axis, fn=fn)
            what = (f"[{runner_kind} {name} {combine} local_axis={local_axis} "
                    f"K={k} {mode} {case}]")
            _compare(ref, got, what)
            st = got[-1][1]
            gs = st.gaf_state if hasattr(st, "gaf_state") else st[0]
            if case == "skip":
              assert bool(gs.skipped) and int(gs.num_skipped) == 2, f"{what} expected skips"
              if hasattr(st, "inner_state"):
                _close(st.inner_state, multi.init(_params()).inner_state,
                       f"{what} inner state untouched")
            elif case == "nan":
              assert int(gs.num_dropped) == 4, f"{what} expected 2 dropped per step"
              assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(got[-1][0]))
            else:
              acc = np.asarray(gs.accepted)
              assert 2 <= acc.sum() < k, f"{what} wants a mix of accepted/rejected, got {acc}"
            count += 1
  return count


def check_shard_map_equals_vmapped():
  assert _run_cases("shard_map") == 2 * 2 * 2 * 3 + 2 * 2 * 3


def check_pmap_equals_vmapped():
  assert _run_cases("pmap") == 2 * 2 * 3


def _gram_under(mesh, local, mode, **kw):
  f = jax.jit(jax.shard_map(
      lambda g: optax_gaf.cross_device_gram(g, AXIS, mode=mode, **kw),
      mesh=mesh, in_specs=P(AXIS), out_specs=(P(), P())))
  return f(local)


def check_ring_equals_all_gather():
  for n in (2, 7, 8):  # odd and even ring lengths
    for k_local in ((1, 3) if n == 8 else (1,)):
      grads = _grads(n * k_local, seed=n, case="mixed")
      exact = np.asarray(optax_gaf.gram_matrix(grads))
      g_ag, f_ag = _gram_under(_mesh(n), grads, "all_gather")
      g_ring, f_ring = _gram_under(_mesh(n), grads, "ring")
      np.testing.assert_allclose(g_ag, exact, rtol=RTOL, atol=1e-5, err_msg=f"all_gather n={n}")
      np.testing.assert_allclose(g_ring, exact, rtol=RTOL, atol=1e-5, err_msg=f"ring n={n}")
      assert np.all(f_ag) and np.all(f_ring)


def check_blocked_leaf_products_under_shard_map():
  """Large leaves (blocked products on CPU) inside shard_map, both modes."""
  saved = gram_lib._BLOCKED_MIN_BYTES, gram_lib._BLOCK_BYTES
  gram_lib._BLOCKED_MIN_BYTES, gram_lib._BLOCK_BYTES = 1 << 14, 1 << 12
  try:
    grads = {"w": jax.random.normal(jax.random.key(3), (16, 3000)),
             "b": jax.random.normal(jax.random.key(4), (16, 5))}
    exact = np.asarray(optax_gaf.gram_matrix(grads))
    for mode in ("all_gather", "ring"):
      gram, finite = _gram_under(_mesh(8), grads, mode)
      np.testing.assert_allclose(gram, exact, rtol=RTOL, atol=1e-4, err_msg=mode)
      assert np.all(finite)
  finally:
    gram_lib._BLOCKED_MIN_BYTES, gram_lib._BLOCK_BYTES = saved


def check_tuple_axis_names():
  """axis_name=('host', 'dev') on a 2 x 4 mesh: device-major over both axes."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("host", "dev"))
  grads = _grads(16, seed=9, case="mixed")
  exact = np.asarray(optax_gaf.gram_matrix(grads))
  for mode, kw in (("all_gather", {}), ("ring", {}), ("sketch", dict(sketch_dim=17))):
    f = jax.jit(jax.shard_map(
        lambda g: optax_gaf.cross_device_gram(g, ("host", "dev"), mode=mode, **kw),
        mesh=mesh, in_specs=P(("host", "dev")), out_specs=(P(), P())))
    gram, finite = f(grads)
    np.testing.assert_allclose(gram, exact, rtol=RTOL, atol=1e-5, err_msg=mode)
    assert np.all(finite)
  axes = ("host", "dev")
  single = optax_gaf.with_gaf(optax.adam(0.1), 0.8, num_microbatches=16)
  multi = optax_gaf.with_gaf(optax.adam(0.1), 0.8, num_microbatches=16, axis_name=axes)
  fn = jax.jit(jax.shard_map(multi.update, mesh=mesh, in_specs=(P(axes), P(), P()),
                             out_specs=(P(), P())))
  grads = _grads(16, seed=9, case="nan")
  _compare(_single(single, grads), _sharded_run(multi, grads, mesh, True, fn=fn), "[tuple axes]")


def check_ring_moves_half_the_bytes():
  """HLO of the ring: floor(D/2) collective-permutes, no all-gather of grads."""
  mesh = _mesh(8)
  grads = {"w": jnp.zeros((8, 1000))}
  txt = {}
  for mode in ("all_gather", "ring"):
    f = jax.jit(jax.shard_map(
        lambda g: optax_gaf.cross_device_gram(g, AXIS, mode=mode)[0],
        mesh=mesh, in_specs=P(AXIS), out_specs=P()))
    txt[mode] = f.lower(grads).compile().as_text()
  assert txt["ring"].count(" collective-permute(") == 4, txt["ring"]
  assert " all-gather(" not in txt["ring"]
  assert " all-gather(" in txt["all_gather"]


def check_sharded_params_jit_equals_unsharded():
  """FSDP-style: params and microgradients sharded over a mesh axis, plain gaf."""
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  k = 4
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((64, 16)), "b": jnp.zeros((16,))}
  common = {n: rng.normal(size=p.shape) for n, p in params.items()}
  grads = {n: jnp.asarray(np.stack([(1 if i % 3 else -1) * c + 0.5 * rng.normal(size=c.shape)
                                    for i in range(k)]), jnp.float32)
           for n, c in common.items()}
  grads["w"] = grads["w"].at[2, 0, 0].set(jnp.nan)
  p_spec = {"w": P("fsdp", None), "b": P("fsdp")}
  g_spec = {"w": P(None, "fsdp", None), "b": P(None, "fsdp")}
  shard = lambda tree, spec: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec)
  for combine in ("mean", "pairwise"):
    opt = optax_gaf.with_gaf(optax.adam(0.1), 0.9, combine=combine, num_microbatches=k)
    state = opt.init(params)
    ref_u, ref_s = jax.jit(opt.update)(grads, state, params)  # one device, unsharded
    p_sh, g_sh = shard(params, p_spec), shard(grads, g_spec)
    s_sh = opt.init(p_sh)
    fn = jax.jit(opt.update)
    u, s = fn(g_sh, s_sh, p_sh)
    hlo = fn.lower(g_sh, s_sh, p_sh).compile().as_text()
    assert "all-reduce" in hlo, "expected XLA to insert a reduction of partial inner products"
    assert u["w"].sharding.spec[0] == "fsdp", u["w"].sharding
    _close(u, ref_u, f"[fsdp {combine}] updates")
    _close(s, ref_s, f"[fsdp {combine}] state")
    assert 2 <= int(s.gaf_state.num_accepted) < k - 1 and int(s.gaf_state.num_dropped) == 1


def _sketch_case(k: int, seed: int, nan: bool):
  """P = 2048 parameters; microgradients +-common + noise (cos about +-0.7)."""
  rng = np.random.default_rng(seed)
  p = 2048
  common = rng.normal(size=p)
  signs = np.where(rng.random(k) < 0.6, 1.0, -1.0)
  signs[0] = 1.0
  flat = signs[:, None] * common + 0.6 * rng.normal(size=(k, p))
  if nan:
    flat[2, 7] = np.nan
  flat = flat.astype(np.float32)
  params = {"w": jnp.zeros((40, 50)), "b": jnp.zeros((48,))}
  grads = {"w": jnp.asarray(flat[:, :2000].reshape(k, 40, 50)), "b": jnp.asarray(flat[:, 2000:])}
  return params, grads


def check_sketch_large_d_decides_like_exact():
  """sketch_dim >= P/2: the same decisions as exact GAF (margins >> sketch error)."""
  mesh = _mesh(8)
  num_params = 2048
  total = 0
  for combine in ("mean", "pairwise"):
    for k, local_axis in ((8, False), (16, True)):
      kw = dict(combine=combine, num_microbatches=k)
      exact_opt = optax.chain(optax_gaf.gaf(0.8, **kw), optax.sgd(1.0))
      for d in ((num_params // 2, num_params) if combine == "mean" and local_axis
                else (num_params // 2,)):
        sk_opt = optax.chain(optax_gaf.gaf(
            0.8, **kw, axis_name=AXIS, mode="sketch", sketch_dim=d, local_axis=local_axis),
            optax.sgd(1.0))
        fn = _sharded_fn(sk_opt, mesh, local_axis)
        for seed in range(3):
          params, grads = _sketch_case(k, seed, nan=seed == 2)
          exact = _single(exact_opt, grads, steps=3, params=params)
          sk = _sharded_run(sk_opt, grads, mesh, local_axis, steps=3, params=params, fn=fn)
          for t, ((u1, s1), (u2, s2)) in enumerate(zip(exact, sk)):
            what = f"[sketch d={d} {combine} seed={seed} K={k} step {t}]"
            for field in ("accepted", "finite", "skipped", "num_accepted"):
              assert np.array_equal(getattr(s1[0], field), getattr(s2[0], field)), \
                  f"{what} {field}: {getattr(s1[0], field)} vs {getattr(s2[0], field)}"
            assert 2 <= int(s1[0].num_accepted) < k, f"{what} wants a mix"
            # Same decisions -> same weights -> same update.
            _close(u2, u1, f"{what} updates")
            err = np.abs(np.asarray(s2[0].distances) - np.asarray(s1[0].distances)).max()
            if d >= num_params:  # no bucket collisions: exact distances
              assert err < 1e-5, f"{what} distance error {err}"
            else:
              assert 0 < err < 0.25, f"{what} distance error {err}"
            total += 1
  assert total == 5 * 3 * 3


def check_sketch_is_unbiased():
  """Mean of <Sa, Sb> over many sign draws approaches <a, b>; error ~ 1/sqrt(d)."""
  rng = np.random.default_rng(1)
  a = rng.normal(size=(2, 4000)).astype(np.float32)
  a[1] = 0.3 * a[0] + a[1]
  exact = float(a[0] @ a[1] / np.linalg.norm(a[0]) / np.linalg.norm(a[1]))
  x = {"w": jnp.asarray(a)}
  for d in (64, 512):
    cos = []
    for step in range(200):
      s = np.asarray(collective.count_sketch(x, d, seed=0, step=step), np.float64)
      cos.append(s[0] @ s[1] / np.linalg.norm(s[0]) / np.linalg.norm(s[1]))
    cos = np.array(cos)
    assert abs(cos.mean() - exact) < 4 * cos.std() / np.sqrt(len(cos)) + 0.01, (d, cos.mean(), exact)
    assert 0.3 / np.sqrt(d) < cos.std() < 3 / np.sqrt(d), (d, cos.std())


def check_bfloat16_grads_match_single_device():
  """bf16 microgradients: same decisions; update within bf16 rounding."""
  mesh = _mesh(8)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(16, seed=4, case="nan"))
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  for mode in ("ring", "sketch"):
    kw = dict(sketch_dim=17) if mode == "sketch" else {}
    single = optax_gaf.gaf(0.8, num_microbatches=16)
    multi = optax_gaf.gaf(0.8, num_microbatches=16, axis_name=AXIS, mode=mode, **kw)
    (u1, s1), = _single(single, grads, steps=1, params=params)
    (u2, s2), = _sharded_run(multi, grads, mesh, True, steps=1, params=params)
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(u1)):
      assert a.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2e-2, atol=2e-2, err_msg=mode)
    for field in ("accepted", "finite", "skipped"):
      assert np.array_equal(getattr(s1, field), getattr(s2, field)), (mode, field)


def check_replicated_skip_decision_with_disagreeing_devices():
  """with_gaf state stays in sync: out_specs=P() (checked replication) compiles."""
  mesh = _mesh(8)
  grads = _grads(8, seed=3, case="skip")
  opt = optax_gaf.with_gaf(optax.adam(0.1), 0.5, axis_name=AXIS, local_axis=False,
                           num_microbatches=8)
  params = _params()
  f = jax.jit(jax.shard_map(lambda g, s, p: opt.update(jax.tree.map(lambda x: x[0], g), s, p),
                            mesh=mesh, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P())))
  u, s = f(grads, opt.init(params), params)
  assert bool(s.gaf_state.skipped)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))


def check_unbound_axis_name_inside_other_mesh():
  mesh = _mesh(8, "other")
  opt = optax_gaf.gaf(0.5, axis_name="data")
  f = jax.shard_map(lambda g: opt.update(g, opt.init(None))[0], mesh=mesh,
                    in_specs=P("other"), out_specs=P("other"))
  try:
    f({"w": jnp.ones((8, 3))})
  except ValueError as e:
    assert "'data'" in str(e) and "not bound" in str(e), str(e)
  else:
    raise AssertionError("expected ValueError for an unbound axis name")


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items()
          if name.startswith("check_")}


def main(argv):
  assert jax.device_count() >= 8, (
      "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  names = argv or list(CHECKS)
  for name in names:
    t0 = time.perf_counter()
    try:
      CHECKS[name]()
      result = {"name": name, "ok": True, "error": ""}
    except Exception:  # noqa: BLE001 - reported to the parent test
      result = {"name": name, "ok": False, "error": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
