"""Conformance checks in the spirit of optax/contrib/_common_test.py.

Every transformation (``gaf`` in a chain, ``with_gaf``) must take unknown
extra args without recompiling, converge under ``lax.scan``, match itself
under ``inject_hyperparams``, keep bf16/f32 dtypes, and keep its state dtypes
stable under ``lax.cond``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optax_gaf

K = 4
TARGET = jnp.array([1.0, -2.0, 0.5])


def _optimizers(k=K):
  return {
      "gaf_chain_sgd": optax.chain(optax_gaf.gaf(0.97, num_microbatches=k), optax.sgd(0.1)),
      "with_gaf_adam": optax_gaf.with_gaf(optax.adam(0.1), 0.97, num_microbatches=k),
      "with_gaf_momentum_pairwise": optax_gaf.with_gaf(
          optax.sgd(0.05, momentum=0.9), 1.2, combine="pairwise", num_microbatches=k),
  }


def _loss(params, batch):
  return jnp.mean(jnp.sum((params["w"] - batch) ** 2, axis=-1))


def _micrograds(params, key, dtype=jnp.float32):
  """K noisy microbatches around TARGET; gradients [K, 3] in ``dtype``."""
  batch = TARGET + 0.3 * jax.random.normal(key, (K * 8, 3))
  grads = optax_gaf.microbatch_grads(_loss, K)(params, batch.astype(dtype))
  return jax.tree.map(lambda g: g.astype(dtype), grads)


class ConformanceTest(chex.TestCase):

  def test_unknown_extra_args_do_not_recompile(self):
    for name, tx in _optimizers().items():
      with self.subTest(name):
        params = {"w": jnp.zeros(3)}
        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(grads, state, extra):
          return tx.update(grads, state, params, some_unknown_arg=extra, another=extra * 2)

        state = tx.init(params)
        for i in range(3):
          _, state = step(_micrograds(params, jax.random.PRNGKey(i)), state, jnp.float32(i))
        gaf_state = state.gaf_state if isinstance(state, optax_gaf.WithGafState) else state[0]
        self.assertEqual(int(gaf_state.count), 3)

  def test_converges_under_lax_scan(self):
    for name, tx in _optimizers().items():
      with self.subTest(name):
        params = {"w": jnp.zeros(3)}

        def body(carry, key):
          params, state = carry
          updates, state = tx.update(_micrograds(params, key), state, params)
          return (optax.apply_updates(params, updates), state), None

        @jax.jit
        def run(params):
          keys = jax.random.split(jax.random.PRNGKey(0), 200)
          return lax.scan(body, (params, tx.init(params)), keys)[0]

        params, state = run(params)
        np.testing.assert_allclose(params["w"], TARGET, atol=0.1)
        gaf_state = state.gaf_state if isinstance(state, optax_gaf.WithGafState) else state[0]
        self.assertEqual(int(gaf_state.count), 200)

  def test_state_dtypes_stable_under_lax_cond(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      for name, tx in _optimizers().items():
        with self.subTest(f"{name}-{jnp.dtype(dtype).name}"):
          params = {"w": jnp.zeros(3, dtype)}
          state = tx.init(params)
          grads = _micrograds(params, jax.random.PRNGKey(0), dtype)

          @jax.jit
          def maybe_update(pred, state):
            return lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

          new_state = maybe_update(True, state)
          chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
          chex.assert_trees_all_equal(maybe_update(False, state), state)

  def test_keeps_bf16_and_f32_update_dtypes(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      for name, tx in _optimizers().items():
        with self.subTest(f"{name}-{jnp.dtype(dtype).name}"):
          params = {"w": jnp.zeros(3, dtype)}
          updates, _ = jax.jit(tx.update)(
              _micrograds(params, jax.random.PRNGKey(1), dtype), tx.init(params), params)
          chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)

  def test_inject_hyperparams_matches_plain(self):
    params = {"w": jnp.zeros(3)}
    pairs = {
        "gaf": (optax_gaf.gaf(0.9, combine="pairwise", num_microbatches=K),
                optax.inject_hyperparams(optax_gaf.gaf, static_args=("combine",))(
                    0.9, combine="pairwise", num_microbatches=K)),
        "with_gaf": (optax_gaf.with_gaf(optax.adam(0.1), 0.9, num_microbatches=K),
                     optax.inject_hyperparams(optax_gaf.with_gaf)(
                         optax.adam(0.1), tau=0.9, num_microbatches=K)),
    }
    for name, (plain, injected) in pairs.items():
      with self.subTest(name):
        p_plain, p_inj = params, params
        s_plain, s_inj = plain.init(params), injected.init(params)
        step_plain, step_inj = jax.jit(plain.update), jax.jit(injected.update)
        for i in range(5):
          key = jax.random.PRNGKey(i)
          u_plain, s_plain = step_plain(_micrograds(p_plain, key), s_plain, p_plain)
          u_inj, s_inj = step_inj(_micrograds(p_inj, key), s_inj, p_inj)
          chex.assert_trees_all_close(u_plain, u_inj, rtol=1e-6, atol=1e-7)
          p_plain = optax.apply_updates(p_plain, u_plain)
          p_inj = optax.apply_updates(p_inj, u_inj)
        chex.assert_trees_all_close(s_plain, s_inj.inner_state, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s_inj.hyperparams["tau"], 0.9)

  def test_inject_hyperparams_tau_schedule(self):
    schedule = optax.linear_schedule(2.0, 0.0, transition_steps=4)
    tx = optax.inject_hyperparams(optax_gaf.gaf)(tau=schedule, num_microbatches=K)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    taus = []
    for i in range(5):
      _, state = jax.jit(tx.update)(_micrograds(params, jax.random.PRNGKey(i)), state, params)
      taus.append(float(state.inner_state.tau))
    np.testing.assert_allclose(taus, [2.0, 1.5, 1.0, 0.5, 0.0], atol=1e-6)
