"""``with_gaf`` (wrapper.py): true skips, agreement with the oracle pipeline, extra args."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gaf
from optax_gaf._src import wrapper as wrapper_lib
from tests import reference as ref_lib

K = 4
SHAPES = [(3, 2), (5,)]


def _grads(seed, rho=0.8):
  rng = np.random.default_rng(seed)
  return jax.tree.map(jnp.asarray, ref_lib.correlated_micrograds(rng, K, SHAPES, rho))


def _disagreeing(seed):
  """g_1 and three copies of -g_1: every distance is 2, nothing agrees below tau=2."""
  signs = jnp.array([1.0, -1.0, -1.0, -1.0])
  return jax.tree.map(lambda g: g[:1] * signs.reshape((K,) + (1,) * (g.ndim - 1)), _grads(seed))


def _params():
  return {"p0": jnp.ones((3, 2)), "p1": jnp.linspace(-1.0, 1.0, 5)}


INNERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}


class WithGafTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_skip_leaves_inner_state_bit_identical_and_updates_zero(self):
    for name, make in INNERS.items():
      with self.subTest(name):
        tx = optax_gaf.with_gaf(make(), tau=0.9, num_microbatches=K)
        params = _params()
        step = self.variant(tx.update)
        updates, state = step(_grads(0), tx.init(params), params)
        self.assertFalse(bool(state.gaf_state.skipped))
        params = optax.apply_updates(params, updates)
        before = jax.tree.map(np.array, state.inner_state)
        updates, state = step(_disagreeing(1), state, params)
        self.assertTrue(bool(state.gaf_state.skipped))
        self.assertEqual(int(state.gaf_state.num_skipped), 1)
        self.assertEqual(int(state.gaf_state.count), 2)
        chex.assert_trees_all_equal(state.inner_state, before, strict=True)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)

  def test_matches_oracle_pipeline_that_skips_the_inner_step(self):
    tau = 0.9
    for name, make in INNERS.items():
      with self.subTest(name):
        inner = make()
        tx = optax_gaf.with_gaf(inner, tau=tau, num_microbatches=K)
        params = _params()
        state = tx.init(params)
        inner_state = inner.init(params)
        step = jax.jit(tx.update)
        for t in range(6):
          grads = _disagreeing(t) if t % 3 == 2 else _grads(10 + t)
          updates, state = step(grads, state, params)
          filtered, ref = ref_lib.gaf_reference_tree(grads, tau, "mean")
          assert ref_lib.decision_margin(ref, tau) > 1e-3
          self.assertEqual(bool(state.gaf_state.skipped), ref.skipped)
          if ref.skipped:   # the authors' code: no optimizer.step()
            expected = jax.tree.map(jnp.zeros_like, params)
          else:
            filtered = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), filtered)
            expected, inner_state = inner.update(filtered, inner_state, params)
          chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)
          chex.assert_trees_all_close(state.inner_state, inner_state, rtol=1e-5, atol=1e-6)
          params = optax.apply_updates(params, updates)
        self.assertEqual(int(state.gaf_state.num_skipped), 2)

  def test_equals_chain_when_nothing_is_skipped(self):
    inner = optax.adam(1e-2)
    wrapped = optax_gaf.with_gaf(inner, tau=1.5, combine="pairwise")
    chained = optax.chain(optax_gaf.gaf(1.5, combine="pairwise"), inner)
    params = _params()
    s_w, s_c = wrapped.init(params), chained.init(params)
    for t in range(3):
      u_w, s_w = wrapped.update(_grads(20 + t), s_w, params)
      u_c, s_c = chained.update(_grads(20 + t), s_c, params)
      chex.assert_trees_all_close(u_w, u_c, rtol=1e-6)
    chex.assert_trees_all_close(s_w.inner_state, s_c[1], rtol=1e-6)
    chex.assert_trees_all_equal(s_w.gaf_state, s_c[0])

  def test_nan_microgradients_never_reach_the_inner_state(self):
    tx = optax_gaf.with_gaf(optax.adam(1e-2), tau=0.9)
    params = _params()
    grads = _grads(30)
    grads["p1"] = grads["p1"].at[0, 2].set(jnp.nan).at[2, 0].set(jnp.inf)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_tree_all_finite((updates, state))
    np.testing.assert_array_equal(state.gaf_state.finite, [False, True, False, True])
    all_bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    before = state.inner_state
    updates, state = jax.jit(tx.update)(all_bad, state, params)
    chex.assert_trees_all_equal(state.inner_state, before)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))

  def test_extra_args_reach_the_inner_optimizer(self):
    def scale_by_factor():
      def update_fn(updates, state, params=None, *, factor, **extra):
        del params, extra
        return jax.tree.map(lambda u: factor * u, updates), state
      return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)

    tx = optax_gaf.with_gaf(scale_by_factor(), tau=2.0)
    params = _params()
    grads = _grads(40)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, factor=3.0, unused=1)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: 3.0 * jnp.mean(g, 0), grads),
                                rtol=1e-6)
    # An inner optimizer without extra-args support ignores unknown ones.
    plain = optax_gaf.with_gaf(optax.sgd(1.0), tau=2.0)
    updates, _ = plain.update(grads, plain.init(params), params, factor=3.0)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -jnp.mean(g, 0), grads),
                                rtol=1e-6)

  @parameterized.parameters("select", "cond")
  def test_apply_or_skip_casts_new_state_to_old_dtypes(self, how):
    inner = optax.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.bfloat16)
    params = {"w": jnp.ones(3)}
    state = inner.init(params)
    updates, new = wrapper_lib.apply_or_skip(inner, jnp.bool_(False), {"w": jnp.ones(3)},
                                             state, params, how)
    chex.assert_trees_all_equal_dtypes(new, state)
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3))
    updates, same = wrapper_lib.apply_or_skip(inner, jnp.bool_(True), {"w": jnp.ones(3)},
                                              state, params, how)
    chex.assert_trees_all_equal(same, state)
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3)})

  @parameterized.parameters("select", "cond")
  def test_skip_discards_non_finite_inner_results(self, how):
    # An inner optimizer that divides by the gradient's norm gives NaN/Inf on
    # the zero gradient of a skip; the select path evaluates it and must
    # still return zeros and the old state, bit for bit.
    def update(grads, state, params=None):
      scale = 1.0 / jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
      new = jax.tree.map(lambda s, g: s + g * scale, state, grads)
      return jax.tree.map(lambda g: g * scale, grads), new
    inner = optax.GradientTransformation(lambda p: jax.tree.map(jnp.ones_like, p), update)
    params = {"w": jnp.ones(3), "b": jnp.ones((), jnp.int32)}
    state = inner.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(lambda skip: wrapper_lib.apply_or_skip(
        inner, skip, zeros, state, params, how))
    updates, same = step(jnp.bool_(True))
    chex.assert_trees_all_equal(same, state)
    chex.assert_trees_all_equal(updates, zeros)
    updates, _ = step(jnp.bool_(False))  # the same call without the skip is NaN
    self.assertTrue(np.isnan(np.asarray(updates["w"])).all())

  @parameterized.parameters("select", "cond")
  def test_skip_modes_agree_under_jit(self, skip_mode):
    # Both modes, on agreeing and on skipped steps, give the same updates and
    # states as the default under jit: bit for bit on these values (in general
    # XLA may fuse the two programs differently, so last bits can differ).
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    inner = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.adam(1e-2, b1=0.8), optax.add_decayed_weights(1e-3))
    ref, opt = (optax_gaf.with_gaf(inner, 0.5, skip_mode=m) for m in ("select", skip_mode))
    state_ref, state = ref.init(params), opt.init(params)
    grads = [{"w": jnp.array([[1., 2., 3.], [1., 2., 2.5]]), "b": jnp.array([1., 1.])},
             {"w": jnp.array([[1., 0., 0.], [-1., 0., 0.]]), "b": jnp.array([0., 0.])}]
    for g in grads + grads:
      u_ref, state_ref = jax.jit(ref.update)(g, state_ref, params)
      u, state = jax.jit(opt.update)(g, state, params)
      chex.assert_trees_all_equal(u, u_ref)
      chex.assert_trees_all_equal(state, state_ref)
    self.assertEqual(int(state.gaf_state.num_skipped), 2)

  @parameterized.parameters("select", "cond")
  def test_prng_key_inner_state_runs_eagerly(self, skip_mode):
    # optax.add_noise keeps a typed PRNG key in its state: casting it back to
    # its own dtype must not be attempted (it failed without jit).
    inner = optax.chain(optax.add_noise(0.01, 0.55, 0), optax.sgd(0.1))
    opt = optax_gaf.with_gaf(inner, 0.5, skip_mode=skip_mode)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    for micro in (jnp.array([[1., 0.], [1., 0.1]]), jnp.array([[1., 0.], [-1., 0.]])):
      eager, state_eager = opt.update({"w": micro}, state, params)
      jitted, _ = jax.jit(opt.update)({"w": micro}, state, params)
      chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
      state = state_eager
    self.assertEqual(int(state.gaf_state.num_skipped), 1)

  def test_cond_mode_keeps_derivatives_finite_on_skips(self):
    # Differentiating through a skipped update: with the cond the skipped
    # branch's derivative is never evaluated; with the select, adam's infinite
    # derivative of sqrt at nu = 0 meets a zero cotangent (0 * inf = NaN)
    # unless eps_root > 0, as optax documents for meta-gradients.
    params = {"w": jnp.zeros(2)}
    skip = jnp.array([[1., 0.], [-1., 0.]])

    def meta_grad(inner, skip_mode):
      opt = optax_gaf.with_gaf(inner, 0.5, skip_mode=skip_mode)
      state = opt.init(params)
      def f(micro):
        updates, new = opt.update({"w": micro}, state, params)
        return jnp.sum(updates["w"]) + jnp.sum(new.inner_state[0].nu["w"])
      return jax.grad(f)(skip)

    np.testing.assert_array_equal(meta_grad(optax.adam(1e-2), "cond"), np.zeros((2, 2)))
    self.assertTrue(np.isnan(meta_grad(optax.adam(1e-2), "select")).all())
    np.testing.assert_array_equal(
        meta_grad(optax.adam(1e-2, eps_root=1e-8), "select"), np.zeros((2, 2)))

  def test_unknown_skip_mode_is_rejected(self):
    with self.assertRaisesRegex(ValueError, "skip_mode"):
      optax_gaf.with_gaf(optax.sgd(1.0), skip_mode="Select")
    with self.assertRaisesRegex(ValueError, "skip_mode"):
      optax_gaf.apply_if_agreed(optax.sgd(1.0), skip_mode="where")

  def test_extra_arg_named_like_a_parameter_reaches_the_inner(self):
    seen = {}
    def update(updates, state, params=None, *, mode=None, how=None):
      seen.update(mode=mode, how=how)
      return updates, state
    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    opt = optax_gaf.with_gaf(inner, 2.0)
    params = {"w": jnp.zeros(2)}
    opt.update({"w": jnp.ones((2, 2))}, opt.init(params), params, mode="m", how="h")
    self.assertEqual(seen, {"mode": "m", "how": "h"})
