"""The eight gridworlds of the Optim4RL paper (docs/paper_settings.md §3), after Oh et al. 2020 ("Discovering
Reinforcement Learning Algorithms", the LPG gridworlds).

A rectangular room bordered by walls holds the agent and a few objects. Each object is a triple
``[reward, termination probability, respawn probability]``: small maps have ``(+1, 0, p)`` and
``(−1, 0.5, p)``, big maps two of each; dense maps use ``p = 0.5``, sparse ones ``p = 0.05``;
short episodes last 50 steps, long ones 500 (the time limit is a truncation).

One step, in the order of the authors' implementation (sail-sg/optim4rl, ``envs/gridworld.py``):

1. The agent takes one of 9 moves (stay, 4 cardinal, 4 diagonal); a move into a wall leaves it
   where it is (a diagonal move is never split into its cardinal parts).
2. Every object on the agent's new cell is collected: its reward is paid, it is removed, and the
   episode terminates with its termination probability.
3. Every absent object — including one collected in step 2 — respawns with its respawn
   probability on a uniformly random non-wall cell. As in the authors' code that cell may hold the
   agent or another object; ``respawn_on_free_cell=True`` restricts it to cells free of both.
4. The time limit is checked.

Reset puts the agent and all objects on distinct uniformly random non-wall cells.
Observation: float32 binary planes ``(num_objects + 1, rows, cols)``: one per object (in the
order of ``objects``), then the agent. Positions are kept as flat cell indices (``row * cols +
col``; ``-1`` for an absent object), so a step costs a handful of scalar ops and one
``(num_objects + 1) × rows·cols`` comparison for the observation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.envs.base import Env

# (row, col) offsets of the 9 actions, in the authors' order: stay, up, right, down, left,
# down-left, down-right, up-right, up-left.
MOVES = ((0, 0), (-1, 0), (0, 1), (1, 0), (0, -1), (1, -1), (1, 1), (-1, 1), (-1, -1))

WALL = "#"


class GridworldState(NamedTuple):
    agent: jax.Array  # int32 flat cell index
    objects: jax.Array  # int32 [num_objects] flat cell indices, -1 where absent
    t: jax.Array  # int32 steps taken in this episode


def bordered_layout(rows: int, cols: int) -> tuple[str, ...]:
    """An empty ``rows × cols`` room whose border cells are walls (sizes include the walls)."""
    if rows < 3 or cols < 3:
        raise ValueError(f"a bordered gridworld needs at least 3 x 3 cells, got {rows} x {cols}")
    inner = WALL + " " * (cols - 2) + WALL
    return (WALL * cols,) + (inner,) * (rows - 2) + (WALL * cols,)


def _objects(num_pairs: int, respawn_prob: float) -> tuple[tuple[float, float, float], ...]:
    good = (1.0, 0.0, respawn_prob)
    bad = (-1.0, 0.5, respawn_prob)
    return (good,) * num_pairs + (bad,) * num_pairs


DENSE, SPARSE = 0.5, 0.05
SHORT, LONG = 50, 500

# name -> (rows, cols incl. walls, pairs of (+1, -1) objects, respawn prob, time limit); docs/paper_settings.md §3.
GRIDWORLDS: dict[str, tuple[int, int, int, float, int]] = {
    "small_sparse_short": (5, 10, 1, SPARSE, SHORT),
    "small_sparse_long": (10, 5, 1, SPARSE, LONG),
    "small_dense_short": (6, 8, 1, DENSE, SHORT),
    "small_dense_long": (8, 6, 1, DENSE, LONG),
    "big_sparse_short": (12, 14, 2, SPARSE, SHORT),
    "big_sparse_long": (14, 12, 2, SPARSE, LONG),
    "big_dense_short": (11, 15, 2, DENSE, SHORT),
    "big_dense_long": (15, 11, 2, DENSE, LONG),
}


@dataclass(frozen=True)
class Gridworld(Env):
    """A gridworld with walls, collectable objects and a time limit (see the module docstring).

    Attributes:
      layout: the map, one string per row; ``'#'`` is a wall, anything else is free. The border
        must be walls (moves are computed on flat cell indices and rely on it).
      objects: ``(reward, termination probability, respawn probability)`` per object.
      max_steps: time limit; reaching it ends the episode as a truncation.
      respawn_on_free_cell: respawn only on cells without the agent or another object
        (default False: any non-wall cell, as in the authors' code).
    """

    layout: tuple[str, ...] = bordered_layout(5, 5)
    objects: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.5), (-1.0, 0.5, 0.5))
    max_steps: int = 50
    respawn_on_free_cell: bool = False
    name: str = "gridworld"
    discrete: bool = True

    def __post_init__(self):
        # Accept lists (e.g. from a TOML config) but store tuples, so the env stays hashable.
        object.__setattr__(self, "layout", tuple(str(row) for row in self.layout))
        object.__setattr__(
            self, "objects", tuple(tuple(float(v) for v in obj) for obj in self.objects)
        )
        rows = len(self.layout)
        if rows < 3 or len({len(row) for row in self.layout}) != 1 or len(self.layout[0]) < 3:
            raise ValueError("gridworld layout must be a rectangle of at least 3 x 3 cells")
        cols = len(self.layout[0])
        border = self.layout[0] + self.layout[-1] + "".join(r[0] + r[-1] for r in self.layout)
        if set(border) != {WALL}:
            raise ValueError(f"gridworld layout must have walls ('{WALL}') on its whole border")
        if not self.objects or any(len(obj) != 3 for obj in self.objects):
            raise ValueError("gridworld objects must be non-empty (reward, term_prob, respawn_prob)")
        if any(not (0.0 <= p <= 1.0) for obj in self.objects for p in obj[1:]):
            raise ValueError("gridworld object probabilities must lie in [0, 1]")
        free = sum(row.count(WALL) for row in self.layout)
        if rows * cols - free < len(self.objects) + 1:
            raise ValueError("gridworld layout has fewer free cells than agent + objects")
        if int(self.max_steps) < 1:
            raise ValueError(f"gridworld max_steps must be >= 1, got {self.max_steps}")

    # --- static description (numpy constants, folded into the traced program) ---------------
    @property
    def rows(self) -> int:
        return len(self.layout)

    @property
    def cols(self) -> int:
        return len(self.layout[0])

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return (self.num_objects + 1, self.rows, self.cols)

    @property
    def num_actions(self) -> int:
        return len(MOVES)

    @property
    def max_episode_steps(self) -> int:
        return int(self.max_steps)

    def _wall_mask(self) -> np.ndarray:
        return np.array([[c == WALL for c in row] for row in self.layout]).reshape(-1)

    def _free_cells(self) -> np.ndarray:
        return np.flatnonzero(~self._wall_mask()).astype(np.int32)

    def _object_table(self) -> np.ndarray:
        return np.array(self.objects, np.float32)  # [num_objects, 3]

    # --- dynamics ----------------------------------------------------------------------------
    def observe(self, s: GridworldState) -> jax.Array:
        cells = jnp.concatenate([s.objects, s.agent[None]])
        # An absent object (-1) matches no cell, so its plane is all zeros.
        planes = cells[:, None] == jnp.arange(self.rows * self.cols, dtype=jnp.int32)
        return planes.astype(jnp.float32).reshape(self.observation_shape)

    def reset_env(self, key):
        n = self.num_objects + 1
        picks = _sample_distinct(jax.random.uniform(key, (n,)), jnp.full((0,), _NONE, jnp.int32),
                                 self._free_cells().size, jnp.ones((n,), jnp.bool_))
        cells = jnp.asarray(self._free_cells())[picks]
        s = GridworldState(agent=cells[0], objects=cells[1:], t=jnp.zeros((), jnp.int32))
        return s, self.observe(s)

    def step_env(self, key, s: GridworldState, action):
        # One draw per step: rows = termination, respawn, respawn-cell uniforms per object.
        u_term, u_respawn, u_cell = jax.random.uniform(key, (3, self.num_objects))
        table = jnp.asarray(self._object_table())
        reward_of, term_prob, respawn_prob = table[:, 0], table[:, 1], table[:, 2]

        move = jnp.asarray([dr * self.cols + dc for dr, dc in MOVES], jnp.int32)
        target = s.agent + move[jnp.asarray(action, jnp.int32)]
        agent = jnp.where(jnp.asarray(self._wall_mask())[target], s.agent, target)

        collected = s.objects == agent
        reward = jnp.sum(jnp.where(collected, reward_of, 0.0))
        terminated = jnp.any(collected & (u_term < term_prob))
        objects = jnp.where(collected, -1, s.objects)

        respawn = (objects < 0) & (u_respawn < respawn_prob)
        objects = jnp.where(respawn, self._respawn_cells(u_cell, agent, objects, respawn), objects)

        t = s.t + 1
        s = GridworldState(agent=agent, objects=objects, t=t)
        return s, self.observe(s), reward, terminated, t >= self.max_steps

    def _respawn_cells(self, u_cell, agent, objects, respawn):
        """One candidate cell per object (used only where ``respawn`` is set)."""
        free = jnp.asarray(self._free_cells())
        n_free = free.shape[0]
        if not self.respawn_on_free_cell:
            return free[jnp.minimum((u_cell * n_free).astype(jnp.int32), n_free - 1)]
        # Exclude the agent and present objects, in the index space of free cells.
        free_index = np.full(self.rows * self.cols, _NONE, np.int32)
        free_index[self._free_cells()] = np.arange(n_free, dtype=np.int32)
        occupied = jnp.asarray(free_index)[jnp.concatenate([agent[None], jnp.maximum(objects, 0)])]
        occupied = occupied.at[1:].set(jnp.where(objects >= 0, occupied[1:], _NONE))
        return free[_sample_distinct(u_cell, occupied, n_free, respawn)]


_NONE = np.iinfo(np.int32).max  # "no cell": sorts after every real index


def _sample_distinct(u, excluded, n, active):
    """Distinct indices in ``[0, n)`` avoiding ``excluded``, drawn one after another.

    Draw ``i`` (where ``active[i]``) is uniform over the indices not yet excluded: ``r`` uniform
    in ``[0, allowed)`` is mapped to the ``r``-th allowed index ``x``, the fixed point of
    ``x = r + #{e in excluded : e <= x}`` (reached from ``x = r`` in at most ``len(excluded)``
    monotone iterations). A few scalar ops per object, no sort, and no random numbers beyond
    ``u`` — far cheaper than scoring every cell of the grid. ``excluded`` holds ``_NONE`` in empty
    slots and no duplicates.
    """
    picks = []
    for i in range(u.shape[0]):
        allowed = n - jnp.sum(excluded != _NONE)
        r = jnp.minimum((u[i] * allowed).astype(jnp.int32), allowed - 1)
        x = r
        for _ in range(excluded.shape[0]):
            x = r + jnp.sum(excluded <= x)
        picks.append(x)
        excluded = jnp.concatenate([excluded, jnp.where(active[i], x, _NONE)[None]])
    return jnp.stack(picks)


def make_gridworld(name: str, **overrides) -> Gridworld:
    """The docs/paper_settings.md §3 gridworld ``name``; ``overrides`` replace fields (e.g. ``max_steps``)."""
    rows, cols, pairs, respawn_prob, max_steps = GRIDWORLDS[name]
    fields = dict(
        layout=bordered_layout(rows, cols),
        objects=_objects(pairs, respawn_prob),
        max_steps=max_steps,
        name=name,
    )
    fields.update(overrides)
    return Gridworld(**fields)
