"""Scan-based GAF (scan.py): equals the vmapped path, skips like with_gaf, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf

D_IN, D_HID, D_OUT = 6, 16, 3


def _mlp_params(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"l1": {"w": jax.random.normal(k1, (D_IN, D_HID)) / np.sqrt(D_IN),
                 "b": jnp.zeros(D_HID)},
          "l2": {"w": jax.random.normal(k2, (D_HID, D_OUT)) / np.sqrt(D_HID),
                 "b": jnp.zeros(D_OUT)}}


def _loss(params, batch):
  h = jax.nn.relu(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
  logits = h @ params["l2"]["w"] + params["l2"]["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))


def _loss_aux(params, batch):
  loss = _loss(params, batch)
  return loss, {"double": 2 * loss}


def _batch(seed, k, per=4, noisy_labels=True):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((k * per, D_IN)).astype(np.float32)
  y = rng.integers(0, D_OUT, k * per) if noisy_labels else (x[:, 0] > 0).astype(int)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _vmapped(params, batch, k, tau, combine):
  grads = optax_gaf.microbatch_grads(_loss, k)(params, batch)
  tx = optax_gaf.gaf(tau, combine=combine, num_microbatches=k)
  filtered, state = tx.update(grads, tx.init(params), params)
  return grads, filtered, state


def _assert_same_as_vmapped(agreement, grads, filtered, state, micro):
  np.testing.assert_array_equal(agreement.accepted, state.accepted)
  np.testing.assert_array_equal(agreement.finite, state.finite)
  assert bool(agreement.skipped) == bool(state.skipped)
  assert int(agreement.num_accepted) == int(state.num_accepted)
  np.testing.assert_allclose(agreement.distances, state.distances, atol=1e-5)
  chex.assert_trees_all_close(grads, filtered, rtol=1e-5, atol=1e-6)
  # The weights express the result in the microgradients, like the Gram path.
  expect = jax.tree.map(
      lambda g: jnp.tensordot(agreement.weights, jnp.nan_to_num(g), axes=1), micro)
  chex.assert_trees_all_close(grads, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["mean", "pairwise"])
@pytest.mark.parametrize("k,tau", [(6, 0.95)])
def test_equals_vmapped_microbatch_grads_plus_gaf(combine, k, tau):
  params, batch = _mlp_params(), _batch(k, k)
  fn = jax.jit(optax_gaf.gaf_value_and_grad(_loss, k, tau, combine=combine))
  loss, grads, agreement = fn(params, batch)
  micro, filtered, state = _vmapped(params, batch, k, tau, combine)
  assert 1 < int(state.num_accepted) < k  # the draw exercises both outcomes
  _assert_same_as_vmapped(agreement, grads, filtered, state, micro)
  per_mb = jax.vmap(_loss, in_axes=(None, 0))(
      params, jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), batch))
  np.testing.assert_allclose(loss, jnp.mean(per_mb), rtol=1e-6)


def test_nan_microbatch_is_dropped_and_first_finite_is_reference():
  k = 4
  params, batch = _mlp_params(1), _batch(7, k, noisy_labels=False)
  batch["x"] = batch["x"].at[0, 0].set(jnp.nan).at[13, 2].set(jnp.inf)  # microbatches 0, 3
  fn = jax.jit(optax_gaf.gaf_value_and_grad(_loss_aux, k, 2.0, has_aux=True))
  (loss, aux), grads, agreement = fn(params, batch)
  np.testing.assert_array_equal(agreement.finite, [False, True, True, False])
  np.testing.assert_array_equal(agreement.accepted, [False, True, True, False])
  assert not bool(agreement.skipped)
  chex.assert_tree_all_finite(grads)
  assert aux["double"].shape == (k,) and np.isnan(loss)
  micro = optax_gaf.microbatch_grads(_loss, k)(params, batch)
  expect = jax.tree.map(lambda g: (g[1] + g[2]) / 2, micro)
  chex.assert_trees_all_close(grads, expect, rtol=1e-5, atol=1e-6)
  _, filtered, state = _vmapped(params, batch, k, 2.0, "mean")
  _assert_same_as_vmapped(agreement, grads, filtered, state, micro)


def test_train_loop_equals_with_gaf_including_skips_and_tau_schedule():
  k, steps = 4, 6
  sched = optax.piecewise_constant_schedule(2.0, {3: 0.3})  # later steps mostly skip
  params0 = _mlp_params(2)
  grad_fn = optax_gaf.gaf_value_and_grad(_loss, k, sched, combine="pairwise")
  opt = optax_gaf.apply_if_agreed(optax.adam(1e-2), num_microbatches=k)
  ref = optax_gaf.with_gaf(optax.adam(1e-2), sched, combine="pairwise", num_microbatches=k)
  micro_fn = optax_gaf.microbatch_grads(_loss, k)

  @jax.jit
  def scan_step(params, state, batch):
    tau_t = sched(state.gaf_state.count)
    _, grads, agreement = grad_fn(params, batch, step=state.gaf_state.count)
    updates, new = opt.update(grads, state, params, agreement=agreement, tau=tau_t)
    return optax.apply_updates(params, updates), new

  @jax.jit
  def ref_step(params, state, batch):
    updates, new = ref.update(micro_fn(params, batch), state, params)
    return optax.apply_updates(params, updates), new

  p_scan, s_scan = params0, opt.init(params0)
  p_ref, s_ref = params0, ref.init(params0)
  for t in range(steps):
    batch = _batch(100 + t, k)
    inner_before = s_scan.inner_state
    p_scan, s_scan = scan_step(p_scan, s_scan, batch)
    p_ref, s_ref = ref_step(p_ref, s_ref, batch)
    chex.assert_trees_all_close(s_scan.gaf_state, s_ref.gaf_state, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(p_scan, p_ref, rtol=1e-5, atol=1e-6)
    if bool(s_scan.gaf_state.skipped):
      chex.assert_trees_all_equal(s_scan.inner_state, inner_before)
    assert bool(optax_gaf.has_updated(s_scan)) == (not bool(s_scan.gaf_state.skipped))
  assert 0 < int(s_scan.gaf_state.num_skipped) < steps
  chex.assert_trees_all_close(s_scan.inner_state, s_ref.inner_state, rtol=1e-5, atol=1e-6)


def test_flax_nnx_model_equals_vmapped():
  nnx = pytest.importorskip("flax.nnx")
  k = 4
  model = nnx.Sequential(nnx.Linear(D_IN, D_HID, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(D_HID, D_OUT, rngs=nnx.Rngs(1)))
  graphdef, params0 = nnx.split(model, nnx.Param)

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  batch = _batch(5, k)
  grad_fn = optax_gaf.gaf_value_and_grad(loss_fn, k, 0.97)
  optimizer = nnx.Optimizer(
      model, optax_gaf.apply_if_agreed(optax.sgd(0.1), num_microbatches=k), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads, agreement = grad_fn(nnx.state(model, nnx.Param), batch)
    optimizer.update(model, grads, agreement=agreement)
    return loss, agreement

  micro = optax_gaf.microbatch_grads(loss_fn, k)(params0, batch)
  tx = optax_gaf.gaf(0.97, num_microbatches=k)
  filtered, state = tx.update(micro, tx.init(params0), params0)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.as_pure(params0), nnx.as_pure(filtered))
  _, agreement = train_step(model, optimizer, batch)  # updates the model in place
  np.testing.assert_array_equal(agreement.accepted, state.accepted)
  assert 1 < int(agreement.num_accepted) < k
  chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.Param)), expected,
                              rtol=1e-5, atol=1e-6)
  assert int(optimizer.opt_state.gaf_state.count[...]) == 1


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="num_microbatches"):
    optax_gaf.gaf_value_and_grad(_loss, 1)
  with pytest.raises(ValueError, match="num_microbatches"):
    optax_gaf.gaf_value_and_grad(_loss, 2.5)
  with pytest.raises(ValueError, match="tau"):
    optax_gaf.gaf_value_and_grad(_loss, 2, tau=-0.1)
  with pytest.raises(ValueError, match="combine"):
    optax_gaf.gaf_value_and_grad(_loss, 2, combine="median")
  with pytest.raises(ValueError, match="not divisible"):
    optax_gaf.gaf_value_and_grad(_loss, 3)(_mlp_params(), _batch(0, 2))
  opt = optax_gaf.apply_if_agreed(optax.sgd(1.0))
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="agreement="):
    opt.update(params, opt.init(params), params)
