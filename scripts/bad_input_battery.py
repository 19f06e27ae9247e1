"""A battery of bad inputs for every command: each must end with exactly one stderr line
`optim4rl: error: ...`, a non-zero exit, no traceback and no new file or directory.

    python scripts/bad_input_battery.py [--json out.json] [--only train] [--timeout 60]

Cases are generated from the parser itself (every numeric option gets NaN, inf, -inf, -1, a
word, an empty string and 1e400) plus hand-written ones: unknown names, --set typos and bad
values, broken presets, output paths that are files or lie under files, flag/--set conflicts,
and --resume with nothing to resume. Each case runs in-process in a fresh temporary directory;
one that has not failed after --timeout seconds is counted as "proceeds" (it accepted the bad
input and started working, or hung). Outcomes: clear, traceback, proceeds, messy (several lines,
exit 0, or left files behind). Prints the counts and every case that is not clear.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "abc", "", "1e400"]
# Minimal arguments a command needs so that the option under test is what fails.
BASE = {
    "train": ["--env", "catch", "--steps", "1280"],
    "meta-train": ["--preset", "catch-cpu", "--iterations", "1"],
    "compare": ["--env", "catch", "--optimizers", "adam", "--steps", "1280", "--seeds", "5"],
    "gradients": ["--env", "catch", "--steps", "1280"],
    "inspect": ["adam"],
    "sweep": ["--preset", "catch-cpu", "--sweep", "meta_learning_rate=1e-3,3e-4"],
    "imitate": ["--out", "x.o4r"],
    "reproduce": ["--budget", "smoke"],
}
PRESET_TEXT = {
    "missing": None,
    "directory": "DIR",
    "syntax": "[meta\nx = 1\n",
    "section typo": "[metaa]\niterations = 1\n",
    "key typo": "[meta]\niteratons = 1\ntasks = [{env = \"catch\"}]\n",
    "nan value": "[meta]\nmeta_learning_rate = nan\ntasks = [{env = \"catch\"}]\n",
    "negative": "[meta]\nnum_agents = -4\ntasks = [{env = \"catch\"}]\n",
    "wrong type": "[meta]\nnum_agents = \"many\"\ntasks = [{env = \"catch\"}]\n",
    "unknown env": "[meta]\ntasks = [{env = \"nosuchenv\"}]\n",
}
TRAIN_PRESET_TEXT = {
    "section typo": "[trian]\nenv = \"catch\"\n",
    "key typo": "[train]\nenvv = \"catch\"\n",
    "nan lr": "[train]\nlearning_rate = nan\n",
    "agent typo": "[agent]\nnum_envz = 4\n",
}


def numeric_cases() -> list[tuple[str, list[str]]]:
    from optim4rl import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sp in sub.choices.items():
        if name not in BASE:
            continue
        for action in sp._actions:
            if not action.option_strings or action.type is None or action.choices:
                continue
            flag = action.option_strings[-1]
            base = list(BASE[name])
            if flag in base:  # replace the base's value for this flag
                i = base.index(flag)
                base = base[:i] + base[i + 2:]
            for value in BAD_NUMBERS:
                cases.append((f"{name} {flag} {value!r}", [name, *base, flag, value]))
    return cases


def named_cases() -> list[tuple[str, list[str]]]:
    c = []
    add = lambda label, argv: c.append((label, argv))  # noqa: E731
    for env in ("nosuchenv", "", "catch,catch"):
        add(f"train --env {env!r}", ["train", "--env", env, "--steps", "1280"])
        add(f"compare --env {env!r}", ["compare", "--env", env, "--optimizers", "adam", "--seeds", "5"])
        add(f"gradients --env {env!r}", ["gradients", "--env", env])
    for opt in ("nosuch", "optim4rl:nosuch", "optim4rl", "optim4rl:missing.o4r", "adam@1e-3", "velo"):
        add(f"train --optimizer {opt}", ["train", "--env", "catch", "--steps", "1280", "--optimizer", opt])
        add(f"gradients --optimizer {opt}", ["gradients", "--env", "catch", "--optimizer", opt])
        add(f"inspect {opt}", ["inspect", opt])
        add(f"imitate --optimizer {opt}", ["imitate", "--optimizer", opt, "--out", "x.o4r"])
    for opt in ("adam@nan", "adam@-1", "adam@", "adam@abc", "adam@1e-3,nan", "nosuch", "adam adam",
                "optim4rl:nosuch@1e-3", "rmsprop"):
        add(f"compare --optimizers {opt}", ["compare", "--env", "catch", "--seeds", "5", "--optimizers",
                                            *opt.split()])
    add("compare --reference nosuch", ["compare", "--env", "catch", "--optimizers", "adam", "--reference",
                                       "nosuch", "--seeds", "5"])
    add("compare --seeds 1", ["compare", "--env", "catch", "--optimizers", "adam", "--seeds", "1"])
    add("imitate --target nosuch", ["imitate", "--target", "nosuch", "--out", "x.o4r"])
    add("imitate --out x.txt", ["imitate", "--out", "x.txt"])
    add("reproduce --only nosuch", ["reproduce", "--only", "nosuch"])
    add("list nothing", ["list", "nothing"])
    add("train --agent sac", ["train", "--agent", "sac"])
    add("meta-train --optimizer adam", ["meta-train", "--optimizer", "adam"])
    add("meta-train --num-agents 1e8", ["meta-train", "--preset", "catch-cpu", "--num-agents", "100000000"])
    add("train --seeds 1e14", ["train", "--env", "catch", "--seeds", "100000000000000"])
    add("train --steps 1e30", ["train", "--env", "catch", "--steps", "1" + "0" * 30])
    add("sweep no --sweep", ["sweep", "--preset", "catch-cpu"])
    add("sweep --sweep bogus=1,2", ["sweep", "--preset", "catch-cpu", "--sweep", "bogus=1,2"])
    add("sweep --sweep reset_interval=", ["sweep", "--preset", "catch-cpu", "--sweep", "reset_interval="])
    add("sweep --sweep meta_learning_rate=nan,1", ["sweep", "--preset", "catch-cpu", "--sweep",
                                                   "meta_learning_rate=nan,1"])
    add("sweep --eval-env nosuch", ["sweep", "--preset", "catch-cpu", "--sweep", "seed=0,1", "--eval-env", "x"])
    return c


def set_cases() -> list[tuple[str, list[str]]]:
    c = []
    sets = {
        "train": ["bogus=1", "entropy_coef=nan", "num_envs=-3", "num_envs=abc", "total_steps=inf",
                  "gamma=2", "rollout_length=0", "=1", "noequals"],
        "meta-train": ["bogus=1", "meta_learning_rate=nan", "meta_learning_rate=-1", "optimizer_options.bogus=1",
                       "optimizer_options.hidden_size=-1", "eval_steps=-1", "reset_interval=0",
                       "tasks=[]", "tasks=[{env=\"nosuch\"}]", "grad_clip=inf", "num_agents=abc"],
        "compare": ["bogus=1", "entropy_coef=nan", "num_envs=0"],
        "gradients": ["bogus=1", "entropy_coef=inf"],
        "imitate": ["bogus=1", "steps_per_batch=nan"],
        "sweep": ["bogus=1", "meta_learning_rate=nan"],
    }
    for name, values in sets.items():
        for value in values:
            c.append((f"{name} --set {value}", [name, *BASE[name], "--set", value]))
    conflicts = [
        ("train --steps 5000 --set total_steps=6000", ["train", "--env", "catch", "--steps", "5000", "--set",
                                                       "total_steps=6000"]),
        ("meta-train --iterations 3 --set iterations=4", ["meta-train", "--preset", "catch-cpu", "--iterations",
                                                          "3", "--set", "iterations=4"]),
        ("meta-train --no-pipeline --set pipeline=true", ["meta-train", "--preset", "catch-cpu", "--no-pipeline",
                                                          "--set", "pipeline=true"]),
        ("compare --steps 5000 --set total_steps=6000", ["compare", "--env", "catch", "--optimizers", "adam",
                                                         "--seeds", "5", "--steps", "5000", "--set",
                                                         "total_steps=6000"]),
    ]
    return c + conflicts


def path_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    c = []
    afile = tmp / "a_file"
    afile.write_text("x")
    for name in BASE:
        base = list(BASE[name])
        if "--out" in base:
            i = base.index("--out")
            base = base[:i] + base[i + 2:]
        for label, out in (("is a file", str(afile)), ("under a file", str(afile / "run")), ("empty", "")):
            file_out = name in ("imitate", "inspect")  # their --out is a file: a directory is the bad case
            out_arg = str(tmp / f"a_dir.{name}.o4r") if file_out and label == "is a file" else out
            if file_out and label == "is a file":
                Path(out_arg).mkdir(exist_ok=True)
                label = "is a directory"
            c.append((f"{name} --out {label}", [name, *base, "--out", out_arg]))
    for name, texts in (("meta-train", PRESET_TEXT), ("sweep", PRESET_TEXT), ("train", TRAIN_PRESET_TEXT)):
        for label, text in texts.items():
            path = tmp / f"{name}-{label.replace(' ', '_')}.toml"
            if text == "DIR":
                path.mkdir(exist_ok=True)
            elif text is not None:
                path.write_text(text)
            base = [a for a in BASE[name] if a != "catch-cpu" and a != "--preset"]
            c.append((f"{name} --preset {label}", [name, *base, "--preset", str(path)]))
    c.append(("train --resume nothing", ["train", "--env", "catch", "--resume", "--out", str(tmp / "none")]))
    c.append(("meta-train --resume nothing", ["meta-train", "--preset", "catch-cpu", "--resume", "--out",
                                              str(tmp / "none2")]))
    c.append(("train --resume --overwrite", ["train", "--env", "catch", "--resume", "--overwrite"]))
    return c


class Timeout(Exception):
    pass


def run_case(argv: list[str], timeout: float) -> dict:
    from optim4rl import cli

    with tempfile.TemporaryDirectory() as cwd:
        old = os.getcwd()
        os.chdir(cwd)
        err, out = io.StringIO(), io.StringIO()
        code, trace = None, None

        def alarm(*_):
            raise Timeout

        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        except Timeout:
            code = "timeout"
        except BaseException:  # noqa: BLE001 - a traceback is what the battery looks for
            trace = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            left = sorted(os.listdir(cwd))
            os.chdir(old)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if trace or "Traceback" in err.getvalue():
        outcome = "traceback"
    elif code == "timeout":
        outcome = "proceeds"
    elif code not in (0, None) and len(lines) == 1 and lines[0].startswith("optim4rl: error:") and not left:
        outcome = "clear"
    else:
        outcome = "messy"
    return {"outcome": outcome, "exit": code, "stderr": lines[-3:], "left": left,
            "traceback": trace.splitlines()[-1] if trace else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every case and its outcome here")
    parser.add_argument("--only", help="only cases of this command")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    os.environ["OPTIM4RL_NO_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        cases = numeric_cases() + named_cases() + set_cases() + path_cases(Path(tmp))
        if args.only:
            cases = [c for c in cases if c[1][0] == args.only]
        results, counts = [], {}
        for label, argv in cases:
            r = run_case(argv, args.timeout)
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            results.append({"case": label, "argv": argv, **r})
            if r["outcome"] != "clear":
                print(f"{r['outcome']:9s} {label}: exit {r['exit']} {r['stderr']} {r['traceback'] or ''}"
                      f"{' left ' + str(r['left']) if r['left'] else ''}", flush=True)
    print(f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "cases": results}, indent=1))
    return 0 if set(counts) <= {"clear"} else 1


if __name__ == "__main__":
    sys.exit(main())
