"""Pipeline meta-training (docs/paper_settings.md §2): schedule, meta-gradient, sharding, resume, NaN safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from optim4rl import optimizers
from optim4rl.meta import MetaConfig, MetaTask, MetaTrainer, reset_offsets
from optim4rl.meta import train as meta_train


def tiny_config(**changes) -> MetaConfig:
    base = dict(tasks=(MetaTask("catch", 1.0, 1e-3),), num_agents=4, reset_interval=4, iterations=4,
                inner_updates=2, rollout_length=5, iterations_per_chunk=2, eval_steps=0)
    base.update(changes)
    return MetaConfig(**base)


def test_reset_offsets_spread_evenly():
    offsets = reset_offsets(512, 144)
    assert offsets[0] == 0 and offsets[-1] == 143
    assert np.all(np.diff(offsets) >= 0)
    # After one interval every age in [0, R) is represented almost equally (512 agents over 144
    # ages; int(linspace) gives the endpoint R-1 alone, as in the reference code).
    counts = np.bincount(offsets, minlength=144)
    assert counts[:-1].min() >= 3 and counts.max() <= 4 and counts[-1] >= 1


@pytest.fixture(scope="module")
def trainer():
    return MetaTrainer(tiny_config())


def test_schedule_ages_after_one_interval(trainer):
    cfg = tiny_config(num_agents=8, reset_interval=4)
    tr = MetaTrainer(cfg)
    state = tr.init()
    setup = tr.tasks[0]
    pop = state.populations[0]
    step = jax.jit(lambda key, pop, t: tr.reset_population(key, state.phi, pop, setup, t)[0])
    for t in range(cfg.reset_interval):
        pop = step(jax.random.key(t), pop, t)
        pop = pop._replace(age=pop.age + 1)
    # Every agent reset exactly once within the first interval, at t = its offset.
    expected = cfg.reset_interval - reset_offsets(8, 4)
    np.testing.assert_array_equal(np.asarray(pop.age), expected)
    assert set(np.asarray(pop.age).tolist()) == {1, 2, 3, 4}


def test_no_pipeline_never_resets():
    tr = MetaTrainer(tiny_config(pipeline=False))
    state = tr.init()
    pop = state.populations[0]._replace(age=jnp.full((4,), 7, jnp.int32))
    for t in range(8):
        pop, _ = tr.reset_population(jax.random.key(t), state.phi, pop, tr.tasks[0], t)
    np.testing.assert_array_equal(np.asarray(pop.age), 7)


def _smooth_loss(linear: bool):
    """A differentiable stand-in for the A2C loss (which is a semi-gradient: its gradient is not
    the derivative of its value, so finite differences cannot check it)."""

    def loss(params, network, traj, last_obs, cfg):
        total = 0.0
        for i, leaf in enumerate(jax.tree.leaves(params)):
            coeff = jnp.sin(jnp.arange(leaf.size, dtype=jnp.float32) + i).reshape(leaf.shape)
            total = total + jnp.sum(coeff * leaf)
            if not linear:
                total = total + jnp.sum(jnp.tanh(leaf) ** 2)
        return total, {"actor_loss": total, "value_loss": jnp.zeros(()), "entropy": jnp.zeros(())}

    return loss


@pytest.mark.parametrize("inner_updates,linear", [(1, False), (3, True)])
def test_meta_gradient_matches_finite_difference(monkeypatch, inner_updates, linear):
    """d meta_loss / d phi through the inner updates and recurrent states, against central
    differences. K=1 with a nonlinear loss, or K=3 with a linear one: in both the optimizer's
    (stop-gradient) inputs do not depend on phi, so the first-order meta-gradient is exact."""
    from optim4rl.agents import a2c

    monkeypatch.setattr(a2c, "a2c_loss", _smooth_loss(linear))
    tr = MetaTrainer(tiny_config(inner_updates=inner_updates, grad_clip=None))
    state = tr.init()
    setup, pop = tr.tasks[0], state.populations[0]
    keys = jax.random.split(jax.random.key(3), 4)

    def mean_loss(phi):
        losses, _ = jax.vmap(tr.agent_meta_loss, in_axes=(None, 0, 0, None))(phi, pop, keys, setup)
        return jnp.mean(losses)

    phi = state.phi
    grad = jax.jit(jax.grad(mean_loss))(phi)
    norm = optimizers_norm(grad)
    assert float(norm) > 0
    f = jax.jit(mean_loss)
    rng = np.random.default_rng(0)
    for direction in (jax.tree.map(lambda g: g / norm, grad),
                      jax.tree.map(lambda g: jnp.asarray(rng.normal(size=g.shape), jnp.float32), grad)):
        dnorm = optimizers_norm(direction)
        direction = jax.tree.map(lambda d: d / dnorm, direction)
        eps = 1e-2
        plus = f(jax.tree.map(lambda p, d: p + eps * d, phi, direction))
        minus = f(jax.tree.map(lambda p, d: p - eps * d, phi, direction))
        fd = float(plus - minus) / (2 * eps)
        analytic = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))))
        assert fd == pytest.approx(analytic, rel=0.05, abs=1e-3 * float(norm))


def optimizers_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_update_scale_metric_is_the_mean_step_over_the_step_size():
    tr = MetaTrainer(tiny_config(optimizer="optim4rl"))
    _, metrics = jax.jit(tr.meta_step)(tr.init())
    scale = float(metrics["update_scale/catch"])
    assert np.isfinite(scale) and scale > 0.0
    zero = float(metrics["zero_grad_fraction/catch"])
    assert 0.0 <= zero < 1.0
    from optim4rl.meta.pipeline import _mean_abs, _zero_fraction
    assert float(_mean_abs({"a": jnp.asarray([1.0, -3.0]), "b": jnp.asarray([[0.0, 4.0]])})) == 2.0
    assert float(_zero_fraction({"a": jnp.asarray([1.0, 0.0]), "b": jnp.asarray([[0.0, 0.0]])})) == 0.75


def test_meta_loss_terms_are_logged_sum_to_the_loss_and_follow_the_step_size():
    tr = MetaTrainer(tiny_config(optimizer="optim4rl"))
    state = tr.init()
    setup, agent = tr.tasks[0], jax.tree.map(lambda x: x[0], state.populations[0])
    key = jax.random.key(5)
    loss, (_, mon) = jax.jit(lambda a, k: tr.agent_meta_loss(state.phi, a, k, setup))(agent, key)
    terms = {t: float(mon[f"loss_{t}"]) for t in ("actor", "critic", "entropy")}
    assert float(loss) == pytest.approx(sum(terms.values()), rel=1e-5, abs=1e-6)
    assert terms["critic"] >= 0.0 and terms["entropy"] <= 0.0  # 0.5·value loss, −0.01·entropy
    # An explicit step size equal to the task's gives the same numbers; a traced one can be
    # differentiated through the K inner updates (scripts/meta_loss_terms.py relies on it).
    same, _ = tr.agent_meta_loss(state.phi, agent, key, setup, learning_rate=jnp.float32(1e-3))
    assert float(same) == pytest.approx(float(loss), rel=1e-5)
    d_critic = jax.grad(lambda log_lr: tr.agent_meta_loss(state.phi, agent, key, setup,
                                                          learning_rate=jnp.exp(log_lr))[1][1]["loss_critic"])
    assert np.isfinite(float(d_critic(jnp.log(1e-3))))
    _, metrics = jax.jit(tr.meta_step)(state)
    for t in ("actor", "critic", "entropy"):
        assert np.isfinite(float(metrics[f"meta_loss_{t}/catch"]))


def test_meta_loss_terms_script_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "meta_loss_terms.py"
    spec = importlib.util.spec_from_file_location("meta_loss_terms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["init", "--env", "catch", "--envs", "2", "--lr", "1e-3", "--ages", "0,1",
                 "--agents", "2", "--repeats", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# init on catch") and len(out) == 3
    assert out[2].startswith("age    4 updates | actor ") and "0.5·critic" in out[2]


def test_nan_agent_is_reset_and_phi_stays_finite(trainer):
    state = trainer.init()
    pop = state.populations[0]
    poisoned_hidden = jax.tree.map(lambda x: x.at[3].set(jnp.nan) if x.dtype == jnp.float32 else x, pop.opt_state)
    state = state._replace(populations=(pop._replace(opt_state=poisoned_hidden),))
    step = jax.jit(trainer.meta_step)
    new_state, metrics = step(state)
    # The poisoned optimizer state makes the meta-gradient non-finite: the update is skipped.
    assert float(metrics["skipped_update"]) == 1.0
    assert int(new_state.skipped) == 1
    for a, b in zip(jax.tree.leaves(new_state.phi), jax.tree.leaves(state.phi)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Next iteration the agent whose parameters went non-finite is re-initialised.
    newer, metrics = step(new_state)
    assert float(metrics["nonfinite_agents/catch"]) >= 1.0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(newer.phi))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(newer.populations[0].params))


def test_kill_and_resume_reach_the_same_phi(tmp_path):
    cfg = tiny_config(iterations=6)
    full = meta_train.run(cfg, tmp_path / "full")
    stopped = meta_train.run(cfg, tmp_path / "resumed", stop_after_chunks=1)
    assert stopped == {"stopped_at_iteration": 2}
    resumed = meta_train.run(cfg, tmp_path / "resumed", resume=True)
    assert resumed["iterations"] == full["iterations"] == 6
    _, phi_full, info = optimizers.load(tmp_path / "full" / "optimizer.o4r")
    _, phi_resumed, _ = optimizers.load(tmp_path / "resumed" / "optimizer.o4r")
    for a, b in zip(jax.tree.leaves(phi_full), jax.tree.leaves(phi_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info["meta_iterations"] == 6 and info["trained_on"] == ["catch"]
    rows = (tmp_path / "resumed" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per meta-iteration, no duplicates after resume
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert "code_version" in config and config["config"]["num_agents"] == 4


def test_time_limit_stops_at_a_chunk_boundary_and_resume_finishes(tmp_path):
    cfg = tiny_config(iterations=6)
    stopped = meta_train.run(cfg, tmp_path / "run", time_limit_s=1e-9)
    assert stopped["stopped_at_iteration"] == 2 and stopped["stopped_by"].startswith("time limit")
    assert not (tmp_path / "run" / "optimizer.o4r").exists()  # a truncated φ never gets the final name
    _, _, info = optimizers.load(tmp_path / "run" / "optimizer_latest.o4r")
    assert info["meta_iterations"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_at_iteration"] == 2
    resumed = meta_train.run(cfg, tmp_path / "run", resume=True)
    full = meta_train.run(cfg, tmp_path / "full")
    assert resumed["iterations"] == full["iterations"] == 6
    _, phi_full, _ = optimizers.load(tmp_path / "full" / "optimizer.o4r")
    _, phi_resumed, _ = optimizers.load(tmp_path / "run" / "optimizer.o4r")
    for a, b in zip(jax.tree.leaves(phi_full), jax.tree.leaves(phi_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_code_version_names_the_commit_a_copied_tree_came_from(monkeypatch):
    from optim4rl import runs

    assert "git_commit_from" not in runs.code_version()
    monkeypatch.setenv("OPTIM4RL_GIT_COMMIT", "0123abcd")  # wins over this checkout's own .git
    version = runs.code_version()
    assert version["git_commit"] == "0123abcd" and version["git_commit_from"] == "OPTIM4RL_GIT_COMMIT"
    assert "git_dirty" not in version


def test_the_recorded_commit_is_the_one_the_process_started_with(tmp_path):
    # A long sweep or reproduction writes many run records; a commit made meanwhile in the
    # checkout must not be recorded for runs whose code was imported before it.
    import shutil
    import subprocess

    from optim4rl import runs

    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})

    git("init", "-q")
    (tmp_path / "a").write_text("1")
    git("add", "a")
    git("commit", "-qm", "one")
    first = runs._git_version(tmp_path)
    (tmp_path / "a").write_text("2")
    git("commit", "-qam", "two")
    assert runs._git_version(tmp_path) == first and len(first["git_commit"]) == 40


MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np
    from optim4rl.meta import MetaConfig, MetaTask, MetaTrainer
    from optim4rl.meta.train import place
    assert jax.device_count() == 4, jax.devices()
    cfg = MetaConfig(tasks=(MetaTask("catch", 1.0, 1e-3),), num_agents=8, reset_interval=4,
                     inner_updates=2, rollout_length=5, iterations_per_chunk=1, eval_steps=0)
    tr = MetaTrainer(cfg)
    single = tr.init()
    sharded = place(tr.init(), tr)
    leaf = sharded.populations[0].params
    assert len(jax.tree.leaves(leaf)[0].sharding.device_set) == 4
    step = jax.jit(tr.meta_step)
    a, _ = step(single)
    b, _ = step(sharded)
    for x, y in zip(jax.tree.leaves(a.phi), jax.tree.leaves(b.phi)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6)
    print("OK")
""")


def test_one_meta_step_on_4_devices_equals_1_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_agent_normalised_meta_gradient_is_the_mean_of_unit_norm_agent_gradients():
    """meta_normalize="agent": every agent's meta-gradient counts with unit norm, then the task's
    mean is rescaled to meta_max_norm as usual."""
    tr = MetaTrainer(tiny_config(meta_normalize="agent", meta_max_norm=None))
    state = tr.init()
    setup, pop = tr.tasks[0], state.populations[0]
    key = jax.random.key(5)
    grad, _, loss, _, _ = jax.jit(lambda phi, pop: tr.task_meta_gradient(phi, pop, key, setup))(state.phi, pop)
    keys = jax.random.split(key, len(setup.offsets))
    expected, losses = None, []
    for j in range(len(setup.offsets)):
        agent = jax.tree.map(lambda x: x[j], pop)
        (l, _), g = jax.value_and_grad(tr.agent_meta_loss, has_aux=True)(state.phi, agent, keys[j], setup)
        g = jax.tree.map(lambda x: x / optimizers_norm(g) / len(setup.offsets), g)
        expected = g if expected is None else jax.tree.map(jnp.add, expected, g)
        losses.append(float(l))
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-4)
    # The unit-norm mean has norm at most 1 (equality only if all agents agree).
    assert 0.0 < float(optimizers_norm(grad)) <= 1.0 + 1e-5
    # The task rule (docs/paper_settings.md §2) is the default, and an unknown rule is one clear error.
    assert MetaConfig().meta_normalize == "task"


def test_remat_settings_give_the_same_meta_gradient_and_auto_is_resolved(monkeypatch):
    """"full" (jax.checkpoint of each inner update) and "none" differ only in what the backward
    pass keeps; "auto" picks one from the memory estimate; true/false are the old spellings."""
    from optim4rl.config import from_dict
    from optim4rl.errors import ConfigError
    from optim4rl.meta import pipeline

    assert from_dict(MetaConfig, {"remat": True, "tasks": [{"env": "catch"}]}).remat == "full"
    assert from_dict(MetaConfig, {"remat": False, "tasks": [{"env": "catch"}]}).remat == "none"
    with pytest.raises(ConfigError, match="remat"):
        from_dict(MetaConfig, {"remat": "some", "tasks": [{"env": "catch"}]})

    grads = {}
    for remat in ("full", "none"):
        tr = MetaTrainer(tiny_config(remat=remat))
        assert tr.remat == remat
        state = tr.init()
        setup, pop = tr.tasks[0], state.populations[0]
        meta_gradient = jax.jit(lambda phi, pop, key: tr.task_meta_gradient(phi, pop, key, setup)[0])
        grads[remat] = meta_gradient(state.phi, pop, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)

    tr = MetaTrainer(tiny_config())
    # K x agents x (the residuals of one update: at least the gradient and the recurrent state).
    coordinates = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda x: x[0], tr.init().populations[0].params))[0].size
    assert tr.remat_estimate_bytes >= 2 * 4 * 4 * coordinates
    assert tr.remat == "none"  # a few MiB
    monkeypatch.setattr(pipeline, "device_memory_bytes", lambda: tr.remat_estimate_bytes)
    assert MetaTrainer(tiny_config()).remat == "full"


def test_unknown_meta_normalize_is_a_config_error():
    from optim4rl.config import from_dict
    from optim4rl.errors import ConfigError

    with pytest.raises(ConfigError, match="meta_normalize"):
        from_dict(MetaConfig, {"meta_normalize": "global", "tasks": [{"env": "catch"}]})


@pytest.mark.parametrize("name", [n for n, _ in sorted(__import__("optim4rl.config").config.list_presets().items())])
def test_every_meta_train_preset_builds_a_valid_config(name):
    from optim4rl import config as config_lib

    data = config_lib.load_preset(name)
    if data.get("command") != "meta-train":
        pytest.skip(f"{name} is not a meta-train preset")
    cfg = meta_train.load_config(dict(data["meta"]))
    assert cfg.iterations >= 1 and cfg.tasks


def test_big_dense_long_64env_agents_live_as_long_as_a_compare_run():
    # The preset's point: each agent trains as many env steps as `compare` gives big_dense_long
    # (1e6, 64 envs), where Adam separates from the untrained φ (docs/DESIGN.md).
    from optim4rl import config as config_lib

    cfg = meta_train.load_config(dict(config_lib.load_preset("big_dense_long-64env")["meta"]))
    lifetime = cfg.reset_interval * cfg.inner_updates * cfg.envs_per_agent * cfg.rollout_length
    assert cfg.envs_per_agent == 64 and lifetime >= 1_000_000
    assert cfg.iterations >= 2 * cfg.reset_interval  # the ages have spread before the last half
