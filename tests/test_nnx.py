"""Flax NNX: ``nnx.Optimizer(model, with_gaf(...), wrt=nnx.Param)`` trains a model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

import optax_gaf  # noqa: E402

K = 4


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.hidden(x)))


def _loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


@nnx.jit
def _train_step(model, optimizer, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def pure_loss(p, b):
    return _loss(nnx.merge(graphdef, p, rest), b)

  grads = optax_gaf.microbatch_grads(pure_loss, K)(params, batch)   # leaves [K, ...]
  optimizer.update(model, grads)
  return _loss(model, batch)


def _batch():
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
  return {"x": x, "y": jnp.sin(jnp.sum(x, axis=1, keepdims=True))}


def _as_array(x):
  return jnp.asarray(x[...] if isinstance(x, nnx.Variable) else x)


class NnxTest(chex.TestCase):

  def test_with_gaf_nnx_optimizer_decreases_the_loss(self):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax_gaf.with_gaf(optax.adam(1e-2), tau=1.0, num_microbatches=K),
        wrt=nnx.Param)
    batch = _batch()
    start = float(_loss(model, batch))
    for _ in range(25):
      loss = float(_train_step(model, optimizer, batch))
    self.assertLess(loss, 0.5 * start)
    gaf_state = optimizer.opt_state.gaf_state
    self.assertEqual(int(_as_array(gaf_state.count)), 25)
    self.assertGreaterEqual(int(_as_array(gaf_state.num_accepted)), 2)
    self.assertLess(int(_as_array(gaf_state.num_skipped)), 25)

  def test_skipped_step_leaves_model_and_adam_state_unchanged(self):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax_gaf.with_gaf(optax.adam(1e-2), tau=0.0, num_microbatches=K),
        wrt=nnx.Param)
    batch = _batch()
    _train_step(model, optimizer, batch)   # sets up the jit cache
    params = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    inner = jax.tree.map(np.array, nnx.state(optimizer.opt_state.inner_state))
    _train_step(model, optimizer, batch)   # tau = 0: random microgradients never agree
    self.assertTrue(bool(_as_array(optimizer.opt_state.gaf_state.skipped)))
    self.assertEqual(int(_as_array(optimizer.opt_state.gaf_state.num_skipped)), 2)
    chex.assert_trees_all_equal(jax.tree.map(np.array, nnx.state(model, nnx.Param)), params)
    chex.assert_trees_all_equal(
        jax.tree.map(np.array, nnx.state(optimizer.opt_state.inner_state)), inner)
