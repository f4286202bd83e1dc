"""The label-noise experiment: data, label noise, Flax NNX models, jitted training.

Shared by the demo (``python -m optax_gaf.demo``), the sweep
(``benchmarks/label_noise.py``) and the notebooks. Everything runs offline:
scikit-learn's ``load_digits`` ships with the package and MNIST-1D is generated
locally by ``mnist1d.data.make_dataset`` (never its download path).

Training is pure: the NNX model is split once into a graph definition and a
parameter pytree, and a chunk of steps runs as one ``lax.scan`` vmapped over
R replicas (seeds, noise levels, thresholds). Every replica sees its own
fixed data order; the methods given the same order see the same microbatches.
Methods:

- ``"gaf"``: ``optax_gaf.with_gaf(optimizer, tau, combine=...)``.
- ``"averaging"``: the same optimizer on the mean of the same K microgradients,
  optionally with a per-step update mask (a masked step leaves parameters and
  optimizer state untouched, exactly like a GAF skip). The controls are masks:
  random skipping at GAF's skip count, and stopping after GAF's update count.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gaf
from optax_gaf._src import combine as combine_lib

DATASETS: tuple[str, ...] = ("digits", "mnist1d")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
MODELS: tuple[str, ...] = ("mlp", "cnn")
NOISE_KINDS: tuple[str, ...] = ("symmetric", "pairflip")


class Data(NamedTuple):
  """A classification data set with clean labels.

  Attributes:
    x_train: ``[N, D]`` float32 features, standardized.
    y_train: ``[N]`` int32 clean training labels.
    x_test: ``[M, D]`` float32 features.
    y_test: ``[M]`` int32 clean test labels.
    num_classes: number of classes.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def load_digits_data(test_size: int = 497, seed: int = 0) -> Data:
  """scikit-learn's 8x8 digits: 1300 train / 497 test, standardized by train statistics."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  x, y = load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=test_size, random_state=seed, stratify=y)
  mean, std = x_tr.mean(0), x_tr.std(0)
  std = np.where(std > 0, std, 1.0)
  f = lambda a: ((a - mean) / std).astype(np.float32)
  return Data(f(x_tr), y_tr.astype(np.int32), f(x_te), y_te.astype(np.int32), 10)


def load_mnist1d_data() -> Data:
  """MNIST-1D generated locally (4000 train / 1000 test, 40 features, 10 classes).

  Uses ``make_dataset(get_dataset_args())``, never the download path. The
  generator seeds NumPy's global RNG; its previous state is restored.
  """
  from mnist1d.data import get_dataset_args, make_dataset
  saved = np.random.get_state()
  try:
    d = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(saved)
  f = lambda a: np.asarray(a, np.float32)
  i = lambda a: np.asarray(a, np.int32)
  return Data(f(d["x"]), i(d["y"]), f(d["x_test"]), i(d["y_test"]), 10)


def load_data(name: str) -> Data:
  """Loads ``"digits"`` or ``"mnist1d"`` (both offline)."""
  if name == "digits":
    return load_digits_data()
  if name == "mnist1d":
    return load_mnist1d_data()
  raise ValueError(f"`dataset` must be one of {DATASETS}, got {name!r}")


def add_label_noise(
    labels: np.ndarray, noise: float, num_classes: int, seed: int,
    kind: str = "symmetric",
) -> np.ndarray:
  """Corrupts each label with probability ``noise``.

  ``"symmetric"`` replaces it by a uniformly drawn *other* class;
  ``"pairflip"`` by the next class, ``(y + 1) mod C`` (class-dependent noise).

  Args:
    labels: ``[N]`` int clean labels.
    noise: corruption probability in [0, 1).
    num_classes: C.
    seed: seed of the corruption (NumPy ``default_rng``).
    kind: ``"symmetric"`` or ``"pairflip"``.

  Returns:
    ``[N]`` int32 noisy labels.

  Examples:
    >>> import numpy as np
    >>> y = np.zeros(10000, np.int32)
    >>> noisy = add_label_noise(y, 0.4, 10, seed=0)
    >>> round(float(np.mean(noisy != y)), 2)
    0.4
  """
  if not 0.0 <= noise < 1.0:
    raise ValueError(f"`noise` must be in [0, 1), got {noise}")
  if kind not in NOISE_KINDS:
    raise ValueError(f"`kind` must be one of {NOISE_KINDS}, got {kind!r}")
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels, np.int32)
  flip = rng.random(labels.shape) < noise
  if kind == "symmetric":
    other = (labels + rng.integers(1, num_classes, labels.shape)) % num_classes
  else:
    other = (labels + 1) % num_classes
  return np.where(flip, other, labels).astype(np.int32)


def make_model(kind: str, in_dim: int, num_classes: int, seed: int):
  """A Flax NNX classifier: ``"mlp"`` (in-256-128-C) or ``"cnn"`` (MNIST-1D's 1-D CNN)."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(in_dim, 256, rngs=rngs)
      self.l2 = nnx.Linear(256, 128, rngs=rngs)
      self.l3 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x):
      return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

  class CNN(nnx.Module):
    """Three strided 1-D convolutions (25 channels) and a linear head."""

    def __init__(self, rngs):
      conv = lambda i, o, k: nnx.Conv(i, o, kernel_size=(k,), strides=(2,),
                                      padding=((1, 1),), rngs=rngs)
      self.c1, self.c2, self.c3 = conv(1, 25, 5), conv(25, 25, 3), conv(25, 25, 3)
      length = in_dim
      for k in (5, 3, 3):
        length = (length + 2 - k) // 2 + 1
      self.head = nnx.Linear(25 * length, num_classes, rngs=rngs)

    def __call__(self, x):
      h = x[..., None]
      for c in (self.c1, self.c2, self.c3):
        h = jax.nn.relu(c(h))
      return self.head(h.reshape(*h.shape[:-2], -1))

  if kind not in MODELS:
    raise ValueError(f"`model` must be one of {MODELS}, got {kind!r}")
  rngs = nnx.Rngs(seed)
  return MLP(rngs) if kind == "mlp" else CNN(rngs)


def init_replicas(kind: str, data: Data, seeds: Sequence[int]) -> tuple[Any, Any]:
  """``(graphdef, params)`` with params stacked over the seeds on a leading axis R."""
  from flax import nnx
  key = (kind, data.x_train.shape[1], data.num_classes)
  states = []
  for s in seeds:
    graphdef, state = nnx.split(make_model(*key, int(s)))
    states.append(state)
  # One graph definition per architecture, so jitted steps are reused (cached).
  graphdef = _GRAPHDEFS.setdefault(key, graphdef)
  return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


_GRAPHDEFS: dict[tuple, Any] = {}


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
  """``"sgd"`` (momentum 0.9, Nesterov), ``"adam"`` or ``"adamw"`` (weight decay 1e-4)."""
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9, nesterov=True)
  if name == "adam":
    return optax.adam(lr)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=1e-4)
  raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {name!r}")


def data_order(seed: int, num_train: int, batch_size: int, steps: int) -> np.ndarray:
  """``[steps, batch_size]`` int32 indices: a fresh permutation each epoch, remainder dropped."""
  per_epoch = num_train // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch size {batch_size} exceeds the {num_train} training examples")
  rng = np.random.default_rng(seed)
  epochs = -(-steps // per_epoch)
  order = [rng.permutation(num_train)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
           for _ in range(epochs)]
  return np.concatenate(order)[:steps].astype(np.int32)


def compared_distance(distances: jax.Array, finite: jax.Array) -> jax.Array:
  """Mean cosine distance over the microgradients that were compared (not the reference)."""
  compared = finite & (jnp.cumsum(finite) > 1)
  n = jnp.sum(compared)
  return jnp.where(n > 0, jnp.sum(jnp.where(compared, distances, 0)) / jnp.maximum(n, 1), 0.0)


class Curves(NamedTuple):
  """Training curves of R replicas (NumPy arrays).

  Attributes:
    eval_steps: ``[E]`` steps after which the model was evaluated.
    test_acc: ``[R, E]`` clean test accuracy.
    train_acc_noisy: ``[R, E]`` accuracy on the noisy training labels.
    train_acc_clean: ``[R, E]`` accuracy on the clean training labels.
    skipped: ``[R, S]`` bool, steps without an update.
    distance: ``[R, S]`` mean cosine distance of the compared microgradients.
    num_used: ``[R, S]`` int, microgradients in each step's update (GAF's
      ``num_accepted``; K for averaging, or the number of nonzero weights;
      0 on a skipped step).
  """
  eval_steps: np.ndarray
  test_acc: np.ndarray
  train_acc_noisy: np.ndarray
  train_acc_clean: np.ndarray
  skipped: np.ndarray
  distance: np.ndarray
  num_used: np.ndarray


def _apply_fn(graphdef: Any) -> Callable:
  from flax import nnx
  return lambda params, x: nnx.merge(graphdef, params)(x)


@functools.lru_cache(maxsize=32)
def _make_chunk_fn(graphdef: Any, method: str, optimizer: str, lr: float,
                   k: int, combine: str, weighted: bool = False) -> Callable:
  """The jitted, replica-vmapped scan over a chunk of steps (cached per setting)."""
  apply_fn = _apply_fn(graphdef)
  inner = make_optimizer(optimizer, lr)

  def loss_fn(params, batch):
    logits = apply_fn(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  grad_fn = optax_gaf.microbatch_grads(loss_fn, num_microbatches=k)

  def replica(params, opt_state, x, y, order, mask, tau, weights):
    gaf_opt = optax_gaf.with_gaf(inner, tau, combine=combine, num_microbatches=k)

    def step(carry, inputs):
      params, opt_state = carry
      idx, do_update, w = inputs
      grads = grad_fn(params, {"x": x[idx], "y": y[idx]})  # leaves [K, ...]
      if method == "gaf":
        updates, opt_state = gaf_opt.update(grads, opt_state, params)
        stats = opt_state.gaf_state
        skipped = stats.skipped
        used = stats.num_accepted
        dist = compared_distance(stats.distances, stats.finite)
      else:
        agree = optax_gaf.agreement_weights(optax_gaf.gram_matrix(grads), 2.0, "mean")
        dist = compared_distance(agree.distances, agree.finite)
        if weighted:
          # The library's masked weighted sum: unchosen microgradients cannot
          # leak NaN/Inf through a zero weight (0 * NaN = NaN).
          mean = combine_lib.weighted_sum(w, grads, w > 0)
          do_update = do_update & jnp.any(w > 0)
          used = jnp.where(do_update, jnp.sum(w > 0, dtype=jnp.int32), 0)
        else:
          mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
          used = jnp.where(do_update, k, 0).astype(jnp.int32)
        new_updates, new_state = inner.update(mean, opt_state, params)
        keep = lambda new, old: jnp.where(do_update, new, old)
        opt_state = jax.tree.map(keep, new_state, opt_state)
        updates = jax.tree.map(lambda u: jnp.where(do_update, u, jnp.zeros_like(u)), new_updates)
        skipped = ~do_update
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (skipped, dist, used)

    (params, opt_state), outs = jax.lax.scan(
        step, (params, opt_state), (order, mask, weights))
    return (params, opt_state) + outs

  return jax.jit(jax.vmap(replica, in_axes=(0, 0, None, 0, 0, 0, 0, 0)))


@functools.lru_cache(maxsize=32)
def _accuracy_fn(graphdef: Any) -> Callable:
  apply_fn = _apply_fn(graphdef)

  def acc(params, x, y):
    return jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y)
  return jax.jit(jax.vmap(acc, in_axes=(0, None, 0)))


def train(
    data: Data,
    y_noisy: np.ndarray,
    order: np.ndarray,
    graphdef: Any,
    params: Any,
    *,
    method: str,
    optimizer: str = "sgd",
    lr: float = 0.01,
    num_microbatches: int = 2,
    combine: str = "pairwise",
    tau: Any = 0.9,
    mask: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    eval_every: int = 20,
    progress: str | None = None,
) -> Curves:
  """Trains R replicas with ``method`` in ``"gaf"`` or ``"averaging"``.

  Args:
    data: the data set (clean labels; ``x_test``/``y_test`` are evaluated).
    y_noisy: ``[R, N]`` noisy training labels, one row per replica.
    order: ``[R, S, K * m]`` example indices of each step (see :func:`data_order`).
    graphdef: the NNX graph definition.
    params: parameters stacked on a leading axis R (see :func:`init_replicas`).
    method: ``"gaf"`` or ``"averaging"``.
    optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
    lr: learning rate.
    num_microbatches: K; each step's batch is split into K microbatches.
    combine: GAF's fold rule.
    tau: GAF's threshold, a scalar or ``[R]`` (one per replica).
    mask: ``[R, S]`` bool; averaging updates only where True (default all).
    weights: optional ``[R, S, K]`` weights of the K microgradients for
      averaging (default the plain mean); a step whose weights are all zero
      is skipped (see :func:`random_subset_weights`).
    y_test: optional ``[R, M]`` labels of ``data.x_test`` per replica (e.g. a
      noisy held-out split); default ``data.y_test`` for every replica.
    eval_every: evaluate every this many steps (and after the last step).
    progress: a tqdm description, or None for no progress bar.

  Returns:
    :class:`Curves`.
  """
  if method not in ("gaf", "averaging"):
    raise ValueError(f"`method` must be 'gaf' or 'averaging', got {method!r}")
  r, steps = order.shape[:2]
  if weights is not None:
    if method != "averaging":
      raise ValueError("`weights` apply to method='averaging' only")
    weights = np.asarray(weights, np.float32)
    if weights.shape != (r, steps, num_microbatches):
      raise ValueError(f"`weights` must have shape {(r, steps, num_microbatches)} "
                       f"(replicas, steps, K), got {weights.shape}")
  inner = make_optimizer(optimizer, lr)
  if method == "gaf":
    init = optax_gaf.with_gaf(inner, 1.0, combine=combine, num_microbatches=num_microbatches).init
  else:
    init = inner.init
  opt_state = jax.vmap(init)(params)
  mask = np.ones((r, steps), bool) if mask is None else np.asarray(mask, bool)
  tau = np.broadcast_to(np.asarray(tau, np.float32), (r,))
  chunk_fn = _make_chunk_fn(graphdef, method, optimizer, float(lr), num_microbatches, combine,
                            weights is not None)
  if weights is None:  # unused by the chunk function; keeps one signature
    weights = np.zeros((r, steps, 1), np.float32)
  acc_fn = _accuracy_fn(graphdef)
  x_tr, x_te = jnp.asarray(data.x_train), jnp.asarray(data.x_test)
  y_noisy = jnp.asarray(y_noisy)
  y_clean = jnp.broadcast_to(jnp.asarray(data.y_train), y_noisy.shape)
  y_test = jnp.broadcast_to(jnp.asarray(data.y_test if y_test is None else y_test),
                            (r, data.x_test.shape[0]))
  bounds = list(range(0, steps, eval_every)) + [steps]
  evals, test, noisy, clean, skips, dists, used = [], [], [], [], [], [], []
  iterator = zip(bounds[:-1], bounds[1:])
  if progress is not None:
    from tqdm import tqdm
    iterator = tqdm(list(iterator), desc=progress, unit="eval", leave=True)
  for lo, hi in iterator:
    params, opt_state, sk, di, nu = chunk_fn(
        params, opt_state, x_tr, y_noisy, jnp.asarray(order[:, lo:hi]),
        jnp.asarray(mask[:, lo:hi]), jnp.asarray(tau), jnp.asarray(weights[:, lo:hi]))
    evals.append(hi)
    test.append(acc_fn(params, x_te, y_test))
    noisy.append(acc_fn(params, x_tr, y_noisy))
    clean.append(acc_fn(params, x_tr, y_clean))
    skips.append(sk)
    dists.append(di)
    used.append(nu)
  stack = lambda xs: np.stack([np.asarray(a) for a in xs], axis=1)
  return Curves(
      eval_steps=np.asarray(evals), test_acc=stack(test), train_acc_noisy=stack(noisy),
      train_acc_clean=stack(clean), skipped=np.concatenate([np.asarray(s) for s in skips], 1),
      distance=np.concatenate([np.asarray(d) for d in dists], 1),
      num_used=np.concatenate([np.asarray(u) for u in used], 1))


def summarize(curves: Curves) -> dict[str, np.ndarray]:
  """Per-replica summary metrics (arrays of length R)."""
  return {
      "final_test_acc": curves.test_acc[:, -1],
      "best_test_acc": curves.test_acc.max(1),
      "final_train_acc_noisy": curves.train_acc_noisy[:, -1],
      "final_train_acc_clean": curves.train_acc_clean[:, -1],
      "skip_fraction": curves.skipped.mean(1),
      "num_updates": (~curves.skipped).sum(1),
      "mean_cosine_distance": curves.distance.mean(1),
  }


def random_skip_mask(skipped: np.ndarray, seed: int) -> np.ndarray:
  """Per row, skips as many steps as ``skipped`` does, at uniformly random steps.

  Examples:
    >>> import numpy as np
    >>> skipped = np.array([[True, True, False, False, True]])
    >>> mask = random_skip_mask(skipped, seed=0)
    >>> int((~mask).sum())
    3
  """
  rng = np.random.default_rng(seed)
  mask = np.ones(skipped.shape, bool)
  for row, s in enumerate(skipped):
    mask[row, rng.choice(s.shape[0], int(s.sum()), replace=False)] = False
  return mask


def random_subset_weights(num_used: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Averaging weights over a random subset of GAF's size, at GAF's steps.

  For each replica and step, picks ``num_used`` of the K microgradients
  uniformly at random and gives each weight ``1 / num_used``; a step with
  ``num_used < 2`` (a GAF skip) gets all-zero weights, so it is skipped too.
  Averaging with these weights updates exactly when GAF did, from as many
  microgradients, but chosen at random instead of by agreement.

  Args:
    num_used: ``[R, S]`` microgradients in GAF's update per step
      (``Curves.num_used`` of a GAF run).
    k: the number of microgradients K.
    seed: seed of the random choice.

  Returns:
    ``[R, S, K]`` float32 weights.

  Examples:
    >>> import numpy as np
    >>> w = random_subset_weights(np.array([[3, 0, 2]]), k=4, seed=0)
    >>> (w > 0).sum(-1).tolist(), np.round(w.sum(-1), 6).tolist()
    ([[3, 0, 2]], [[1.0, 0.0, 1.0]])
  """
  num_used = np.asarray(num_used)
  if num_used.ndim != 2 or np.any(num_used > k) or np.any(num_used < 0):
    raise ValueError(f"`num_used` must be [R, S] counts in 0..{k}, got shape "
                     f"{num_used.shape} and range {num_used.min()}..{num_used.max()}")
  rng = np.random.default_rng(seed)
  ranks = np.argsort(rng.random((*num_used.shape, k)), axis=-1).argsort(axis=-1)
  chosen = (ranks < num_used[..., None]) & (num_used[..., None] >= 2)
  return (chosen / np.maximum(num_used, 1)[..., None]).astype(np.float32)


def truncation_mask(skipped: np.ndarray) -> np.ndarray:
  """Per row, updates only during the first (number of non-skipped) steps.

  Averaging under this mask stops after GAF's update count: reading its final
  accuracy is reading averaging at the same number of updates as GAF.

  Examples:
    >>> import numpy as np
    >>> truncation_mask(np.array([[True, False, True, False]]))
    array([[ True,  True, False, False]])
  """
  n = (~skipped).sum(1)
  return np.arange(skipped.shape[1])[None, :] < n[:, None]
