"""The `optim4rl` command: train, meta-train, compare, gradients, reproduce, inspect, imitate, list.

This is the only module that parses arguments or prints. Library errors that describe bad input
(`optim4rl.errors.Optim4RLError`, a ValueError) become one line `optim4rl: error: ...`, exit 2,
and every command validates its names, numbers and output paths before it prints a header,
starts a progress bar or creates a directory.

Environment: ``OPTIM4RL_NO_PROGRESS=1`` turns the progress bars off (as in CI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from optim4rl.errors import ConfigError, Optim4RLError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line `optim4rl: error: ...` (exit 2), like the library's errors."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"optim4rl: error: {self.prog}: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has one (not for flags or unset options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default not in (None, False, argparse.SUPPRESS)
                and not isinstance(default, bool) and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _number(kind: type, low: float | None = None, low_inclusive: bool = True, what: str = ""):
    """An argparse type: a finite number of `kind`, at least (or above) `low`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what or kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (value == low and not low_inclusive)):
            bound = f"{'at least' if low_inclusive else 'above'} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        if kind is int and abs(value) > 2**40:
            raise argparse.ArgumentTypeError(f"is too large: {text!r}")
        return value

    parse.__name__ = what or kind.__name__
    return parse


positive_float = _number(float, 0.0, low_inclusive=False, what="a positive number")
nonneg_float = _number(float, 0.0, what="a number >= 0")
positive_int = _number(int, 1, what="a positive integer")
nonneg_int = _number(int, 0, what="an integer >= 0")
seed_int = _number(int, 0, what="a seed (integer >= 0)")


class Progress:
    """A tqdm bar fed by the library's progress callbacks."""

    def __init__(self, desc: str, unit: str = "step"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                        disable=os.environ.get("OPTIM4RL_NO_PROGRESS") == "1", file=sys.stderr)
        self.done = 0

    def __call__(self, event: dict[str, Any]) -> None:
        total = event.get("total_steps") or event.get("total")
        if total and self.bar.total != total:
            self.bar.total = total
        now = event.get("env_steps", event.get("done", 0))
        self.bar.update(max(0, now - self.done))
        self.done = now
        post = {}
        for key, label in (("episode_return", "return"), ("steps_per_s", "steps/s"),
                           ("meta_loss", "meta_loss"), ("update_scale", "|Δθ|/lr"), ("eval_return", "eval"),
                           ("loss", "loss"), ("optimizer", "opt")):
            value = event.get(key)
            if isinstance(value, float) and math.isfinite(value):
                post[label] = f"{value:.4g}"
            elif isinstance(value, str):
                post[label] = value
        if post:
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _out_dir(args, default_name: str) -> Path:
    if args.out is not None:
        if not args.out.strip():
            raise ConfigError("--out must name a directory, got ''")
        return Path(args.out)
    return Path("runs") / default_name


def _clip(value: float | None) -> float | None:
    """--grad-clip: 0 turns clipping off."""
    return None if value is None or value == 0 else value


_PRESET_SECTIONS = {"train": ("train", "agent"), "meta-train": ("meta",), "compare": ("compare", "agent")}
_PRESET_KEYS = ("description", "command", "scale", "_path")


def _load_preset_section(name: str | None, section: str, command: str) -> dict:
    """The preset `name` for `command`; unknown sections or top-level keys are errors (a typo
    such as [metaa] must not silently run with the defaults)."""
    from optim4rl import config as config_lib

    if not name:
        return {}
    data = config_lib.load_preset(name)
    if data.get("command", command) != command:
        raise ConfigError(f"preset {name!r} is for `optim4rl {data['command']}`, not `{command}`")
    allowed = _PRESET_SECTIONS[command]
    for key, value in data.items():
        if key in _PRESET_KEYS:
            continue
        if key not in allowed:
            what = f"section [{key}]" if isinstance(value, dict) else f"key {key!r}"
            raise ConfigError(f"preset {data['_path']}: unknown {what}; a {command} preset has "
                              f"{', '.join(_PRESET_KEYS[:3])} and [{'], ['.join(allowed)}]")
        if not isinstance(value, dict):
            raise ConfigError(f"preset {data['_path']}: [{key}] must be a table")
    if data.get("scale", "cpu") not in ("cpu", "paper"):
        raise ConfigError(f"preset {data['_path']}: scale must be 'cpu' or 'paper', got {data['scale']!r}")
    return data


# --- train -----------------------------------------------------------------------------------

def _flat_overrides(items: list[str] | None, section: str) -> dict:
    """--set KEY=VALUE (or SECTION.KEY=VALUE) items as a flat table of agent settings."""
    from optim4rl import config as config_lib

    overrides = {}
    for item in items or []:
        keys, value = config_lib.parse_override(item)
        if keys[0] == section:
            keys = keys[1:]
        if len(keys) != 1:
            raise ConfigError(f"--set {item!r}: {section} settings are flat ({section}.KEY=VALUE)")
        overrides[keys[0]] = value
    return overrides


def _refuse_conflict(flag: str, key: str, flag_value: Any, sets: dict) -> None:
    """One documented rule for every command: a flag and a --set of the same field conflict."""
    if flag_value is not None and key in sets:
        raise ConfigError(f"both {flag} and --set {key}= were given; use one of them")


def cmd_train(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl import training

    preset = _load_preset_section(args.preset, "train", "train")
    spec_data = dict(preset.get("train", {}))
    for key in ("agent", "env", "optimizer", "seeds", "seed"):
        value = getattr(args, key)
        if value is not None:
            spec_data[key] = value
    if args.lr is not None:
        spec_data["learning_rate"] = args.lr
    if args.grad_clip is not None:
        spec_data["grad_clip"] = _clip(args.grad_clip)
    if "learning_rate" not in spec_data:
        defaults = training.TrainSpec()
        spec_data["learning_rate"] = training.default_learning_rate(
            spec_data.get("agent", defaults.agent), spec_data.get("env", defaults.env))
    spec = config_lib.from_dict(training.TrainSpec, spec_data, "train")
    cli_sets = _flat_overrides(args.set, "agent")
    _refuse_conflict("--steps", "total_steps", args.steps, cli_sets)
    overrides = {**preset.get("agent", {}), **cli_sets}
    if args.steps is not None:
        overrides["total_steps"] = args.steps
    agent_config = training.resolve_agent_config(spec, overrides, scale=preset.get("scale", "cpu"))
    out = _out_dir(args, f"train-{spec.agent}-{spec.env}-{spec.optimizer.replace(':', '_').replace('/', '_')}")
    # Everything that can be wrong is found here, before a header, a bar or a directory.
    prepared = training.prepare(spec, agent_config)
    training.check_memory(prepared)
    mode = training.claim(out, spec, agent_config, resume=args.resume, overwrite=args.overwrite)
    extended_from = None
    if mode == "resume":
        prepared, extended_from = training.for_resume(out, prepared)
    if mode == "finished":
        print(f"optim4rl train: {out} already holds this run, finished, with the same config; "
              "nothing to do (--overwrite runs it again)", file=sys.stderr)
        _print_train_summary(json.loads((out / "summary.json").read_text()), out)
        return 0
    steps = training.actual_steps(prepared)
    asked = agent_config.total_steps
    rounding = (f" ({asked:,} rounded up to whole updates of {prepared.train.steps_per_update:,} steps)"
                if steps != asked else "")
    print(f"optim4rl train: {spec.agent} on {spec.env} with {spec.optimizer} (lr {spec.learning_rate:g}), "
          f"{spec.seeds} seed(s), {steps:,} env steps each{rounding} -> {out}"
          f"{' (resuming)' if mode == 'resume' and extended_from is None else ''}"
          f"{f' (resuming, extended from {extended_from:,} steps)' if extended_from is not None else ''}",
          file=sys.stderr)
    bar = Progress(f"{spec.agent}/{spec.env}")
    try:
        summary = training.run(spec, agent_config, out, callback=bar, resume=mode == "resume",
                               prepared=prepared)
    finally:
        bar.close()
    _print_train_summary(summary, out)
    return 1 if summary.get("diverged_seeds") else 0


def _print_train_summary(summary: dict, out: Path) -> None:
    def fmt(score):
        return "diverged" if score is None or not math.isfinite(score) else f"{score:.3f}"

    scores = ", ".join(fmt(s) for s in summary["score_per_seed"])
    print(f"score (mean of last {summary.get('score_fraction', 0.1):.0%} of logged returns) per seed: {scores}")
    diverged = summary.get("diverged_seeds") or []
    if diverged:
        firsts = ", ".join(f"seed {d['seed']} at update {d['first_nonfinite_update']}" for d in diverged)
        print(f"optim4rl: warning: {len(diverged)} of {len(summary['score_per_seed'])} seed(s) diverged "
              f"(non-finite loss or parameters: {firsts}); their scores are invalid", file=sys.stderr)
    mean = summary.get("score_mean")
    compile_s = summary.get("compile_time_s") or 0.0
    print(f"mean score {fmt(mean)}{' (valid seeds only)' if diverged and mean is not None else ''}; "
          f"{summary['steps_per_s']:,.0f} env steps/s after compilation "
          f"(wall {summary['wall_time_s']:.1f}s, of which {compile_s:.1f}s compiling); results in {out}")


# --- list ------------------------------------------------------------------------------------

def _config_keys(cls) -> list[str]:
    import dataclasses

    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        lines.append(f"  {f.name:<26} {default!r}")
    return lines


def cmd_list(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl import envs, optimizers

    what = args.what
    if what in (None, "envs"):
        print("envs:")
        for name in envs.list_envs():
            print(f"  {name:<28} {envs.env_family(name)}")
    if what in (None, "optimizers"):
        print("optimizers (hand-designed: any optax optimizer name; learned: NAME:init, NAME:FILE.o4r, "
              "or a pretrained spec below):")
        for name in optimizers.list_optimizers():
            note = ""
            if name in optimizers.registry.OPTIONAL_LEARNED:
                note = "  (needs a user-supplied weights file; not supported in this version)"
            elif name in optimizers.registry.LEARNED:
                note = "  (learned: use NAME:init, NAME:FILE.o4r or a pretrained spec)"
            print(f"  {name}{note}")
    if what in (None, "presets"):
        print("presets (meta-train --preset NAME, or a path to a TOML file):")
        presets = config_lib.list_presets()
        width = max(map(len, presets), default=0)
        for name, desc in presets.items():
            print(f"  {name:<{width}}  {desc}")
    if what in (None, "pretrained"):
        print("pretrained optimizers (pass the spec as --optimizer):")
        pretrained = optimizers.registry.describe_pretrained()
        if not pretrained:
            print("  (none shipped yet)")
        width = max(map(len, pretrained), default=0)
        for spec, desc in pretrained.items():
            print(f"  {spec:<{width}}  {desc}")
    if what == "keys":
        from optim4rl.agents.a2c import A2CConfig
        from optim4rl.agents.ppo import PPOConfig
        from optim4rl.meta.config import MetaConfig, MetaTask

        for title, cls in (("train/compare --set KEY=VALUE, A2C agents", A2CConfig),
                           ("train/compare --set KEY=VALUE, PPO agents", PPOConfig),
                           ("meta-train --set KEY=VALUE", MetaConfig),
                           ("meta-train preset [[meta.tasks]] entries", MetaTask)):
            print(f"{title} (key, default):")
            print("\n".join(_config_keys(cls)))
        print("meta-train --set optimizer_options.KEY=VALUE: the architecture's fields, e.g. "
              "inputs, hidden_size, head_sizes (see docs/DESIGN.md)")
    return 0


# --- parser ----------------------------------------------------------------------------------

def _add_parser(sub, name: str, help: str, description: str | None = None):
    return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                          formatter_class=HelpFormatter)


def _run_dir_flags(p, what: str = "run") -> None:
    p.add_argument("--resume", action="store_true",
                   help=f"continue the {what} in --out from its checkpoint (its config must match)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace a {what} already in --out (without it, a finished run of the same "
                        "config is reported and a different one refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="optim4rl", formatter_class=HelpFormatter,
        description="Learned optimizers for reinforcement learning (Optim4RL, arXiv 2302.01470).",
        epilog="Set OPTIM4RL_NO_PROGRESS=1 to turn the progress bars off.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add_parser(sub, "train", "train an agent with any optimizer, over several seeds in parallel")
    p.add_argument("--env", help="environment name (see `optim4rl list envs`; default catch)")
    p.add_argument("--agent", choices=["a2c", "ppo"], help="RL algorithm (default a2c)")
    p.add_argument("--optimizer", help="adam, rmsprop, sgd, ... (any optax optimizer) or "
                                       "optim4rl:FILE.o4r / a pretrained spec (default adam)")
    p.add_argument("--lr", type=positive_float,
                   help="learning rate (step size); default: A2C 3e-3, PPO the task's step size in the "
                        "paper's Brax settings (3e-4; walker2d 3e-5)")
    p.add_argument("--grad-clip", type=nonneg_float, help="elementwise gradient clip (0 = off; default 1)")
    p.add_argument("--steps", type=positive_int,
                   help="environment steps per seed, rounded up to whole updates (default: the task's "
                        "CPU budget)")
    p.add_argument("--seeds", type=positive_int, help="number of seeds, trained in parallel (default 1)")
    p.add_argument("--seed", type=seed_int, help="first seed (default 0)")
    p.add_argument("--preset", help="a train preset name or a path to a TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an agent setting (`optim4rl list keys`); a flag and a --set of the "
                        "same setting conflict")
    p.add_argument("--out", help="run directory (default runs/train-AGENT-ENV-OPTIMIZER)")
    _run_dir_flags(p)
    p.set_defaults(func=cmd_train)

    p = _add_parser(sub, "list", "list envs, optimizers, presets, pretrained optimizers or --set keys")
    p.add_argument("what", nargs="?", choices=["envs", "optimizers", "presets", "pretrained", "keys"],
                   help="what to list (default: all but keys)")
    p.set_defaults(func=cmd_list)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list = []

# --- meta-train ------------------------------------------------------------------------------

def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def cmd_meta_train(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl.meta import train as meta_train
    from optim4rl.meta.pipeline import MetaTrainer
    from optim4rl.runs import claim_run_dir

    preset = _load_preset_section(args.preset, "meta", "meta-train")
    data = dict(preset.get("meta", {}))
    sets: dict = {}
    for item in args.set or []:
        keys, value = config_lib.parse_override(item)
        if keys[0] == "meta":
            keys = keys[1:]
        config_lib.set_path(sets, keys, value)
    # A flag and a --set of the same field conflict (one rule for every command).
    _refuse_conflict("--optimizer", "optimizer", args.optimizer, sets)
    _refuse_conflict("--no-pipeline", "pipeline", True if args.no_pipeline else None, sets)
    for key, flag in (("iterations", "--iterations"), ("seed", "--seed"), ("num_agents", "--num-agents")):
        _refuse_conflict(flag, key, getattr(args, key), sets)
    if args.inputs and "inputs" in sets.get("optimizer_options", {}):
        raise ConfigError("both --inputs and --set optimizer_options.inputs= were given; use one of them")
    if args.optimizer:
        data["optimizer"] = args.optimizer
    if args.inputs:
        data["optimizer_options"] = {**data.get("optimizer_options", {}), "inputs": args.inputs}
    if args.no_pipeline:
        data["pipeline"] = False
    for key in ("iterations", "seed", "num_agents"):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    for key, value in sets.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    cfg = meta_train.load_config(data)
    name = args.preset or "custom"
    out = _out_dir(args, f"meta-{cfg.optimizer}-{Path(name).stem}")
    trainer = MetaTrainer(cfg)  # unknown envs, architectures or init_from files fail here
    meta_train.check_memory(trainer)
    mode = claim_run_dir(out, cfg, resume=args.resume, overwrite=args.overwrite,
                         extendable={"iterations": "--iterations"})
    if mode == "finished":
        summary = json.loads((out / "summary.json").read_text())
        print(f"optim4rl meta-train: {out} already holds this run, finished, with the same config; "
              f"nothing to do (--overwrite runs it again)", file=sys.stderr)
        print(f"optimizer saved to {summary.get('optimizer_file')}")
        return 0
    tasks = ", ".join(t.env for t in cfg.tasks)
    print(f"optim4rl meta-train: {cfg.optimizer} on [{tasks}], {cfg.num_agents} agents/task, "
          f"{cfg.iterations} meta-iterations ({cfg.iterations * cfg.env_steps_per_iteration():,} env steps), "
          f"pipeline={'on' if cfg.pipeline else 'off'} -> {out}{' (resuming)' if mode == 'resume' else ''}",
          file=sys.stderr)
    bar = Progress(f"meta-train {Path(name).stem}")
    try:
        summary = meta_train.run(cfg, out, callback=bar, resume=mode == "resume", preset=args.preset,
                                 time_limit_s=args.time_limit, trainer=trainer)
    finally:
        bar.close()
    if "stopped_at_iteration" in summary:
        print(f"stopped by --time-limit at meta-iteration {summary['stopped_at_iteration']} of "
              f"{cfg.iterations}; φ so far saved to {summary['optimizer_file']}; continue with --resume --out {out}")
        return 0
    final = summary.get("final_eval_return")
    print(f"done: {summary['iterations']} meta-iterations, {summary['skipped_updates']} skipped updates, "
          f"final evaluation return {final if final is None else round(final, 4)}; optimizer saved to "
          f"{summary['optimizer_file']}")
    return 0


def register_meta_train(sub) -> None:
    from optim4rl import config as config_lib

    presets = ", ".join(name for name, _ in config_lib.list_presets().items()
                        if config_lib.load_preset(name).get("command") == "meta-train")
    p = _add_parser(sub, "meta-train", "meta-train a learned optimizer with pipeline training",
                    "Pipeline meta-training (the paper's Section 4): a population of A2C agents (or PPO "
                    "agents on Brax tasks with agent = \"ppo\": MetaPPO) with "
                    "staggered resets shares the learned optimizer's meta-parameters; the result is "
                    "OUT/optimizer.o4r.")
    p.add_argument("--preset", help=f"one of: {presets}; or a path to a TOML file "
                                    "(`optim4rl list presets`)")
    p.add_argument("--optimizer", choices=["optim4rl", "l2l", "lin", "star", "rlc2024"],
                   help="architecture to meta-train (default: the preset's, else optim4rl; rlc2024: "
                        "Optim4RL as in the final, RLC 2024 version: raw g and g² inputs, linear heads)")
    p.add_argument("--inputs", choices=["sign_log", "raw"],
                   help="Optim4RL gradient inputs (raw = the no-gradient-processing ablation)")
    p.add_argument("--no-pipeline", action="store_true", help="ablation: agents are never reset")
    p.add_argument("--iterations", type=positive_int,
                   help="meta-iterations (with --resume: may extend a run, recorded in config.json)")
    p.add_argument("--num-agents", dest="num_agents", type=positive_int, help="agents per task")
    p.add_argument("--seed", type=seed_int, help="seed of the run (default 0)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a meta setting (`optim4rl list keys`), e.g. meta_learning_rate=3e-4, "
                        "optimizer_options.inputs=raw, init_from=FILE.o4r")
    p.add_argument("--out", help="run directory (default runs/meta-OPTIMIZER-PRESET)")
    _run_dir_flags(p)
    p.add_argument("--time-limit", dest="time_limit", type=_positive_seconds, metavar="SECONDS",
                   help="stop cleanly (checkpoint + optimizer_latest.o4r) at the first chunk past this "
                        "wall-clock time; --resume continues")
    p.set_defaults(func=cmd_meta_train)


_EXTRA_COMMANDS.append(register_meta_train)

# --- compare ---------------------------------------------------------------------------------

def cmd_compare(args) -> int:
    from optim4rl import compare
    from optim4rl import config as config_lib

    preset = _load_preset_section(args.preset, "compare", "compare")
    data = dict(preset.get("compare", {}))
    if args.env:
        data["envs"] = args.env
    if args.optimizers:
        data["optimizers"] = args.optimizers
    for key, attr in (("agent", "agent"), ("seeds", "seeds"), ("seed", "seed"), ("steps", "steps"),
                      ("reference", "reference")):
        if getattr(args, attr) is not None:
            data[key] = getattr(args, attr)
    if args.lrs:
        data["learning_rates"] = args.lrs
    if args.score_last_updates is not None:
        data["score_last_updates"] = args.score_last_updates
    if args.grad_clip is not None:
        data["grad_clip"] = _clip(args.grad_clip)
    cli_sets = _flat_overrides(args.set, "agent")
    _refuse_conflict("--steps", "total_steps", args.steps, cli_sets)
    overrides = {**(data.pop("agent_overrides", {}) or preset.get("agent", {})), **cli_sets}
    data["agent_overrides"] = overrides
    data.setdefault("scale", preset.get("scale", "cpu"))
    for required in ("envs", "optimizers"):
        if required not in data:
            raise ConfigError(f"compare needs --{'env' if required == 'envs' else required}")
    spec = config_lib.from_dict(compare.CompareSpec, data, "compare")
    out = _out_dir(args, f"compare-{spec.agent}-{'-'.join(spec.envs)}")
    if spec.seeds < 5:
        print(f"optim4rl: warning: {spec.seeds} seeds per optimizer: the confidence intervals are wide "
              "and the paired tests can hardly reach significance (use --seeds 5 or more, the paper "
              "uses 10)", file=sys.stderr)

    def report(event):
        state = "done before, skipped" if event["skipped"] else "training"
        print(f"[{event['done'] + 1}/{event['total']}] {event['env']}: {event['optimizer']} "
              f"lr {event['learning_rate']:g} x {spec.seeds} seeds ({state})", file=sys.stderr)

    summary = compare.run(spec, out, callback=report)
    print((out / "summary.md").read_text())
    print(f"results in {out}")
    return 0


def register_compare(sub) -> None:
    p = _add_parser(sub, "compare", "compare optimizers over many seeds, with statistics and plots",
                    "Trains every optimizer (and each of its step sizes) on every task over the same "
                    "seeds, selects each optimizer's best step size by mean score, and writes bootstrap "
                    "confidence intervals, paired tests against the reference, plots and summary.md.")
    p.add_argument("--env", nargs="+", help="one or more environments (several: also an aggregate)")
    p.add_argument("--optimizers", nargs="+", help="e.g. adam rmsprop optim4rl:grid6 (NAME@LR,LR to sweep)")
    p.add_argument("--agent", choices=["a2c", "ppo"], help="RL algorithm (default a2c)")
    p.add_argument("--lrs", nargs="+", type=positive_float,
                   help="step sizes swept for every optimizer without its own @LR (default: the task's "
                        "own, A2C 3e-3, PPO the paper's Brax step size: 3e-4, walker2d 3e-5)")
    p.add_argument("--seeds", type=positive_int, help="seeds per optimizer (default 10)")
    p.add_argument("--seed", type=seed_int, help="first seed (default 0)")
    p.add_argument("--steps", type=positive_int, help="environment steps per seed")
    p.add_argument("--reference", help="optimizer the others are tested against (default adam)")
    p.add_argument("--grad-clip", type=nonneg_float, help="elementwise gradient clip (0 = off; default 1)")
    p.add_argument("--preset", help="a compare preset name or TOML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an agent setting (`optim4rl list keys`)")
    p.add_argument("--out", help="comparison directory (default runs/compare-AGENT-ENVS; re-running it "
                                 "reuses finished runs and resumes killed ones)")
    p.add_argument("--score-last-updates", dest="score_last_updates", type=positive_int, metavar="N",
                   help="score = mean episode return of each seed's last N updates (the RLC 2024 paper's "
                        "gridworld score: 20); default: the last 10%% of logged returns")
    p.set_defaults(func=cmd_compare)


_EXTRA_COMMANDS.append(register_compare)


# --- gradients -------------------------------------------------------------------------------

def cmd_gradients(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl import envs
    from optim4rl.analysis import collect
    from optim4rl.optimizers import make_optimizer
    from optim4rl.runs import check_writable_dir

    modes = [m for m in ("env", "supervised", "compare") if getattr(args, m)]
    if len(modes) != 1:
        raise ConfigError("gradients needs exactly one of --env ENV, --supervised digits, "
                          "--compare DIR ...")
    for name in ("coords", "snapshots", "phases"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.identity_steps < 0:
        raise ConfigError(f"--identity-steps must be >= 0, got {args.identity_steps}")
    if args.snapshots < args.phases:
        raise ConfigError(f"--snapshots ({args.snapshots}) must be at least --phases ({args.phases})")

    if args.compare:
        out = check_writable_dir(_out_dir(args, "gradients-compare"))
        identity_steps = 0 if args.no_identity else args.identity_steps
        print(f"optim4rl gradients: comparing {len(args.compare)} recorded run(s) -> {out}",
              file=sys.stderr)
        collect.compare_runs(args.compare, out, args.phases, identity_steps, args.seed or 0)
        print((out / "report.md").read_text())
        print(f"figures and summary.json in {out}")
        return 0

    identity_steps = args.identity_steps if args.identity else 0
    seed = args.seed or 0
    if args.supervised:
        from optim4rl.analysis import supervised

        optimizer = args.optimizer or "adam"
        lr = args.lr if args.lr is not None else 1e-3
        clip = None if args.grad_clip is None or args.grad_clip <= 0 else args.grad_clip
        steps = args.steps if args.steps is not None else 3000
        out = check_writable_dir(_out_dir(args, f"gradients-supervised-{args.supervised}-{optimizer}"))
        make_optimizer(optimizer, lr, grad_clip=clip)
        print(f"optim4rl gradients: MLP on {args.supervised} with {optimizer} (lr {lr:g}), "
              f"{steps:,} minibatch steps of {args.batch_size} -> {out}", file=sys.stderr)
        bar = Progress(f"supervised/{args.supervised}", unit="example")
        try:
            result = supervised.collect_supervised(
                args.supervised, optimizer, lr, clip, steps, args.batch_size, seed=seed,
                num_coords=args.coords, num_snapshots=args.snapshots, callback=bar)
        finally:
            bar.close()
    else:
        agent = args.agent or "a2c"
        optimizer = args.optimizer or "adam"
        lr = args.lr if args.lr is not None else 3e-3
        clip = 1.0 if args.grad_clip is None else (None if args.grad_clip <= 0 else args.grad_clip)
        overrides = {}
        for item in args.set or []:
            keys, value = config_lib.parse_override(item)
            if keys[0] == "agent":
                keys = keys[1:]
            if len(keys) != 1:
                raise ConfigError(f"--set {item!r}: agent settings are flat (agent.KEY=VALUE)")
            overrides[keys[0]] = value
        out = check_writable_dir(
            _out_dir(args, f"gradients-{agent}-{args.env}-{optimizer.replace(':', '_').replace('/', '_')}"))
        envs.env_family(args.env)
        make_optimizer(optimizer, lr, grad_clip=clip)
        from optim4rl import training

        # The agent settings are checked here too, before the header (unknown keys, NaN).
        training.resolve_agent_config(training.TrainSpec(agent=agent, env=args.env, optimizer=optimizer,
                                                         learning_rate=lr), overrides)
        print(f"optim4rl gradients: {agent} on {args.env} with {optimizer} (lr {lr:g}) -> {out}",
              file=sys.stderr)
        bar = Progress(f"{agent}/{args.env}")
        try:
            result = collect.collect_rl(
                agent, args.env, optimizer, lr, clip, args.steps, seed, args.coords, args.snapshots,
                agent_overrides=overrides, callback=bar)
        finally:
            bar.close()
    record = result.record
    config = {k: v for k, v in vars(args).items() if k != "func"}
    collect.write_run(result, out, args.phases, identity_steps, config=config)
    meta = record.metadata
    if args.supervised:
        done = f"test accuracy {meta['test_accuracy']:.3f} (train {meta['train_accuracy']:.3f})"
    else:
        final = meta.get("final_episode_return")
        done = (f"{meta['total_env_steps']:,} env steps, mean episode return over the last 10% of "
                f"updates {'n/a' if final is None else format(final, '.3f')}")
    print(f"recorded {record.num_snapshots} snapshots x {record.num_coords} coordinates "
          f"(of {meta['num_parameters']:,} parameters) in {result.wall_time_s:.1f}s; {done}")
    print((out / "report.md").read_text())
    print(f"gradients.npz, summary.json and figures in {out}")
    return 0


def register_gradients(sub) -> None:
    p = _add_parser(
        sub, "gradients", "record agent-gradients while training and analyse their distribution",
        description="Record a subsample of gradients and updates per layer while training "
                    "(--env: an RL agent; --supervised digits: a small classifier), write "
                    "gradients.npz, summary.json and histogram/drift figures; or --compare "
                    "recorded runs in one figure, with the identity experiment.")
    p.add_argument("--env", help="RL environment to record (see `optim4rl list envs`)")
    p.add_argument("--supervised", choices=["digits"], help="record a classifier on this dataset instead")
    p.add_argument("--compare", nargs="+", metavar="DIR_OR_NPZ",
                   help="recorded run directories (or .npz files) to compare in one figure")
    p.add_argument("--agent", choices=["a2c", "ppo"], help="RL agent (default a2c)")
    p.add_argument("--optimizer", help="adam (default), rmsprop, ... or optim4rl:FILE|PRETRAINED")
    p.add_argument("--lr", type=positive_float, help="step size (default 3e-3 RL, 1e-3 supervised)")
    p.add_argument("--grad-clip", type=nonneg_float,
                   help="elementwise clip inside the optimizer (0 = off; default 1 RL, off supervised); "
                        "gradients are recorded before it")
    p.add_argument("--steps", type=positive_int,
                   help="RL: environment steps (default: the agent's CPU preset); supervised: minibatch "
                        "steps (default 3000)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=64, help="supervised minibatch size")
    p.add_argument("--seed", type=seed_int, help="seed (default 0)")
    p.add_argument("--coords", type=positive_int, default=2048, help="coordinates recorded, stratified by layer")
    p.add_argument("--snapshots", type=positive_int, default=150, help="evenly spaced snapshots recorded")
    p.add_argument("--phases", type=positive_int, default=3, help="training phases compared")
    p.add_argument("--identity", action="store_true", help="also run the identity experiment on this run")
    p.add_argument("--identity-steps", dest="identity_steps", type=nonneg_int, default=1000,
                   help="training steps of the identity experiment (run by --compare unless --no-identity)")
    p.add_argument("--no-identity", dest="no_identity", action="store_true",
                   help="with --compare: skip the identity experiment")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an agent setting")
    p.add_argument("--out", help="output directory (default runs/gradients-...)")
    p.set_defaults(func=cmd_gradients)


_EXTRA_COMMANDS.append(register_gradients)

# --- reproduce -------------------------------------------------------------------------------

def cmd_reproduce(args) -> int:
    import shutil

    from optim4rl import reproduce

    from optim4rl.runs import check_writable_dir, check_writable_file

    out = check_writable_dir(_out_dir(args, f"reproduce-{args.budget}"))
    if args.docs:
        check_writable_file(args.docs, "--docs")
    known = [e.name for e in reproduce.experiments(args.budget)]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(known)}")

    def report(event):
        if event.get("event") == "experiment":
            print(f"== {event['name']}: {event['title']}", file=sys.stderr)
        else:
            state = ("not finished, left out" if event.get("left_out")
                     else "done before, skipped" if event["skipped"] else "training")
            print(f"   [{event['done'] + 1}/{event['total']}] {event['env']}: {event['optimizer']} "
                  f"lr {event['learning_rate']:g} ({state})", file=sys.stderr)

    report_path = reproduce.run(args.budget, out, callback=report, only=tuple(args.only or ()),
                                report_only=args.report_only)
    if args.docs:
        docs = Path(args.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        figures = docs.parent / "figures" / "results"
        text = report_path.read_text()
        for png in sorted(out.glob("*/*.png")):
            target = figures / png.parent.name / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            text = text.replace(f"]({png.parent.name}/{png.name})",
                                f"]({target.relative_to(docs.parent).as_posix()})")
        budget_head = text.split("\n", 1)[0]
        if args.only and docs.exists() and docs.read_text().split("\n", 1)[0] == budget_head:
            # A report of the same budget is there: update only the selected experiments' sections.
            command = f"optim4rl reproduce --budget {args.budget} --only {' '.join(args.only)}" + (
                " --report-only" if args.report_only else "") + f" --out {out}"
            text = reproduce.merge_report(docs.read_text(), text, args.budget, list(args.only), command)
            print(f"sections of {', '.join(args.only)} updated in {docs} (figures in {figures})", file=sys.stderr)
        else:
            print(f"report copied to {docs} (figures in {figures})", file=sys.stderr)
        docs.write_text(text)
    print(report_path.read_text())
    return 0


def register_reproduce(sub) -> None:
    p = _add_parser(sub, "reproduce", "regenerate the paper's experiments with `compare`, and a report",
                    "Runs the paper's experiments (its Section 5: big_dense_long against the baselines, "
                    "transfer to Brax and gymnax, the ablations, Catch) as comparisons, at a chosen "
                    "budget, and writes a report; re-running reuses finished runs.")
    p.add_argument("--budget", choices=["smoke", "cpu", "paper"], default="smoke",
                   help="smoke: minutes (tests); cpu: what runs on a CPU; paper: the paper's budgets")
    p.add_argument("--only", nargs="+", help="run only these experiments (a_big_dense_long, b_brax, ...)")
    p.add_argument("--out", help="directory (default runs/reproduce-BUDGET); re-running skips finished runs")
    p.add_argument("--docs", help="also write the report here (e.g. docs/results.md), figures beside it")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="train nothing: write the report from the runs finished so far (a long run still going)")
    p.set_defaults(func=cmd_reproduce)


_EXTRA_COMMANDS.append(register_reproduce)


# --- inspect ---------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    import json

    from optim4rl.analysis import response
    from optim4rl.optimizers import make_optimizer
    from optim4rl.runs import check_writable_file

    if args.out is not None:
        check_writable_file(args.out)
    for spec in args.optimizers:  # every name is checked before the first response is computed
        make_optimizer(spec, 1.0, grad_clip=args.grad_clip)
    results = []
    for spec in args.optimizers:
        result = response.step_response(spec, steps=args.steps, grad_clip=args.grad_clip, seed=args.seed or 0)
        relative = response.relative_response(spec, steps=max(args.steps, 2), grad_clip=args.grad_clip,
                                              seed=args.seed or 0)
        results.append({**result, "relative": relative})
        print(response.format_response(result) + "\n")
        print(response.format_relative(relative) + "\n")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"written to {out}", file=sys.stderr)
    return 0


def register_inspect(sub) -> None:
    p = _add_parser(
        sub, "inspect", "step-size response of optimizers: |update|/lr by gradient size and noise",
        description="For each optimizer, feed coordinates a gradient of fixed size whose sign flips at "
                    "random (probability 0, 0.25, 0.5) and print |update|/lr after --steps updates. Adam "
                    "gives ~1 for consistent gradients and much less for noise; a learned optimizer that "
                    "prints the same number everywhere is sign descent with a fixed step. A second table "
                    "gives |update|/lr of a last gradient 0.01x ... 100x the size of the noisy ones "
                    "before it: RMSProp's step follows the ratio, sign descent's does not.")
    p.add_argument("optimizers", nargs="+", help="e.g. adam optim4rl:big_dense_long optim4rl:init")
    p.add_argument("--steps", type=positive_int, default=20, help="updates before the response is read")
    p.add_argument("--grad-clip", dest="grad_clip", type=positive_float, help="elementwise clip (default off)")
    p.add_argument("--seed", type=seed_int, help="seed of the sign flips (default 0)")
    p.add_argument("--out", help="also write the responses as JSON to this file")
    p.set_defaults(func=cmd_inspect)


_EXTRA_COMMANDS.append(register_inspect)


# --- sweep -----------------------------------------------------------------------------------

def cmd_sweep(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl import sweep as sweep_lib

    overrides = {}
    for item in args.set or []:
        keys, value = config_lib.parse_override(item)
        overrides[".".join(keys)] = value
    regime_data = {}
    for key, attr in (("env", "eval_env"), ("steps", "eval_steps"), ("num_envs", "eval_num_envs"),
                      ("learning_rate", "eval_lr"), ("seeds", "eval_seeds"), ("fresh_seeds", "fresh_seeds"),
                      ("fresh_seed", "fresh_seed"), ("score_last_updates", "score_last_updates")):
        if getattr(args, attr) is not None:
            regime_data[key] = getattr(args, attr)
    if args.score_last_updates is not None and args.score_last_updates <= 0:
        regime_data["score_last_updates"] = None
    if args.grad_clip is not None:
        regime_data["grad_clip"] = None if args.grad_clip <= 0 else args.grad_clip
    if args.reference is not None:
        regime_data["reference"] = None if args.reference.lower() == "none" else args.reference
    regime = config_lib.from_dict(sweep_lib.EvalRegime, regime_data, "sweep evaluation")
    spec = sweep_lib.SweepSpec(preset=args.preset, grid=tuple(sweep_lib.parse_axis(a) for a in args.sweep),
                               overrides=overrides, regime=regime, time_limit_s=args.time_limit,
                               selection_runs_dir=args.selection_runs)
    grid = sweep_lib.points(spec)
    from optim4rl.runs import check_writable_dir

    out = check_writable_dir(_out_dir(args, 'sweep'))
    for _, settings in grid:  # every point's config is checked before anything is printed or made
        sweep_lib.meta_config(spec, settings)
    print(f"optim4rl sweep: {len(grid)} points of {args.preset} -> {out}", file=sys.stderr)

    def report(event):
        if event.get("event") == "point":
            print(f"== {event['point']} ({event['state']})", file=sys.stderr)
        elif "phase" in event:  # an evaluation run (meta-training progress events have no phase)
            state = "done before, skipped" if event["skipped"] else "training"
            print(f"   {event['phase']} [{event['done'] + 1}/{event['total']}] {event['optimizer']} ({state})",
                  file=sys.stderr)

    result = sweep_lib.run(spec, out, callback=report)
    print((out / "summary.md").read_text())
    if not result["complete"]:
        print(f"not every point finished within the time limit; rerun the same command to continue",
              file=sys.stderr)
    return 0


def register_sweep(sub) -> None:
    p = _add_parser(
        sub, "sweep", "meta-train a grid of configs, evaluate every file, select the best, re-evaluate it",
        description="One meta-training run directory per grid point (resumable; a rerun continues), "
                    "within an optional wall-clock budget; then every finished file trains fresh A2C agents "
                    "in a stated regime (default: the final paper version's, 512 envs, score = mean return "
                    "of the last 20 updates), the files are ranked by mean score, and the selected one is "
                    "re-evaluated on fresh seeds: that number is not inflated by the selection.")
    p.add_argument("--preset", required=True, help="meta-train preset, e.g. big_dense_long-rlc2024-cpu")
    p.add_argument("--sweep", action="append", required=True, metavar="KEY=V1,V2",
                   help="a grid axis (repeat for more); paired settings as K1&K2=A1&B1,A2&B2, e.g. "
                        "'meta_global_clip&meta_grad_clip=0.5&0,0&1.0'")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a fixed meta setting for every point")
    p.add_argument("--time-limit", dest="time_limit", type=_positive_seconds, metavar="SECONDS",
                   help="wall-clock budget for meta-training in this invocation; rerun to continue")
    p.add_argument("--eval-env", dest="eval_env", help="evaluation task (default: the first meta-training task)")
    p.add_argument("--eval-steps", dest="eval_steps", type=positive_int, help="env steps per evaluation seed (default 1e7)")
    p.add_argument("--eval-num-envs", dest="eval_num_envs", type=positive_int, help="A2C envs in evaluation (default 512)")
    p.add_argument("--eval-lr", dest="eval_lr", type=positive_float, help="step size (default: the task's meta-training α)")
    p.add_argument("--eval-seeds", dest="eval_seeds", type=positive_int, help="selection seeds 0..N-1 (default 3)")
    p.add_argument("--fresh-seeds", dest="fresh_seeds", type=positive_int, help="re-evaluation seeds (default 3)")
    p.add_argument("--fresh-seed", dest="fresh_seed", type=seed_int, help="first re-evaluation seed (default 1000)")
    p.add_argument("--score-last-updates", dest="score_last_updates", type=nonneg_int, metavar="N",
                   help="score = mean return of the last N updates (default 20; 0 = last 10%% of returns)")
    p.add_argument("--grad-clip", dest="grad_clip", type=nonneg_float, help="elementwise clip in evaluation (default 1; 0 off)")
    p.add_argument("--reference", help="hand-designed optimizer evaluated alongside (default adam; none = no reference)")
    p.add_argument("--selection-runs", dest="selection_runs", metavar="DIR",
                   help="training runs of the selection phase (default OUT/selection/runs); the runs "
                        "directory of a comparison in the same regime reuses its reference runs")
    p.add_argument("--out", required=True, help="sweep directory (a rerun resumes it)")
    p.set_defaults(func=cmd_sweep)


_EXTRA_COMMANDS.append(register_sweep)


# --- imitate ---------------------------------------------------------------------------------

def cmd_imitate(args) -> int:
    import dataclasses

    from optim4rl import config as config_lib
    from optim4rl import optimizers
    from optim4rl.analysis import response
    from optim4rl.optimizers import imitate as imitate_lib
    from optim4rl.runs import code_version, command_line

    settings = {"target": args.target, "seed": args.seed}
    if args.steps is not None:
        settings["steps"] = args.steps
    for item in args.set or []:
        keys, value = config_lib.parse_override(item)
        config_lib.set_path(settings, keys, value)
    options = settings.pop("optimizer_options", {})  # architecture fields, with NAME:init
    cfg = config_lib.from_dict(imitate_lib.ImitationConfig, settings, "imitate")
    opt, phi, source_info = optimizers.learned_from_spec(args.optimizer, **options)
    out = Path(args.out)
    if out.suffix != ".o4r":
        raise ConfigError(f"--out must name a .o4r file, got '{out}'")
    from optim4rl.runs import check_writable_file

    check_writable_file(out)
    imitate_lib.target_transform(opt, cfg)  # fail on a bad target before any work
    print(f"optim4rl imitate: {args.optimizer} -> step sizes of {cfg.target}, {cfg.steps} steps on "
          f"{cfg.coordinates} streams x {cfg.horizon} updates -> {out}", file=sys.stderr)
    bar = Progress("imitate", unit="step")
    try:
        phi, report = imitate_lib.imitate(opt, phi, cfg, callback=bar)
    finally:
        bar.close()
    info = {"made_by": "optim4rl imitate", "command": command_line(),
            "imitation": dataclasses.asdict(cfg), "seed": cfg.seed, "start": args.optimizer,
            "start_info": source_info, "code_version": code_version(),
            "heldout_loss_before": report["heldout_loss_before"],
            "heldout_loss_after": report["heldout_loss_after"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    optimizers.save(out, opt, phi, info=info)
    print(f"held-out squared log-error of |update|/lr against {cfg.target}: "
          f"{report['heldout_loss_before']:.4g} before, {report['heldout_loss_after']:.4g} after")
    spec = f"{opt.name}:{out}"
    print(response.format_response(response.step_response(spec)) + "\n")
    print(response.format_relative(response.relative_response(spec)))
    print(f"saved to {out}; train with --optimizer {spec}, or meta-train from it with "
          f"--set init_from={out}", file=sys.stderr)
    return 0


def register_imitate(sub) -> None:
    p = _add_parser(
        sub, "imitate", "fit a learned optimizer's step sizes to Adam's (or any optimizer's)",
        description="Not in the paper. Fits φ so that the learned optimizer's |update|/lr matches the "
                    "target's on synthetic per-coordinate gradient streams (scales 1e-8 ... 1, noise, "
                    "exactly-zero gradients). The result trains agents like any .o4r file and can start "
                    "pipeline meta-training (meta-train --set init_from=FILE).")
    p.add_argument("--optimizer", default="optim4rl:init",
                   help="learned optimizer to start from: NAME:init, NAME:FILE.o4r or NAME:PRETRAINED")
    p.add_argument("--target", default="adam", help="optimizer whose step sizes to match")
    p.add_argument("--steps", type=positive_int, help="fitting steps (default 500)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the synthetic gradient streams")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another ImitationConfig field (coordinates, horizon, learning_rate, floor, "
                        "chunk), or an architecture field with NAME:init, e.g. "
                        "optimizer_options.sign_flip=true")
    p.add_argument("--out", required=True, help="output parameter file (.o4r)")
    p.set_defaults(func=cmd_imitate)


_EXTRA_COMMANDS.append(register_imitate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Optim4RLError as exc:
        parser.exit(2, f"optim4rl: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "optim4rl: interrupted (use --resume to continue from the last checkpoint)\n")
    except BrokenPipeError:
        # `optim4rl list | head`: the reader left; say nothing more and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A filesystem fault (disk full, permissions, read-only files): one line. Checkpoints
        # are written atomically, so a run stopped here resumes from its last one.
        where = f"{exc.filename}: " if exc.filename else ""
        hint = ("; the run directory stays resumable with --resume once there is space"
                if exc.errno == 28 else "")
        parser.exit(1, f"optim4rl: error: {where}{exc.strerror or exc}{hint}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
