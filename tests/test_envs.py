"""Environments: gridworld and Catch dynamics against docs/paper_settings.md §3, registry, Brax/gymnax adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim4rl import envs
from optim4rl.envs.gridworld import GRIDWORLDS, MOVES, Gridworld, GridworldState

PAPER_MAPS = {  # docs/paper_settings.md §3 table: rows x cols including walls
    "small_sparse_short": (5, 10),
    "small_sparse_long": (10, 5),
    "small_dense_short": (6, 8),
    "small_dense_long": (8, 6),
    "big_sparse_short": (12, 14),
    "big_sparse_long": (14, 12),
    "big_dense_short": (11, 15),
    "big_dense_long": (15, 11),
}
NO_RESPAWN = ((1.0, 0.0, 0.0), (-1.0, 0.5, 0.0))


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def grid_state(env: Gridworld, agent, objects, t=0):
    """A hand-made state: ``agent`` is (row, col); ``objects`` are (row, col) or None (absent)."""
    flat = lambda rc: -1 if rc is None else rc[0] * env.cols + rc[1]  # noqa: E731
    return GridworldState(
        agent=jnp.int32(flat(agent)),
        objects=jnp.array([flat(o) for o in objects], jnp.int32),
        t=jnp.int32(t),
    )


def cell(env: Gridworld, flat_index) -> tuple[int, int]:
    return divmod(int(flat_index), env.cols)


# --- registry ------------------------------------------------------------------------------
def test_registry_lists_every_family_and_rejects_unknown_names():
    names = envs.list_envs()
    for name in [*GRIDWORLDS, "catch", "ant", "humanoid", "inverted_double_pendulum", "walker2d",
                 "hopper", "halfcheetah", "reacher", "pusher", "CartPole-v1", "Breakout-MinAtar",
                 "Asterix-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar"]:
        assert name in names
    assert envs.env_family("big_dense_long") == "gridworld"
    assert envs.env_family("catch") == "catch"
    assert envs.env_family("ant") == "brax"
    assert envs.env_family("Breakout-MinAtar") == "gymnax"
    assert envs.env_family("gymnax:Catch-bsuite") == "gymnax"
    assert envs.list_envs("gridworld") == list(GRIDWORLDS)
    with pytest.raises(ValueError, match=r"unknown env 'nope'; known envs: catch, ") as err:
        envs.make("nope")
    assert "\n" not in str(err.value)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="'bogus'"):
        envs.make("big_dense_long", bogus=1)
    with pytest.raises(ValueError, match="'speed'"):
        envs.make("catch", speed=2)
    with pytest.raises(ValueError, match="'gravityy'"):
        envs.make("CartPole-v1", gravityy=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        envs.make("small_dense_short", max_steps=0)
    with pytest.raises(ValueError, match="'rows'"):
        envs.make("Breakout-MinAtar", rows=3)
    with pytest.raises(ValueError, match="border"):
        envs.make("small_dense_short", layout=("#####", "#   #", "#    ", "#####"))
    assert envs.make("small_dense_short", max_steps=7).max_episode_steps == 7


# --- gridworlds: configuration ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAPER_MAPS))
def test_gridworld_matches_spec_table(name):
    env = envs.make(name)
    rows, cols = PAPER_MAPS[name]
    pairs = 1 if name.startswith("small") else 2
    p = 0.5 if "_dense_" in name else 0.05
    assert (env.rows, env.cols) == (rows, cols)
    assert env.objects == ((1.0, 0.0, p),) * pairs + ((-1.0, 0.5, p),) * pairs
    assert env.max_episode_steps == (50 if name.endswith("short") else 500)
    assert env.num_actions == 9 and env.discrete
    assert env.observation_shape == (2 * pairs + 1, rows, cols)
    walls = np.array([[c == "#" for c in row] for row in env.layout])
    border = np.ones_like(walls)
    border[1:-1, 1:-1] = False
    np.testing.assert_array_equal(walls, border)  # walls fill exactly the border
    assert hash(env) == hash(envs.make(name))  # usable as a static jit argument


# --- gridworlds: dynamics ---------------------------------------------------------------------
def test_reset_places_everything_on_distinct_free_cells_uniformly():
    env = envs.make("small_dense_short")  # 4 x 6 = 24 free cells
    n = 4800
    states, obs = jax.jit(jax.vmap(env.reset))(keys(n))
    obs = np.asarray(obs)
    assert obs.shape == (n, 3, 6, 8) and obs.dtype == np.float32
    assert set(np.unique(obs)) <= {0.0, 1.0}
    np.testing.assert_array_equal(obs.sum(axis=(2, 3)), 1.0)  # each plane one-hot
    assert obs.sum(axis=1).max() == 1.0  # distinct cells
    assert obs[:, :, [0, -1], :].sum() == 0 and obs[:, :, :, [0, -1]].sum() == 0  # not on walls
    for plane in (0, 2):  # agent and first object uniform over the 24 free cells (expect 200)
        counts = obs[:, plane, 1:-1, 1:-1].sum(axis=0)
        assert counts.min() > 130 and counts.max() < 270
    assert np.all(np.asarray(states.inner.t) == 0)


def test_moves_cardinal_diagonal_and_walls_block():
    env = envs.make("small_dense_short", objects=NO_RESPAWN)  # 6 x 8, free rows/cols 1..4 / 1..6
    step = jax.jit(env.step_env)
    far = [None, None]
    # From the middle every move succeeds, with the authors' action order.
    for action, (dr, dc) in enumerate(MOVES):
        s, *_ = step(jax.random.key(0), grid_state(env, (2, 3), far), action)
        assert cell(env, s.agent) == (2 + dr, 3 + dc)
    # From the top-left corner (1, 1), moves with an up or left component hit a wall.
    expected = {0: (1, 1), 1: (1, 1), 2: (1, 2), 3: (2, 1), 4: (1, 1),
                5: (1, 1), 6: (2, 2), 7: (1, 1), 8: (1, 1)}
    for action, target in expected.items():
        s, *_ = step(jax.random.key(0), grid_state(env, (1, 1), far), action)
        assert cell(env, s.agent) == target, action
    # Along the bottom wall a diagonal move is refused as a whole, never slid along the wall.
    s, *_ = step(jax.random.key(0), grid_state(env, (4, 3), far), 6)  # down-right
    assert cell(env, s.agent) == (4, 3)


def test_pickup_pays_reward_and_removes_object():
    env = envs.make("small_dense_short", objects=NO_RESPAWN)
    state = grid_state(env, (2, 2), [(2, 3), (3, 3)])
    s, obs, reward, terminated, truncated = jax.jit(env.step_env)(jax.random.key(1), state, 2)
    assert float(reward) == 1.0 and not bool(terminated) and not bool(truncated)
    assert cell(env, s.agent) == (2, 3)
    assert int(s.objects[0]) == -1 and cell(env, s.objects[1]) == (3, 3)
    obs = np.asarray(obs)
    assert obs[0].sum() == 0  # collected object's plane is empty
    assert obs[1, 3, 3] == 1 and obs[1].sum() == 1
    assert obs[2, 2, 3] == 1 and obs[2].sum() == 1  # agent plane is last


def test_negative_object_terminates_half_the_time():
    env = envs.make("small_dense_short", objects=NO_RESPAWN)
    state = grid_state(env, (2, 2), [None, (3, 3)])
    step = jax.jit(jax.vmap(env.step_env, in_axes=(0, None, None)))
    _, _, reward, terminated, _ = step(keys(4000, seed=3), state, 6)  # down-right onto it
    np.testing.assert_array_equal(np.asarray(reward), -1.0)
    assert 0.47 < float(jnp.mean(terminated)) < 0.53
    # ... while the +1 object (termination probability 0) never ends the episode.
    state = grid_state(env, (2, 2), [(3, 3), None])
    _, _, reward, terminated, _ = step(keys(4000, seed=4), state, 6)
    np.testing.assert_array_equal(np.asarray(reward), 1.0)
    assert not bool(jnp.any(terminated))


def test_absent_objects_respawn_with_their_probability():
    dense, sparse = envs.make("big_dense_short"), envs.make("big_sparse_short")
    n = 20000

    @jax.jit
    def run(key):
        out = []
        for env in (dense, sparse):
            state = grid_state(env, (1, 1), [None] * env.num_objects)
            s, obs, *_ = jax.vmap(env.step_env, in_axes=(0, None, None))(jax.random.split(key, n), state, 0)
            out.append((s.objects, obs[:, :-1].sum(axis=(2, 3))))
        return out

    for env, (objects, planes) in zip((dense, sparse), run(jax.random.key(5))):
        p = env.objects[0][2]
        present = np.asarray(objects) >= 0
        assert abs(present.mean() - p) < 0.02
        assert abs(present[:, 0].mean() - p) < 0.02  # per object, independently
        cells = np.asarray(objects)[present]
        rows, cols = cells // env.cols, cells % env.cols
        assert rows.min() >= 1 and rows.max() <= env.rows - 2
        assert cols.min() >= 1 and cols.max() <= env.cols - 2
        assert len(np.unique(cells)) == (env.rows - 2) * (env.cols - 2)  # every free cell reachable
        np.testing.assert_array_equal(np.asarray(planes), present)


def test_collected_object_may_respawn_in_the_same_step():
    env = envs.make("small_dense_short", objects=((1.0, 0.0, 1.0), (-1.0, 0.5, 0.0)))
    s, _, reward, _, _ = jax.jit(env.step_env)(jax.random.key(2), grid_state(env, (2, 2), [(2, 3), None]), 2)
    assert float(reward) == 1.0 and int(s.objects[0]) >= 0


def test_respawn_on_free_cell_avoids_agent_and_objects():
    env = envs.make("small_dense_short", respawn_on_free_cell=True,
                    objects=((1.0, 0.0, 1.0), (1.0, 0.0, 1.0), (-1.0, 0.5, 0.0)))
    state = grid_state(env, (2, 2), [None, None, (3, 3)])
    step = jax.jit(jax.vmap(env.step_env, in_axes=(0, None, None)))
    s, *_ = step(keys(3000, seed=6), state, 0)
    objs = np.asarray(s.objects)
    agent = 2 * env.cols + 2
    assert np.all(objs[:, :2] >= 0)
    assert np.all(objs[:, 0] != objs[:, 1])
    assert np.all(objs[:, :2] != agent) and np.all(objs[:, :2] != 3 * env.cols + 3)
    assert len(np.unique(objs[:, 0])) == 24 - 2  # all other free cells reachable


def test_time_limit_truncates_at_50_and_500_steps():
    # Objects never respawn or move, so an agent that stays never meets them.
    short = envs.make("small_sparse_short", objects=NO_RESPAWN)
    long = envs.make("small_sparse_long", objects=NO_RESPAWN)

    def run(env, key):
        state, _ = env.reset(key)

        def body(state, k):
            state, ts = env.step(k, state, 0)
            return state, (ts.done, ts.truncated, ts.episode_length, ts.reward)

        return jax.lax.scan(body, state, jax.random.split(key, env.max_episode_steps + 3))

    results = jax.jit(lambda key: [run(env, key) for env in (short, long)])(jax.random.key(7))
    for limit, (state, (done, truncated, length, reward)) in zip((50, 500), results):
        done, truncated = np.asarray(done), np.asarray(truncated)
        assert done[limit - 1] == 1 and truncated[limit - 1] == 1
        assert int(length[limit - 1]) == limit
        assert done.sum() == 1 and truncated.sum() == 1 and float(jnp.abs(reward).sum()) == 0
        assert int(state.inner.t) == 3 and int(state.episode_length) == 3  # auto-reset restarted


def test_termination_at_time_limit_is_not_truncation():
    env = envs.make("small_dense_short", objects=((-1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)))
    state = envs.EnvState(grid_state(env, (2, 2), [(2, 3), None], t=49), jnp.float32(0), jnp.int32(49))
    _, ts = jax.jit(env.step)(jax.random.key(0), state, 2)
    assert float(ts.done) == 1 and float(ts.truncated) == 0 and float(ts.reward) == -1


# --- Catch ------------------------------------------------------------------------------------
def test_catch_pays_plus_one_for_a_catch_and_minus_one_for_a_miss_after_nine_steps():
    env = envs.make("catch")
    assert env.observation_shape == (10, 5) and env.num_actions == 3 and env.max_episode_steps == 9

    def run(key, follow):
        state, obs = env.reset(key)

        def body(carry, k):
            state, obs = carry
            ball_col = jnp.argmax(obs[0:9].max(axis=0))  # ball is in rows 0..8 before it lands
            paddle_col = jnp.argmax(obs[9])
            toward = jnp.sign(ball_col - paddle_col).astype(jnp.int32) + 1
            away = jnp.where(ball_col >= 2, 0, 2)  # run for the far wall
            state, ts = env.step(k, state, toward if follow else away)
            return (state, ts.obs), (ts.reward, ts.done, ball_col)

        return jax.lax.scan(body, (state, obs), jax.random.split(key, 9))[1]

    both = jax.jit(jax.vmap(lambda k: (run(k, True), run(k, False))))
    (r_follow, d_follow, ball), (r_away, d_away, _) = (
        tuple(np.asarray(x) for x in out) for out in both(keys(40))
    )
    for reward, done in ((r_follow, d_follow), (r_away, d_away)):
        np.testing.assert_array_equal(done, np.tile([0] * 8 + [1], (40, 1)))
        np.testing.assert_array_equal(reward[:, :8], 0.0)
    np.testing.assert_array_equal(r_follow[:, 8], 1.0)
    # Moving away: paddle from column 2 reaches 0 or 4; a ball in column 2 is always missed.
    np.testing.assert_array_equal(r_away[:, 8], -1.0)
    assert len(np.unique(ball[:, 0])) == 5  # the ball starts in every column


# --- every family under jit + vmap -------------------------------------------------------------
def _rollout(env, key, n=4, steps=3):
    """Reset ``n`` envs and take ``steps`` random steps (a scan, or one plain step)."""
    reset_key, key = jax.random.split(key)
    state, obs0 = jax.vmap(env.reset)(jax.random.split(reset_key, n))

    def body(state, k):
        action_key, step_key = jax.random.split(k)
        if env.discrete:
            action = jax.random.randint(action_key, (n,), 0, env.num_actions)
        else:
            action = jax.random.uniform(action_key, (n, env.action_size), minval=-1, maxval=1)
        state, ts = jax.vmap(env.step)(jax.random.split(step_key, n), state, action)
        return state, ts

    if steps == 1:  # no scan: a smaller program, compiled faster
        state, ts = body(state, key)
        return obs0, (state, jax.tree.map(lambda x: x[None], ts))
    return obs0, jax.lax.scan(body, state, jax.random.split(key, steps))


def _check_shapes(env, obs0, ts, n=4, steps=3):
    assert obs0.shape == (n, *env.observation_shape) and obs0.dtype == jnp.float32
    assert ts.obs.shape == (steps, n, *env.observation_shape) and ts.obs.dtype == jnp.float32
    for x in (ts.reward, ts.done, ts.truncated, ts.episode_return):
        assert x.shape == (steps, n) and x.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(ts.obs))) and bool(jnp.all(jnp.isfinite(ts.reward)))


def _check_jit_vmap(env, n=4, steps=3):
    obs0, (_, ts) = jax.jit(lambda key: _rollout(env, key, n, steps))(jax.random.key(0))
    _check_shapes(env, obs0, ts, n, steps)
    return ts


def test_catch_and_every_gridworld_reset_and_step_under_jit_and_vmap():
    # One compiled program for all of them: compiling is most of the cost.
    own = [envs.make(name) for name in ["catch", *GRIDWORLDS]]
    results = jax.jit(lambda key: [_rollout(env, key, steps=1) for env in own])(jax.random.key(0))
    for env, (obs0, (_, ts)) in zip(own, results):
        _check_shapes(env, obs0, ts, steps=1)


@pytest.mark.parametrize("name", ["CartPole-v1", "Breakout-MinAtar", "Pendulum-v1"])
def test_gymnax_env_resets_and_steps_under_jit_and_vmap(name):
    _check_jit_vmap(envs.make(name))


def test_gymnax_adapter_time_limit_and_image_layout():
    env = envs.make("CartPole-v1", max_steps_in_episode=4)
    ts = _check_jit_vmap(env, n=2, steps=5)
    np.testing.assert_array_equal(np.asarray(ts.truncated)[:, 0], [0, 0, 0, 1, 0])
    assert env.max_episode_steps == 4
    assert envs.make("Breakout-MinAtar").observation_shape == (4, 10, 10)  # channels first
    pend = envs.make("Pendulum-v1")
    assert not pend.discrete and pend.action_size == 1


def test_brax_adapter_truncation_action_repeat_and_cached_auto_reset():
    # Brax's `fast` test task: no physics, obs = [x, v], v grows by 0.02 per step of action > 0,
    # reward = x. Cheap to compile, and every number below is known in closed form.
    env = envs.make("brax:fast", episode_length=3)
    assert env.brax_env is not None and not env.discrete and env.action_size == 1
    assert env.max_episode_steps == 3 and env.observation_shape == (2,)
    repeat = envs.make("brax:fast", episode_length=4, action_repeat=2)
    assert repeat.max_episode_steps == 2

    def run(env, key):
        state, obs0 = jax.vmap(env.reset)(jax.random.split(key, 2))
        action = jnp.ones((2, 1))

        def body(state, k):
            return jax.vmap(env.step)(jax.random.split(k, 2), state, action)

        return obs0, jax.lax.scan(body, state, jax.random.split(key, 4))

    (obs0, (state, ts)), (_, (_, ts2)) = jax.jit(
        lambda key: (run(env, key), run(repeat, key)))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ts.done)[:, 0], [0, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(ts.truncated)[:, 0], [0, 0, 1, 0])
    np.testing.assert_allclose(np.asarray(ts.reward)[:, 0], [0.0004, 0.0012, 0.0024, 0.0004], atol=1e-7)
    np.testing.assert_allclose(np.asarray(ts.obs[2]), np.asarray(obs0))  # back to the cached start
    np.testing.assert_allclose(np.asarray(ts.obs[3]), np.asarray(ts.obs[0]))
    np.testing.assert_array_equal(np.asarray(state.inner.t), [1, 1])
    np.testing.assert_allclose(np.asarray(ts.episode_return)[2, 0], 0.004, atol=1e-7)
    # action_repeat=2: rewards of the two Brax steps summed; time limit counts Brax steps.
    np.testing.assert_allclose(np.asarray(ts2.reward)[:2, 0], [0.0016, 0.0064], atol=1e-7)
    np.testing.assert_array_equal(np.asarray(ts2.truncated)[:, 0], [0, 1, 0, 1])


def test_brax_options_are_checked():
    with pytest.raises(ValueError, match="backend"):
        envs.make("ant", backend="warp")
    with pytest.raises(ValueError, match="'bogus'"):
        envs.make("ant", bogus=1)
    with pytest.raises(ValueError, match="unknown brax task 'nope'"):
        envs.make("brax:nope")


@pytest.mark.slow  # compiling real Brax physics takes tens of seconds on a busy CPU
def test_brax_physics_task_resets_and_steps_under_jit_and_vmap():
    env = envs.make("inverted_double_pendulum")
    assert env.backend == "spring" and env.observation_shape == (8,) and env.action_size == 1
    _check_jit_vmap(env, n=2, steps=1)
