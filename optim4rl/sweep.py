"""`optim4rl sweep`: meta-train a grid of configs, evaluate every file, select, and re-evaluate.

The final paper version (Lan et al., RLC 2024) meta-trains one file per point of a grid (reset
interval x meta learning rate x meta-gradient clip on big_dense_long), evaluates every file by
training fresh A2C agents with it, and reports the best file's score on the very seeds it was
selected on. That number is inflated by the selection (the maximum of 40 noisy means). This
command does the same, and then **re-evaluates the selected file on fresh seeds**, which is the
number to report.

Layout of the sweep directory::

    sweep.json, summary.md      the grid, each point's state, the ranking, the selection
    points/NAME/                one meta-training run directory per grid point (resumable)
    selection/                  `compare` of every finished file (+ the reference) on seeds 0..n-1
    reevaluation/               `compare` of the selected file and the reference on fresh seeds

A re-run with the same arguments resumes: finished points are skipped, an interrupted one continues
from its checkpoint, finished evaluation runs are reused. ``time_limit_s`` bounds the wall-clock
time spent meta-training in one invocation (each invocation trains at least one chunk); points not finished within it are listed as such and
left out of the selection until a later run finishes them.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from optim4rl.errors import ConfigError
from optim4rl.runs import to_jsonable, write_json

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class EvalRegime:
    """How every file is evaluated: A2C on ``env`` for ``steps`` with ``num_envs`` envs, step size
    ``learning_rate`` (None: the meta-training task's), elementwise clip ``grad_clip``, scored by
    the mean return of each seed's last ``score_last_updates`` updates (None: last 10%)."""

    env: str | None = None  # None: the first meta-training task
    steps: int = 10_000_000
    num_envs: int = 512
    learning_rate: float | None = None
    grad_clip: float | None = 1.0
    score_last_updates: int | None = 20
    seeds: int = 3
    fresh_seeds: int = 3
    fresh_seed: int = 1000  # first seed of the re-evaluation, disjoint from 0 .. seeds-1
    reference: str | None = "adam"  # evaluated alongside at the same step size (None: none)

    def __post_init__(self):
        if self.seeds < 2 or self.fresh_seeds < 2:
            raise ConfigError("sweep evaluation needs at least 2 seeds and 2 fresh seeds")
        if self.fresh_seed < self.seeds:
            raise ConfigError(f"fresh_seed {self.fresh_seed} overlaps the selection seeds 0..{self.seeds - 1}")


@dataclass(frozen=True)
class SweepSpec:
    """A grid over meta-training settings. ``grid`` is a tuple of axes; an axis is
    ``(keys, values)`` where ``keys`` names one or more MetaConfig settings (dotted for nested
    ones) and each value gives one value per key, so a paired choice such as
    (meta_global_clip, meta_grad_clip) = (0.5, 0) or (0, 1.0) is one axis."""

    preset: str
    grid: tuple[tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]], ...]
    overrides: Mapping[str, Any] = field(default_factory=dict)  # fixed settings, before the grid
    regime: EvalRegime = EvalRegime()
    time_limit_s: float | None = None
    # Training runs of the selection phase (default: selection/runs). Another comparison's runs
    # directory with the same regime lets the reference's runs be reused instead of retrained.
    selection_runs_dir: str | None = None

    def __post_init__(self):
        if not self.grid:
            raise ConfigError("sweep needs at least one --sweep KEY=V1,V2 axis")
        seen: set[str] = set()
        for keys, values in self.grid:
            if not keys or not values:
                raise ConfigError(f"sweep axis {keys!r} needs at least one key and one value")
            if seen & set(keys):
                raise ConfigError(f"sweep key {sorted(seen & set(keys))[0]!r} is on two axes")
            seen |= set(keys)
            for value in values:
                if len(value) != len(keys):
                    raise ConfigError(f"sweep axis {'&'.join(keys)}: value {value!r} needs "
                                      f"{len(keys)} parts")


def parse_axis(text: str) -> tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]:
    """``"reset_interval=72,144"`` -> ``(("reset_interval",), ((72,), (144,)))``;
    ``"meta_global_clip&meta_grad_clip=0.5&0,0&1.0"`` -> one axis of two paired settings."""
    from optim4rl import config as config_lib

    if "=" not in text:
        raise ConfigError(f"--sweep {text!r} must look like KEY=V1,V2 (or K1&K2=A1&B1,A2&B2)")
    key_text, values_text = text.split("=", 1)
    keys = tuple(k.strip() for k in key_text.split("&"))
    values = []
    for item in values_text.split(","):
        parts = item.split("&")
        if len(parts) != len(keys):
            raise ConfigError(f"--sweep {text!r}: value {item!r} needs {len(keys)} parts joined by '&'")
        values.append(tuple(config_lib.parse_override(f"v={p.strip()}")[1] for p in parts))
    if any(not k for k in keys) or not values:
        raise ConfigError(f"--sweep {text!r}: empty key or no values")
    return keys, tuple(values)


def points(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """Every grid point as ``(name, {key: value})``, in grid order (the last axis varies fastest)."""
    out = []
    axes = [[dict(zip(keys, value)) for value in values] for keys, values in spec.grid]
    for i, combo in enumerate(itertools.product(*axes)):
        settings = {k: v for part in combo for k, v in part.items()}
        name = f"p{i:02d}-" + "-".join(f"{k.split('.')[-1]}{_fmt(v)}" for k, v in settings.items())
        out.append((name, settings))
    return out


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def meta_config(spec: SweepSpec, settings: Mapping[str, Any]):
    """The MetaConfig of one grid point: preset, then the fixed overrides, then the point."""
    from optim4rl import config as config_lib
    from optim4rl.meta import train as meta_train

    preset = config_lib.load_preset(spec.preset)
    if preset.get("command", "meta-train") != "meta-train":
        raise ConfigError(f"preset {spec.preset!r} is for `optim4rl {preset['command']}`, not meta-training")
    data = json.loads(json.dumps(preset.get("meta", {})))  # a deep copy
    for key, value in {**dict(spec.overrides), **dict(settings)}.items():
        keys = key.split(".")
        if keys[0] == "meta":
            keys = keys[1:]
        config_lib.set_path(data, keys, value)
    return meta_train.load_config(data)


def _point_state(run_dir: Path, cfg) -> str:
    """"done", "partial" (a checkpoint to resume), "new"; a directory of another config is an error."""
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return "new"
    recorded = json.loads(config_path.read_text()).get("config")
    if recorded != to_jsonable(cfg):
        raise ConfigError(f"{run_dir} holds a meta-training run of another config; use another --out "
                          "or remove it")
    summary = run_dir / "summary.json"
    if summary.exists() and (run_dir / "optimizer.o4r").exists():
        if "stopped_at_iteration" not in json.loads(summary.read_text()):
            return "done"
    return "partial" if (run_dir / "checkpoint.msgpack").exists() else "new"


def run(spec: SweepSpec, out: Path | str, callback: Callback | None = None) -> dict[str, Any]:
    """Meta-trains the grid (resuming), evaluates the finished files, selects and re-evaluates."""
    from optim4rl.meta import train as meta_train
    from optim4rl.runs import RunDir

    out = Path(out)
    RunDir(out).write_config(spec)
    grid = points(spec)
    configs = {name: meta_config(spec, settings) for name, settings in grid}  # fail early on a bad key
    t_start = time.time()
    states: dict[str, str] = {}
    trained = False
    for name, settings in grid:
        run_dir = out / "points" / name
        cfg = configs[name]
        state = _point_state(run_dir, cfg)
        remaining = None if spec.time_limit_s is None else spec.time_limit_s - (time.time() - t_start)
        # Out of budget: stop, except that every invocation makes progress (at least one chunk).
        if state != "done" and remaining is not None and remaining <= 0 and trained:
            states[name] = state
            continue
        if callback:
            callback({"event": "point", "point": name, "settings": settings, "state": state})
        if state != "done":
            summary = meta_train.run(cfg, run_dir, resume=state == "partial", preset=spec.preset,
                                     time_limit_s=remaining, callback=callback)
            state = "partial" if "stopped_at_iteration" in summary else "done"
            trained = True
        states[name] = state
    finished = [name for name, _ in grid if states[name] == "done"]
    result: dict[str, Any] = {
        "spec": to_jsonable(spec),
        "points": [{"name": name, "settings": settings, "state": states[name]} for name, settings in grid],
        "selection": None, "reevaluation": None,
    }
    if finished:
        result.update(_evaluate(spec, out, configs, finished, callback))
    result["complete"] = len(finished) == len(grid)
    write_json(out / "sweep.json", result)
    (out / "summary.md").write_text(_markdown(result))
    return result


def _file_spec(path: Path) -> str:
    from optim4rl.optimizers import load

    return f"{load(path)[0].name}:{path}"


def _evaluate(spec: SweepSpec, out: Path, configs: dict, finished: list[str], callback) -> dict:
    from optim4rl import compare

    regime = spec.regime
    first = configs[finished[0]]
    env = regime.env or first.tasks[0].env
    lr = regime.learning_rate or first.tasks[0].learning_rate
    files = {name: _file_spec(out / "points" / name / "optimizer.o4r") for name in finished}
    labels = {compare.parse_optimizer(f, _dummy_spec())[0]: name for name, f in files.items()}
    entries = [f"{f}@{lr:g}" for f in files.values()]
    reference = f"{regime.reference}@{lr:g}" if regime.reference else None

    def compare_spec(optimizers, seeds, seed):
        ref = regime.reference or compare.parse_optimizer(optimizers[0], _dummy_spec())[0]
        return compare.CompareSpec(
            envs=(env,), optimizers=tuple(optimizers), agent="a2c", seeds=seeds, seed=seed,
            reference=ref, grad_clip=regime.grad_clip, steps=regime.steps,
            agent_overrides={"num_envs": regime.num_envs}, score_last_updates=regime.score_last_updates)

    # Selection: every finished file on the same seeds; the reference only for context.
    cb = (lambda e: callback({**e, "phase": "selection"})) if callback else None
    selection = compare.run(compare_spec(([reference] if reference else []) + entries, regime.seeds, 0),
                            out / "selection", callback=cb, runs_dir=spec.selection_runs_dir)
    rows = {r["optimizer"]: r for r in selection["tasks"][env]["rows"]}
    ranking = sorted(((rows[label]["mean"], labels[label]) for label in labels if label in rows),
                     key=lambda x: -x[0] if math.isfinite(x[0]) else math.inf)
    best_name = ranking[0][1]
    best_label = next(label for label, name in labels.items() if name == best_name)
    # Re-evaluation: the selected file on seeds it was not selected on.
    cb = (lambda e: callback({**e, "phase": "reevaluation"})) if callback else None
    reeval = compare.run(compare_spec(([reference] if reference else []) + [f"{files[best_name]}@{lr:g}"],
                                      regime.fresh_seeds, regime.fresh_seed), out / "reevaluation", callback=cb)
    fresh = {r["optimizer"]: r for r in reeval["tasks"][env]["rows"]}
    return {
        "regime": {**to_jsonable(regime), "env": env, "learning_rate": lr},
        "ranking": [{"point": name, "mean_score": score, "row": rows[next(l for l, n in labels.items() if n == name)]}
                    for score, name in ranking],
        "reference_selection_row": rows.get(regime.reference) if regime.reference else None,
        "selection": {"point": best_name, "file": files[best_name], "mean_score_on_selection_seeds": ranking[0][0]},
        "reevaluation": {"point": best_name, "seeds": list(range(regime.fresh_seed, regime.fresh_seed + regime.fresh_seeds)),
                         "row": fresh.get(best_label),
                         "reference_row": fresh.get(regime.reference) if regime.reference else None},
    }


def _dummy_spec():
    from optim4rl import compare

    return compare.CompareSpec(envs=("catch",), optimizers=("adam",))


def _markdown(result: dict) -> str:
    spec = result["spec"]
    lines = [f"# Sweep of `{spec['preset']}`", ""]
    lines += ["| point | settings | state |", "|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['name']} | " + ", ".join(f"{k}={v}" for k, v in p["settings"].items())
                     + f" | {p['state']} |")
    lines.append("")
    if not result.get("ranking"):
        lines += ["No point has finished meta-training yet: nothing evaluated.", ""]
        return "\n".join(lines)
    regime = result["regime"]
    score = (f"mean episode return of the last {regime['score_last_updates']} updates"
             if regime["score_last_updates"] else "mean of the last 10% of logged returns")
    lines += [f"Evaluation: A2C on {regime['env']}, {regime['num_envs']} envs, {regime['steps']:,} steps, "
              f"α {regime['learning_rate']:g}, clip {regime['grad_clip']}; score = {score}.", "",
              f"## Ranking on the selection seeds 0..{regime['seeds'] - 1} (the paper's number is the top row)", "",
              "| point | mean | 90% CI |", "|---|---:|---|"]
    for r in result["ranking"]:
        row = r["row"]
        lines.append(f"| {r['point']} | {row['mean']:.4g} | [{row['ci_low']:.4g}, {row['ci_high']:.4g}] |")
    ref = result.get("reference_selection_row")
    if ref:
        lines.append(f"| {ref['optimizer']} (reference) | {ref['mean']:.4g} | [{ref['ci_low']:.4g}, {ref['ci_high']:.4g}] |")
    lines.append("")
    re = result["reevaluation"]
    row, ref = re["row"], re.get("reference_row")
    lines += [f"## Selected: {result['selection']['point']}, re-evaluated on fresh seeds "
              f"{re['seeds'][0]}..{re['seeds'][-1]} (the number to report)", ""]
    if row:
        lines.append(f"- selected file: mean {row['mean']:.4g}, 90% CI [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
                     + (f"; vs {ref['optimizer']}: difference {row['diff']:.4g} [{row['diff_ci_low']:.4g}, "
                        f"{row['diff_ci_high']:.4g}], paired t-test p = {row['pvalue']:.3g}, verdict "
                        f"**{row['verdict']}**" if ref else ""))
    if ref:
        lines.append(f"- {ref['optimizer']}: mean {ref['mean']:.4g}, 90% CI [{ref['ci_low']:.4g}, {ref['ci_high']:.4g}]")
    if not result["complete"]:
        lines += ["", "Not every point has finished: the selection is over the finished ones only; rerun the "
                  "same command to continue."]
    lines.append("")
    return "\n".join(lines)
