import numpy as np
import pytest

from optim4rl.analysis import response
from optim4rl.cli import main
from optim4rl.errors import ConfigError


def test_adam_is_scale_free_and_damps_noise():
    result = response.step_response("adam", magnitudes=(1e-4, 1e-2, 1.0), flip_probs=(0.0, 0.5), steps=30)
    consistent, noisy = np.asarray(result["response"])
    np.testing.assert_allclose(consistent, 1.0, atol=0.01)  # |m/sqrt(v)| = 1 for a constant gradient
    assert np.all(noisy < 0.5 * consistent)


def test_sgd_response_is_the_gradient_size():
    result = response.step_response("sgd", magnitudes=(1e-3, 0.5), flip_probs=(0.0, 0.5), steps=3)
    np.testing.assert_allclose(result["response"], [[1e-3, 0.5], [1e-3, 0.5]], rtol=1e-5)


def test_learned_optimizer_response_is_finite_and_positive():
    result = response.step_response("optim4rl:init", magnitudes=(1e-6, 1e-2), flip_probs=(0.0,), steps=4,
                                    coordinates=8)
    values = np.asarray(result["response"])
    assert values.shape == (1, 2) and np.all(np.isfinite(values)) and np.all(values > 0)
    table = response.format_response(result).splitlines()
    assert table[2] == "| sign-flip prob. \\ gradient size | 1e-06 | 0.01 |"
    assert table[4].startswith("| 0 | ") and table[4].count("|") == 4


def test_relative_response_separates_rmsprop_from_sign_descent():
    rms = np.asarray(response.relative_response("rmsprop", ratios=(0.1, 1.0, 10.0), steps=20)["response"])
    assert np.all(np.diff(rms, axis=1) > 0) and np.all(rms[:, 2] > 10 * rms[:, 0])  # follows |g|/rms
    sign = np.asarray(response.relative_response("sign_sgd", ratios=(0.1, 1.0, 10.0), steps=5)["response"])
    np.testing.assert_allclose(sign, 1.0)  # a fixed step, whatever the size
    result = response.relative_response("optim4rl:init", ratios=(0.5, 2.0), magnitudes=(1e-3,), steps=3,
                                        coordinates=4)
    table = response.format_relative(result).splitlines()
    assert table[2] == "| history size \\ last gradient / history | 0.5× | 2× |"
    assert table[4].startswith("| 0.001 | ") and np.all(np.asarray(result["response"]) > 0)
    with pytest.raises(ConfigError, match="ratios"):
        response.relative_response("adam", ratios=(0.0,))


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="flip probabilities"):
        response.step_response("adam", flip_probs=(1.5,))
    with pytest.raises(ConfigError, match="magnitudes"):
        response.step_response("adam", magnitudes=(0.0,))


def test_inspect_command_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "response.json"
    assert main(["inspect", "adam", "rmsprop", "--steps", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "`adam`" in printed and "`rmsprop`" in printed
    assert "last gradient / history" in printed
    assert out.exists()
    import json
    assert [r["spec"] for r in json.loads(out.read_text())] == ["adam", "rmsprop"]
    assert "relative" in json.loads(out.read_text())[0]
    with pytest.raises(SystemExit):
        main(["inspect", "nosuchopt"])
    assert "unknown optimizer 'nosuchopt'" in capsys.readouterr().err


def test_reproduce_report_section_covers_adam_init_and_the_shipped_files():
    from optim4rl import reproduce

    text = "\n".join(reproduce._step_response_section(["catch"]))
    for spec in ("`adam`", "`optim4rl:init`", "`optim4rl:catch`"):
        assert spec in text
