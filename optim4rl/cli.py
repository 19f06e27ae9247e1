"""The `optim4rl` command: train, meta-train, compare, gradients, reproduce, list.

This is the only module that parses arguments or prints. Library errors that describe bad input
(`optim4rl.errors.Optim4RLError`, a ValueError) become one line `optim4rl: error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from optim4rl.errors import ConfigError, Optim4RLError


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
                           ("meta_loss", "meta_loss"), ("eval_return", "eval"), ("optimizer", "opt")):
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
    if args.out:
        return Path(args.out)
    return Path("runs") / default_name


def _load_preset_section(name: str | None, section: str, command: str) -> dict:
    from optim4rl import config as config_lib

    if not name:
        return {}
    data = config_lib.load_preset(name)
    if data.get("command", command) != command:
        raise ConfigError(f"preset {name!r} is for `optim4rl {data['command']}`, not `{command}`")
    return data


# --- train -----------------------------------------------------------------------------------

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
        spec_data["grad_clip"] = None if args.grad_clip <= 0 else args.grad_clip
    spec = config_lib.from_dict(training.TrainSpec, spec_data, "train")
    overrides = dict(preset.get("agent", {}))
    for item in args.set or []:
        keys, value = config_lib.parse_override(item)
        if keys[0] == "agent":
            keys = keys[1:]
        if len(keys) != 1:
            raise ConfigError(f"--set {item!r}: agent settings are flat (agent.KEY=VALUE)")
        overrides[keys[0]] = value
    if args.steps is not None:
        overrides["total_steps"] = args.steps
    agent_config = training.resolve_agent_config(spec, overrides, scale=preset.get("scale", "cpu"))
    out = _out_dir(args, f"train-{spec.agent}-{spec.env}-{spec.optimizer.replace(':', '_').replace('/', '_')}")
    print(f"optim4rl train: {spec.agent} on {spec.env} with {spec.optimizer} (lr {spec.learning_rate:g}), "
          f"{spec.seeds} seed(s), {agent_config.total_steps:,} env steps each -> {out}", file=sys.stderr)
    bar = Progress(f"{spec.agent}/{spec.env}")
    try:
        summary = training.run(spec, agent_config, out, callback=bar, resume=args.resume)
    finally:
        bar.close()
    scores = ", ".join(f"{s:.3f}" for s in summary["score_per_seed"])
    print(f"score (mean of last 10% of returns) per seed: {scores}")
    print(f"mean score {summary['score_mean']:.3f}; {summary['steps_per_s']:,.0f} env steps/s; "
          f"wall {summary['wall_time_s']:.1f}s; results in {out}")
    return 0


# --- list ------------------------------------------------------------------------------------

def cmd_list(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl import envs, optimizers

    what = args.what
    if what in (None, "envs"):
        print("envs:")
        for name in envs.list_envs():
            print(f"  {name}")
    if what in (None, "optimizers"):
        print("optimizers (hand-designed: any optax optimizer name; learned: NAME:FILE, NAME:PRETRAINED, NAME:init):")
        for name in optimizers.list_optimizers():
            print(f"  {name}")
    if what in (None, "presets"):
        print("presets:")
        for name, desc in config_lib.list_presets().items():
            print(f"  {name:<28} {desc}")
    if what in (None, "pretrained"):
        print("pretrained optimizers (use as optim4rl:NAME):")
        pretrained = optimizers.list_pretrained()
        if not pretrained:
            print("  (none shipped yet)")
        for name in pretrained:
            print(f"  {name}")
    return 0


# --- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optim4rl", description="Learned optimizers for reinforcement learning (Optim4RL).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an agent with any optimizer, over several seeds")
    p.add_argument("--env", help="environment name (see `optim4rl list envs`)")
    p.add_argument("--agent", choices=["a2c", "ppo"])
    p.add_argument("--optimizer", help="adam, rmsprop, sgd, ... or optim4rl:FILE|PRETRAINED")
    p.add_argument("--lr", type=float, help="learning rate (step size)")
    p.add_argument("--grad-clip", type=float, help="elementwise gradient clip (0 = off; default 1)")
    p.add_argument("--steps", type=int, help="environment steps per seed")
    p.add_argument("--seeds", type=int, help="number of seeds, trained in parallel")
    p.add_argument("--seed", type=int, help="first seed")
    p.add_argument("--preset", help="preset name in configs/ or path to a TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an agent setting")
    p.add_argument("--out", help="run directory (default runs/train-...)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list", help="list envs, optimizers, presets and pretrained optimizers")
    p.add_argument("what", nargs="?", choices=["envs", "optimizers", "presets", "pretrained"])
    p.set_defaults(func=cmd_list)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list = []

# --- meta-train ------------------------------------------------------------------------------

def cmd_meta_train(args) -> int:
    from optim4rl import config as config_lib
    from optim4rl.meta import train as meta_train

    preset = _load_preset_section(args.preset, "meta", "meta-train")
    data = dict(preset.get("meta", {}))
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
    for item in args.set or []:
        keys, value = config_lib.parse_override(item)
        if keys[0] == "meta":
            keys = keys[1:]
        config_lib.set_path(data, keys, value)
    cfg = meta_train.load_config(data)
    name = args.preset or "custom"
    out = _out_dir(args, f"meta-{cfg.optimizer}-{Path(name).stem}")
    tasks = ", ".join(t.env for t in cfg.tasks)
    print(f"optim4rl meta-train: {cfg.optimizer} on [{tasks}], {cfg.num_agents} agents/task, "
          f"{cfg.iterations} meta-iterations ({cfg.iterations * cfg.env_steps_per_iteration():,} env steps), "
          f"pipeline={'on' if cfg.pipeline else 'off'} -> {out}", file=sys.stderr)
    bar = Progress(f"meta-train {Path(name).stem}")
    try:
        summary = meta_train.run(cfg, out, callback=bar, resume=args.resume, preset=args.preset)
    finally:
        bar.close()
    final = summary.get("final_eval_return")
    print(f"done: {summary['iterations']} meta-iterations, {summary['skipped_updates']} skipped updates, "
          f"final evaluation return {final if final is None else round(final, 4)}; optimizer saved to "
          f"{summary['optimizer_file']}")
    return 0


def register_meta_train(sub) -> None:
    p = sub.add_parser("meta-train", help="meta-train a learned optimizer with pipeline training")
    p.add_argument("--preset", help="catch, big_dense_long, grid6 (+ -cpu variants) or a TOML path")
    p.add_argument("--optimizer", choices=["optim4rl", "l2l", "lin", "star"], help="architecture to meta-train")
    p.add_argument("--inputs", choices=["sign_log", "raw"], help="Optim4RL gradient inputs (raw = ablation)")
    p.add_argument("--no-pipeline", action="store_true", help="ablation: agents are never reset")
    p.add_argument("--iterations", type=int, help="meta-iterations")
    p.add_argument("--num-agents", dest="num_agents", type=int, help="agents per task")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a meta setting")
    p.add_argument("--out", help="run directory (default runs/meta-...)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
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
    if args.grad_clip is not None:
        data["grad_clip"] = None if args.grad_clip <= 0 else args.grad_clip
    overrides = dict(data.pop("agent_overrides", {}) or preset.get("agent", {}))
    for item in args.set or []:
        keys, value = config_lib.parse_override(item)
        overrides[keys[-1]] = value
    data["agent_overrides"] = overrides
    data.setdefault("scale", preset.get("scale", "cpu"))
    for required in ("envs", "optimizers"):
        if required not in data:
            raise ConfigError(f"compare needs --{'env' if required == 'envs' else required}")
    spec = config_lib.from_dict(compare.CompareSpec, data, "compare")
    out = _out_dir(args, f"compare-{spec.agent}-{'-'.join(spec.envs)}")

    def report(event):
        state = "done before, skipped" if event["skipped"] else "training"
        print(f"[{event['done'] + 1}/{event['total']}] {event['env']}: {event['optimizer']} "
              f"lr {event['learning_rate']:g} x {spec.seeds} seeds ({state})", file=sys.stderr)

    summary = compare.run(spec, out, callback=report)
    print((out / "summary.md").read_text())
    print(f"results in {out}")
    return 0


def register_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare optimizers over many seeds, with statistics and plots")
    p.add_argument("--env", nargs="+", help="one or more environments (several: also an aggregate)")
    p.add_argument("--optimizers", nargs="+", help="e.g. adam rmsprop optim4rl:grid6 (NAME@LR,LR to sweep)")
    p.add_argument("--agent", choices=["a2c", "ppo"])
    p.add_argument("--lrs", nargs="+", type=float, help="step sizes swept for every optimizer")
    p.add_argument("--seeds", type=int, help="seeds per optimizer (default 10)")
    p.add_argument("--seed", type=int, help="first seed")
    p.add_argument("--steps", type=int, help="environment steps per seed")
    p.add_argument("--reference", help="optimizer the others are tested against (default adam)")
    p.add_argument("--grad-clip", type=float, help="elementwise gradient clip (0 = off; default 1)")
    p.add_argument("--preset", help="a compare preset name or TOML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an agent setting")
    p.add_argument("--out", help="comparison directory (re-running it skips finished runs)")
    p.set_defaults(func=cmd_compare)


_EXTRA_COMMANDS.append(register_compare)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Optim4RLError as exc:
        parser.exit(2, f"optim4rl: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "optim4rl: interrupted (use --resume to continue from the last checkpoint)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
