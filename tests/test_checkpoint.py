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

  def test_statistics_of_a_checkpoint_from_before_the_packing_restore(self):
    # Before the packing, a with_gaf state serialised its GafState as nine
    # named arrays; from_statistics rebuilds the packed state from them.
    tx = optax_gaf.with_gaf(optax.adam(1e-2), 0.9, num_microbatches=K)
    params = {"p0": jnp.ones((3, 2)), "p1": jnp.zeros(5)}
    params, state, _ = _train(tx, params, tx.init(params), range(4))
    stats = {name: np.asarray(v) for name, v in state.gaf_state.as_dict().items()}
    old_layout = {"gaf_state": stats,
                  "inner_state": serialization.to_state_dict(state.inner_state)}
    restored = serialization.msgpack_restore(serialization.msgpack_serialize(old_layout))
    rebuilt = optax_gaf.WithGafState(
        gaf_state=optax_gaf.GafState.from_statistics(**restored["gaf_state"]),
        inner_state=serialization.from_state_dict(state.inner_state, restored["inner_state"]))
    chex.assert_trees_all_equal(rebuilt, state)
    _, cont, cont_hist = _train(tx, params, state, range(4, 8))
    _, res, res_hist = _train(tx, params, rebuilt, range(4, 8))
    chex.assert_trees_all_equal(res_hist, cont_hist, strict=True)
    chex.assert_trees_all_equal(res, cont)
    with self.assertRaisesRegex(ValueError, r"missing \['tau'\]"):
      optax_gaf.GafState.from_statistics(
          **{k: v for k, v in restored["gaf_state"].items() if k != "tau"})
