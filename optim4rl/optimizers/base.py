"""What every learned optimizer shares: architecture vs. meta-parameters, and the optax wrapper.

A learned optimizer is split in two, as in the paper's notation ``U_φ``:

* the *architecture* (a frozen dataclass such as :class:`~optim4rl.optimizers.Optim4RL`): sizes,
  input processing, constants. Hashable, serialisable as a small JSON dict;
* the *meta-parameters* ``φ`` (``opt.init_meta(key)``): a nested dict of float32 arrays, the only
  thing meta-training changes.

``opt.transform(φ, learning_rate)`` closes over ``φ`` and returns an ordinary
``optax.GradientTransformation``. The update is a coordinate-wise network: all leaves of the
gradient pytree are flattened into one vector of ``N`` coordinates, the network runs once on the
batch ``[N, features]``, and the result is unflattened. Each subclass only writes
:meth:`LearnedOptimizer.init_state` and :meth:`LearnedOptimizer.step` on flat float32 vectors.

The gradient (and, for STAR, the parameters) enter the network through ``stop_gradient``: when
meta-training differentiates a loss through ``tx.update`` with respect to ``φ``, there are no
second-order terms (SPEC §1, §2).
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

Array = jax.Array
MetaParams = dict
LearningRate = float | Array | Callable[[Array], Array]


class GRUState(NamedTuple):
    """State of a one-GRU learned optimizer (L2L, Lin)."""

    hidden: Array  # [hidden_size, N]: one recurrent state per coordinate, zeros at init
    count: Array  # int32 number of updates done so far


def clip_enabled(grad_clip: Any) -> bool:
    """``None`` or a non-positive number disables the elementwise clip (reference convention)."""
    if grad_clip is None:
        return False
    if isinstance(grad_clip, numbers.Number):
        return grad_clip > 0
    return True  # an array or tracer: the caller asked for clipping


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
    """Base class of learned-optimizer architectures (frozen dataclasses; fields = config)."""

    name: ClassVar[str] = ""
    uses_params: ClassVar[bool] = False  # STAR reads the parameter values as a network input

    # -- what subclasses implement -------------------------------------------------------------

    def init_meta(self, key: Array) -> MetaParams:
        """Fresh meta-parameters ``φ`` (nested dict of float32 arrays) from a PRNG key."""
        raise NotImplementedError

    def init_state(self, num_coordinates: int) -> NamedTuple:
        """Optimizer state for ``num_coordinates`` scalar parameters (recurrent states at zero)."""
        raise NotImplementedError

    def step(self, phi: MetaParams, grads: Array, state: NamedTuple, params: Array | None,
             learning_rate: Array, leaf_sizes: tuple[int, ...]) -> tuple[Array, NamedTuple]:
        """One update on flat float32 vectors ``[N]``: returns ``(Δθ, new_state)``.

        ``grads`` is already clipped and stop-gradient-ed; ``params`` is given (stop-gradient-ed)
        only when ``uses_params``; ``leaf_sizes`` are the sizes of the original leaves in
        flattening order (STAR normalises its features per tensor).
        """
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------------

    def transform(self, phi: MetaParams, learning_rate: LearningRate,
                  grad_clip: float | None = None) -> optax.GradientTransformation:
        """The learned optimizer with meta-parameters ``phi`` as an optax transformation.

        Args:
          phi: meta-parameters from :meth:`init_meta` or :func:`~optim4rl.optimizers.load`; may be
            a tracer, the update is differentiable with respect to it.
          learning_rate: step size α (a float, an array, or an optax schedule of the step count).
          grad_clip: elementwise gradient clip applied before the network (``None`` or ≤ 0: off).

        ``tx.update(grads, state, params)`` returns the additive update (``optax.apply_updates``).
        """
        clip = clip_enabled(grad_clip)

        def init_fn(params: Any) -> NamedTuple:
            flat, _ = ravel_pytree(params)
            return self.init_state(flat.size)

        def update_fn(updates: Any, state: NamedTuple, params: Any = None):
            grads, unravel = ravel_pytree(updates)
            grads = grads.astype(jnp.float32)
            if clip:
                grads = jnp.clip(grads, -grad_clip, grad_clip)
            grads = jax.lax.stop_gradient(grads)
            flat_params = None
            if self.uses_params:
                if params is None:
                    raise ValueError(f"the {self.name} optimizer reads the parameters: call "
                                     "tx.update(grads, state, params)")
                flat_params = jax.lax.stop_gradient(ravel_pytree(params)[0].astype(jnp.float32))
            if callable(learning_rate):
                step_size = learning_rate(state.count)
            else:
                step_size = learning_rate
            leaf_sizes = tuple(int(leaf.size) for leaf in jax.tree_util.tree_leaves(updates))
            delta, new_state = self.step(phi, grads, state, flat_params,
                                         jnp.asarray(step_size, jnp.float32), leaf_sizes)
            return unravel(delta), new_state

        return optax.GradientTransformation(init_fn, update_fn)

    def meta_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"gru_m/wi": (2, 24), ...}``: the name and shape of every meta-parameter tensor."""
        abstract = jax.eval_shape(self.init_meta, jax.random.key(0))
        return {name: tuple(leaf.shape) for name, leaf in named_leaves(abstract)}

    def config(self) -> dict[str, Any]:
        """The architecture's fields as a JSON-ready dict (tuples become lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LearnedOptimizer":
        """Inverse of :meth:`config`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown {cls.name} option(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in config.items():
            if isinstance(value, list):
                value = tuple(value)
            elif hints.get(key) is float and isinstance(value, int):
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[("gru_m/wi", leaf), ...]`` for a nested dict of arrays, in JAX flattening order."""
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = []
    for path, leaf in leaves_with_paths:
        parts = []
        for entry in path:
            if not isinstance(entry, jax.tree_util.DictKey):
                raise ValueError("meta-parameters must be nested dicts of arrays")
            parts.append(str(entry.key))
        named.append(("/".join(parts), leaf))
    return named


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def freeze_sequences(instance: Any) -> None:
    """Turn list-valued fields into tuples, so that a frozen architecture stays hashable."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if isinstance(value, list):
            object.__setattr__(instance, field.name, tuple(value))


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
