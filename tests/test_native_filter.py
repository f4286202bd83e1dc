"""The one-pass CPU filter (native_filter.py) and its two kernels."""

import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from optax_gaf._src import native_filter
from optax_gaf._src import native_gram
from tests import reference as ref_lib
from tests.native_paths import run_on_path

needs_kernel = pytest.mark.skipif(
    not native_gram.available(),
    reason=f"native Gram kernel unavailable: {native_gram._STATE.get('error')}")

SHAPES = [(30, 40), (40,), (7, 3, 3)]


def _f64(x):
  return np.asarray(x, np.float64)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("n", [0, 1, 17, 8192, 8209, 140_000])
def test_gram_and_sum_equal_float64_and_the_gram_kernel(k, n):
  # 140_000 columns cross a float64 flush (16 blocks of 8192).
  x = np.random.default_rng(k * 7919 + n).standard_normal((k, n)).astype(np.float32)
  g, s = jax.jit(native_gram.gram_and_sum)(x)
  exact = _f64(x) @ _f64(x).T
  np.testing.assert_allclose(g, exact, rtol=2e-6, atol=2e-6 * max(1.0, np.abs(exact).max()))
  np.testing.assert_allclose(s, _f64(x).sum(0), rtol=1e-5, atol=1e-5 * k)
  # The sums ride along the same tiles: the Gram matrix is bit-identical.
  np.testing.assert_array_equal(g, native_gram.gram(x))


@needs_kernel
@pytest.mark.parametrize("n", [5, 2048, 2049, 40_000, 140_000])
def test_combine_equals_float64_and_never_reads_unused_rows(n):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((6, n)).astype(np.float32)
  total = x.sum(0)
  coef = np.array([0.5, 0, -1.25, 0, 0, 2.0], np.float32)
  for a0 in (0.0, 0.3):
    y = jax.jit(native_gram.combine)(x, total, coef, np.float32(a0))
    np.testing.assert_allclose(y, a0 * _f64(total) + coef @ _f64(x), rtol=1e-5, atol=1e-5)
  # NaN/Inf in rows with a zero coefficient, and in the total when a0 == 0,
  # are never read: they cannot leak through 0 * nan.
  x[1, :] = np.nan
  x[3, n // 2] = np.inf
  y = native_gram.combine(x, np.full(n, np.nan, np.float32), coef, np.float32(0.0))
  np.testing.assert_allclose(y, coef[[0, 2, 5]] @ _f64(x[[0, 2, 5]]), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_combine_fallback_of_other_platforms_equals_the_kernel():
  # lax.platform_dependent lowers _combine_xla off CPU (e.g. jax.export for
  # GPU): same result, and no NaN from rows with a zero coefficient.
  rng = np.random.default_rng(2)
  x = rng.standard_normal((5, 300)).astype(np.float32)
  total = x.sum(0)
  coef = np.array([0.5, 0, -1.0, 0, 2.0], np.float32)
  for a0 in (0.0, 0.25):
    np.testing.assert_allclose(native_filter._combine_xla(x, total, coef, np.float32(a0)),
                               native_gram.combine(x, total, coef, np.float32(a0)),
                               rtol=1e-6, atol=1e-6)
  x[1] = np.nan
  y = native_filter._combine_xla(x, np.full(300, np.nan, np.float32), coef, np.float32(0.0))
  assert np.isfinite(np.asarray(y)).all()


@needs_kernel
def test_kernels_under_vmap():
  rng = np.random.default_rng(1)
  xb = rng.standard_normal((3, 5, 1000)).astype(np.float32)
  g, s = jax.jit(jax.vmap(native_gram.gram_and_sum))(xb)
  np.testing.assert_allclose(g, np.einsum("bkn,bjn->bkj", _f64(xb), _f64(xb)), rtol=1e-5)
  np.testing.assert_allclose(s, _f64(xb).sum(1), rtol=1e-5, atol=1e-4)
  coef = rng.standard_normal((3, 5)).astype(np.float32)
  y = jax.jit(jax.vmap(native_gram.combine, in_axes=(0, 0, 0, None)))(
      xb, s, coef, np.float32(0.5))
  np.testing.assert_allclose(
      y, 0.5 * _f64(s) + np.einsum("bk,bkn->bn", coef, _f64(xb)), rtol=1e-5, atol=1e-4)


def _split(w, finite=None):
  w = jnp.asarray(w, jnp.float32)
  finite = jnp.ones(w.shape, bool) if finite is None else jnp.asarray(finite)
  coef, a0 = native_filter.split_weights(w, finite)
  return np.asarray(coef), float(a0)


def test_split_weights_reads_the_fewest_rows():
  # All 8 agree (mean): the update is S / 8, no row is read again.
  coef, a0 = _split(np.full(8, 1 / 8))
  assert a0 == np.float32(1 / 8) and not coef.any()
  # Pairwise weights (1/8, 1/8, 1/4, 1/2): S / 8 plus the two larger ones
  # (3 reads < 4), all coefficients non-negative.
  coef, a0 = _split([1 / 8, 1 / 8, 1 / 4, 1 / 2])
  assert a0 == 1 / 8 and np.array_equal(coef, np.float32([0, 0, 1 / 8, 3 / 8]))
  # Pairwise at K = 2, (1/2, 1/2): S / 2.
  coef, a0 = _split([0.5, 0.5])
  assert a0 == 0.5 and not coef.any()
  # Half agree: the direct sum over the four accepted ones.
  w = np.array([1, 0, 0, 1, 1, 0, 0, 1]) / 4
  coef, a0 = _split(w)
  assert a0 == 0 and np.array_equal(coef, w.astype(np.float32))
  # A skip reads nothing.
  coef, a0 = _split(np.zeros(4))
  assert a0 == 0 and not coef.any()


def test_split_weights_never_subtracts_a_microgradient():
  # Six of eight agree: S / 6 minus the two rejected ones would read 3 rows
  # instead of 6, but it cancels where the rejected ones dominate; direct.
  w = np.array([1, 1, 0, 1, 1, 0, 1, 1]) / 6
  coef, a0 = _split(w)
  assert a0 == 0 and np.array_equal(coef, w.astype(np.float32))
  # A non-finite microgradient makes S non-finite: direct, its row unread.
  w = np.array([1, 1, 1, 0]) / 3
  coef, a0 = _split(w, finite=[True, True, True, False])
  assert a0 == 0 and np.array_equal(coef, w.astype(np.float32))


@pytest.mark.parametrize("seed", range(20))
def test_split_weights_is_an_identity(seed):
  # a0 * sum_i g_i + sum_i coef_i g_i == sum_i w_i g_i for any weights, with
  # non-negative coefficients; with a non-finite row, only the direct form,
  # and that row's coefficient is 0.
  rng = np.random.default_rng(seed)
  k = int(rng.integers(3, 12))
  w = rng.choice([0.0, 0.125, 0.25, 0.25, 0.25, 0.5, 1 / 3], size=k)
  if seed % 2:
    w = np.where(w == 0, 0.25, w)  # every row accepted
  coef, a0 = _split(w)
  np.testing.assert_allclose(a0 + coef, w, rtol=1e-6, atol=1e-7)
  if a0:
    assert np.all(w > 0) and np.all(coef >= 0)
    assert np.sum(coef != 0) + 1 < np.sum(w != 0)  # it reads fewer rows
  finite = np.ones(k, bool)
  finite[int(rng.integers(k))] = False
  w = np.where(finite, w, 0.0)
  coef, a0 = _split(w, finite=finite)
  assert a0 == 0 and np.array_equal(coef, w.astype(np.float32))


@needs_kernel
def test_rejected_microgradient_dominating_a_leaf_keeps_its_sign():
  # One leaf where the rejected microgradient is 2.5e7x the accepted ones: the
  # update there must be the mean of the accepted ones (sign included), as on
  # the XLA path; S minus the rejected row would leave only its rounding error.
  rng = np.random.default_rng(0)
  v = rng.standard_normal(1000)
  a = np.stack([v + 0.1 * rng.standard_normal(1000) for _ in range(4)])
  a[1] = -a[1]
  b = np.array([[4e-8], [1.0], [4e-8], [-4e-8]])
  grads = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  want, ref = ref_lib.gaf_reference_tree(grads, 0.5, "mean")
  assert list(np.flatnonzero(~ref.accepted)) == [1]
  opt = optax_gaf.gaf(0.5)
  got = jax.jit(lambda g: opt.update(g, opt.init(None))[0])(grads)
  np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)
  adam = optax_gaf.with_gaf(optax.adam(1e-3, eps=1e-12), 0.5)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
  step, _ = jax.jit(adam.update)(grads, adam.init(params), params)
  # Adam's first step is -lr * g / (|g| + eps) elementwise: about -1e-3 here.
  g = float(want["b"][0])
  assert float(step["b"][0]) == pytest.approx(-1e-3 * g / (abs(g) + 1e-12), rel=1e-5)


@needs_kernel
def test_elements_only_rejected_microgradients_touch_stay_exactly_zero():
  # Like embedding rows a microbatch does not use: where every accepted
  # microgradient is exactly 0, the update is exactly 0, whatever the two
  # rejected ones hold there.
  rng = np.random.default_rng(3)
  k, n = 8, 4096
  x = (rng.standard_normal(n) + 0.3 * rng.standard_normal((k, n))).astype(np.float32)
  x[[2, 5]] *= -1
  x[:, :64] = 0
  x[[2, 5], :64] = rng.standard_normal((2, 64)).astype(np.float32)
  grads = {"emb": jnp.asarray(x)}
  _, ref = ref_lib.gaf_reference_tree(grads, 1.0, "mean")
  assert list(np.flatnonzero(~ref.accepted)) == [2, 5]
  opt = optax_gaf.gaf(1.0)
  got = jax.jit(lambda g: opt.update(g, opt.init(None))[0])(grads)
  assert not np.asarray(got["emb"][:64]).any()


@needs_kernel
@pytest.mark.parametrize("k", [64, 256])
def test_mean_weights_at_large_k_share_s(k):
  # The fold's running-mean weights differ in their last bits at large K;
  # they still count as one weight, so nothing is read twice.
  grads = _agreeing(np.random.default_rng(11), k, [])
  coef, a0 = _split_from(grads, 1.0, "mean")
  assert a0 != 0 and not coef.any()
  want, ref = ref_lib.gaf_reference_tree(grads, 1.0, "mean")
  assert ref.num_accepted == k
  gaf = optax_gaf.gaf(1.0)
  got = jax.jit(lambda g: gaf.update(g, gaf.init(None))[0])(grads)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("a0", [0.0, 0.3])
def test_kernel_derivatives_pass_numerical_checks(a0):
  from jax.test_util import check_grads
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((4, 37)), jnp.float32)
  total = jnp.sum(x, axis=0)
  coef = jnp.asarray([0.5, 0.0, -0.25, 1.0], jnp.float32)
  f = lambda x, t, c, a: native_filter._combine(x, t, c, a)
  check_grads(f, (x, total, coef, jnp.float32(a0)), order=1, modes=("fwd", "rev"),
              atol=1e-2, rtol=1e-2, eps=1e-2)
  check_grads(lambda x: native_filter._gram_and_sum(x), (x,), order=1, modes=("fwd", "rev"),
              atol=1e-2, rtol=1e-2, eps=1e-2)


def _agreeing(rng, k, rejected, outlier=1.0):
  """K microgradients: ``rejected`` of them point against the others."""
  grads = ref_lib.correlated_micrograds(rng, k, SHAPES, 0.9, 0.2)
  for i in rejected:
    grads = jax.tree.map(lambda x: x.copy(), grads)
    for leaf in grads.values():
      leaf[i] *= -outlier
  return grads


def _split_from(grads, tau, combine):
  gram = optax_gaf.gram_matrix(grads)
  ag = optax_gaf.agreement_weights(gram, tau, combine)
  coef, a0 = native_filter.split_weights(ag.weights, ag.finite)
  return np.asarray(coef), float(a0)


def _mode(grads, tau, combine):
  return "split" if _split_from(grads, tau, combine)[1] else "direct"


@needs_kernel
@pytest.mark.parametrize("combine", ["mean", "pairwise"])
@pytest.mark.parametrize("case, rejected, outlier, mode", [
    ("all agree", [], 1.0, "split"),
    ("one rejected", [5], 1.0, "direct"),
    ("half rejected", [1, 2, 4, 6], 1.0, "direct"),
    ("rejected outlier", [3], 300.0, "direct"),
])
def test_gaf_update_equals_the_float64_oracle(combine, case, rejected, outlier, mode):
  grads = _agreeing(np.random.default_rng(len(case)), 8, rejected, outlier)
  tau = 1.0
  want, ref = ref_lib.gaf_reference_tree(grads, tau, combine)
  assert ref_lib.decision_margin(ref, tau) > 1e-3
  assert list(np.flatnonzero(~ref.accepted)) == rejected
  assert _mode(grads, tau, combine) == mode
  gaf = optax_gaf.gaf(tau, combine=combine)
  hlo = jax.jit(lambda g: gaf.update(g, gaf.init(None))[0]).lower(grads).as_text()
  assert native_gram.GRAM_SUM_TARGET in hlo and native_gram.COMBINE_TARGET in hlo
  got = jax.jit(lambda g: gaf.update(g, gaf.init(None))[0])(grads)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_nan_microgradient_is_dropped_and_skips_read_nothing():
  grads = _agreeing(np.random.default_rng(5), 6, [])
  grads["p0"][2, 3, 4] = np.nan
  gaf = optax_gaf.gaf(1.0)
  got, state = jax.jit(gaf.update)(grads, gaf.init(None))
  assert not bool(state.finite[2]) and int(state.num_accepted) == 5
  want, _ = ref_lib.gaf_reference_tree(grads, 1.0, "mean")
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # Nothing agrees with the reference: a skip, all zeros.
  grads = _agreeing(np.random.default_rng(6), 3, [1, 2])
  got, state = jax.jit(gaf.update)(grads, gaf.init(None))
  assert bool(state.skipped)
  for leaf in jax.tree.leaves(got):
    assert not np.asarray(leaf).any()


@needs_kernel
@pytest.mark.parametrize("rejected", [[], [2], [1, 2, 3]])
def test_derivatives_match_the_xla_path(rejected):
  grads = jax.tree.map(jnp.asarray, _agreeing(np.random.default_rng(7), 5, rejected))
  gaf = optax_gaf.gaf(1.0)
  probe = jax.tree.map(lambda x: jnp.cos(jnp.arange(x[0].size).reshape(x.shape[1:])), grads)

  def loss(g):
    u = gaf.update(g, gaf.init(None))[0]
    return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(probe)))

  def both(native):
    tangent = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size).reshape(x.shape)), grads)
    return (run_on_path(jax.jit(jax.grad(loss)), grads, native=native),
            run_on_path(jax.jit(lambda g, t: jax.jvp(loss, (g,), (t,))[1]), grads, tangent,
                        native=native))

  native = both(True)
  xla = both(False)
  chex.assert_trees_all_close(native, xla, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("native", [True, False])
def test_derivatives_of_distances_ignore_a_dropped_microgradient(native):
  # Reverse mode multiplies the zero cotangents of a dropped row's inner
  # products by that row: without finite_or_zero, 0 * nan poisoned the
  # derivatives of the finite rows. They must equal those of the problem
  # without the dropped row, and the dropped row's must be zero.
  rng = np.random.default_rng(3)
  grads = jax.tree.map(jnp.asarray, _agreeing(rng, 5, [2]))  # small leaves: grouped
  grads["big"] = jnp.asarray(rng.normal(size=(5, 2000)), jnp.float32) + grads["p1"][:, :1]
  bad = jax.tree.map(lambda x: x.at[1].set(jnp.nan), grads)
  bad["p2"] = grads["p2"].at[1, 0].set(jnp.inf)
  kept = jax.tree.map(lambda x: jnp.delete(x, 1, axis=0), grads)

  def distance_sum(g):
    gaf = optax_gaf.gaf(1.0)
    return jnp.sum(gaf.update(g, gaf.init(None))[1].distances)

  got = run_on_path(jax.jit(jax.grad(distance_sum)), bad, native=native)
  want = run_on_path(jax.jit(jax.grad(distance_sum)), kept, native=native)
  for name in got:
    assert np.all(np.asarray(got[name][1]) == 0), name
    np.testing.assert_allclose(np.delete(np.asarray(got[name]), 1, axis=0), want[name],
                               rtol=1e-5, atol=1e-6)
  assert any(np.abs(np.asarray(w)).max() > 0 for w in jax.tree.leaves(want))


@needs_kernel
def test_vmap_and_with_gaf_train_step():
  rng = np.random.default_rng(8)
  batch = [_agreeing(rng, 4, r) for r in ([], [3], [1, 2, 3])]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batch)
  gaf = optax_gaf.gaf(1.0)
  got = jax.jit(jax.vmap(lambda g: gaf.update(g, gaf.init(None))[0]))(stacked)
  for i, g in enumerate(batch):
    want, _ = ref_lib.gaf_reference_tree(g, 1.0, "mean")
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], got), want, rtol=1e-5, atol=1e-6)
  opt = optax_gaf.with_gaf(optax.sgd(0.1, momentum=0.9), 1.0, num_microbatches=4)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), batch[0])
  state = opt.init(params)
  step = jax.jit(lambda p, s, g: opt.update(g, s, p))
  for g in batch:
    updates, state = step(params, state, g)
    params = optax.apply_updates(params, updates)
  assert int(state.gaf_state.num_skipped) == 1  # the last one: nothing agreed
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _calls(fn, grads, target):
  return fn.lower(grads).as_text().count(f"custom_call @{target}")


SMALL_SHAPES = [(40, 60), (5,), (40,), (3, 3), (), (2000,), (17, 4)]


def test_small_leaves_are_grouped_in_leaf_order():
  mats = [jnp.zeros((8, int(np.prod(s)))) for s in SMALL_SHAPES]
  blocks = native_filter.group_small_leaves(mats)
  # 8 x 2000 = 16000 and 8 x 2400 values are above the 8192 limit: alone.
  assert [members for members, _ in blocks] == [[0], [5], [1, 2, 3, 4, 6]]
  assert blocks[-1][1].shape == (8, 5 + 40 + 9 + 1 + 68)
  assert blocks[0][1] is mats[0]  # a large leaf is never copied
  one_small = native_filter.group_small_leaves([mats[0], mats[1]])
  assert [members for members, _ in one_small] == [[0], [1]]


@needs_kernel
@pytest.mark.parametrize("rejected", [[], [3], [1, 4, 6]])
def test_grouped_small_leaves_equal_the_oracle_with_one_call_each(rejected):
  k = 8
  grads = ref_lib.correlated_micrograds(np.random.default_rng(11), k, SMALL_SHAPES, 0.9, 0.2)
  for i in rejected:
    for leaf in grads.values():
      leaf[i] *= -1
  grads["p2"][5, 7] = np.nan  # a dropped microgradient, NaN only in a grouped leaf
  want, ref = ref_lib.gaf_reference_tree(grads, 1.0, "mean")
  assert ref_lib.decision_margin(ref, 1.0) > 1e-3 and not ref.finite[5]
  gaf = optax_gaf.gaf(1.0)
  fn = jax.jit(lambda g: gaf.update(g, gaf.init(None)))
  # Two large leaves alone and one group: three calls of each kernel, not seven.
  assert _calls(fn, grads, native_gram.GRAM_SUM_TARGET) == 3
  assert _calls(fn, grads, native_gram.COMBINE_TARGET) == 3
  got, state = fn(grads)
  assert not bool(state.finite[5])
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # The same as one kernel call per leaf, up to the order of the Gram sums.
  with mock.patch.object(native_filter, "_SMALL_ELEMENTS", 0):
    per_leaf = jax.jit(lambda g: gaf.update(g, gaf.init(None))[0])
    assert _calls(per_leaf, grads, native_gram.GRAM_SUM_TARGET) == 7
    chex.assert_trees_all_close(got, per_leaf(grads), rtol=1e-6, atol=1e-7)


def test_applicability():
  f32 = {"w": jnp.ones((4, 3))}
  assert native_filter.applicable(f32) == native_gram.available()
  assert not native_filter.applicable({"w": jnp.ones((4, 3)), "b": jnp.ones((4, 3), jnp.bfloat16)})
  assert not native_filter.applicable({})
  with mock.patch.dict(os.environ, {"OPTAX_GAF_NATIVE_GRAM": "0"}):
    assert not native_filter.applicable(f32)
