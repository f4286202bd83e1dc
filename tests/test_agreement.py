"""The sequential filter on a Gram matrix (agreement.py) against the float64 oracle."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from optax_gaf._src import agreement as agreement_lib
from tests import reference as ref_lib

# Thresholds exactly representable in float32 (the dtype tau is used in), no
# subnormals: the oracle and the library then compare against the same tau.
TAUS = st.floats(0.0, 2.0, width=32, allow_subnormal=False)

COMBINES = ("mean", "pairwise")
_weights = jax.jit(agreement_lib.agreement_weights, static_argnames="combine")


def _micro(seed, k, d, rho, spread=0.0):
  rng = np.random.default_rng(seed)
  micro = ref_lib.correlated_micrograds(rng, k, [(d,)], rho, spread, np.float64)
  return micro["p0"]


def _gram(micro64):
  return jnp.asarray(micro64 @ micro64.T, jnp.float32)


class AgreementWeightsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @given(
      k=st.integers(2, 16),
      d=st.integers(1, 12),
      rho=st.floats(-0.5, 1.0),
      spread=st.floats(0.0, 2.0),
      tau=TAUS,
      combine=st.sampled_from(COMBINES),
      seed=st.integers(0, 2**32 - 1),
  )
  def test_matches_float64_reference(self, k, d, rho, spread, tau, combine, seed):
    micro = _micro(seed, k, d, rho, spread)
    ref = ref_lib.gaf_reference(micro, tau, combine)
    assume(ref_lib.decision_margin(ref, tau) > 1e-3)
    fn = self.variant(functools.partial(agreement_lib.agreement_weights, combine=combine))
    out = fn(_gram(micro), jnp.float32(tau))
    np.testing.assert_array_equal(out.accepted, ref.accepted)
    np.testing.assert_array_equal(out.finite, ref.finite)
    self.assertEqual(bool(out.skipped), ref.skipped)
    self.assertEqual(int(out.num_accepted), ref.num_accepted)
    np.testing.assert_allclose(out.distances, ref.distances, atol=2e-4)
    update = np.asarray(out.weights, np.float64) @ micro
    scale = np.max(np.linalg.norm(micro, axis=1))
    np.testing.assert_allclose(update, ref.update, atol=1e-5 * scale)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tau_two_accepts_all_with_closed_form_weights(self):
    k = 6
    micro = _micro(0, k, 5, -0.2)  # disagreeing directions: tau = 2 still keeps all
    gram = _gram(micro)
    mean = self.variant(functools.partial(agreement_lib.agreement_weights, combine="mean"))(gram, 2.0)
    np.testing.assert_allclose(mean.weights, np.full(k, 1 / k), rtol=1e-6)
    self.assertTrue(np.all(mean.accepted))
    pair = self.variant(functools.partial(agreement_lib.agreement_weights, combine="pairwise"))(gram, 2.0)
    # g = (((g1 + g2)/2 + g3)/2 ...): g1 and g2 weigh 2^-(K-1), g_i weighs 2^-(K-i+1).
    expected = np.array([2.0**-(k - 1)] + [2.0**-(k - i + 1) for i in range(2, k + 1)])
    np.testing.assert_allclose(pair.weights, expected, rtol=1e-6)
    self.assertEqual(int(pair.num_accepted), k)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tau_zero_with_random_gradients_skips(self):
    gram = _gram(_micro(1, 8, 20, 0.3))
    for combine in COMBINES:
      out = self.variant(functools.partial(agreement_lib.agreement_weights, combine=combine))(gram, 0.0)
      self.assertTrue(bool(out.skipped))
      np.testing.assert_array_equal(out.weights, np.zeros(8))
      self.assertFalse(np.any(out.accepted))
      self.assertEqual(int(out.num_accepted), 0)
      self.assertTrue(np.all(out.distances[1:] > 0))

  @given(rho=st.floats(-1.0, 1.0), tau=TAUS, seed=st.integers(0, 2**32 - 1))
  def test_k_two_rules_agree(self, rho, tau, seed):
    gram = _gram(_micro(seed, 2, 4, rho))
    mean = _weights(gram, tau, "mean")
    pair = _weights(gram, tau, "pairwise")
    chex.assert_trees_all_equal(mean, pair)

  def test_nan_first_microgradient_is_never_the_reference(self):
    micro = _micro(2, 5, 6, 0.9)
    micro[0, 3] = np.nan
    micro[3, 0] = np.inf
    ref = ref_lib.gaf_reference(micro, 0.5, "mean")
    with np.errstate(invalid="ignore"):
      gram = jnp.asarray(micro @ micro.T, jnp.float32)
    out = agreement_lib.agreement_weights(gram, 0.5, "mean")
    np.testing.assert_array_equal(out.finite, [False, True, True, False, True])
    np.testing.assert_array_equal(out.accepted, ref.accepted)
    self.assertTrue(bool(out.accepted[1]))  # g_2 became the reference
    self.assertEqual(float(out.distances[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(out.weights)[[0, 3]], [0.0, 0.0])
    chex.assert_tree_all_finite((out.weights, out.distances))
    finite_rows = np.where(ref.finite[:, None], micro, 0)
    np.testing.assert_allclose(np.asarray(out.weights, np.float64) @ finite_rows, ref.update,
                               rtol=1e-5, atol=1e-6)

  def test_fewer_than_two_finite_microgradients_skip(self):
    micro = np.full((3, 4), np.nan)
    micro[1] = 1.0
    for rows in (micro, np.full((3, 4), np.inf)):
      with np.errstate(invalid="ignore"):
        gram = jnp.asarray(rows @ rows.T, jnp.float32)
      out = agreement_lib.agreement_weights(gram, 2.0, "mean")
      self.assertTrue(bool(out.skipped))
      np.testing.assert_array_equal(out.weights, np.zeros(3))
      self.assertEqual(int(out.num_accepted), 0)
      chex.assert_tree_all_finite(out.distances)

  def test_explicit_finite_mask_overrides_gram_diagonal(self):
    gram = _gram(_micro(3, 4, 3, 0.99))
    out = agreement_lib.agreement_weights(gram, 1.0, "mean",
                                          finite=jnp.array([True, False, True, True]))
    np.testing.assert_array_equal(out.accepted, [True, False, True, True])
    np.testing.assert_allclose(out.weights, [1 / 3, 0, 1 / 3, 1 / 3], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_gradients_give_cosine_zero_and_no_nan(self):
    k = 4
    gram = jnp.zeros((k, k), jnp.float32)
    for tau, skipped in ((0.97, True), (1.0, False)):
      out = self.variant(functools.partial(agreement_lib.agreement_weights, combine="mean"))(gram, tau)
      chex.assert_tree_all_finite(out)
      np.testing.assert_array_equal(out.distances, [0.0, 1.0, 1.0, 1.0])  # cos = 0
      self.assertEqual(bool(out.skipped), skipped)
    # One zero microgradient among nonzero ones: cos(g, 0) = 0 as well.
    micro = _micro(4, 3, 5, 0.95)
    micro[1] = 0.0
    out = agreement_lib.agreement_weights(_gram(micro), 0.9, "mean")
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out.distances[1], 1.0)
    np.testing.assert_array_equal(out.accepted, [True, False, True])

  def test_distance_derivatives_are_finite_at_zero_norm(self):
    # A zero microgradient has cos = 0 whatever its direction; the distances'
    # derivatives with respect to the Gram matrix must not be NaN there.
    micro = _micro(4, 3, 5, 0.95)
    micro[1] = 0.0
    distances = lambda g: agreement_lib.agreement_weights(g, 0.9, "mean").distances
    for gram in (_gram(micro), jnp.zeros((4, 4), jnp.float32)):
      jac = jax.jacobian(distances)(jnp.asarray(gram, jnp.float32))
      chex.assert_tree_all_finite(jac)
    # Elsewhere they are unchanged: d(1 - cos)/d<a, b> = -1 / (|a| |b|) for the
    # second microgradient against the first (the reference).
    gram = jnp.asarray(_gram(_micro(3, 3, 5, 0.95)), jnp.float32)
    jac = jax.jacobian(distances)(gram)
    expected = -1 / np.sqrt(float(gram[0, 0]) * float(gram[1, 1]))
    np.testing.assert_allclose(jac[1, 0, 1] + jac[1, 1, 0], expected, rtol=1e-5)

  @settings(max_examples=8)
  @given(
      k=st.integers(2, 16),
      rho=st.floats(-0.5, 1.0),
      tau=TAUS,
      log_scale=st.floats(-6.0, 6.0),
      seed=st.integers(0, 2**32 - 1),
  )
  def test_acceptance_is_invariant_to_positive_scaling(self, k, rho, tau, log_scale, seed):
    micro = _micro(seed, k, 6, rho, 0.5)
    ref = ref_lib.gaf_reference(micro, tau, "mean")
    assume(ref_lib.decision_margin(ref, tau) > 1e-3)
    c = 10.0**log_scale
    for combine in COMBINES:
      base = _weights(_gram(micro), tau, combine)
      scaled = _weights(_gram(c * micro), tau, combine)
      np.testing.assert_array_equal(base.accepted, scaled.accepted)
      np.testing.assert_allclose(base.weights, scaled.weights, rtol=1e-4, atol=1e-6)
    # Scaling only the last microgradient cannot change any decision either.
    last = micro.copy()
    last[-1] *= c
    np.testing.assert_array_equal(
        _weights(_gram(last), tau, "mean").accepted, ref.accepted)


class AgreementWeightsBadInputTest(chex.TestCase):

  def test_errors_name_the_argument(self):
    gram = jnp.eye(3)
    with self.assertRaisesRegex(ValueError, r"`combine` must be one of \('mean', 'pairwise'\)"):
      agreement_lib.agreement_weights(gram, 0.5, "avg")
    for tau in (-1.0, 2.5, float("nan")):
      with self.assertRaisesRegex(ValueError, "`tau` must be in \\[0, 2\\]"):
        agreement_lib.agreement_weights(gram, tau, "mean")
    for bad in (jnp.ones((3, 2)), jnp.ones((0, 0))):
      with self.assertRaisesRegex(ValueError, r"`gram` must be a square \[K, K\] matrix with "
                                  rf"K >= 1, got shape \({bad.shape[0]}, {bad.shape[1]}\)"):
        agreement_lib.agreement_weights(bad, 0.5, "mean")
    with self.assertRaisesRegex(ValueError, r"`combine` must be one of"):
      agreement_lib.agreement_weights(gram, 0.5, np.array(["mean"]))
    with self.assertRaisesRegex(ValueError, "`gram` must be floating point"):
      agreement_lib.agreement_weights(jnp.eye(3, dtype=jnp.int32), 0.5, "mean")
    with self.assertRaisesRegex(ValueError, r"`finite` must be a bool array of shape \(3,\)"):
      agreement_lib.agreement_weights(gram, 0.5, "mean", finite=jnp.ones(2, bool))
    # NumPy and list masks are converted (a NumPy mask failed inside the loop).
    for mask in (np.array([True, False, True]), [True, False, True]):
      out = agreement_lib.agreement_weights(jnp.ones((3, 3)), 0.5, "mean", finite=mask)
      np.testing.assert_array_equal(out.accepted, [True, False, True])
    for dtype in (jnp.int32, jnp.float32):  # a flag of 2 would be half-finite
      with self.assertRaisesRegex(ValueError, r"`finite` must be a bool array.*dtype"):
        agreement_lib.agreement_weights(gram, 0.5, "mean", finite=jnp.ones(3, dtype))
    # A traced tau (inject_hyperparams under jit) cannot be checked and is used.
    out = jax.jit(lambda t: agreement_lib.agreement_weights(gram, t, "mean"))(0.5)
    self.assertTrue(bool(out.skipped))


class CosineAndFoldStepTest(chex.TestCase):

  def test_cosine_distance_zero_norm_is_one_without_nan(self):
    d = agreement_lib.cosine_distance(jnp.float32(0), jnp.float32(0), jnp.float32(4))
    self.assertEqual(float(d), 1.0)
    d = agreement_lib.cosine_distance(jnp.float32(0), jnp.float32(0), jnp.float32(0))
    self.assertEqual(float(d), 1.0)

  def test_cosine_distance_clips_rounding(self):
    # dot slightly above |a||b| from rounding must not give a negative distance.
    self.assertEqual(float(agreement_lib.cosine_distance(1.0000001, 1.0, 1.0)), 0.0)
    self.assertEqual(float(agreement_lib.cosine_distance(-1.0000001, 1.0, 1.0)), 2.0)

  def test_cosine_distance_of_a_vector_with_itself_is_zero(self):
    # sqrt(14) * sqrt(14) rounds above 14 in float32; sqrt(14 * 14) does not.
    for n in np.float32([14.0, 3.0, 0.1, 1e-5, 7e12, 123.456]):
      self.assertEqual(float(agreement_lib.cosine_distance(n, n, n)), 0.0, n)

  def test_cosine_distance_where_the_norm_product_over_or_underflows(self):
    # |a|^2 |b|^2 = 1e60 or 1e-50 is not a float32: the roots are multiplied.
    for n in (1e30, 1e-25):
      d = agreement_lib.cosine_distance(jnp.float32(0.5 * n), jnp.float32(n), jnp.float32(n))
      np.testing.assert_allclose(float(d), 0.5, rtol=1e-6)

  def test_only_distances_within_rounding_of_zero_count_as_zero(self):
    near = agreement_lib.cosine_distance(jnp.float32(1 - 1e-6), jnp.float32(1), jnp.float32(1))
    self.assertEqual(float(near), 0.0)
    far = agreement_lib.cosine_distance(jnp.float32(1 - 1e-5), jnp.float32(1), jnp.float32(1))
    np.testing.assert_allclose(float(far), 1e-5, rtol=1e-2)
    self.assertFalse(bool(agreement_lib.fold_step(
        agreement_lib.FoldCarry(jnp.int32(1), jnp.float32(1)), 1 - 1e-5, 1.0, True, 0.0,
        "mean").accepted))

  def test_fold_step_drops_non_finite_and_keeps_carry(self):
    carry = agreement_lib.FoldCarry(jnp.int32(2), jnp.float32(3.0))
    step = agreement_lib.fold_step(carry, jnp.float32(jnp.nan), jnp.float32(jnp.inf),
                                   jnp.bool_(False), 2.0, "mean")
    self.assertFalse(bool(step.accepted))
    self.assertFalse(bool(step.compared))
    self.assertEqual((float(step.alpha), float(step.beta)), (1.0, 0.0))
    chex.assert_trees_all_equal(step.carry, carry)

  def test_fold_step_mean_and_pairwise_coefficients(self):
    carry = agreement_lib.FoldCarry(jnp.int32(3), jnp.float32(1.0))
    # Identical direction: g = e1 (|g|^2 = 1), g_i = 2 e1.
    mean = agreement_lib.fold_step(carry, 2.0, 4.0, True, 0.1, "mean")
    np.testing.assert_allclose([mean.alpha, mean.beta], [0.75, 0.25])
    np.testing.assert_allclose(mean.carry.norm2, (0.75 + 0.5) ** 2)
    self.assertEqual(int(mean.carry.count), 4)
    pair = agreement_lib.fold_step(carry, 2.0, 4.0, True, 0.1, "pairwise")
    np.testing.assert_allclose([pair.alpha, pair.beta], [0.5, 0.5])
    np.testing.assert_allclose(pair.carry.norm2, 1.5**2)
