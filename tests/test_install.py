"""A clean install works: every module imports, and one env of every family can be made.

An undeclared dependency (gymnax imports six without declaring it) fails here, fast and clearly,
instead of deep inside a training test.
"""

import importlib
import pkgutil

import pytest

import optim4rl
from optim4rl import envs
from optim4rl.config import PRESET_DIR, list_presets, load_preset

MODULES = sorted(m.name for m in pkgutil.walk_packages(optim4rl.__path__, "optim4rl.")
                 if m.name != "optim4rl.torch" and not m.name.startswith("optim4rl.torch."))


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("name", ["catch", "small_dense_long", "inverted_double_pendulum", "CartPole-v1"])
def test_one_env_of_every_family_is_made(name):
    env = envs.make(name)
    assert env.observation_shape
    families = {envs.env_family(n) for n in ["catch", "small_dense_long", "inverted_double_pendulum",
                                             "CartPole-v1"]}
    assert families == {"catch", "gridworld", "brax", "gymnax"}


def test_presets_are_package_data():
    # Presets live inside the package, so a wheel (not only a checkout) has them.
    assert PRESET_DIR.parent == __import__("pathlib").Path(optim4rl.__file__).parent
    presets = list_presets()
    assert {"catch-cpu", "big_dense_long-64env", "grid6"} <= set(presets)
    for name in presets:
        assert load_preset(name)["command"] in ("meta-train", "train", "compare")


def test_declared_dependencies_cover_the_imports():
    import tomllib
    from pathlib import Path

    pyproject = Path(optim4rl.__file__).parent.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("installed from a wheel: no pyproject.toml beside the package")
    declared = " ".join(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    for package in ("jax", "flax", "optax", "brax", "gymnax", "numpy", "scipy", "matplotlib", "tqdm",
                    "scikit-learn", "six"):
        assert package in declared, package
