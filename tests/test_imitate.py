"""`optim4rl imitate`: fitting a learned optimizer's step sizes to Adam's; meta-train init_from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim4rl import optimizers
from optim4rl.analysis.response import step_response
from optim4rl.cli import main
from optim4rl.errors import ConfigError, ParameterFileError
from optim4rl.meta import MetaConfig, MetaTask, MetaTrainer
from optim4rl.optimizers import imitate as im

SMALL = dict(coordinates=256, horizon=60, chunk=10)


def test_gradient_streams_cover_scales_noise_and_zeros():
    g = np.asarray(im.gradient_streams(jax.random.key(0), 4096, 50))
    assert g.shape == (50, 4096) and np.isfinite(g).all()
    assert np.abs(g).max() <= 1.0
    assert 0.2 < np.mean(g == 0) < 0.5  # a quarter of the streams 50 % zero, a quarter 90 %
    scale = np.log10(np.abs(g[g != 0]))
    assert scale.min() < -7 and scale.max() > -1
    # Some streams keep their sign (signal), others flip it at random (noise).
    flips = np.mean(np.sign(g[1:]) * np.sign(g[:-1]) < 0, axis=0)
    assert flips.min() < 0.05 and flips.max() > 0.4


def test_target_magnitudes_are_adams():
    g = jnp.full((30, 3), 1e-3).at[:, 1].set(-0.5).at[:, 2].set(0.0)
    mags = np.asarray(im.magnitudes(optimizers.make_optimizer("adam", 1.0), g))
    np.testing.assert_allclose(mags[:, :2], 1.0, rtol=1e-3)  # bias-corrected, consistent gradient
    assert np.all(mags[:, 2] == 0)


def test_imitation_learns_adams_noise_damping(tmp_path):
    """From a random φ (a fixed step whatever the noise) to Adam's rule: much smaller steps when the
    gradient's sign flips at random than when it is consistent."""
    opt = optimizers.Optim4RL()
    phi0 = opt.init_meta(jax.random.key(0))
    cfg = im.ImitationConfig(steps=120, learning_rate=1e-2, **SMALL)
    phi, report = im.imitate(opt, phi0, cfg)
    assert report["heldout_loss_after"] < 0.6 * report["heldout_loss_before"]
    assert len(report["train_loss_by_chunk"]) == 12

    def noise_ratio(phi):
        path = tmp_path / "phi.o4r"
        optimizers.save(path, opt, phi, info={})
        table = step_response(f"optim4rl:{path}", magnitudes=(1e-3,), flip_probs=(0.0, 0.5))["response"]
        return table[1][0] / table[0][0]

    assert noise_ratio(phi0) > 0.8  # untrained: about the same step under noise
    assert noise_ratio(phi) < 0.5  # imitating Adam (0.2): damped
    # Same seed, same φ.
    again, _ = im.imitate(opt, phi0, cfg)
    for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_imitate_rejects_what_it_cannot_fit():
    with pytest.raises(ConfigError, match="reads the parameter values"):
        im.target_transform(optimizers.STAR(), im.ImitationConfig())
    with pytest.raises(ConfigError, match="nosuch"):
        im.target_transform(optimizers.Optim4RL(), im.ImitationConfig(target="nosuch"))
    with pytest.raises(ConfigError, match="steps"):
        im.ImitationConfig(steps=0)


def test_imitate_command_writes_a_file_with_provenance(tmp_path, capsys):
    out = tmp_path / "adam_like.o4r"
    code = main(["imitate", "--steps", "3", "--set", "coordinates=64", "--set", "horizon=10",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out squared log-error" in printed and "|Δθ|/α" in printed
    opt, phi, info = optimizers.load(out)
    assert isinstance(opt, optimizers.Optim4RL)
    assert info["imitation"]["target"] == "adam" and info["imitation"]["steps"] == 3
    assert info["start"] == "optim4rl:init" and "git_commit" in info["code_version"]
    assert info["heldout_loss_after"] <= info["heldout_loss_before"]
    optimizers.make_optimizer(f"optim4rl:{out}", 3e-3)  # loads like any parameter file


def test_meta_train_starts_from_init_from(tmp_path):
    opt = optimizers.Optim4RL(hidden_size=4)
    phi = jax.tree.map(lambda x: x + 0.5, opt.init_meta(jax.random.key(3)))
    path = tmp_path / "start.o4r"
    optimizers.save(path, opt, phi, info={})
    base = dict(tasks=(MetaTask("catch", 1.0, 1e-3),), num_agents=2, reset_interval=2,
                iterations=1, inner_updates=1, rollout_length=4, eval_steps=0)
    tr = MetaTrainer(MetaConfig(init_from=str(path), **base))
    assert tr.opt == opt
    for a, b in zip(jax.tree.leaves(tr.init().phi), jax.tree.leaves(phi)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="architecture"):
        MetaTrainer(MetaConfig(init_from=str(path), optimizer_options={"hidden_size": 8}, **base))
    with pytest.raises(ParameterFileError, match="optim4rl"):
        MetaTrainer(MetaConfig(init_from=str(path), optimizer="l2l", **base))


@pytest.mark.parametrize("args,message", [
    (["imitate", "--out", "x.txt"], ".o4r file"),
    (["imitate", "--target", "adamx", "--out", "x.o4r"], "adamx"),
    (["imitate", "--set", "horizon=0", "--out", "x.o4r"], "horizon"),
    (["imitate", "--optimizer", "star:init", "--out", "x.o4r"], "reads the parameter values"),
])
def test_imitate_bad_input_gives_one_clear_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("optim4rl: error: ") and message in err[-1]
    assert not list(tmp_path.iterdir())  # nothing written



def test_diverging_fit_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["imitate", "--steps", "2", "--set", "coordinates=32", "--set", "horizon=5",
              "--set", "learning_rate=1e30", "--set", "floor=1e-30", "--out", str(tmp_path / "x.o4r")])
    assert exit_info.value.code == 2
    assert "non-finite loss" in capsys.readouterr().err
