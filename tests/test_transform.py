"""``gaf`` (transform.py): oracle agreement, edge cases, composition and bad input."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import assume, given
from hypothesis import strategies as st

import optax_gaf
from tests import reference as ref_lib

# Thresholds exactly representable in float32 (the dtype tau is used in), no
# subnormals: the oracle and the library then compare against the same tau.
TAUS = st.floats(0.0, 2.0, width=32, allow_subnormal=False)

COMBINES = ("mean", "pairwise")
SHAPES = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple),
                  min_size=1, max_size=3)


def _grads(seed, k, shapes, rho, spread=0.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(jnp.asarray,
                      ref_lib.correlated_micrograds(rng, k, shapes, rho, spread, dtype))


def _params(grads):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)


def _gaf_update(grads, tau, combine="mean", params=None):
  """One ``gaf`` step from a fresh state; ``tau`` is traced under jit (one compile)."""
  tx = optax_gaf.gaf(tau, combine=combine)
  return tx.update(grads, tx.init(params), params)


def _assert_matches_reference(test, updates, state, grads, tau, combine, rtol=2e-5):
  expected, ref = ref_lib.gaf_reference_tree(grads, tau, combine)
  np.testing.assert_array_equal(state.accepted, ref.accepted)
  np.testing.assert_array_equal(state.finite, ref.finite)
  test.assertEqual(bool(state.skipped), ref.skipped)
  test.assertEqual(int(state.num_accepted), ref.num_accepted)
  np.testing.assert_allclose(state.distances, ref.distances, atol=2e-4)
  scale = float(np.max(np.linalg.norm(np.where(
      ref.finite[:, None], np.nan_to_num(ref_lib.flatten_micro(grads)), 0), axis=1)))
  jax.tree.map(
      lambda u, e: np.testing.assert_allclose(
          np.asarray(u, np.float64), e, rtol=rtol, atol=rtol * scale),
      updates, expected)


_jit_gaf_update = jax.jit(_gaf_update, static_argnames="combine")


class GafMatchesReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @given(
      k=st.integers(2, 16),
      shapes=SHAPES,
      rho=st.floats(-0.5, 1.0),
      spread=st.floats(0.0, 1.5),
      tau=TAUS,
      combine=st.sampled_from(COMBINES),
      seed=st.integers(0, 2**32 - 1),
  )
  def test_pytree_update_matches_float64_reference(
      self, k, shapes, rho, spread, tau, combine, seed):
    grads = _grads(seed, k, shapes, rho, spread)
    _, ref = ref_lib.gaf_reference_tree(grads, tau, combine)
    assume(ref_lib.decision_margin(ref, tau) > 1e-3)
    tx = optax_gaf.gaf(tau, combine=combine, num_microbatches=k)
    params = _params(grads)
    state = tx.init(params)
    updates, state = self.variant(tx.update)(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    _assert_matches_reference(self, updates, state, grads, tau, combine)
    self.assertEqual(int(state.count), 1)
    self.assertEqual(int(state.num_skipped), int(ref.skipped))
    np.testing.assert_allclose(state.tau, tau, rtol=1e-6, atol=1e-30)


class GafEdgeCaseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_tau_two_accepts_everything_and_mean_is_plain_mean(self):
    grads = _grads(0, 7, [(3, 2), (4,)], rho=-0.3)
    updates, state = self.variant(_gaf_update)(grads, 2.0)
    self.assertTrue(np.all(state.accepted))
    self.assertEqual(int(state.num_accepted), 7)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: jnp.mean(g, 0), grads),
                                rtol=1e-6, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tau_zero_with_random_gradients_skips_with_zeros(self):
    grads = _grads(1, 8, [(5,), (2, 3)], rho=0.5)
    step = self.variant(_gaf_update, static_argnames="combine")
    for combine in COMBINES:
      updates, state = step(grads, 0.0, combine)
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, _params(grads)))
      self.assertTrue(bool(state.skipped))
      self.assertEqual(int(state.num_skipped), 1)
      self.assertFalse(np.any(state.accepted))

  def test_tau_zero_accepts_identical_microgradients(self):
    # Copies of one microgradient have distance exactly 0 <= tau = 0: all are
    # accepted and the update is that microgradient, for both fold rules, in
    # gaf and in the streaming gaf_accumulate.
    rng = np.random.default_rng(4)
    for k in (2, 3, 4, 8, 33):
      for values in ([1.0, 2.0, 3.0], [0.001, 5.0, 2.0], rng.standard_normal(257) * 1e3):
        g = {"w": jnp.tile(jnp.asarray(values, jnp.float32), (k, 1))}
        for combine in COMBINES:
          updates, state = _gaf_update(g, 0.0, combine)
          self.assertEqual(int(state.num_accepted), k, (k, values, combine))
          np.testing.assert_array_equal(state.distances, np.zeros(k))
          np.testing.assert_allclose(updates["w"], g["w"][0], rtol=1e-6)
      acc = optax_gaf.gaf_accumulate(optax.sgd(1.0), k, tau=0.0)
      state = acc.init({"w": g["w"][0]})
      for i in range(k):
        _, state = acc.update({"w": g["w"][i]}, state)
      self.assertFalse(bool(state.gaf_state.skipped))
      self.assertEqual(int(state.gaf_state.num_accepted), k)

  @given(rho=st.floats(-1.0, 1.0), tau=TAUS, seed=st.integers(0, 2**32 - 1))
  def test_k_two_both_rules_agree(self, rho, tau, seed):
    grads = _grads(seed, 2, [(3,), (2, 2)], rho)
    mean = _jit_gaf_update(grads, tau, "mean")
    pair = _jit_gaf_update(grads, tau, "pairwise")
    chex.assert_trees_all_equal(mean, pair)

  def test_pairwise_weights_later_microgradients_more(self):
    # Orthogonal unit gradients, tau = 2: pairwise gives (1/4, 1/4, 1/2).
    grads = {"w": jnp.eye(3)}
    for combine, expected in (("mean", [1 / 3] * 3), ("pairwise", [0.25, 0.25, 0.5])):
      updates, _ = _jit_gaf_update(grads, 2.0, combine)
      np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bf16_gradients_give_bf16_updates_from_float32_gram(self):
    # D = 6000 bf16 entries: a bf16 accumulation of the norms would be far off.
    grads = _grads(2, 6, [(3000,), (30, 100)], rho=0.8, dtype=np.float32)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    gram = optax_gaf.gram_matrix(grads)
    self.assertEqual(gram.dtype, jnp.float32)
    tau = 0.6
    tx = optax_gaf.gaf(tau, num_microbatches=6)
    params = _params(grads)
    updates, state = self.variant(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    self.assertEqual(state.distances.dtype, jnp.float32)
    # The oracle sees exactly the bf16 values (in float64); only the final
    # rounding to bf16 separates the two.
    _, ref = ref_lib.gaf_reference_tree(grads, tau, "mean")
    assert ref_lib.decision_margin(ref, tau) > 1e-3
    _assert_matches_reference(self, updates, state, grads, tau, "mean", rtol=1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_and_inf_microgradients_are_dropped(self):
    grads = _grads(3, 6, [(4,), (2, 3)], rho=0.9)
    grads["p0"] = grads["p0"].at[0, 1].set(jnp.nan)   # the first: never the reference
    grads["p1"] = grads["p1"].at[3, 0, 2].set(-jnp.inf)
    tau = 0.5
    tx = optax_gaf.gaf(tau, num_microbatches=6)
    params = _params(grads)
    step = self.variant(tx.update)
    updates, state = step(grads, tx.init(params), params)
    chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(state.distances)
    np.testing.assert_array_equal(state.finite, [False, True, True, False, True, True])
    self.assertTrue(bool(state.accepted[1]))
    self.assertEqual(float(state.distances[1]), 0.0)
    self.assertEqual(int(state.num_dropped), 2)
    _assert_matches_reference(self, updates, state, grads, tau, "mean")
    _, state = step(grads, state, params)
    self.assertEqual(int(state.num_dropped), 4)

  def test_large_k_with_and_without_nan_matches_reference(self):
    # K > 16 takes the matrix-vector weighted sum (with a masked pass for NaN).
    for combine in COMBINES:
      grads = _grads(8, 20, [(3, 4), (5,)], rho=0.8, spread=0.5)
      tau = 0.6
      updates, state = _jit_gaf_update(grads, tau, combine)
      _, ref = ref_lib.gaf_reference_tree(grads, tau, combine)
      assert ref_lib.decision_margin(ref, tau) > 1e-3
      _assert_matches_reference(self, updates, state, grads, tau, combine)
      grads["p1"] = grads["p1"].at[0, 1].set(jnp.nan).at[7, 0].set(jnp.inf)
      updates, state = _jit_gaf_update(grads, tau, combine)
      _, ref = ref_lib.gaf_reference_tree(grads, tau, combine)
      assert ref_lib.decision_margin(ref, tau) > 1e-3
      chex.assert_tree_all_finite(updates)
      _assert_matches_reference(self, updates, state, grads, tau, combine)

  def test_float64_gradients_match_the_reference_tightly(self):
    with jax.enable_x64(True):
      for seed, combine in ((0, "mean"), (1, "pairwise")):
        grads = _grads(seed, 9, [(4, 3), (6,)], rho=0.5, spread=1.0, dtype=np.float64)
        tau = 0.9
        updates, state = jax.jit(_gaf_update, static_argnames="combine")(grads, tau, combine)
        expected, ref = ref_lib.gaf_reference_tree(grads, tau, combine)
        assert ref_lib.decision_margin(ref, tau) > 1e-3
        chex.assert_trees_all_equal_dtypes(updates, expected)
        np.testing.assert_array_equal(state.accepted, ref.accepted)
        jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-12, atol=1e-12),
                     updates, expected)

  def test_squared_norm_overflow_counts_as_non_finite(self):
    # |g_1|^2 = 1e40 overflows the float32 Gram: g_1 is dropped like a NaN.
    grads = {"w": jnp.array([[1e20, 1.0], [1.0, 2.0], [1.0, 2.1]], jnp.float32)}
    updates, state = _jit_gaf_update(grads, 0.5, "mean")
    np.testing.assert_array_equal(state.finite, [False, True, True])
    np.testing.assert_allclose(updates["w"], [1.0, 2.05], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_all_or_all_but_one_non_finite_skips(self):
    grads = {"w": jnp.full((4, 3), jnp.nan).at[2].set(1.0), "b": jnp.ones((4,))}
    step = self.variant(_gaf_update)
    updates, state = step(grads, 2.0)
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3), "b": jnp.zeros(())})
    self.assertTrue(bool(state.skipped))
    self.assertEqual(int(state.num_dropped), 3)
    grads = {"w": jnp.full((4, 3), jnp.inf), "b": jnp.full((4,), jnp.nan)}
    updates, state = step(grads, 2.0)
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3), "b": jnp.zeros(())})
    self.assertFalse(np.any(state.finite))
    self.assertTrue(bool(state.skipped))

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradients_give_no_nan_anywhere(self):
    grads = {"w": jnp.zeros((5, 3, 2)), "b": jnp.zeros((5, 2))}
    step = self.variant(_gaf_update, static_argnames="combine")
    for tau, skipped in ((0.97, True), (1.0, False), (2.0, False)):
      for combine in COMBINES:
        updates, state = step(grads, tau, combine)
        chex.assert_tree_all_finite((updates, state))
        chex.assert_trees_all_equal(updates, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
        self.assertEqual(bool(state.skipped), skipped)
    # A zero microgradient next to nonzero ones: cosine 0, distance 1.
    grads = _grads(4, 3, [(6,)], rho=0.99)
    grads["p0"] = grads["p0"].at[1].set(0.0)
    updates, state = step(grads, 0.5, "mean")
    chex.assert_tree_all_finite((updates, state))
    np.testing.assert_allclose(state.distances[1], 1.0)
    np.testing.assert_array_equal(state.accepted, [True, False, True])

  def test_schedule_tau_follows_the_step_count(self):
    schedule = optax.piecewise_constant_schedule(2.0, {2: 0.0})  # 2, 2, 0, 0
    grads = _grads(5, 4, [(8,)], rho=0.2)
    tx = optax_gaf.gaf(schedule, num_microbatches=4)
    state = tx.init(None)
    step = jax.jit(tx.update)
    seen = []
    for _ in range(4):
      _, state = step(grads, state)
      seen.append((float(state.tau), bool(state.skipped)))
    self.assertEqual(seen, [(2.0, False), (2.0, False), (0.0, True), (0.0, True)])
    self.assertEqual(int(state.num_skipped), 2)
    self.assertEqual(int(state.count), 4)
    linear = optax.linear_schedule(1.5, 0.5, transition_steps=10)
    _, state = optax_gaf.gaf(linear).update(grads, state)
    np.testing.assert_allclose(state.tau, linear(4), rtol=1e-6)

  def test_inject_hyperparams_matches_plain_and_tau_can_be_changed(self):
    grads = _grads(6, 5, [(4,), (3,)], rho=0.6)
    params = _params(grads)
    plain = optax_gaf.gaf(0.9, num_microbatches=5)
    injected = optax.inject_hyperparams(optax_gaf.gaf)(tau=0.9, num_microbatches=5)
    u_plain, s_plain = jax.jit(plain.update)(grads, plain.init(params), params)
    state = injected.init(params)
    u_inj, state = jax.jit(injected.update)(grads, state, params)
    chex.assert_trees_all_equal(u_plain, u_inj)
    chex.assert_trees_all_equal(s_plain, state.inner_state)
    self.assertFalse(bool(state.inner_state.skipped))
    state.hyperparams["tau"] = jnp.asarray(0.0)
    u_inj, state = jax.jit(injected.update)(grads, state, params)
    self.assertTrue(bool(state.inner_state.skipped))
    chex.assert_trees_all_equal(u_inj, jax.tree.map(jnp.zeros_like, params))

  def test_state_fields_and_lengths(self):
    grads = _grads(7, 4, [(3,)], rho=0.9)
    sized = optax_gaf.gaf(num_microbatches=4).init({"p0": jnp.zeros(3)})
    self.assertIsInstance(sized, optax_gaf.GafState)
    chex.assert_shape([sized.distances, sized.accepted, sized.finite], (4,))
    unsized = optax_gaf.gaf().init({"p0": jnp.zeros(3)})
    chex.assert_shape([unsized.distances, unsized.accepted, unsized.finite], (0,))
    _, state = optax_gaf.gaf().update(grads, unsized)
    chex.assert_shape([state.distances, state.accepted, state.finite], (4,))
    chex.assert_type([state.count, state.num_accepted, state.num_skipped, state.num_dropped],
                     jnp.int32)


  def test_state_packs_nine_statistics_in_three_arrays(self):
    grads = _grads(8, 4, [(3,), (2, 2)], rho=0.9)
    grads["p0"] = grads["p0"].at[2].set(jnp.nan)
    tx = optax_gaf.gaf(0.5, num_microbatches=4)
    _, state = jax.jit(tx.update)(grads, tx.init({"p0": jnp.zeros(3), "p1": jnp.zeros((2, 2))}))
    self.assertLen(jax.tree.leaves(state), 3)
    stats = state.as_dict()
    self.assertEqual(tuple(stats), ("count", "tau", "distances", "accepted", "finite",
                                    "num_accepted", "skipped", "num_skipped", "num_dropped"))
    # The packed arrays hold what the filter decided (checked against agreement_weights).
    gram = sum(jnp.einsum("i...,j...->ij", g, g) for g in jax.tree.leaves(grads))
    agree = optax_gaf.agreement_weights(gram, 0.5, "mean")
    # (the reference Gram matrix sums in another order: last bits may differ)
    chex.assert_trees_all_close(stats["distances"], agree.distances.astype(jnp.float32),
                                rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(stats["accepted"], agree.accepted)
    chex.assert_trees_all_equal(stats["finite"], jnp.array([True, True, False, True]))
    self.assertEqual(int(stats["count"]), 1)
    self.assertEqual(int(stats["num_dropped"]), 1)
    self.assertEqual(int(stats["num_accepted"]), int(agree.num_accepted))
    self.assertEqual(bool(stats["skipped"]), bool(agree.skipped))
    self.assertEqual(int(stats["num_skipped"]), int(agree.skipped))
    self.assertAlmostEqual(float(stats["tau"]), 0.5)
    self.assertIn("num_dropped=Array(1", repr(state))
    # Trees of shapes or specs print their stored fields instead of failing.
    shapes = jax.eval_shape(tx.init, {"p0": jnp.zeros(3), "p1": jnp.zeros((2, 2))})
    self.assertIn("counters=ShapeDtypeStruct(shape=(5,)", repr(shapes))
    self.assertEqual(repr(jax.tree.map(lambda _: None, state)),
                     "GafState(counters=None, measures=None, masks=None)")

  def test_batched_state_gives_batched_statistics(self):
    tx = optax_gaf.gaf(num_microbatches=4)
    params = {"p0": jnp.zeros((5, 3))}  # a batch of 5 parameter sets
    grads = {"p0": jax.random.normal(jax.random.key(0), (5, 4, 3))}
    states = jax.vmap(tx.init)(params)
    _, states = jax.vmap(tx.update)(grads, states)
    chex.assert_shape([states.distances, states.accepted, states.finite], (5, 4))
    chex.assert_shape([states.count, states.tau, states.num_accepted, states.skipped,
                       states.num_skipped, states.num_dropped], (5,))
    for b in range(5):
      _, one = tx.update({"p0": grads["p0"][b]}, tx.init({"p0": params["p0"][b]}))
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[b], states.as_dict()),
                                  one.as_dict(), atol=1e-6)
    # from_statistics packs a batch back into the same arrays.
    rebuilt = optax_gaf.GafState.from_statistics(**states.as_dict())
    chex.assert_trees_all_equal(rebuilt, states)

  def test_from_statistics_names_a_statistic_of_the_wrong_shape(self):
    stats = optax_gaf.gaf(num_microbatches=4).init(None).as_dict()
    with self.assertRaisesRegex(ValueError, r"`accepted` has shape \(3,\), expected \(4,\)"):
      optax_gaf.GafState.from_statistics(**{**stats, "accepted": jnp.zeros(3, bool)})
    with self.assertRaisesRegex(ValueError, r"`num_skipped` has shape \(2,\), expected \(\)"):
      optax_gaf.GafState.from_statistics(**{**stats, "num_skipped": jnp.zeros(2, jnp.int32)})
    # The misshapen statistic is named even when it is `count` or `distances`.
    with self.assertRaisesRegex(ValueError, r"`count` has shape \(2,\), expected \(\)"):
      optax_gaf.GafState.from_statistics(**{**stats, "count": jnp.zeros(2, jnp.int32)})
    with self.assertRaisesRegex(ValueError, r"`distances` has shape \(\), expected \(4,\)"):
      optax_gaf.GafState.from_statistics(**{**stats, "distances": jnp.float32(0)})
    batched = jax.vmap(lambda _: optax_gaf.gaf(num_microbatches=4).init(None))(jnp.arange(2))
    stats = batched.as_dict()
    with self.assertRaisesRegex(ValueError, r"`distances` has shape \(2, 3\), expected \(2, 4\)"):
      optax_gaf.GafState.from_statistics(**{**stats, "distances": jnp.zeros((2, 3))})

  def test_running_totals_stop_at_the_int32_maximum(self):
    top = np.iinfo(np.int32).max
    tx = optax_gaf.gaf(0.0, num_microbatches=3)
    stats = tx.init(None).as_dict()
    state = optax_gaf.GafState.from_statistics(
        **{**stats, "num_skipped": top - 1, "num_dropped": top - 1})
    grads = {"w": jnp.array([[1.0, 0.0], [jnp.nan, 0.0], [0.0, 1.0]])}  # one NaN, a skip
    for want in (top, top):
      _, state = jax.jit(tx.update)(grads, state)
      self.assertEqual(int(state.num_skipped), want)
      self.assertEqual(int(state.num_dropped), want)

  def test_traced_num_microbatches_at_init_warns_naming_static_args(self):
    params = {"w": jnp.zeros(2)}
    for factory in (optax_gaf.gaf, functools.partial(optax_gaf.with_gaf, optax.sgd(0.1))):
      injected = optax.inject_hyperparams(factory)(tau=0.5, num_microbatches=3)
      # Under jit (jax.jit(TrainState.create), eval_shape, pmap) the count is
      # traced: the statistics start empty, as with num_microbatches=None,
      # and a jitted training loop still runs.
      with self.assertWarnsRegex(UserWarning, r"static_args=\('num_microbatches',\)"):
        state = jax.jit(injected.init)(params)
      gaf_state = getattr(state.inner_state, "gaf_state", state.inner_state)
      chex.assert_shape(gaf_state.distances, (0,))
      step = jax.jit(injected.update)
      for _ in range(2):
        _, state = step({"w": jnp.ones((3, 2))}, state, params)
      gaf_state = getattr(state.inner_state, "gaf_state", state.inner_state)
      chex.assert_shape(gaf_state.distances, (3,))
      self.assertEqual(int(gaf_state.num_accepted), 3)
      self.assertEqual(int(gaf_state.count), 2)
      # Outside jit the count is concrete: no warning, statistics of length K.
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = injected.init(params)
      gaf_state = getattr(state.inner_state, "gaf_state", state.inner_state)
      chex.assert_shape(gaf_state.distances, (3,))
    static = optax.inject_hyperparams(optax_gaf.gaf, static_args=("num_microbatches",))(
        tau=0.5, num_microbatches=3)
    chex.assert_shape(jax.jit(static.init)(None).inner_state.distances, (3,))


class GafCompositionTest(chex.TestCase):

  def test_chain_with_momentum_adam_adamw_matches_reference_pipeline(self):
    k, tau = 4, 0.95
    params = {"p0": jnp.ones((3, 2)), "p1": jnp.ones((5,))}
    shapes = [(3, 2), (5,)]
    for inner in (optax.sgd(0.1, momentum=0.9), optax.adam(1e-2), optax.adamw(1e-2, weight_decay=0.1)):
      tx = optax.chain(optax_gaf.gaf(tau, num_microbatches=k), inner)
      state = tx.init(params)
      inner_state = inner.init(params)
      p_ref = params
      step = jax.jit(tx.update)
      skipped = []
      for t in range(6):
        grads = _grads(100 + t, k, shapes, rho=0.8)
        if t % 3 == 2:  # g_1 against -g_1 three times: nothing agrees
          grads = jax.tree.map(lambda g: g[:1] * jnp.array([1.0, -1, -1, -1]).reshape(
              (k,) + (1,) * (g.ndim - 1)), grads)
        updates, state = step(grads, state, params)
        filtered, ref = ref_lib.gaf_reference_tree(grads, tau, "mean")
        assert ref_lib.decision_margin(ref, tau) > 1e-3
        skipped.append(ref.skipped)
        filtered = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), filtered)
        ref_updates, inner_state = inner.update(filtered, inner_state, params)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-6)
        params = optax.apply_updates(params, updates)
        p_ref = optax.apply_updates(p_ref, ref_updates)
      self.assertIn(True, skipped)
      self.assertIn(False, skipped)
      chex.assert_trees_all_close(params, p_ref, rtol=1e-5, atol=1e-6)


class GafBadInputTest(chex.TestCase):

  def test_tau_out_of_range_or_nan(self):
    for bad in (-0.1, 2.01, float("nan"), float("inf"), np.float32(3.0)):
      for factory in (optax_gaf.gaf, functools.partial(optax_gaf.with_gaf, optax.sgd(1.0))):
        with self.assertRaisesRegex(ValueError, r"`tau` must be in \[0, 2\]") as cm:
          factory(tau=bad)
        self.assertIn(str(float(bad)), str(cm.exception))
    with self.assertRaisesRegex(ValueError, "`tau` must be a real scalar"):
      optax_gaf.gaf(tau=jnp.array([0.5, 0.6]))
    with self.assertRaisesRegex((ValueError, TypeError), "`tau`"):
      optax_gaf.gaf(tau="0.5")
    for ok in (0, 0.0, 2, 2.0, jnp.float32(1.0)):
      optax_gaf.gaf(tau=ok)

  def test_bad_combine_lists_the_choices(self):
    for factory in (optax_gaf.gaf, functools.partial(optax_gaf.with_gaf, optax.sgd(1.0))):
      with self.assertRaisesRegex(ValueError, r"`combine` must be one of \('mean', 'pairwise'\), got 'sum'"):
        factory(combine="sum")

  def test_bad_num_microbatches(self):
    with self.assertRaisesRegex(ValueError, "GAF needs at least 2 microbatches; `num_microbatches` is 1"):
      optax_gaf.gaf(num_microbatches=1)
    with self.assertRaisesRegex(ValueError, "`num_microbatches` must be an int >= 2, got 2.5"):
      optax_gaf.gaf(num_microbatches=2.5)
    with self.assertRaisesRegex(ValueError, "num_microbatches=4.*size 3"):
      tx = optax_gaf.gaf(num_microbatches=4)
      tx.update({"w": jnp.ones((3, 2))}, tx.init(None))

  def test_k_below_two(self):
    with self.assertRaisesRegex(ValueError, "GAF needs at least 2 microbatches, got K=1"):
      optax_gaf.gaf().update({"w": jnp.ones((1, 3))}, optax_gaf.gaf().init(None))

  def test_mismatched_leading_sizes_name_both_leaves(self):
    grads = {"a": jnp.ones((4, 3)), "b": {"c": jnp.ones((5, 3))}}
    with self.assertRaisesRegex(
        ValueError, r"leaf \['a'\] has shape \(4, 3\) but leaf \['b'\]\['c'\] has shape \(5, 3\)"):
      optax_gaf.gaf().update(grads, optax_gaf.gaf().init(None))

  def test_leaf_without_microbatch_axis_given_params_names_the_leaf(self):
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
    grads = {"w": jnp.ones((4, 4, 3)), "b": jnp.ones((4, 3))}   # ok
    optax_gaf.gaf().update(grads, optax_gaf.gaf().init(params), params)
    grads = {"w": jnp.ones((4, 3)), "b": jnp.ones((4, 3))}      # 'w' lacks K
    for tx in (optax_gaf.gaf(), optax_gaf.with_gaf(optax.sgd(1.0))):
      with self.assertRaisesRegex(
          ValueError, r"leaf \['w'\] has shape \(4, 3\) but its parameter has shape \(4, 3\)"):
        tx.update(grads, tx.init(params), params)
    with self.assertRaisesRegex(ValueError, r"leaf \['b'\] is a scalar"):
      optax_gaf.gaf().update({"w": jnp.ones((4, 4, 3)), "b": jnp.ones(())},
                             optax_gaf.gaf().init(None))

  def test_integer_gradients_are_rejected(self):
    with self.assertRaisesRegex(ValueError, r"floating-point gradients; leaf \['n'\]"):
      optax_gaf.gaf().update({"n": jnp.ones((3, 2), jnp.int32)}, optax_gaf.gaf().init(None))
