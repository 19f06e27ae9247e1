"""optim4rl.torch against the JAX optimizers: same φ, same gradient streams, same numbers.

Every architecture (Optim4RL with sign/log and raw inputs, linear heads, the learned sign flip;
L2L; Lin; STAR) and the shipped grid6 and catch files as well as untrained φ are run for 50 steps
on gradients spanning 1e-8 … 1 with exact zeros and sign noise, in one parameter group of several
tensors; updates and recurrent states must agree to rtol 1e-5.
"""

from __future__ import annotations

import copy
import io
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optim4rl.torch as ot  # noqa: E402
from optim4rl import optimizers  # noqa: E402
from optim4rl.errors import ConfigError, Optim4RLError, ParameterFileError  # noqa: E402
from optim4rl.torch import architectures  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [(5, 7), (7,), (3, 2, 4), ()]
STEPS = 50
RTOL = 1e-5
CLASSES = {"optim4rl": ot.Optim4RL, "l2l": ot.L2L, "lin": ot.Lin, "star": ot.STAR}


def gradient_stream(seed: int, shapes=SHAPES, steps=STEPS, top=0.0):
    """Per coordinate a fixed scale, log-uniform in [1e-8, 10^top], and a persistent sign with
    sign noise on top; some coordinates always zero, others zero at random steps, and one step
    with an all-zero gradient."""
    rng = np.random.default_rng(seed)
    sizes = [int(np.prod(s, dtype=int)) for s in shapes]
    n = sum(sizes)
    scale = 10.0 ** rng.uniform(-8.0, top, n)
    mean = rng.choice([-1.0, 1.0], n) * rng.uniform(0.0, 1.0, n)
    always_zero = rng.random(n) < 0.05
    stream = []
    for t in range(steps):
        g = scale * (mean + rng.normal(0.0, 1.0, n))
        g[always_zero | (rng.random(n) < 0.1)] = 0.0
        if t == 7:
            g[:] = 0.0
        g = g.astype(np.float32)
        stream.append([c.reshape(s) for c, s in zip(np.split(g, np.cumsum(sizes)[:-1]), shapes)])
    return stream


def initial_params(seed: int, shapes=SHAPES):
    rng = np.random.default_rng(seed + 1000)
    return [rng.normal(0.0, 0.3, s).astype(np.float32) for s in shapes]


def run_jax(opt, phi, lr, grad_clip, stream, params):
    """Per step: (params before, update, state after) of the JAX transformation."""
    tx = opt.transform(phi, lr, grad_clip=grad_clip)
    params = [jnp.asarray(p) for p in params]
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for grads in stream:
        updates, state = update([jnp.asarray(g) for g in grads], state, params)
        history.append(([np.array(p) for p in params], [np.array(u) for u in updates],
                        {k: np.asarray(v) for k, v in state._asdict().items() if k != "count"}))
        params = optax.apply_updates(params, updates)
    return history


def torch_states(optimizer, params):
    """The torch optimizer's per-parameter states, concatenated like JAX's ``[features, N]``."""
    names = architectures.state_sizes(optimizer.architecture, optimizer.config)
    return {name: np.concatenate([optimizer.state[p][name].reshape(size, -1).numpy()
                                  for p in params], axis=1)
            for name, size in names.items()}


def assert_close(actual, expected, scale, what):
    # atol: float32 rounding of the largest values in the array, so that exact zeros and values
    # many orders below the largest (from 1e-8 gradients) are compared in absolute terms.
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    atol = 1e-6 * max(scale, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=what)


def compare_with_jax(optimizer_class, file, opt, phi, lr=3e-3, grad_clip=None, seed=0, top=0.0):
    """Feed one stream to both; torch parameters are float64 holding JAX's float32 parameters
    before each step, so ``p_after − p_before`` is the float32 update exactly."""
    stream = gradient_stream(seed, top=top)
    history = run_jax(opt, phi, lr, grad_clip, stream, initial_params(seed))
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    optimizer = optimizer_class(params, lr=lr, file=file, grad_clip=grad_clip)
    for t, (grads, (before, updates, state)) in enumerate(zip(stream, history)):
        with torch.no_grad():
            for p, value in zip(params, before):
                p.copy_(torch.from_numpy(value))
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g).double()
        optimizer.step()
        got = np.concatenate([(p.detach().numpy() - b).ravel() for p, b in zip(params, before)])
        want = np.concatenate([u.ravel() for u in updates])
        assert_close(got, want, np.abs(want).max(), f"update at step {t}")
        for name, value in torch_states(optimizer, params).items():
            assert_close(value, state[name], np.abs(state[name]).max(), f"{name} at step {t}")
    return optimizer


def saved(tmp_path, opt, seed=3):
    phi = optimizers.make._init_meta(opt, jax.random.key(seed))  # jitted: eager init is slow
    path = optimizers.save(tmp_path / f"{opt.name}-{seed}.o4r", opt, phi, info={"seed": seed})
    return path, phi


# -- the same numbers as JAX --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grid6", "catch", "big_dense_long-raw"])
def test_pretrained_optim4rl_matches_jax(name):
    opt, phi, _ = optimizers.load(ROOT / "optim4rl" / "pretrained" / f"{name}.o4r")
    compare_with_jax(ot.Optim4RL, f"optim4rl:{name}", opt, phi)


@pytest.mark.parametrize("architecture", [
    optimizers.Optim4RL(),
    optimizers.Optim4RL(inputs="raw", head_sizes=()),  # the RLC 2024 code's optimizer
    # sign_bias near 0 so that the learned sign is -1 on some coordinates; eps large enough to
    # matter next to exp(o2).
    optimizers.Optim4RL(sign_flip=True, sign_bias=0.1, log_scale=0.1, hidden_size=4,
                        head_sizes=(8,), eps=0.5, log_eps=1e-12),
    optimizers.L2L(),
    optimizers.Lin(head_sizes=(8,)),
    optimizers.STAR(),
    optimizers.STAR(rms_decays=(0.9, 0.99, 0.999), hidden_layers=1, hidden_size=8),
], ids=["optim4rl", "rlc2024", "optim4rl-options", "l2l", "lin", "star", "star-options"])
def test_untrained_phi_matches_jax(tmp_path, architecture):
    path, phi = saved(tmp_path, architecture)
    compare_with_jax(CLASSES[architecture.name], path, architecture, phi)


@pytest.mark.parametrize("name", ["l2l-big_dense_long", "lin-big_dense_long",
                                  "star-big_dense_long"])
def test_pretrained_baselines_match_jax(name):
    opt, phi, _ = optimizers.load(ROOT / "optim4rl" / "pretrained" / f"{name}.o4r")
    compare_with_jax(CLASSES[opt.name], f"{opt.name}:{name}", opt, phi)


@pytest.mark.parametrize("architecture", ["optim4rl", "star"])
def test_grad_clip_matches_jax(architecture):
    opt, phi, _ = optimizers.learned_from_spec(f"{architecture}:init")
    # Gradients up to 10, clipped elementwise at 1 before the network.
    compare_with_jax(CLASSES[architecture], f"{architecture}:init", opt, phi, grad_clip=1.0,
                     top=1.0)


def test_init_source_is_the_untrained_phi_of_make_optimizer():
    opt, phi, _ = optimizers.learned_from_spec("optim4rl:init", inputs="raw", head_sizes=())
    compare_with_jax(lambda params, **kw: ot.Optim4RL(params, inputs="raw", head_sizes=(), **kw),
                     "optim4rl:init", opt, phi)


def test_float32_training_trajectory_matches_jax():
    """Realistic use: float32 parameters updated in place for 50 steps, no resets."""
    opt, phi, _ = optimizers.load(ROOT / "optim4rl" / "pretrained" / "grid6.o4r")
    stream = gradient_stream(5)
    history = run_jax(opt, phi, 1e-2, 1.0, stream, initial_params(5))
    params = [torch.tensor(p, requires_grad=True) for p in initial_params(5)]
    optimizer = ot.Optim4RL(params, lr=1e-2, file="optim4rl:grid6", grad_clip=1.0)
    for t, grads in enumerate(stream):
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        optimizer.step()
        if t + 1 < STEPS:
            # 50 float32 steps of two implementations that sum in different orders (JAX fuses the
            # GRU's input projection into its gates): differences of a few ulps accumulate, so
            # parameters near 0 get an absolute tolerance of 1e-6 (steps here are ~1e-2).
            for p, want in zip(params, history[t + 1][0]):
                np.testing.assert_allclose(p.detach().numpy(), want, rtol=RTOL, atol=1e-6)


def test_parameter_groups_have_their_own_lr_and_clip():
    opt, phi, _ = optimizers.load(ROOT / "optim4rl" / "pretrained" / "grid6.o4r")
    stream = gradient_stream(2)
    first, second = [g[:2] for g in stream], [g[2:] for g in stream]
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    optimizer = ot.Optim4RL([{"params": params[:2]},
                             {"params": params[2:], "lr": 1e-2, "grad_clip": 1e-4}], lr=3e-3)
    jax_first = run_jax(opt, phi, 3e-3, None, first, [np.zeros(s, np.float32) for s in SHAPES[:2]])
    jax_second = run_jax(opt, phi, 1e-2, 1e-4, second,
                         [np.zeros(s, np.float32) for s in SHAPES[2:]])
    for t, grads in enumerate(stream):
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        with torch.no_grad():
            for p in params:
                p.zero_()  # the update is then p after the step (params are not inputs here)
        optimizer.step()
        want = jax_first[t][1] + jax_second[t][1]
        for p, w in zip(params, want):
            assert_close(p.detach().numpy(), w, np.abs(w).max(), f"step {t}")


# -- torch.optim.Optimizer behaviour ------------------------------------------------------------


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=generator)
        loss = (model(x) - x[:, :3]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()


@pytest.mark.parametrize("name", ["optim4rl", "l2l", "lin", "star"])
def test_state_dict_round_trip_continues_identically(name):
    model = small_model()
    optimizer = CLASSES[name](model.parameters(), lr=1e-3, grad_clip=1.0)
    train_steps(model, optimizer, 10, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train_steps(model, optimizer, 10, seed=2)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    restored = small_model(seed=99)
    restored.load_state_dict(checkpoint["model"])
    restored_optimizer = CLASSES[name](restored.parameters(), lr=5.0)  # lr comes from the dict
    restored_optimizer.load_state_dict(checkpoint["optimizer"])
    assert restored_optimizer.param_groups[0]["lr"] == 1e-3
    train_steps(restored, restored_optimizer, 10, seed=2)
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(model.parameters(), restored.parameters()):
        for key, value in optimizer.state[a].items():
            torch.testing.assert_close(value, restored_optimizer.state[b][key], rtol=0, atol=0)


def test_state_is_per_parameter_and_float32_and_resets():
    model = small_model().to(torch.float64)
    optimizer = ot.Optim4RL(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    weight = model[0].weight
    state = optimizer.state[weight]
    assert state["hidden_m"].shape == (8, *weight.shape)
    assert state["hidden_m"].dtype == torch.float32
    assert float(state["step"]) == 1.0
    # A parameter without a gradient is left alone, state included.
    before = model[2].bias.detach().clone()
    hidden = optimizer.state[model[2].bias]["hidden_m"].clone()
    model[2].bias.grad = None
    optimizer.step()
    assert torch.equal(model[2].bias, before)
    assert torch.equal(optimizer.state[model[2].bias]["hidden_m"], hidden)
    assert float(optimizer.state[weight]["step"]) == 2.0
    # Restarting the recurrent states (an agent re-initialised) gives the first step again.
    fresh = ot.Optim4RL([torch.zeros_like(weight, requires_grad=True)], lr=1e-3)
    fresh.param_groups[0]["params"][0].grad = torch.ones_like(weight)
    fresh.step()
    optimizer.state.clear()
    with torch.no_grad():
        weight.zero_()
    optimizer.step()
    torch.testing.assert_close(weight, fresh.param_groups[0]["params"][0])


def test_copies_and_lr_schedulers():
    model = small_model()
    optimizer = ot.STAR(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=4)
    for _ in range(5):
        train_steps(model, optimizer, 1, seed=0)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0  # annealed to zero: allowed, steps go on
    train_steps(model, optimizer, 1, seed=0)
    clone = copy.deepcopy(optimizer)
    assert clone.config == optimizer.config and clone.phi_sha256 == optimizer.phi_sha256
    assert "star" in repr(clone) or "STAR" in repr(clone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["optim4rl", "star"])
def test_cuda_matches_cpu(name):
    models = [small_model(), small_model().cuda()]
    optimizers_ = [CLASSES[name](m.parameters(), lr=1e-3, grad_clip=1.0) for m in models]
    for model, optimizer in zip(models, optimizers_):
        train_steps(model, optimizer, 20, seed=3)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)


# -- files, errors, and what is imported --------------------------------------------------------


def test_architectures_mirror_the_jax_classes():
    import dataclasses

    for name, cls in optimizers.LEARNED.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert architectures.ARCHITECTURES[name] == defaults, name
    for opt in [optimizers.Optim4RL(), optimizers.Optim4RL(inputs="raw", head_sizes=(),
                                                           sign_flip=True),
                optimizers.L2L(head_sizes=(4, 4, 4)), optimizers.Lin(hidden_size=3),
                optimizers.STAR(), optimizers.STAR(rms_decays=(0.9, 0.9, 0.9), hidden_layers=0)]:
        config = architectures.check_config(opt.name, opt.config())
        assert architectures.meta_shapes(opt.name, config) == opt.meta_shapes(), opt
    assert architectures.STEP_TIMESCALES == optimizers.star.STEP_TIMESCALES


def test_reader_gives_the_jax_loaders_tensors():
    for path in sorted((ROOT / "optim4rl" / "pretrained").glob("*.o4r")):
        opt, phi, info = optimizers.load(path)
        loaded = ot.read(path)
        assert loaded.architecture == opt.name and loaded.info == info
        assert loaded.config == architectures.check_config(opt.name, opt.config())
        for name, leaf in optimizers.base.named_leaves(phi):
            np.testing.assert_array_equal(loaded.tensors[name], np.asarray(leaf))


def test_bad_files_give_the_jax_loaders_messages(tmp_path):
    good = (ROOT / "optim4rl" / "pretrained" / "catch.o4r").read_bytes()
    cases = {"empty.o4r": b"", "magic.o4r": b"PK\x03\x04" + good[4:],
             "short.o4r": good[:10], "cut.o4r": good[:-4], "extra.o4r": good + b"\0",
             "flipped.o4r": good[:-1] + bytes([good[-1] ^ 1])}
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ParameterFileError) as jax_error:
            optimizers.load(path)
        with pytest.raises(ParameterFileError) as torch_error:
            ot.Optim4RL([torch.zeros(2)], file=path)
        assert str(torch_error.value) == str(jax_error.value)
        assert "\n" not in str(torch_error.value)
    with pytest.raises(ParameterFileError, match="no such optimizer parameter file"):
        ot.Optim4RL([torch.zeros(2)], file=tmp_path / "missing.o4r")


@pytest.mark.parametrize("call, words", [
    (lambda p: ot.Optim4RL(p, lr=float("nan")), "lr must be a positive finite"),
    (lambda p: ot.Optim4RL(p, lr=float("inf")), "lr must be a positive finite"),
    (lambda p: ot.Optim4RL(p, lr=0.0), "lr must be a positive finite"),
    (lambda p: ot.Optim4RL(p, lr=-1e-3), "lr must be a positive finite"),
    (lambda p: ot.Optim4RL(p, lr="fast"), "lr must be a positive number"),
    (lambda p: ot.Optim4RL(p, grad_clip=float("nan")), "grad_clip must be"),
    (lambda p: ot.Optim4RL([{"params": p, "lr": -1.0}]), "lr must be a positive finite"),
    (lambda p: ot.Optim4RL(p, file="optim4rl:nope"), "unknown pretrained optimizer 'nope'"),
    (lambda p: ot.Optim4RL(p, file="nope"), "unknown pretrained optimizer 'nope'"),
    (lambda p: ot.Optim4RL(p, file="optim4rl:"), "give a source after the colon"),
    (lambda p: ot.L2L(p, file="optim4rl:grid6"), "names a optim4rl optimizer: use"),
    (lambda p: ot.L2L(p, file=ROOT / "optim4rl/pretrained/grid6.o4r"),
     "holds a 'optim4rl' optimizer, not 'l2l'"),
    (lambda p: ot.Optim4RL(p, file="optim4rl:grid6", inputs="raw"),
     "only allowed with file='optim4rl:init'"),
    (lambda p: ot.Optim4RL(p, file="optim4rl:init", inputs="cooked"), "inputs must be one of"),
    (lambda p: ot.Optim4RL(p, file="optim4rl:init", hidden=3), "unknown optim4rl option"),
])
def test_bad_input_raises_one_line(call, words):
    with pytest.raises(Optim4RLError) as error:
        call([torch.zeros(3, requires_grad=True)])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_from_file_picks_the_class(tmp_path):
    path, _ = saved(tmp_path, optimizers.Lin())
    assert isinstance(ot.from_file([torch.zeros(2)], path), ot.Lin)
    assert isinstance(ot.from_file([torch.zeros(2)], "star:star-big_dense_long"), ot.STAR)
    with pytest.raises(ConfigError):
        ot.from_file([torch.zeros(2)], "grid7")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPTIM4RL_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_running_imports_neither_jax_nor_optax():
    result = run_python("""
        import sys, torch, optim4rl.torch as ot
        for cls in (ot.Optim4RL, ot.L2L, ot.Lin, ot.STAR):
            p = torch.nn.Parameter(torch.ones(3, 2))
            opt = cls([p], lr=1e-3)
            p.grad = torch.ones(3, 2)
            opt.step()
            opt.load_state_dict(opt.state_dict())
        print(sorted(m for m in ("jax", "optax", "flax") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_torch_one_line_names_the_extra_and_the_core_is_unaffected():
    result = run_python("""
        import sys
        import optim4rl, optim4rl.optimizers
        print("core imported torch:", "torch" in sys.modules)
        sys.modules["torch"] = None  # as if torch were not installed
        optim4rl.make_optimizer("optim4rl:grid6", 1e-3)
        import optim4rl.torch
    """)
    assert "core imported torch: False" in result.stdout, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == ('ImportError: optim4rl.torch needs PyTorch, which is not installed: '
                         'pip install "optim4rl[torch]"')
