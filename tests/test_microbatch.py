"""``microbatch_grads`` and ``split_batch`` (microbatch.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import optax_gaf
from optax_gaf._src import microbatch as microbatch_lib


def _loss(params, batch, scale=1.0):
  pred = batch["x"] @ params["w"] + params["b"]
  return scale * jnp.mean((pred - batch["y"]) ** 2)


def _setup(b=12, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((2,)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.standard_normal((b, 3)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal((b, 2)), jnp.float32)}
  return params, batch


class MicrobatchGradsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_a_loop_of_grads_over_contiguous_microbatches(self):
    params, batch = _setup()
    for k in (3, 4):
      grads = self.variant(optax_gaf.microbatch_grads(_loss, k))(params, batch)
      chex.assert_tree_shape_prefix(grads, (k,))
      m = 12 // k
      for i in range(k):
        micro = jax.tree.map(lambda x: x[i * m:(i + 1) * m], batch)
        chex.assert_trees_all_close(jax.tree.map(lambda g: g[i], grads),
                                    jax.grad(_loss)(params, micro), rtol=1e-5, atol=1e-6)

  def test_has_aux_and_shared_extra_args(self):
    params, batch = _setup()

    def loss_aux(p, b, scale):
      value = _loss(p, b, scale)
      return value, {"loss": value}

    grads, aux = optax_gaf.microbatch_grads(loss_aux, 3, has_aux=True)(params, batch, 2.0)
    chex.assert_shape(aux["loss"], (3,))
    plain = optax_gaf.microbatch_grads(_loss, 3)(params, batch)
    chex.assert_trees_all_close(grads, jax.tree.map(lambda g: 2.0 * g, plain), rtol=1e-6)
    first = jax.tree.map(lambda x: x[:4], batch)
    np.testing.assert_allclose(aux["loss"][0], _loss(params, first, 2.0), rtol=1e-6)

  def test_feeds_gaf_directly(self):
    params, batch = _setup()
    grads = optax_gaf.microbatch_grads(_loss, 4)(params, batch)
    tx = optax_gaf.gaf(2.0, num_microbatches=4)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_close(updates, jax.grad(_loss)(params, batch), rtol=1e-5, atol=1e-6)

  def test_indivisible_batch_names_sizes(self):
    params, batch = _setup(b=10)
    with self.assertRaisesRegex(
        ValueError, "batch size 10 is not divisible by num_microbatches=4"):
      optax_gaf.microbatch_grads(_loss, 4)(params, batch)

  def test_bad_num_microbatches(self):
    for bad in (1, 0):
      with self.assertRaisesRegex(ValueError, "at least 2 microbatches; `num_microbatches` is"):
        optax_gaf.microbatch_grads(_loss, bad)
    for bad in (2.0, None, "4"):
      with self.assertRaisesRegex(ValueError, "`num_microbatches` must be an int >= 2"):
        optax_gaf.microbatch_grads(_loss, bad)

  def test_split_batch_errors_name_the_leaf(self):
    with self.assertRaisesRegex(ValueError, r"\['x'\] has 4 rows, \['y'\] has 6"):
      microbatch_lib.split_batch({"x": jnp.ones((4, 2)), "y": jnp.ones((6,))}, 2)
    with self.assertRaisesRegex(ValueError, r"Batch leaf \['t'\] is a scalar"):
      microbatch_lib.split_batch({"s": jnp.ones((4,)), "t": jnp.ones(())}, 2)
    with self.assertRaisesRegex(ValueError, "empty batch"):
      microbatch_lib.split_batch({}, 2)
    out = microbatch_lib.split_batch({"x": jnp.arange(12).reshape(6, 2)}, 3)
    np.testing.assert_array_equal(out["x"][1], [[4, 5], [6, 7]])
