"""A full disk (ENOSPC) on a real filesystem: one line, and the run resumes from its last checkpoint.

The disk is a small tmpfs mounted for the test, so it needs root and a kernel that allows the
mount (CI's machine does); elsewhere the test is skipped.
"""

import errno
import os
import shutil
import subprocess
import uuid

import pytest

from optim4rl import cli, training


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount):
    """Takes every free byte of the disk; returns the filler file."""
    filler = mount / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_mid_run_stops_and_resumes_to_the_uninterrupted_result(small_disk, tmp_path):
    spec = training.TrainSpec(env="catch", seeds=2, log_chunks=6, checkpoint_every_chunks=1)
    agent = training.resolve_agent_config(spec, {"total_steps": 6 * 1280})
    full = training.run(spec, agent, tmp_path / "full", plot=False)
    state = {}

    def fill_after_three(event):
        if event["chunk"] == 3:
            state["filler"] = _fill(small_disk)

    run = small_disk / "run"
    with pytest.raises(OSError) as info:
        training.run(spec, agent, run, callback=fill_after_three, plot=False)
    assert info.value.errno == errno.ENOSPC
    assert not (run / "summary.json").exists()
    state["filler"].unlink()  # space again
    resumed = training.run(spec, agent, run, resume=True, plot=False)
    assert resumed["score_per_seed"] == full["score_per_seed"]
    assert (run / "metrics.csv").read_text() == (tmp_path / "full" / "metrics.csv").read_text()
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_disk_full_is_one_line_from_the_command_line(small_disk, capsys):
    _fill(small_disk)
    code = None
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--env", "catch", "--steps", "1280", "--out", str(small_disk / "run")])
    code = info.value.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optim4rl: error:")]
    assert code == 1 and len(err) == 1
    assert "No space left on device" in err[0] and "--resume" in err[0]
