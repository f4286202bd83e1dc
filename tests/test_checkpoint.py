"""States of ``gaf`` and ``with_gaf`` round-trip through flax.serialization (msgpack)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import optax_gaf
from tests import reference as ref_lib

K = 4


def _grads(t):
  rng = np.random.default_rng(t)
  grads = ref_lib.correlated_micrograds(rng, K, [(3, 2), (5,)], rho=0.6)
  if t % 4 == 3:  # a skipped step and a dropped microgradient now and then
    grads = {name: np.stack([g[0], -g[0], -g[0], np.full_like(g[0], np.nan)])
             for name, g in grads.items()}
  return jax.tree.map(jnp.asarray, grads)


def _make_optimizers():
  return {
      "gaf_chain_adamw": optax.chain(optax_gaf.gaf(0.9, num_microbatches=K),
                                     optax.adamw(1e-2, weight_decay=0.1)),
      "with_gaf_adam": optax_gaf.with_gaf(optax.adam(1e-2), 0.9, num_microbatches=K),
      "with_gaf_momentum_pairwise": optax_gaf.with_gaf(
          optax.sgd(0.05, momentum=0.9), optax.linear_schedule(1.2, 0.8, 10),
          combine="pairwise", num_microbatches=K),
  }


def _train(tx, params, state, steps):
  step = jax.jit(tx.update)
  history = []
  for t in steps:
    updates, state = step(_grads(t), state, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return params, state, history


class CheckpointTest(chex.TestCase):

  def test_msgpack_round_trip_and_bit_identical_resume(self):
    for name, tx in _make_optimizers().items():
      with self.subTest(name):
        params = {"p0": jnp.ones((3, 2)), "p1": jnp.zeros(5)}
        params, state, _ = _train(tx, params, tx.init(params), range(4))
        gaf_state = state.gaf_state if isinstance(state, optax_gaf.WithGafState) else state[0]
        self.assertEqual(int(gaf_state.num_skipped), 1)
        self.assertEqual(int(gaf_state.num_dropped), 1)

        blob = serialization.to_bytes(state)
        fresh = tx.init(jax.tree.map(jnp.zeros_like, params))
        restored = serialization.from_bytes(fresh, blob)
        chex.assert_trees_all_equal(restored, state, strict=True)
        self.assertIs(type(restored), type(state))

        p_blob = serialization.to_bytes(params)
        p_restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, params), p_blob)
        cont_params, cont_state, cont_hist = _train(tx, params, state, range(4, 9))
        res_params, res_state, res_hist = _train(tx, p_restored, restored, range(4, 9))
        chex.assert_trees_all_equal(res_hist, cont_hist, strict=True)
        chex.assert_trees_all_equal(res_params, cont_params, strict=True)
        chex.assert_trees_all_equal(res_state, cont_state, strict=True)

  def test_state_is_a_pytree_of_arrays(self):
    tx = optax_gaf.with_gaf(optax.adam(1e-3), num_microbatches=K)
    state = tx.init({"w": jnp.zeros(3)})
    for leaf in jax.tree.leaves(state):
      self.assertIsInstance(leaf, jax.Array)
    state_dict = serialization.to_state_dict(state)
    self.assertEqual(
        sorted(state_dict["gaf_state"]),
        sorted(optax_gaf.GafState._fields))
