"""`optim4rl compare`: several optimizers on one or more tasks over many seeds, with statistics.

For every (task, optimizer, step size) the seeds are trained in parallel by one jitted run of
`optim4rl.training` (seeds are `vmap`ped, so ten seeds cost about one). With several step sizes
per optimizer the best by mean score is selected. Finished runs are skipped on a re-run, so a
killed comparison resumes at the granularity of one optimizer run.

Outputs in the comparison directory:
  results.csv        one row per task x optimizer x step size x seed (score, final return, selected)
  summary.md         per-task tables (mean, IQM, 90% bootstrap CI, paired tests vs the reference)
  summary.json       the same numbers, machine-readable
  curves_TASK.png/.svg   learning curves with 90% bootstrap bands (selected step sizes)
  scores_TASK.png/.svg   final-score interval plot
  runs/TASK/OPT/lrLR/    the training run directories
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np

from optim4rl import training
from optim4rl.config import check_numbers
from optim4rl.errors import ConfigError
from optim4rl.runs import RunDir, check_writable_dir, config_differences, read_csv, recorded_config, to_jsonable, write_json

@dataclass(frozen=True)
class CompareSpec:
    envs: tuple[str, ...]
    optimizers: tuple[str, ...]
    agent: Literal["a2c", "ppo"] = "a2c"
    learning_rates: tuple[float, ...] = ()  # swept for every optimizer without its own "@lr"
    seeds: int = 10
    seed: int = 0
    reference: str = "adam"
    grad_clip: float | None = 1.0
    steps: int | None = None
    agent_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scale: str = "cpu"
    paired: bool = True
    log_chunks: int = 50
    # Score = mean episode return of the last N updates of each seed (the RLC 2024 paper's
    # gridworld score, N = 20); None: the mean of the last 10% of the logged returns. Computed
    # from each run's metrics.csv, so one run serves either score.
    score_last_updates: int | None = None

    def __post_init__(self):
        if not self.envs:
            raise ConfigError("compare needs at least one --env")
        if not self.optimizers:
            raise ConfigError("compare needs at least one optimizer")
        try:
            check_numbers(self)
        except ValueError as exc:
            raise ConfigError(f"compare: {exc}") from None
        if not 2 <= self.seeds <= 65536:
            raise ConfigError(f"compare needs between 2 and 65536 seeds for statistics, got {self.seeds}")
        if not 0 <= self.seed <= 2**31 - 1 - self.seeds:
            raise ConfigError(f"compare: seed must be between 0 and 2**31 - 1 - seeds, got {self.seed}")
        for lr in self.learning_rates:
            if not lr > 0:
                raise ConfigError(f"compare: step sizes must be positive, got {lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"compare: grad_clip must be positive or off, got {self.grad_clip}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"compare: steps must be at least 1, got {self.steps}")
        if self.score_last_updates is not None and (
                isinstance(self.score_last_updates, bool) or not isinstance(self.score_last_updates, int)
                or self.score_last_updates < 1):
            raise ConfigError(f"score_last_updates must be a positive number of updates, got "
                              f"{self.score_last_updates!r}")

    def score_description(self) -> str:
        what = "evaluation" if self.agent == "ppo" and self.score_last_updates is None else "episode"
        if self.score_last_updates is not None:
            return f"mean episode return of the last {self.score_last_updates} updates"
        return f"mean of the last 10% of logged {what} returns"


def parse_optimizer(entry: str, spec: CompareSpec) -> tuple[str, str, tuple[float, ...]]:
    """'adam' or 'adam@1e-3,3e-3' -> (label, optimizer spec, step sizes)."""
    name, at, lrs = entry.partition("@")
    if at and not lrs:
        raise ConfigError(f"bad step sizes in {entry!r}: use NAME@LR[,LR...] or NAME alone")
    if lrs:
        try:
            rates = tuple(float(x) for x in lrs.split(","))
        except ValueError:
            raise ConfigError(f"bad step sizes in {entry!r}: use NAME@LR[,LR...]") from None
        if not all(math.isfinite(r) and r > 0 for r in rates):
            raise ConfigError(f"bad step sizes in {entry!r}: each must be a positive finite number")
    else:
        rates = spec.learning_rates  # () = each task's default step size (training.default_learning_rate)
    label = name
    arch, _, source = name.partition(":")
    if source.endswith(".o4r"):
        # Short, readable labels for files: the stem, or the run directory for "optimizer.o4r".
        path = Path(source)
        label = f"{arch}:{path.parent.name if path.stem.startswith('optimizer') else path.stem}"
    return label, name, rates


def _run_spec(spec: CompareSpec, env: str, name: str, lr: float):
    """The TrainSpec and agent config of one (task, optimizer, step size) run."""
    train_spec = training.TrainSpec(
        agent=spec.agent, env=env, optimizer=name, learning_rate=lr, grad_clip=spec.grad_clip,
        seeds=spec.seeds, seed=spec.seed, log_chunks=spec.log_chunks)
    overrides = dict(spec.agent_overrides)
    if spec.steps:
        overrides["total_steps"] = spec.steps
    return train_spec, training.resolve_agent_config(train_spec, overrides, scale=spec.scale)


def _run_dir(runs_dir: Path, env: str, label: str, lr: float) -> Path:
    safe = label.replace(":", "_").replace("/", "_")
    return runs_dir / env / safe / f"lr{lr:g}"


def _finished(run_dir: Path, expected: dict) -> bool:
    summary, config = run_dir / "summary.json", run_dir / "config.json"
    if not (summary.exists() and config.exists()):
        return False
    try:
        recorded = json.loads(config.read_text())["config"]
    except (json.JSONDecodeError, KeyError):
        return False
    return not config_differences(recorded, to_jsonable(expected))


def run(spec: CompareSpec, out: Path | str, callback: Callable[[dict], None] | None = None,
        runs_dir: Path | str | None = None, only_finished: bool = False) -> dict[str, Any]:
    """Runs (or reuses) every optimizer × step size × task and writes the comparison to ``out``.

    ``runs_dir`` (default ``out/runs``) holds the training runs; several comparisons can share
    one, so a run they have in common (same config and optimizer file) is trained once.
    ``only_finished`` trains nothing: the comparison is written from the runs already finished
    (a report while a long comparison is still going); the others are listed as not finished.
    """
    from optim4rl.analysis import stats

    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    entries = [parse_optimizer(e, spec) for e in spec.optimizers]
    labels = [e[0] for e in entries]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(f"optimizer {', '.join(twice)} is listed more than once; list it once with all its "
                          "step sizes (NAME@LR,LR)")
    if spec.reference not in labels:
        raise ConfigError(f"reference optimizer {spec.reference!r} is not among the optimizers: {', '.join(labels)}")
    check_writable_dir(out)
    if runs_dir != out / "runs":
        check_writable_dir(runs_dir, "runs_dir")
    # Every name, file and setting is checked before the first run trains (not after the earlier
    # optimizers have spent their hours).
    for env in spec.envs:
        for label, name, rates in entries:
            for lr in rates or (training.default_learning_rate(spec.agent, env),):
                train_spec, agent_cfg = _run_spec(spec, env, name, lr)
                tx = training.make_tx(train_spec)
        training.agent_module(spec.agent).make_train(agent_cfg, tx)  # the env, once per task
    RunDir(out).write_config(spec)
    results_rows: list[dict] = []
    per_task: dict[str, dict] = {}
    code_versions: dict[str, int] = {}  # a reused run may come from older code: say so
    total_runs = len(spec.envs) * sum(max(len(e[2]), 1) for e in entries)
    done_runs = 0
    unfinished: list[str] = []
    for env in spec.envs:
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        selected_scores: dict[str, np.ndarray] = {}
        selected_lr: dict[str, float] = {}
        sweep: dict[str, dict[float, float]] = {}
        for label, name, rates in entries:
            best = None
            for lr in rates or (training.default_learning_rate(spec.agent, env),):
                train_spec, agent_cfg = _run_spec(spec, env, name, lr)
                run_dir = _run_dir(runs_dir, env, label, lr)
                expected = training.run_config(train_spec, agent_cfg)
                skipped = _finished(run_dir, expected)
                if callback:
                    callback({"event": "start", "env": env, "optimizer": label, "learning_rate": lr,
                              "skipped": skipped, "done": done_runs, "total": total_runs,
                              "left_out": only_finished and not skipped})
                if not skipped and only_finished:
                    unfinished.append(f"{env}: {label} lr {lr:g}")
                    done_runs += 1
                    continue
                if not skipped:
                    # A killed run of the same config resumes; anything else in its place is stale.
                    resumable = (run_dir / "checkpoint.msgpack").exists() and \
                        not config_differences(recorded_config(run_dir), to_jsonable(expected))
                    training.run(train_spec, agent_cfg, run_dir, plot=False, resume=resumable,
                                 overwrite=not resumable)
                done_runs += 1
                summary = json.loads((run_dir / "summary.json").read_text())
                version = _code_version(run_dir)
                code_versions[version] = code_versions.get(version, 0) + 1
                rows = read_csv(run_dir / "metrics.csv")
                if spec.score_last_updates is not None:
                    scores = score_last_updates(rows, summary["seeds"], spec.score_last_updates)
                else:
                    scores = np.asarray([np.nan if s is None else s for s in _score_list(summary, spec.agent)])
                x, y = _curve(rows, spec)
                sweep.setdefault(label, {})[lr] = (float(np.nanmean(scores)) if np.isfinite(scores).any()
                                                   else float("nan"))
                for seed, score, final in zip(summary["seeds"], scores, summary["final_return_per_seed"]):
                    results_rows.append({"task": env, "optimizer": label, "learning_rate": lr, "seed": seed,
                                         "score": float(score), "final_return": final, "selected": False,
                                         "diverged": False})
                diverged = bool(summary.get("diverged_seeds"))
                if diverged:
                    for row in results_rows[-len(summary["seeds"]):]:
                        row["diverged"] = True
                # A run in which any seed diverged is never selected as an optimizer's best step
                # size, and so never ranked: its other seeds' scores would flatter it.
                mean_score = np.nanmean(scores) if np.isfinite(scores).any() and not diverged else -np.inf
                if best is None or mean_score > best[0]:
                    best = (mean_score, lr, scores, (x, y))
            if best is None:  # only_finished and none of its runs has finished
                continue
            best_score, lr, scores, curve = best
            if best_score == -np.inf:
                scores = np.full_like(scores, np.nan)  # every step size diverged: no score at all
            selected_scores[label], selected_lr[label], curves[f"{label} (lr {lr:g})"] = scores, lr, curve
            for row in results_rows:
                if row["task"] == env and row["optimizer"] == label and row["learning_rate"] == lr:
                    row["selected"] = True
        if not selected_scores:
            continue
        reference = spec.reference if spec.reference in selected_scores else None
        rows = stats.summarize(selected_scores, reference=reference, paired=spec.paired)
        per_task[env] = {"rows": rows, "lr": selected_lr, "sweep": sweep, "scores": selected_scores}
        _plots(out, env, spec, curves, selected_scores)
    _write_results(out, results_rows)
    aggregate = None
    if len(spec.envs) > 1 and not unfinished:
        aggregate = stats.aggregate_tasks({env: t["scores"] for env, t in per_task.items()}, reference=spec.reference)
    summary = _write_summary(out, spec, per_task, aggregate, code_versions, unfinished)
    return summary


def _code_version(run_dir: Path) -> str:
    """The code a run was trained with: short git commit (``+dirty`` if uncommitted changes), else
    the package version."""
    try:
        version = json.loads((run_dir / "config.json").read_text()).get("code_version", {})
    except (OSError, json.JSONDecodeError):
        return "unknown"
    commit = version.get("git_commit")
    if commit:
        return commit[:12] + ("+dirty" if version.get("git_dirty") else "")
    return f"package {version.get('package', 'unknown')}"


def format_code_versions(code_versions: dict[str, int]) -> str:
    text = ", ".join(f"`{v}` ({n} run{'s' if n != 1 else ''})" for v, n in sorted(code_versions.items()))
    if len(code_versions) > 1:
        text += (" — several code versions: finished runs are reused when their config matches, "
                 "so numbers can mix versions; a fresh `--out` retrains them all with one version.")
    return text


def score_last_updates(rows: list[dict], seeds: list[int], last: int) -> np.ndarray:
    """Per seed, the mean episode return of its last ``last`` logged updates (NaN-aware).

    The episode_return of an update is the mean return of the episodes that ended in it (carried
    forward when none did), so this is the paper's "mean return of the last 20 updates".
    """
    by_seed: dict[int, list] = {int(s): [] for s in seeds}
    for r in rows:
        by_seed.setdefault(int(r["seed"]), []).append((int(r["update"]), r["episode_return"]))
    out = []
    for s in seeds:
        tail = np.asarray([v for _, v in sorted(by_seed[int(s)])][-last:], np.float64)
        tail = tail[np.isfinite(tail)]
        out.append(tail.mean() if tail.size else np.nan)
    return np.asarray(out)


def _score_list(summary: dict, agent: str) -> list:
    # PPO is scored on its evaluation episodes (like the paper's Brax curves), A2C on training returns.
    if agent == "ppo" and summary.get("eval_score_per_seed"):
        return summary["eval_score_per_seed"]
    return summary["score_per_seed"]


def _curve(rows: list[dict], spec: CompareSpec) -> tuple[np.ndarray, np.ndarray]:
    key = "eval_return" if spec.agent == "ppo" and rows and "eval_return" in rows[0] else "episode_return"
    by_seed: dict[int, list] = {}
    for r in rows:
        by_seed.setdefault(int(r["seed"]), []).append((r["update"], r["env_steps"], r[key]))
    series = [sorted(v) for _, v in sorted(by_seed.items())]
    length = min(len(s) for s in series)
    x = np.asarray([s[1] for s in series[0][:length]], np.float64)
    y = np.asarray([[s[2] for s in ser[:length]] for ser in series], np.float64)
    if key == "eval_return":  # evaluations are sparse: keep the points where they happened
        keep = np.isfinite(y).all(axis=0)
        x, y = x[keep], y[:, keep]
    return x, y


def _plots(out: Path, env: str, spec: CompareSpec, curves, scores) -> None:
    from optim4rl.analysis import plots

    ylabel = "evaluation return" if spec.agent == "ppo" else "episode return"
    plots.plot_learning_curves(curves, out / f"curves_{env}", title=f"{spec.agent.upper()} on {env}: "
                               f"mean and 90% bootstrap CI over {spec.seeds} seeds", ylabel=ylabel)
    plots.plot_scores(scores, out / f"scores_{env}", title=f"{env}: final score per optimizer "
                      f"(mean, 90% bootstrap CI, seeds as dots)",
                      ylabel=f"score ({spec.score_description()})")


def _write_results(out: Path, rows: list[dict]) -> None:
    writer = RunDir(out).metrics_writer("results")
    writer.write(rows)
    jsonl = out / "results.jsonl"
    if jsonl.exists():
        jsonl.unlink()


def _write_summary(out: Path, spec: CompareSpec, per_task: dict, aggregate,
                   code_versions: dict[str, int] | None = None, unfinished: list[str] | None = None) -> dict:
    from optim4rl.analysis import stats

    lines = [f"# Optimizer comparison: {spec.agent.upper()}, {spec.seeds} seeds", "",
             f"Score = {spec.score_description()} per seed. CI = 90% percentile bootstrap of the mean. p = paired t-test (and Wilcoxon) "
             f"against `{spec.reference}` on the same seeds; verdict at α = 0.05, no multiple-comparison "
             "correction. Step sizes: best mean score of the sweep (selected on the same seeds).", ""]
    data: dict[str, Any] = {"spec": to_jsonable(spec), "score": spec.score_description(), "tasks": {}}
    for env, task in per_task.items():
        lines += [f"## {env}", "", stats.markdown_table(task["rows"]), ""]
        lines += ["Step sizes: " + ", ".join(f"{k} {v:g}" for k, v in task["lr"].items()), ""]
        if any(len(v) > 1 for v in task["sweep"].values()):
            lines += ["Sweep (mean score by step size): " + "; ".join(
                f"{k}: " + ", ".join(f"{lr:g} → {s:.3f}" for lr, s in v.items()) for k, v in task["sweep"].items()), ""]
        lines += [f"![learning curves](curves_{env}.png)", "", f"![scores](scores_{env}.png)", ""]
        data["tasks"][env] = {"rows": [dataclasses.asdict(r) for r in task["rows"]], "learning_rates": task["lr"],
                              "sweep": {k: {str(lr): s for lr, s in v.items()} for k, v in task["sweep"].items()}}
    if aggregate is not None:
        lines += ["## Aggregate over tasks (scores normalised by the reference's mean)", "",
                  stats.markdown_table(aggregate), ""]
        data["aggregate"] = [dataclasses.asdict(r) for r in aggregate]
    if unfinished:
        lines += ["Not finished yet, so not in the tables: " + "; ".join(unfinished)
                  + ". Rerunning the comparison trains them.", ""]
        data["unfinished"] = unfinished
    if code_versions:
        lines += ["Code versions of the runs: " + format_code_versions(code_versions), ""]
        data["code_versions"] = code_versions
    (out / "summary.md").write_text("\n".join(lines))
    write_json(out / "summary.json", data)
    return data
