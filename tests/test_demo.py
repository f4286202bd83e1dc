"""The offline label-noise demo (optax_gaf.demo) and its experiment code."""

import json
import socket

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from optax_gaf import demo  # noqa: E402
from optax_gaf._src import experiment as ex  # noqa: E402

METRICS = ("final_test_acc", "best_test_acc", "final_train_acc_noisy", "skip_fraction",
           "mean_cosine_distance")
FAST = ["--steps", "8", "--eval-every", "4", "--microbatch-size", "8"]


@pytest.fixture
def no_network(monkeypatch):
  """Fails the test if anything opens a network connection."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def test_demo_writes_summary_with_schema(tmp_path, no_network, capsys):
  out = tmp_path / "out"
  assert demo.main(FAST + ["--noise", "0.4", "--tau", "0.9", "--out", str(out)]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary) == {"config", "methods"}
  assert summary["config"]["noise"] == 0.4 and summary["config"]["tau"] == 0.9
  assert summary["config"]["dataset"] == "digits" and summary["config"]["steps"] == 8
  methods = summary["methods"]
  assert {"averaging", "gaf"} <= set(methods)
  for name, stats in methods.items():
    for key in METRICS:
      assert isinstance(stats[key], float), (name, key)
      assert np.isfinite(stats[key]), (name, key)
    assert 0.0 <= stats["final_test_acc"] <= stats["best_test_acc"] <= 1.0
    assert 0.0 <= stats["skip_fraction"] <= 1.0
    assert 0.0 <= stats["mean_cosine_distance"] <= 2.0
  assert methods["averaging"]["skip_fraction"] == 0.0
  # The controls skip exactly as many steps as GAF did.
  n_gaf = methods["gaf"]["num_updates"]
  assert methods["random_skip"]["num_updates"] == n_gaf
  assert methods["averaging_at_gaf_updates"]["num_updates"] == n_gaf
  assert (out / "label_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "GAF" in printed and "averaging" in printed and "final test" in printed


def test_demo_mnist1d_generates_data_offline(tmp_path, no_network):
  out = tmp_path / "m1d"
  demo.main(["--dataset", "mnist1d", "--model", "mlp", "--no-controls", "--out", str(out)] + FAST)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["config"]["model"] == "mlp"
  assert summary["config"]["num_train"] == 4000 and summary["config"]["num_test"] == 1000
  assert set(summary["methods"]) == {"averaging", "gaf"}


@pytest.mark.parametrize("flags", [
    ["--noise", "1.0"], ["--noise", "-0.1"], ["--noise", "nan"], ["--tau", "2.5"],
    ["--tau", "-0.01"], ["--microbatch-size", "0"], ["--num-microbatches", "1"],
    ["--dataset", "cifar10"], ["--optimizer", "lbfgs"], ["--combine", "max"],
    ["--lr", "0"], ["--steps", "0"], ["--noise", "abc"],
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, flags, capsys):
  out = tmp_path / "never"
  with pytest.raises(SystemExit) as err:
    demo.main(flags + ["--out", str(out)])
  assert err.value.code == 2
  assert "error" in capsys.readouterr().err
  assert not out.exists()
  assert list(tmp_path.iterdir()) == []


def test_label_noise_only_changes_the_requested_fraction():
  y = np.arange(20000, dtype=np.int32) % 10
  noisy = ex.add_label_noise(y, 0.4, 10, seed=3)
  flipped = noisy != y
  assert abs(flipped.mean() - 0.4) < 0.015
  # Symmetric: a flipped label goes to every other class about equally often.
  offsets = ((noisy - y) % 10)[flipped]
  counts = np.bincount(offsets, minlength=10)
  assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()
  pair = ex.add_label_noise(y, 0.3, 10, seed=3, kind="pairflip")
  assert np.all((pair == y) | (pair == (y + 1) % 10))
  np.testing.assert_array_equal(ex.add_label_noise(y, 0.0, 10, seed=3), y)


def test_data_order_is_a_permutation_per_epoch():
  order = ex.data_order(seed=0, num_train=50, batch_size=8, steps=12)
  assert order.shape == (12, 8)
  first_epoch = order[:6].ravel()
  assert len(set(first_epoch.tolist())) == 48  # 6 batches, no repeats, 2 dropped
  np.testing.assert_array_equal(order, ex.data_order(0, 50, 8, 12))


def _tiny_setup(seeds=(0,), steps=8, k=2, m=8):
  # Same shapes and optimizer as FAST, so the jitted steps are shared with the demo test.
  data = ex.load_data("digits")
  y_noisy = np.stack([ex.add_label_noise(data.y_train, 0.4, 10, s) for s in seeds])
  order = np.stack([ex.data_order(s, data.x_train.shape[0], k * m, steps) for s in seeds])
  graphdef, params = ex.init_replicas("mlp", data, list(seeds))
  return data, y_noisy, order, graphdef, params


def test_gaf_accepting_everything_is_averaging_on_the_same_microbatches():
  # tau = 2 accepts every microgradient and the running-mean fold is the plain
  # mean, so GAF must reproduce averaging step for step: this pins that both
  # methods see the same data order and the same microbatches.
  data, y_noisy, order, graphdef, params = _tiny_setup()
  kw = dict(num_microbatches=2, eval_every=4, optimizer="sgd", lr=0.01)
  avg = ex.train(data, y_noisy, order, graphdef, params, method="averaging", **kw)
  gaf = ex.train(data, y_noisy, order, graphdef, params, method="gaf", tau=2.0,
                 combine="pairwise", **kw)
  np.testing.assert_allclose(gaf.test_acc, avg.test_acc, atol=1e-6)
  np.testing.assert_allclose(gaf.train_acc_noisy, avg.train_acc_noisy, atol=1e-6)
  np.testing.assert_allclose(gaf.distance, avg.distance, atol=1e-4)
  assert not gaf.skipped.any()


def test_masked_averaging_and_gaf_skips_freeze_the_model():
  data, y_noisy, order, graphdef, params = _tiny_setup()
  kw = dict(num_microbatches=2, eval_every=4, optimizer="sgd", lr=0.01)
  none = np.zeros(order.shape[:2], bool)
  frozen = ex.train(data, y_noisy, order, graphdef, params, method="averaging", mask=none, **kw)
  assert frozen.skipped.all()
  assert np.all(frozen.test_acc == frozen.test_acc[:, :1])
  # tau = 0 rejects every non-identical microgradient: GAF skips every step.
  gaf = ex.train(data, y_noisy, order, graphdef, params, method="gaf", tau=0.0, **kw)
  assert gaf.skipped.all()
  np.testing.assert_array_equal(gaf.test_acc, frozen.test_acc)
  s = ex.summarize(gaf)
  np.testing.assert_array_equal(s["num_updates"], [0])
  np.testing.assert_array_equal(s["skip_fraction"], [1.0])


def test_control_masks_match_gaf_skip_counts():
  skipped = np.random.default_rng(0).random((3, 40)) < 0.7
  rand = ex.random_skip_mask(skipped, seed=1)
  trunc = ex.truncation_mask(skipped)
  np.testing.assert_array_equal(rand.sum(1), (~skipped).sum(1))
  np.testing.assert_array_equal(trunc.sum(1), (~skipped).sum(1))
  for row in trunc:
    n = row.sum()
    assert row[:n].all() and not row[n:].any()


def test_reported_cosine_distance_matches_numpy():
  # The distance logged inside the vmapped, scanned training step must be the
  # plain float64 cosine distance of the two microgradients of that step.
  import jax
  import optax
  from flax import nnx
  import optax_gaf
  data, y_noisy, order, graphdef, params = _tiny_setup()
  curves = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                    num_microbatches=2, eval_every=4, optimizer="sgd", lr=0.01)
  p0 = jax.tree.map(lambda a: a[0], params)

  def loss_fn(p, b):
    logits = nnx.merge(graphdef, p)(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

  idx = order[0, 0]
  grads = optax_gaf.microbatch_grads(loss_fn, 2)(p0, {"x": data.x_train[idx], "y": y_noisy[0, idx]})
  flat = np.concatenate([np.asarray(g, np.float64).reshape(2, -1) for g in jax.tree.leaves(grads)], 1)
  cos = flat[0] @ flat[1] / np.linalg.norm(flat[0]) / np.linalg.norm(flat[1])
  np.testing.assert_allclose(
      curves.distance[0, 0], 1 - cos, atol=1e-4,
      err_msg="gram_matrix under jit(vmap(scan(...))) disagrees with float64 NumPy")


def test_random_subset_weights_match_gaf_counts_and_skips():
  num_used = np.array([[4, 0, 2, 3], [2, 2, 0, 4]])
  w = ex.random_subset_weights(num_used, k=4, seed=1)
  assert w.shape == (2, 4, 4) and w.dtype == np.float32
  np.testing.assert_array_equal((w > 0).sum(-1), num_used)
  np.testing.assert_allclose(w.sum(-1), (num_used >= 2).astype(np.float32), rtol=1e-6)
  # Over many steps each microgradient is picked equally often.
  many = ex.random_subset_weights(np.full((1, 4000), 2), k=4, seed=0)
  np.testing.assert_allclose((many[0] > 0).mean(0), 0.5, atol=0.03)
  with pytest.raises(ValueError, match="num_used"):
    ex.random_subset_weights(np.array([[5]]), k=4, seed=0)


def test_weighted_averaging_uniform_equals_mean_and_follows_gaf_steps():
  k = 4
  data, y_noisy, order, graphdef, params = _tiny_setup(k=k, m=4)
  kw = dict(num_microbatches=k, eval_every=4, optimizer="sgd", lr=0.01)
  avg = ex.train(data, y_noisy, order, graphdef, params, method="averaging", **kw)
  uniform = np.full((*order.shape[:2], k), 1 / k, np.float32)
  weighted = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                      weights=uniform, **kw)
  np.testing.assert_allclose(weighted.test_acc, avg.test_acc, atol=1e-6)
  np.testing.assert_array_equal(avg.num_used, k)
  gaf = ex.train(data, y_noisy, order, graphdef, params, method="gaf", tau=0.95,
                 combine="mean", **kw)
  subset = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                    weights=ex.random_subset_weights(gaf.num_used, k, seed=0), **kw)
  np.testing.assert_array_equal(subset.skipped, gaf.skipped)
  np.testing.assert_array_equal(subset.num_used, gaf.num_used)
  assert set(np.unique(gaf.num_used)) <= {0, 2, 3, 4}
  with pytest.raises(ValueError, match="weights"):
    ex.train(data, y_noisy, order, graphdef, params, method="averaging",
             weights=uniform[:, :, :2], **kw)


def test_weighted_averaging_of_two_of_four_microbatches_equals_k2_on_them():
  # Microbatches are contiguous slices of each step's batch, so weights
  # (1/2, 1/2, 0, 0) at K = 4 must train exactly like K = 2 averaging on the
  # first half of every batch: pins that the weights select and scale.
  k, m = 4, 4
  data, y_noisy, order, graphdef, params = _tiny_setup(k=k, m=m)
  kw = dict(eval_every=4, optimizer="sgd", lr=0.05)
  w = np.zeros((*order.shape[:2], k), np.float32)
  w[..., :2] = 0.5
  weighted = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                      num_microbatches=k, weights=w, **kw)
  half = ex.train(data, y_noisy, order[:, :, :2 * m], graphdef, params, method="averaging",
                  num_microbatches=2, **kw)
  np.testing.assert_allclose(weighted.train_acc_noisy, half.train_acc_noisy, atol=1e-6)
  np.testing.assert_allclose(weighted.test_acc, half.test_acc, atol=1e-6)
  full = ex.train(data, y_noisy, order, graphdef, params, method="averaging",
                  num_microbatches=k, **kw)
  assert not np.allclose(full.train_acc_noisy, half.train_acc_noisy)  # the test can fail
