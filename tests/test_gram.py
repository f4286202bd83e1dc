"""Gram matrix and microbatch-axis validation (gram.py)."""

import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import optax_gaf
from optax_gaf._src import gram as gram_lib
from tests import reference as ref_lib

SHAPES = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=4)


class GramMatrixTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @given(k=st.integers(2, 16), shapes=SHAPES, seed=st.integers(0, 2**32 - 1))
  def test_equals_float64_gram_of_concatenated_leaves(self, k, shapes, seed):
    grads = ref_lib.correlated_micrograds(np.random.default_rng(seed), k, shapes, 0.5, 1.0)
    gram = self.variant(optax_gaf.gram_matrix)(jax.tree.map(jnp.asarray, grads))
    flat = ref_lib.flatten_micro(grads)
    chex.assert_shape(gram, (k, k))
    self.assertEqual(gram.dtype, jnp.float32)
    expected = flat @ flat.T
    norms = np.sqrt(np.diag(expected))
    np.testing.assert_allclose(gram, expected, rtol=1e-5, atol=1e-6 * np.outer(norms, norms).max())
    np.testing.assert_array_equal(gram, gram.T)

  @mock.patch.dict(os.environ, {"OPTAX_GAF_NATIVE_GRAM": "0"})  # XLA's products
  @mock.patch.object(gram_lib, "_BLOCKED_MIN_BYTES", 1 << 17)
  @mock.patch.object(gram_lib, "_BLOCK_BYTES", 1 << 14)
  def test_large_leaves_under_jit_and_vmap_including_a_batch_of_one(self):
    # Every jitted function below is built here, so its trace sees the patched
    # settings (no jax.clear_caches: it crashed a CI run). Leaves of
    # >= _BLOCKED_MIN_BYTES (lowered here to keep the test small)
    # take the blocked path on CPU: 16 blocks of 1024 columns and a 256-column
    # remainder. jit(vmap(...)) over a batch of one is checked because an
    # earlier multiply-reduce path was miscompiled by XLA:CPU there.
    rng = np.random.default_rng(5)
    for batch in (1, 2):
      for k in (3, 4, 8):
        grads = {"big": rng.standard_normal((batch, k, 128, 130)).astype(np.float32),
                 "small": rng.standard_normal((batch, k, 7)).astype(np.float32)}
        gram = jax.jit(jax.vmap(optax_gaf.gram_matrix))(jax.tree.map(jnp.asarray, grads))
        for b in range(batch):
          flat = ref_lib.flatten_micro(jax.tree.map(lambda g: g[b], grads))
          expected = flat @ flat.T
          np.testing.assert_allclose(gram[b], expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())
    x = jnp.asarray(rng.standard_normal((4, 1 << 14)), jnp.float32)
    fresh = jax.jit(lambda g: optax_gaf.gram_matrix(g))
    # The blocked path is a loop over column blocks (one product has no while).
    self.assertIn("stablehlo.while", fresh.lower({"w": x}).as_text())
    self.assertNotIn("stablehlo.while", jax.jit(lambda g: optax_gaf.gram_matrix(g)).lower(
        {"w": x[:, :64]}).as_text())
    single = fresh({"w": x})
    np.testing.assert_allclose(jax.jit(jax.vmap(optax_gaf.gram_matrix))({"w": x[None]})[0],
                               single, rtol=1e-5, atol=1e-3)
    tangent = jax.jvp(optax_gaf.gram_matrix, ({"w": x},), ({"w": x},))[1]
    np.testing.assert_allclose(tangent, 2 * single, rtol=1e-5, atol=1e-3)
    # Reverse mode: d/dx_i sum_jk <x_j, x_k> = 2 sum_j x_j, also under vmap.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(optax_gaf.gram_matrix({"w": x}))))
    expected = np.broadcast_to(2 * np.sum(np.asarray(x), axis=0), x.shape)
    np.testing.assert_allclose(grad(x), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.vmap(grad)(x[None])[0], expected, rtol=1e-5, atol=1e-4)

  @mock.patch.object(gram_lib, "_BLOCKED_MIN_BYTES", 1 << 16)
  @mock.patch.object(gram_lib, "_BLOCK_BYTES", 1 << 14)
  def test_blocked_cross_products_and_bf16_blocks(self):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 5000)).astype(np.float32)
    b = rng.standard_normal((5, 5000)).astype(np.float32)
    self.assertEqual(gram_lib.block_columns(8, 5000, 4), 1024)  # 4 blocks + 904 left
    for fn in (gram_lib.leaf_products, gram_lib._blocked_products):
      c = jax.jit(fn, static_argnums=2)(jnp.asarray(a), jnp.asarray(b), jnp.dtype(jnp.float32))
      np.testing.assert_allclose(c, a.astype(np.float64) @ b.T.astype(np.float64),
                                 rtol=1e-5, atol=1e-4)
    # bf16 leaves: blocks are multiplied with float32 accumulation.
    ones = jnp.ones((4, 8192), jnp.bfloat16)
    np.testing.assert_array_equal(jax.jit(optax_gaf.gram_matrix)({"w": ones}),
                                  np.full((4, 4), 8192.0))

  def test_bf16_and_fp16_accumulate_in_float32(self):
    # 4096 ones: a bf16 running sum stalls at 256; float32 is exact.
    for dtype in (jnp.bfloat16, jnp.float16):
      grads = {"a": jnp.ones((3, 64, 64), dtype), "b": jnp.ones((3, 4), dtype)}
      gram = jax.jit(optax_gaf.gram_matrix)(grads)
      self.assertEqual(gram.dtype, jnp.float32)
      np.testing.assert_array_equal(gram, np.full((3, 3), 4100.0))
    self.assertEqual(gram_lib.accumulation_dtype(jnp.bfloat16), jnp.float32)

  def test_float64_gradients_accumulate_in_float64(self):
    with jax.enable_x64(True):
      x = np.random.default_rng(0).standard_normal((4, 7))
      gram = optax_gaf.gram_matrix({"w": jnp.asarray(x, jnp.float64)})
      self.assertEqual(gram.dtype, jnp.float64)
      np.testing.assert_allclose(gram, x @ x.T, rtol=1e-13)

  def test_mixed_dtypes_accumulate_in_the_widest(self):
    grads = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.full((2, 2), 0.5, jnp.float32)}
    gram = optax_gaf.gram_matrix(grads)
    self.assertEqual(gram.dtype, jnp.float32)
    np.testing.assert_allclose(gram, np.full((2, 2), 3.5))

  def test_cross_products(self):
    rng = np.random.default_rng(1)
    a = {"x": rng.standard_normal((3, 2, 2)), "y": rng.standard_normal((3, 5))}
    b = {"x": rng.standard_normal((4, 2, 2)), "y": rng.standard_normal((4, 5))}
    c = gram_lib.cross_products(jax.tree.map(jnp.float32, a), jax.tree.map(jnp.float32, b))
    np.testing.assert_allclose(c, ref_lib.flatten_micro(a) @ ref_lib.flatten_micro(b).T,
                               rtol=1e-5, atol=1e-5)


class NumMicrobatchesTest(chex.TestCase):

  def test_returns_k_and_checks_params(self):
    grads = {"w": jnp.ones((5, 2, 3)), "b": jnp.ones((5, 3))}
    self.assertEqual(gram_lib.num_microbatches(grads), 5)
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    self.assertEqual(gram_lib.num_microbatches(grads, params), 5)
    self.assertEqual(gram_lib.num_microbatches({"w": jnp.ones((1, 3))}, local=True), 1)

  def test_errors_name_the_leaf_and_shapes(self):
    with self.assertRaisesRegex(ValueError, "GAF needs at least 2 microbatches, got K=1"):
      gram_lib.num_microbatches({"w": jnp.ones((1, 3))})
    with self.assertRaisesRegex(ValueError, r"\['w'\] has shape \(3, 2\) but leaf \['z'\] has shape \(2, 2\)"):
      gram_lib.num_microbatches({"w": jnp.ones((3, 2)), "z": jnp.ones((2, 2))})
    with self.assertRaisesRegex(ValueError, r"leaf \[1\] is a scalar"):
      gram_lib.num_microbatches([jnp.ones((3, 2)), jnp.ones(())])
    with self.assertRaisesRegex(ValueError, r"leaf \['b'\] has shape \(3, 3\) but its parameter "
                                r"has shape \(3, 3\): expected \(3, 3, 3\)"):
      gram_lib.num_microbatches({"b": jnp.ones((3, 3)), "w": jnp.ones((3, 2))},
                                {"b": jnp.ones((3, 3)), "w": jnp.ones((2,))})
    with self.assertRaisesRegex(ValueError, "empty gradient pytree"):
      gram_lib.num_microbatches({})
    # Every leaf without the axis: named as missing, not as a disagreement on K.
    with self.assertRaisesRegex(ValueError, r"leaf \['a'\] has shape \(3, 2\) .* expected "
                                r"\(K, \*\(3, 2\)\).* axis missing"):
      gram_lib.num_microbatches({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))},
                                {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))})
    # With as many leaves, in order (paths may differ: NNX variables, NamedTuples).
    self.assertEqual(gram_lib.num_microbatches(
        (jnp.ones((3, 2)), jnp.ones((3, 4))), {"x": jnp.ones(2), "y": jnp.ones(4)}), 3)
    # Otherwise by path; params leaves without a gradient (an Equinox model's
    # integer buffers or functions) are not checked.
    params = {"w": jnp.ones(2), "idx": jnp.arange(3), "act": jax.nn.relu}
    self.assertEqual(gram_lib.num_microbatches({"w": jnp.ones((3, 2))}, params), 3)
    with self.assertRaisesRegex(ValueError, r"leaf \['w'\] has shape \(3, 5\) but its "
                                r"parameter has shape \(2,\)"):
      gram_lib.num_microbatches({"w": jnp.ones((3, 5))}, params)

  def test_public_gram_matrix_checks_its_input(self):
    with self.assertRaisesRegex(ValueError, r"\['a'\] has shape \(2, 3\) but leaf \['b'\]"):
      optax_gaf.gram_matrix({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
    with self.assertRaisesRegex(ValueError, r"leaf \['a'\] is a scalar"):
      optax_gaf.gram_matrix({"a": jnp.ones(())})
    with self.assertRaisesRegex(ValueError, "empty gradient pytree"):
      optax_gaf.gram_matrix({})
    with self.assertRaisesRegex(ValueError, r"leaf \['a'\] has dtype int32"):
      optax_gaf.gram_matrix({"a": jnp.ones((2, 3), jnp.int32)})
    # One microgradient (a per-device slice) is a valid 1 x 1 Gram matrix.
    np.testing.assert_allclose(optax_gaf.gram_matrix({"a": jnp.ones((1, 3))}), [[3.0]])
