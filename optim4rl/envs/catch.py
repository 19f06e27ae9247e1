"""Catch (bsuite / Osband et al. 2020), as used in the Optim4RL paper (docs/paper_settings.md §3).

A 10 x 5 board; a ball starts in the top row at a random column and falls one row per step;
the paddle moves along the bottom row (actions: 0 left, 1 stay, 2 right). When the ball reaches
the bottom row (after 9 steps) the episode ends with reward +1 if the paddle is under it, else −1.
Observation: the board as a (rows, cols) binary image with the ball and the paddle set to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optim4rl.envs.base import Env


class CatchState(NamedTuple):
    ball_row: jax.Array
    ball_col: jax.Array
    paddle_col: jax.Array
    t: jax.Array


@dataclass(frozen=True)
class Catch(Env):
    rows: int = 10
    columns: int = 5
    name: str = "catch"
    discrete: bool = True

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return (self.rows, self.columns)

    @property
    def num_actions(self) -> int:
        return 3

    @property
    def max_episode_steps(self) -> int:
        return self.rows - 1

    def _obs(self, s: CatchState) -> jax.Array:
        board = jnp.zeros((self.rows, self.columns), jnp.float32)
        board = board.at[s.ball_row, s.ball_col].set(1.0)
        return board.at[self.rows - 1, s.paddle_col].set(1.0)

    def reset_env(self, key):
        ball_col = jax.random.randint(key, (), 0, self.columns)
        s = CatchState(jnp.int32(0), ball_col, jnp.int32(self.columns // 2), jnp.int32(0))
        return s, self._obs(s)

    def step_env(self, key, s: CatchState, action):
        paddle = jnp.clip(s.paddle_col + jnp.asarray(action, jnp.int32) - 1, 0, self.columns - 1)
        s = CatchState(s.ball_row + 1, s.ball_col, paddle, s.t + 1)
        terminated = s.ball_row == self.rows - 1
        reward = jnp.where(terminated, jnp.where(s.ball_col == paddle, 1.0, -1.0), 0.0)
        return s, self._obs(s), reward, terminated, jnp.zeros((), jnp.bool_)
