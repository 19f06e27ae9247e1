"""Run directories: the resolved config, metrics, summaries and atomic checkpoints.

Every command writes into one directory::

    DIR/config.json      full resolved config, seeds, code version, command line
    DIR/metrics.csv      one row per logged point (also metrics.jsonl)
    DIR/summary.json     final figures
    DIR/checkpoint.msgpack  latest checkpoint (written atomically: tmp file + os.replace)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.errors import Optim4RLError

_PACKAGE_ROOT = Path(__file__).resolve().parent


def code_version() -> dict[str, Any]:
    """Package version plus the git commit of the source tree (when it is a git checkout; an
    installed wheel records the package version only).

    ``OPTIM4RL_GIT_COMMIT``, when set, names the commit instead: set it when the tree was copied
    to another machine, whose .git (if any) may hold another state of the tree.
    """
    from optim4rl import __version__

    version: dict[str, Any] = {"package": __version__}
    if os.environ.get("OPTIM4RL_GIT_COMMIT"):
        version["git_commit"] = os.environ["OPTIM4RL_GIT_COMMIT"]
        version["git_commit_from"] = "OPTIM4RL_GIT_COMMIT"
    else:
        version.update(_git_version(_PACKAGE_ROOT.parent))  # (a copy: the cached dict stays)
    version["jax"] = jax.__version__
    version["backend"] = jax.default_backend()
    version["devices"] = jax.device_count()
    return version


@functools.lru_cache(maxsize=None)
def _git_version(repo: Path) -> dict[str, Any]:
    # Only a source checkout (the package beside the repository's .git) has a commit of its own;
    # an installed wheel inside some other repository (a venv in a clone) must not claim one.
    # Read once per process: the code a process runs is what it imported, so a commit made while
    # a long sweep or reproduction runs must not be recorded for its later runs.
    if not (repo / ".git").exists():
        return {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=5)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def command_line() -> str:
    """The command that started this process, as a user would retype it (``python -m optim4rl`` too)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "optim4rl":
        argv[0] = "python -m optim4rl"
    return " ".join(argv)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, numpy scalars -> plain JSON values (NaN -> None)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, jax.Array, np.ndarray)):
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give every file of a run directory the same mode as the
        # ones written with open() (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())


# Files a run may leave in its directory (what --overwrite removes; nothing else is touched).
RUN_FILES = ("config.json", "summary.json", "metrics.csv", "metrics.jsonl", "checkpoint.msgpack",
             "learning_curve.png", "evaluations.csv", "evaluations.jsonl", "optimizer.o4r",
             "optimizer_latest.o4r", "meta_training.png")


def check_writable_dir(path: Path | str, what: str = "--out") -> Path:
    """One clear line (Optim4RLError) unless `path` is, or can become, a writable directory.

    Nothing is created: this runs before any work, so bad input leaves no trace.
    """
    path = Path(path)
    if str(path) == "":
        raise Optim4RLError(f"{what} must name a directory, got ''")
    if path.exists() and not path.is_dir():
        raise Optim4RLError(f"{what} {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise Optim4RLError(f"{what} {path}: {probe} is a file, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise Optim4RLError(f"{what} {path}: {probe} is not writable")
    return path


def check_writable_file(path: Path | str, what: str = "--out") -> Path:
    """One clear line unless `path` can be written as a file (checked before any work)."""
    path = Path(path)
    if str(path) == "" or path.name == "":
        raise Optim4RLError(f"{what} must name a file, got '{path}'")
    if path.is_dir():
        raise Optim4RLError(f"{what} {path} is a directory; give a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what)
    if path.exists() and not os.access(path, os.W_OK):
        raise Optim4RLError(f"{what} {path} is not writable")
    return path


# Config fields that decide when a run saves, not what it computes: a run resumed or reused with
# other values is the same run.
BOOKKEEPING_KEYS = frozenset({"checkpoint_every_s", "checkpoint_every_chunks"})


# Config fields added after runs were recorded, with the value that reproduces the behaviour of
# records that lack them: such a record is the same run as one that has the default.
ADDED_LATER = {"conv_layout": "map"}


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs (bookkeeping keys aside)."""
    # A table added to a config later, left empty (its default), is no difference from a run
    # recorded before it existed.
    if (old == "<absent>" and new == {}) or (old == {} and new == "<absent>"):
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys = list(dict.fromkeys([*old, *new]))
        diffs = []
        for k in keys:
            if k in BOOKKEEPING_KEYS:
                continue
            # A parameter file is its bytes: the same file read from another checkout or
            # directory (a fresh clone, a moved project) is the same run; its SHA-256 decides.
            if k == "path" and prefix.endswith("optimizer_source.") and "sha256" in old \
                    and "sha256" in new:
                continue
            if k in ADDED_LATER and (k not in old or k not in new) and \
                    old.get(k, ADDED_LATER[k]) == new.get(k, ADDED_LATER[k]):
                continue
            diffs += config_differences(old.get(k, "<absent>"), new.get(k, "<absent>"),
                                        f"{prefix}{k}.")
        return diffs
    return [] if old == new else [prefix.rstrip(".")]


def recorded_config(path: Path | str) -> dict | None:
    """The `config` a run directory's config.json records, or None when there is none."""
    config = Path(path) / "config.json"
    if not config.exists():
        return None
    try:
        return json.loads(config.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise Optim4RLError(f"{config} is unreadable or not an optim4rl run record") from None


def claim_run_dir(path: Path | str, config: Any, *, resume: bool = False, overwrite: bool = False,
                  extendable: Mapping[str, str] | None = None, fixed: Mapping[str, str] | None = None,
                  finished: str = "summary.json") -> str:
    """Decides what a new run may do with directory `path`, before anything is written there.

    Returns "fresh" (empty or absent directory, or --overwrite), "resume" (a checkpoint of the
    same config: continue it) or "finished" (a finished run of the same config: nothing to do).
    A run of another config is refused with one line naming the differing keys, so a directory
    never holds numbers of one config under the record of another. `extendable` maps dotted
    keys that a resumed run may increase (the step or iteration budget) to the flag that sets
    them; their change is allowed on --resume only and recorded by the caller. `fixed` maps keys
    that --resume may not change to the reason, given in the refusal.
    """
    path = check_writable_dir(path)
    if resume and overwrite:
        raise Optim4RLError("--resume and --overwrite exclude each other")
    wanted = to_jsonable(config)
    present = [n for n in RUN_FILES if (path / n).exists()]
    if overwrite:
        for name in present:
            (path / name).unlink()
        _remove_stale_tmp(path)
        return "fresh"
    recorded = recorded_config(path)
    checkpoint = (path / "checkpoint.msgpack").exists()
    if recorded is None:
        if resume:
            raise Optim4RLError(f"nothing to resume in {path}: it holds no run (no config.json)")
        if present:
            raise Optim4RLError(f"{path} holds files of an unrecorded run ({', '.join(present)}); "
                                "use --overwrite to replace them or choose another --out")
        if path.exists():
            _remove_stale_tmp(path)
        return "fresh"
    diffs = config_differences(recorded, wanted)
    extended = [d for d in diffs if d in (extendable or {})]
    others = [d for d in diffs if d not in (extendable or {})]
    for key in others:
        if resume and key in (fixed or {}):
            raise Optim4RLError(f"--resume cannot change {key} of the run in {path}: {fixed[key]}")
    if others or (extended and not resume):
        shown = ", ".join(others + extended)
        raise Optim4RLError(f"{path} holds a run with a different config ({shown}); use --resume with "
                            "the same settings to continue it, --overwrite to replace it, or another --out")
    if resume:
        if not checkpoint:
            raise Optim4RLError(f"nothing to resume in {path}: it has no checkpoint.msgpack")
        for key in extended:
            old, new = _dotted(recorded, key), _dotted(wanted, key)
            if not (isinstance(old, (int, float)) and isinstance(new, (int, float)) and new > old):
                raise Optim4RLError(f"--resume can extend {key} ({extendable[key]}) but not shrink it "
                                    f"({old} -> {new})")
        if extended:  # the finished run's summary is no longer this run's: a kill must not revive it
            (path / finished).unlink(missing_ok=True)
        _remove_stale_tmp(path)
        return "resume"
    if (path / finished).exists() and _finished_summary(path / finished):
        return "finished"
    if checkpoint:
        raise Optim4RLError(f"{path} holds an unfinished run with this config; continue it with "
                            "--resume, or replace it with --overwrite")
    return "fresh"


def _finished_summary(path: Path) -> bool:
    try:
        return "stopped_at_iteration" not in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


def _remove_stale_tmp(path: Path) -> None:
    """Temporary files left by a checkpoint write that a kill interrupted (atomic_write_bytes)."""
    for tmp in path.glob("*.tmp"):
        if any(tmp.name.lstrip(".").startswith(name + ".") for name in RUN_FILES):
            tmp.unlink(missing_ok=True)


class RunDir:
    """A run directory. Creating one never deletes files; `resume` reuses existing metrics."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Any, **extra: Any) -> dict:
        record = {
            "config": to_jsonable(config),
            **{k: to_jsonable(v) for k, v in extra.items()},
            "code_version": code_version(),
            "command": command_line(),
        }
        write_json(self.file("config.json"), record)
        return record

    def write_summary(self, summary: Mapping[str, Any], name: str = "summary.json") -> None:
        write_json(self.file(name), summary)

    def metrics_writer(self, name: str = "metrics", append: bool = False) -> "MetricsWriter":
        return MetricsWriter(self.file(f"{name}.csv"), self.file(f"{name}.jsonl"), append=append)


class MetricsWriter:
    """Streams rows to CSV and JSONL; the column set is fixed by the first row."""

    def __init__(self, csv_path: Path, jsonl_path: Path, append: bool = False):
        self.csv_path, self.jsonl_path = csv_path, jsonl_path
        self.columns: list[str] | None = None
        if append and csv_path.exists():
            with open(csv_path, newline="") as f:
                header = next(csv.reader(f), None)
            self.columns = header
        else:
            for p in (csv_path, jsonl_path):
                if p.exists():
                    p.unlink()

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = [to_jsonable(dict(r)) for r in rows]
        if not rows:
            return
        new = self.columns is None
        if new:
            self.columns = list(rows[0].keys())
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns})
        with open(self.jsonl_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def read_csv(path: Path | str, tolerate_torn: bool = False) -> list[dict[str, Any]]:
    """Reads a metrics CSV back: integers as ints, other numbers as floats, empty cells as NaN.

    `tolerate_torn` drops rows a kill or a full disk cut short (missing cells, or a last line
    without its newline) instead of failing on them.
    """

    def conv(v: str) -> Any:
        if v == "":
            return float("nan")
        try:
            return int(v)
        except ValueError:
            pass
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        text = f.read()
    if tolerate_torn and text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if None in row or any(v is None for v in row.values()):
            if tolerate_torn:
                continue
            raise Optim4RLError(f"{path} has a malformed row (a torn write?); --resume drops it")
        rows.append({k: conv(v) for k, v in row.items()})
    return rows


# --- checkpoints ------------------------------------------------------------------------------

def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: Path | str, tree: Any, meta: Mapping[str, Any] | None = None) -> None:
    """Saves a pytree of arrays (typed PRNG keys included) atomically, with a JSON `meta` record."""
    from flax import serialization

    leaves, treedef = jax.tree.flatten(tree)
    arrays = {
        str(i): np.asarray(jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)
    }
    payload = {"meta": json.dumps(to_jsonable(meta or {})), "treedef": str(treedef), "leaves": arrays}
    atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load_checkpoint(path: Path | str, like: Any) -> tuple[Any, dict]:
    """Loads a checkpoint into the structure of `like`; raises a one-line error on mismatch."""
    from flax import serialization

    path = Path(path)
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        arrays, meta = payload["leaves"], json.loads(payload["meta"])
    except FileNotFoundError:
        raise Optim4RLError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise Optim4RLError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})") from None
    like_leaves, treedef = jax.tree.flatten(like)
    if len(arrays) != len(like_leaves):
        raise Optim4RLError(
            f"checkpoint {path} does not match this run ({len(arrays)} arrays, expected {len(like_leaves)})"
        )
    leaves = []
    for i, ref in enumerate(like_leaves):
        arr = np.asarray(arrays[str(i)])
        if _is_key(ref):
            leaves.append(jax.random.wrap_key_data(jnp.asarray(arr), impl=jax.random.key_impl(ref)))
            continue
        if arr.shape != np.shape(ref):
            raise Optim4RLError(
                f"checkpoint {path} does not match this run (array {i}: shape {arr.shape}, expected {np.shape(ref)})"
            )
        leaves.append(jnp.asarray(arr, dtype=ref.dtype))
    tree = jax.tree.unflatten(treedef, leaves)
    # Keep the sharding of the template so a resumed run is laid out like a fresh one, and its
    # commitment: a committed copy of an uncommitted (single-device) template would make jit
    # compile the resumed run's chunk a second time.
    tree = jax.tree.map(
        lambda x, ref: jax.device_put(x, ref.sharding)
        if isinstance(ref, jax.Array) and getattr(ref, "_committed", True) else x, tree, like
    )
    return tree, meta
