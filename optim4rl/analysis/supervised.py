"""The supervised reference for the gradient analysis: a small classifier on scikit-learn's digits.

The paper contrasts RL agent-gradients with those of supervised learning (Lan et al. 2023, Sec. 4,
an image classifier). Here the classifier is an MLP (64 inputs, hidden 32 ReLU, 10 logits by
default) on the 8×8 digits that ship with scikit-learn (`sklearn.datasets.load_digits`, 1797
images, no download), trained with minibatch steps of any optax optimizer on the cross-entropy.
The trainer has the `init`/`run_chunk` shape of the agents' `make_train`, so the same
`optim4rl.analysis.collect.recording` optimizer wrapper records its gradients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim4rl.agents.types import Trainer, plan_updates
from optim4rl.errors import ConfigError

__all__ = [
    "DATASETS",
    "MLPClassifier",
    "SupervisedConfig",
    "SupervisedState",
    "SupervisedTrain",
    "collect_supervised",
    "load_dataset",
    "make_train",
]

DATASETS = ("digits",)


class Dataset(NamedTuple):
    x_train: np.ndarray  # [n, features] float32
    y_train: np.ndarray  # [n] int32
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def load_dataset(name: str = "digits", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits, pixels scaled to [0, 1], a stratified train/test split."""
    if name not in DATASETS:
        raise ConfigError(f"unknown supervised dataset {name!r}; known: {', '.join(DATASETS)}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(x_train, y_train, x_test, y_test, int(y.max()) + 1)


class MLPClassifier(nn.Module):
    """ReLU MLP returning logits."""

    hidden_sizes: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for size in self.hidden_sizes:
            x = nn.relu(nn.Dense(size)(x))
        return nn.Dense(self.num_classes)(x)


@dataclass(frozen=True)
class SupervisedConfig:
    """Minibatch training of the classifier; `steps` counts optimizer steps (minibatches)."""

    dataset: str = "digits"
    hidden_sizes: tuple[int, ...] = (32,)
    batch_size: int = 64
    steps: int = 3000
    test_fraction: float = 0.2
    updates_per_chunk: int = 500

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        for name in ("batch_size", "steps", "updates_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"SupervisedConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"SupervisedConfig.test_fraction must lie in (0, 1), got {self.test_fraction}")


@flax.struct.dataclass
class SupervisedState:
    params: Any
    opt_state: Any
    key: jax.Array
    update_step: jax.Array  # int32


class SupervisedTrain(Trainer):
    """Cross-entropy minibatch training; every epoch visits the training set in a fresh order."""

    def __init__(self, cfg: SupervisedConfig, tx: optax.GradientTransformation, seed: int = 0):
        self.cfg, self.tx = cfg, tx
        self.data = load_dataset(cfg.dataset, cfg.test_fraction, seed)
        self.network = MLPClassifier(cfg.hidden_sizes, self.data.num_classes)
        n_train = self.data.x_train.shape[0]
        if cfg.batch_size > n_train:
            raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {n_train} training examples")
        self.batches_per_epoch = n_train // cfg.batch_size
        self.steps_per_update = cfg.batch_size  # examples per optimizer step
        self.num_updates, self.updates_per_chunk, self.num_chunks = plan_updates(
            cfg.steps, 1, cfg.updates_per_chunk
        )

    def init(self, key: jax.Array) -> SupervisedState:
        key, net_key = jax.random.split(key)
        features = self.data.x_train.shape[1]
        params = self.network.init(net_key, jnp.zeros((1, features), jnp.float32))
        return SupervisedState(params, self.tx.init(params), key, jnp.zeros((), jnp.int32))

    def loss(self, params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = self.network.apply(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def update(self, state: SupervisedState) -> tuple[SupervisedState, dict]:
        x_train, y_train = jnp.asarray(self.data.x_train), jnp.asarray(self.data.y_train)
        epoch = state.update_step // self.batches_per_epoch
        position = state.update_step % self.batches_per_epoch
        order = jax.random.permutation(jax.random.fold_in(state.key, epoch), x_train.shape[0])
        batch = jax.lax.dynamic_slice_in_dim(order, position * self.cfg.batch_size, self.cfg.batch_size)
        (loss, accuracy), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state.params, x_train[batch], y_train[batch]
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.update_step + 1
        metrics = {"examples": (step * self.cfg.batch_size).astype(jnp.float32), "loss": loss,
                   "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
        return SupervisedState(params, opt_state, state.key, step), metrics

    def run_chunk(self, state: SupervisedState) -> tuple[SupervisedState, dict]:
        return jax.lax.scan(lambda s, _: self.update(s), state, None, length=self.updates_per_chunk)

    def evaluate(self, params) -> dict[str, float]:
        """Loss and accuracy on the held-out test split and the whole training split."""
        result = {}
        for split, x, y in (("test", self.data.x_test, self.data.y_test),
                            ("train", self.data.x_train, self.data.y_train)):
            loss, accuracy = jax.jit(self.loss)(params, jnp.asarray(x), jnp.asarray(y))
            result[f"{split}_loss"], result[f"{split}_accuracy"] = float(loss), float(accuracy)
        return result


def make_train(cfg: SupervisedConfig, tx: optax.GradientTransformation, seed: int = 0) -> SupervisedTrain:
    """Classifier training for `cfg` with optimizer `tx`; `seed` fixes the train/test split."""
    return SupervisedTrain(cfg, tx, seed)


def collect_supervised(
    dataset: str = "digits",
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    grad_clip: float | None = None,
    steps: int = 3000,
    batch_size: int = 64,
    hidden_sizes: tuple[int, ...] = (32,),
    seed: int = 0,
    num_coords: int = 2048,
    num_snapshots: int = 150,
    callback=None,
):
    """Train the classifier with `make_optimizer(optimizer, learning_rate, grad_clip)` for `steps`
    minibatch steps and record its gradients; returns a `collect.CollectResult` whose record's
    metadata also holds the final test/train accuracy."""
    from optim4rl import make_optimizer
    from optim4rl.analysis import collect

    cfg = SupervisedConfig(dataset=dataset, hidden_sizes=tuple(hidden_sizes), batch_size=batch_size,
                           steps=steps, updates_per_chunk=min(500, steps))
    tx = make_optimizer(optimizer, learning_rate=learning_rate, grad_clip=grad_clip)
    metadata = {
        "kind": "supervised", "agent": "supervised", "dataset": dataset,
        "optimizer": optimizer, "learning_rate": learning_rate, "grad_clip": grad_clip,
        "seed": seed, "batch_size": batch_size, "config": dataclasses.asdict(cfg),
    }
    trainers = {}

    def build(tx):
        trainers["last"] = make_train(cfg, tx, seed)
        return trainers["last"]

    result = collect.run_recorded(build, tx, jax.random.key(seed), 1, num_coords, num_snapshots,
                                  metadata, coord_seed=seed, callback=callback,
                                  progress_key="examples")
    trainer = trainers["last"]
    sizes = (trainer.data.x_train.shape[1], *cfg.hidden_sizes, trainer.data.num_classes)
    model = "MLP " + "-".join(str(size) for size in sizes)
    evaluation = trainer.evaluate(result.state.params)
    result.record = dataclasses.replace(
        result.record, metadata={**result.record.metadata, "model": model, **evaluation})
    return result
