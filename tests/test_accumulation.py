"""``gaf_accumulate`` (accumulation.py): equals stacked ``with_gaf``, skips, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from tests import reference as ref_lib

SHAPES = [(3, 4), (5,), ()]


def _micro(rng, k, rho, shapes=SHAPES):
  return ref_lib.correlated_micrograds(rng, k, shapes, rho, scale_spread=0.5)


def _cycles(k, combine, tau, seed=0):
  """Four cycles of k microgradients: mixed, NaN-laden, a skip, mixed again.

  Draws are retried (deterministically) until every comparison is at least
  1e-3 away from ``tau`` in float64, the mixed cycles both accept and reject
  something, and cycle 2 is a skip.
  """
  rng = np.random.default_rng(seed)
  for _ in range(200):
    mixed0, mixed3 = _micro(rng, k, 0.55), _micro(rng, k, 0.55)
    nan = _micro(rng, k, 0.8)
    nan["p0"][0, 1, 2] = np.nan          # the reference moves to index 1
    if k > 3:
      nan["p1"][k - 1, 0] = np.inf
    skip = _micro(rng, k, 0.0)
    sign = np.where(np.arange(k) == 0, 1.0, -1.0).astype(np.float32)
    skip = {n: x[:1] * sign.reshape((k,) + (1,) * (x.ndim - 1)) for n, x in skip.items()}
    cycles = [mixed0, nan, skip, mixed3]
    refs = [ref_lib.gaf_reference_tree(c, tau, combine)[1] for c in cycles]
    ok = all(ref_lib.decision_margin(r, tau) > 1e-3 for r in refs)
    ok &= refs[2].skipped and refs[1].skipped == (k == 2)  # k=2: one finite left
    for r in (refs[0], refs[3]):
      ok &= (not r.skipped) and (k == 2 or not r.accepted.all())
    if ok:
      return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *cycles), refs
  raise AssertionError("no suitable draw")  # pragma: no cover


def _params():
  return {f"p{j}": jnp.zeros(s, jnp.float32) for j, s in enumerate(SHAPES)}


@functools.partial(jax.jit, static_argnums=0)
def _run_accumulate(opt, state, params, flat):
  """Feeds microgradients [N, ...] one per call through ``lax.scan``."""
  def body(state, g):
    updates, new = opt.update(g, state, params)
    return new, (updates, new.inner_state, new.has_updated, new.mini_step)
  return jax.lax.scan(body, state, flat)


@functools.partial(jax.jit, static_argnums=0)
def _run_with_gaf(opt, state, params, cycles):
  def body(state, g):
    updates, new = opt.update(g, state, params)
    return new, (updates, new.gaf_state)
  return jax.lax.scan(body, state, cycles)


def _flatten_cycles(cycles):
  return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:])), cycles)


@pytest.mark.parametrize("every_k", [2, 3, 8])
@pytest.mark.parametrize("combine", ["mean", "pairwise"])
def test_equals_stacked_with_gaf_including_nan_and_skip(every_k, combine):
  tau = 0.97
  cycles, refs = _cycles(every_k, combine, tau)
  params = _params()
  inner = optax.adam(0.1)
  acc = optax_gaf.gaf_accumulate(inner, every_k, tau, combine=combine)
  wg = optax_gaf.with_gaf(inner, tau, combine=combine, num_microbatches=every_k)
  acc_state, (acc_updates, acc_inner, updated, mini) = _run_accumulate(
      acc, acc.init(params), params, _flatten_cycles(cycles))
  wg_state, (wg_updates, wg_stats) = _run_with_gaf(wg, wg.init(params), params, cycles)

  n = len(refs) * every_k
  ends = np.arange(n) % every_k == every_k - 1
  np.testing.assert_array_equal(mini, np.where(ends, 0, np.arange(n) % every_k + 1))
  skipped = np.array([r.skipped for r in refs])
  np.testing.assert_array_equal(updated, ends & np.repeat(~skipped, every_k))
  for name in acc_updates:
    per_call = np.asarray(acc_updates[name])
    assert np.all(np.isfinite(per_call)), name
    np.testing.assert_array_equal(per_call[~ends], 0)
    np.testing.assert_allclose(per_call[ends], wg_updates[name], rtol=2e-5, atol=1e-6)
  # Logging state equals with_gaf's field by field.
  chex.assert_trees_all_close(acc_state.gaf_state, wg_state.gaf_state, rtol=1e-5, atol=2e-6)
  chex.assert_trees_all_close(acc_state.inner_state, wg_state.inner_state, rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(acc_state.gaf_state.accepted, refs[-1].accepted)
  assert int(acc_state.gaf_state.count) == len(refs)
  assert int(acc_state.gaf_state.num_skipped) == skipped.sum() == (2 if every_k == 2 else 1)
  assert int(acc_state.gaf_state.num_dropped) == (1 if every_k <= 3 else 2)
  np.testing.assert_array_equal(wg_stats.finite[1], refs[1].finite)
  # Mid-cycle calls and the skip cycle leave the inner state bit-for-bit alone.
  counts = np.asarray(acc_inner[0].count)
  np.testing.assert_array_equal(counts, np.cumsum(ends & np.repeat(~skipped, every_k)))
  for leaf in jax.tree.leaves(acc_inner):
    leaf = np.asarray(leaf)
    for i in range(1, n):
      if not (ends[i] and not skipped[i // every_k]):
        np.testing.assert_array_equal(leaf[i], leaf[i - 1])


def test_matches_float64_oracle_and_nan_never_leaks():
  k, tau = 3, 0.97
  cycles, refs = _cycles(k, "mean", tau, seed=3)
  params = _params()
  opt = optax_gaf.gaf_accumulate(optax.sgd(-1.0), k, tau)  # updates = gradient
  _, (updates, _, _, _) = _run_accumulate(opt, opt.init(params), params,
                                          _flatten_cycles(cycles))
  for c, ref in enumerate(refs):
    expected = ref_lib.unflatten_like(ref.update, params)
    for name in params:
      np.testing.assert_allclose(updates[name][c * k + k - 1], expected[name],
                                 rtol=2e-5, atol=2e-6)


def test_inner_state_and_params_untouched_on_mini_steps_and_skip():
  opt = optax_gaf.gaf_accumulate(optax.adam(1.0), every_k=3, tau=0.5)
  params = {"w": jnp.ones(2)}
  state = opt.init(params)
  inner0 = state.inner_state
  update = jax.jit(opt.update)
  for g in ([1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]):  # nothing agrees with g_1
    updates, state = update({"w": jnp.array(g)}, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    chex.assert_trees_all_equal(state.inner_state, inner0)
  assert bool(state.gaf_state.skipped) and not bool(state.has_updated)
  assert not bool(optax_gaf.has_updated(state))
  np.testing.assert_array_equal(state.gaf_state.accepted, [False] * 3)
  np.testing.assert_allclose(state.gaf_state.distances, [0.0, 2.0, 1.0], atol=1e-6)
  # The running filter was reset for the next cycle.
  chex.assert_trees_all_equal(state.running, opt.init(params).running)
  updates, state = update({"w": jnp.array([1.0, 0.0])}, state, params)
  updates, state = update({"w": jnp.array([1.0, 0.1])}, state, params)
  chex.assert_trees_all_equal(state.inner_state, inner0)
  updates, state = update({"w": jnp.array([1.0, -0.1])}, state, params)
  assert bool(state.has_updated)
  assert int(state.inner_state[0].count) == 1
  assert np.all(np.asarray(updates["w"]) != 0)


def test_tau_schedule_follows_completed_cycles():
  sched = lambda count: jnp.where(count < 1, 2.0, 0.5)
  g = {"w": jnp.array([[1.0, 0.0], [-1.0, 0.2]])}  # cosine distance ~1.98
  params = {"w": jnp.zeros(2)}
  acc = optax_gaf.gaf_accumulate(optax.sgd(1.0), 2, sched)
  wg = optax_gaf.with_gaf(optax.sgd(1.0), sched, num_microbatches=2)
  a_state, w_state = acc.init(params), wg.init(params)
  a_update, w_update = jax.jit(acc.update), jax.jit(wg.update)
  for cycle in range(2):
    for i in range(2):
      a_up, a_state = a_update({"w": g["w"][i]}, a_state, params)
    w_up, w_state = w_update(g, w_state, params)
    np.testing.assert_allclose(a_up["w"], w_up["w"], rtol=1e-6)
    chex.assert_trees_all_close(a_state.gaf_state, w_state.gaf_state, rtol=1e-6)
    assert bool(a_state.gaf_state.skipped) == (cycle == 1)
    np.testing.assert_allclose(a_state.gaf_state.tau, [2.0, 0.5][cycle])


def test_inject_hyperparams_tau():
  opt = optax.inject_hyperparams(optax_gaf.gaf_accumulate, static_args=("every_k",))(
      inner=optax.sgd(1.0), every_k=2, tau=0.5)
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  update = jax.jit(opt.update)
  orthogonal = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]  # distance 1
  for tau, skipped in ((0.5, True), (1.5, False)):
    state.hyperparams["tau"] = jnp.asarray(tau)
    for g in orthogonal:
      _, state = update(g, state, params)
    assert bool(state.inner_state.gaf_state.skipped) == skipped
    np.testing.assert_allclose(state.inner_state.gaf_state.tau, tau)


def test_checkpoint_mid_cycle_resumes_bit_identically():
  serialization = pytest.importorskip("flax.serialization")
  opt = optax_gaf.gaf_accumulate(optax.adam(0.1), every_k=3, tau=0.97)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  update = jax.jit(opt.update)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) + 1, jnp.float32),
                        params) for _ in range(5)]
  state = opt.init(params)
  for g in grads[:2]:
    _, state = update(g, state, params)
  restored = serialization.from_bytes(opt.init(params), serialization.to_bytes(state))
  for g in grads[2:]:
    u1, state = update(g, state, params)
    u2, restored = update(g, restored, params)
    chex.assert_trees_all_equal(u1, u2)
  chex.assert_trees_all_equal(state, restored)
  assert int(state.gaf_state.count) == 1 and int(state.mini_step) == 2


def test_flax_nnx_model_matches_with_gaf():
  nnx = pytest.importorskip("flax.nnx")

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  def loss_fn(model, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))

  k, b = 3, 4
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((2, k, b, 4)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, 2, (2, k, b)))
  m_acc, m_ref = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
  o_acc = nnx.Optimizer(m_acc, optax_gaf.gaf_accumulate(optax.adam(1e-2), k, 0.9),
                        wrt=nnx.Param)
  o_ref = nnx.Optimizer(m_ref, optax_gaf.with_gaf(optax.adam(1e-2), 0.9, num_microbatches=k),
                        wrt=nnx.Param)

  @nnx.jit
  def acc_step(model, optimizer, x, y):
    optimizer.update(model, nnx.grad(loss_fn)(model, x, y))

  @nnx.jit
  def ref_step(model, optimizer, x, y):
    grads = nnx.vmap(nnx.grad(loss_fn), in_axes=(None, 0, 0))(model, x, y)
    optimizer.update(model, grads)

  for step in range(2):
    for i in range(k):
      acc_step(m_acc, o_acc, xs[step, i], ys[step, i])
    ref_step(m_ref, o_ref, xs[step], ys[step])
  chex.assert_trees_all_close(nnx.state(m_acc, nnx.Param), nnx.state(m_ref, nnx.Param),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(nnx.as_pure(o_acc.opt_state.gaf_state),
                              nnx.as_pure(o_ref.opt_state.gaf_state), rtol=1e-5, atol=1e-6)
  assert int(o_acc.opt_state.gaf_state.count[...]) == 2


def test_bfloat16_gradients_keep_dtypes_and_give_the_mean_at_tau_two():
  k = 3
  rng = np.random.default_rng(1)
  micro = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _micro(rng, k, 0.9))
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.bfloat16), micro)
  acc = optax_gaf.gaf_accumulate(optax.sgd(-1.0), k, 2.0)
  state = acc.init(params)
  chex.assert_trees_all_equal_dtypes(state.running.aggregate,
                                     jax.tree.map(lambda p: p.astype(jnp.float32), params))
  _, (updates, _, _, _) = _run_accumulate(acc, state, params, micro)
  chex.assert_trees_all_equal_dtypes(jax.tree.map(lambda u: u[0], updates), params)
  for name in params:
    np.testing.assert_allclose(  # tau = 2: the plain mean
        np.asarray(updates[name][-1], np.float32),
        np.mean(np.asarray(micro[name], np.float32), axis=0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("every_k", [1, 0, -3, 2.0, "2", True, None, [2]])
def test_bad_every_k_raises(every_k):
  with pytest.raises(ValueError, match="every_k"):
    optax_gaf.gaf_accumulate(optax.sgd(1.0), every_k)


def test_bad_tau_and_combine_raise():
  with pytest.raises(ValueError, match="tau"):
    optax_gaf.gaf_accumulate(optax.sgd(1.0), 2, tau=2.5)
  with pytest.raises(ValueError, match="combine"):
    optax_gaf.gaf_accumulate(optax.sgd(1.0), 2, combine="sum")


def test_stacked_microgradients_raise_naming_the_leaf():
  opt = optax_gaf.gaf_accumulate(optax.sgd(1.0), 2)
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"ONE microgradient.*\['a'\].*\(2, 3\)"):
    opt.update({"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 2, 2))}, state, params)


def test_has_updated_rejects_other_states():
  with pytest.raises(ValueError, match="has_updated"):
    optax_gaf.has_updated(optax.sgd(1.0).init({"w": jnp.zeros(1)}))


def test_has_updated_finds_the_state_inside_chain_and_inject_hyperparams():
  params = {"w": jnp.zeros(2)}
  chained = optax.chain(optax.clip(1.0), optax_gaf.gaf_accumulate(optax.sgd(1.0), 2))
  injected = optax.inject_hyperparams(optax_gaf.gaf_accumulate, static_args=("every_k",))(
      optax.sgd(1.0), every_k=2)
  for opt in (chained, injected):
    state = opt.init(params)
    _, state = opt.update({"w": jnp.array([1., 0.])}, state, params)
    assert not bool(optax_gaf.has_updated(state))
    _, state = opt.update({"w": jnp.array([1., 1.])}, state, params)
    assert bool(optax_gaf.has_updated(state))
  two = optax.chain(optax_gaf.with_gaf(optax.sgd(1.0)), optax_gaf.with_gaf(optax.sgd(1.0)))
  with pytest.raises(ValueError, match="holding 2"):
    optax_gaf.has_updated(two.init(params))
  # apply_if_finite may reject a step without running the inner update: the
  # inner state would be stale, so it is not searched.
  guarded = optax.apply_if_finite(optax_gaf.gaf_accumulate(optax.sgd(1.0), 2), 3)
  with pytest.raises(ValueError, match="holding 0"):
    optax_gaf.has_updated(guarded.init(params))
