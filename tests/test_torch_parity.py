"""optax_gaf matches the authors' PyTorch ``step_GAF`` (combine="pairwise").

Skipped unless the optional packages of benchmarks/requirements-torch.txt are
installed (``torch`` and ``gradient-agreement-filtering``). Same MLP weights,
same microbatches, SGD with momentum; a few steps of both must give the same
parameters, including steps where some microgradients are rejected and steps
that are skipped.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gaf_torch = pytest.importorskip("gradient_agreement_filtering")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_gaf  # noqa: E402

SIZES = (12, 16, 5)
K = 4
MICROBATCH = 6
LR = 0.1
MOMENTUM = 0.9


def _torch_model(seed):
  torch.manual_seed(seed)
  return torch.nn.Sequential(
      torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.ReLU(), torch.nn.Linear(SIZES[1], SIZES[2]))


def _params_of(model):
  return [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
          for m in model if isinstance(m, torch.nn.Linear)]


def _loss(params, batch):
  (w1, b1), (w2, b2) = params
  h = jax.nn.relu(batch["x"] @ w1.T + b1)
  logits = h @ w2.T + b2
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))


@functools.lru_cache(maxsize=None)
def _run_both(tau, num_steps, seed=0):
  """Returns (jax params, torch params, torch agreed counts, jax GafStates)."""
  model = _torch_model(seed)
  params = _params_of(model)
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  criterion = torch.nn.CrossEntropyLoss()
  opt = optax_gaf.with_gaf(optax.sgd(LR, momentum=MOMENTUM), tau, combine="pairwise",
                           num_microbatches=K)
  grad_fn = optax_gaf.microbatch_grads(_loss, K)

  @jax.jit
  def step(params, state, batch):
    updates, state = opt.update(grad_fn(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  rng = np.random.default_rng(seed + 1)
  agreed, gaf_states = [], []
  for _ in range(num_steps):
    x = rng.normal(size=(K * MICROBATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=K * MICROBATCH)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    mbs = [torch.utils.data.TensorDataset(xt[i * MICROBATCH:(i + 1) * MICROBATCH],
                                          yt[i * MICROBATCH:(i + 1) * MICROBATCH])
           for i in range(K)]
    result = gaf_torch.step_GAF(model, optimizer, criterion, mbs, wandb=False, verbose=False,
                                cos_distance_thresh=tau)
    agreed.append(result["agreed_count"])
    params, state = step(params, state, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    gaf_states.append(state.gaf_state)
  return params, _params_of(model), agreed, gaf_states


def _assert_same_params(jax_params, torch_params):
  for (wj, bj), (wt, bt) in zip(jax_params, torch_params):
    np.testing.assert_allclose(np.asarray(wj), np.asarray(wt), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bj), np.asarray(bt), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.9])
def test_same_parameters_as_step_gaf(tau):
  jax_params, torch_params, agreed, states = _run_both(tau, num_steps=4)
  _assert_same_params(jax_params, torch_params)
  # Same decisions: the authors count accepted microgradients without the
  # reference; num_accepted counts the reference too (0 on a skip).
  assert [int(s.num_accepted) for s in states] == [a + 1 if a else 0 for a in agreed]
  # The parameters moved (the comparison is not trivially between two copies).
  start = _params_of(_torch_model(0))
  assert max(float(jnp.max(jnp.abs(a - b)))
             for pa, pb in zip(jax_params, start) for a, b in zip(pa, pb)) > 1e-3


def test_mixed_acceptance_is_exercised():
  """At tau=1 and 0.9 some steps reject a microgradient but still update."""
  agreed = _run_both(1.0, num_steps=4)[2] + _run_both(0.9, num_steps=4)[2]
  assert any(0 < a < K - 1 for a in agreed), agreed


def test_skip_leaves_parameters_like_step_gaf():
  jax_params, torch_params, agreed, states = _run_both(0.0, num_steps=2)
  assert agreed == [0, 0]
  assert all(bool(s.skipped) for s in states)
  _assert_same_params(jax_params, torch_params)
  _assert_same_params(jax_params, _params_of(_torch_model(0)))
