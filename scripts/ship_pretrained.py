"""Ship a meta-trained optimizer: copy DIR/optimizer.o4r to optim4rl/pretrained/NAME.o4r.

    python scripts/ship_pretrained.py RUN_DIR NAME [--compare COMPARE_DIR] [--scale TEXT] [--note TEXT]
    python scripts/ship_pretrained.py --reevaluate NAME --compare COMPARE_DIR
    python scripts/ship_pretrained.py --table        # only regenerate pretrained/README.md's table

Beside the file it writes NAME.json: the meta-training command, the provenance read back from the
file (full config, seed, code version), the meta-run's summary and, with ``--compare``, the
evaluation rows of an ``optim4rl compare`` directory that evaluated it. The table in
``optim4rl/pretrained/README.md`` is then rebuilt from all the JSON files, so every number in it
comes from a run directory. ``--reevaluate`` replaces the evaluation of a file already shipped
(for example after `optim4rl reproduce` ran again on another machine); the previous evaluation is
kept in the record under ``earlier_evaluations``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from optim4rl.optimizers import load
from optim4rl.optimizers.make import optimizer_source
from optim4rl.optimizers.registry import PRETRAINED_DIR

TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"


def ship(run_dir: Path, name: str, compare_dir: Path | None, scale: str | None, note: str | None = None) -> Path:
    source = run_dir / "optimizer.o4r"
    if not source.is_file():
        sys.exit(f"ship_pretrained: error: {source} does not exist (has the meta-training run finished?)")
    opt, _, info = load(source)  # validates the file before it is shipped
    target = PRETRAINED_DIR / f"{name}.o4r"
    shutil.copyfile(source, target)
    # A run made on another machine may come back without config.json: the file's provenance
    # holds the same command and preset.
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else \
        {"command": info.get("command", ""), "preset": info.get("preset")}
    summary = json.loads((run_dir / "summary.json").read_text())
    meta = info.get("config", {})
    tasks = meta.get("tasks", [])
    agents = meta.get("num_agents")
    record = {
        "name": name,
        "optimizer": opt.name,
        "architecture": dataclasses.asdict(opt),
        "produced_by": {
            "commands": [*_start_commands(info), config.get("command", "")],
            "provenance_in_file": info,
            "meta_training_summary": summary,
        },
        "scale": scale or (f"{config.get('preset', '?')}: {agents} agents per task, "
                           f"{summary.get('iterations')} meta-iterations ({summary.get('env_steps'):,} env steps)"),
        "trained_on": [t.get("env") if isinstance(t, dict) else t for t in tasks],
    }
    if note:
        record["note"] = note
    if compare_dir is not None:
        record["evaluation"] = _evaluation(compare_dir)
    (PRETRAINED_DIR / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return target


def _start_commands(info: dict) -> list[str]:
    """The commands that made the file a run started from (``init_from``), oldest first, so the
    record names every step needed to remake the shipped file. The start file must still be where
    the run read it, with the SHA-256 the run recorded."""
    start = info.get("init_from")
    if not start:
        return []
    path = Path(start["path"])
    if not path.is_file():
        sys.exit(f"ship_pretrained: error: the run started from {path} (init_from), which no longer exists; "
                 "its command could not be recorded")
    digest = optimizer_source(f"optim4rl:{path}")["sha256"]  # as the run recorded it
    if start.get("sha256") and digest != start["sha256"]:
        sys.exit(f"ship_pretrained: error: {path} changed since the run started from it (SHA-256 differs)")
    _, _, start_info = load(path)
    return [*_start_commands(start_info), start_info.get("command", f"(made elsewhere: {path})")]


def reevaluate(name: str, compare_dir: Path) -> Path:
    record_path = PRETRAINED_DIR / f"{name}.json"
    if not record_path.is_file():
        sys.exit(f"ship_pretrained: error: no shipped optimizer {name!r} ({record_path} does not exist)")
    evaluation = _evaluation(compare_dir)
    labels = {r["optimizer"] for task in evaluation["tasks"].values() for r in task["rows"]}
    if not any(label.split("@")[0].endswith(f":{name}") for label in labels) and \
            not _evaluated_by_path(compare_dir, PRETRAINED_DIR / f"{name}.o4r"):
        sys.exit(f"ship_pretrained: error: {compare_dir} did not evaluate {name!r} (it has: {', '.join(sorted(labels))})")
    record = json.loads(record_path.read_text())
    if record.get("evaluation"):
        record.setdefault("earlier_evaluations", []).append(record["evaluation"])
    record["evaluation"] = evaluation
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record_path


def _evaluated_by_path(compare_dir: Path, shipped: Path) -> bool:
    """Whether the comparison trained a file given by path (as `optim4rl sweep` does) whose bytes
    are the shipped file's."""
    config = json.loads((compare_dir / "config.json").read_text())
    specs = (config.get("config", config)).get("optimizers", [])
    if not shipped.is_file():
        return False
    digest = optimizer_source(f"optim4rl:{shipped}")["sha256"]
    for spec in specs:
        source = spec.split("@")[0].split(":", 1)[-1]
        if source.endswith(".o4r") and Path(source).is_file() \
                and optimizer_source(f"optim4rl:{source}")["sha256"] == digest:
            return True
    return False


def _evaluation(compare_dir: Path) -> dict:
    data = json.loads((compare_dir / "summary.json").read_text())
    spec = json.loads((compare_dir / "config.json").read_text())
    return {"compare_dir": str(compare_dir), "compare_config": spec.get("config", spec),
            "tasks": {task: {"rows": info["rows"], "learning_rates": info.get("learning_rates")}
                      for task, info in data["tasks"].items()}}


def table() -> str:
    lines = ["| name | architecture | meta-trained on | scale | evaluation |", "|---|---|---|---|---|"]
    for path in sorted(PRETRAINED_DIR.glob("*.json")):
        rec = json.loads(path.read_text())
        arch = rec.get("optimizer") or rec["produced_by"]["provenance_in_file"].get("optimizer", "optim4rl")
        inputs = rec.get("architecture", {}).get("inputs")
        arch_text = {"optim4rl": "Optim4RL", "l2l": "L2L", "lin": "Lin", "star": "STAR"}.get(arch, arch)
        if inputs:
            arch_text += f" ({'sign/log' if inputs == 'sign_log' else inputs} inputs)"
        prov = rec["produced_by"]["provenance_in_file"]
        if not prov.get("pipeline", True):
            arch_text += ", no pipeline"
        trained_on = rec.get("trained_on") or prov.get("trained_on") or []
        lines.append(f"| `{rec['name']}` | {arch_text} | {', '.join(trained_on)} | {rec.get('scale', '')} "
                     f"| {_evaluation_text(rec.get('evaluation'))} |")
    return "\n".join(lines)


def _evaluation_text(evaluation: dict | None) -> str:
    if not evaluation:
        return "not evaluated over seeds yet"
    tasks = evaluation.get("tasks") or {evaluation.get("task", "task"): {"rows": evaluation.get("rows", [])}}
    reference = (evaluation.get("compare_config") or {}).get("reference", "adam")
    against = "Adam" if reference == "adam" else reference
    parts = []
    for task, info in tasks.items():
        if not info["rows"]:
            continue
        cells = [f"{_short(r['optimizer'])} {r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                 + (f" ({r['verdict']} vs {against}, p={r['pvalue']:.2g})" if r.get("pvalue") is not None else "")
                 for r in info["rows"]]
        parts.append(f"{task}, n={info['rows'][0]['n']}: " + "; ".join(cells))
    return "<br>".join(parts)


def _short(label: str) -> str:
    # Files evaluated before shipping appear under their run path; call them "this optimizer".
    return "this optimizer" if label.endswith(".o4r") else label


def write_table() -> None:
    readme = PRETRAINED_DIR / "README.md"
    text = readme.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < 0:
        sys.exit(f"ship_pretrained: error: {readme} lacks the {TABLE_START} / {TABLE_END} markers")
    readme.write_text(text[:start + len(TABLE_START)] + "\n" + table() + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("name", nargs="?")
    parser.add_argument("--compare", type=Path, help="an optim4rl compare directory that evaluated this optimizer")
    parser.add_argument("--scale", help="text for the table's scale column")
    parser.add_argument("--note", help="a remark kept in the record (for example where the run was made)")
    parser.add_argument("--table", action="store_true", help="only rebuild the README table")
    parser.add_argument("--reevaluate", metavar="NAME", help="replace a shipped file's evaluation (needs --compare)")
    args = parser.parse_args()
    if args.reevaluate:
        if args.compare is None:
            parser.error("--reevaluate needs --compare COMPARE_DIR")
        print(reevaluate(args.reevaluate, args.compare))
    elif not args.table:
        if args.run_dir is None or args.name is None:
            parser.error("give RUN_DIR and NAME (or --table)")
        print(ship(args.run_dir, args.name, args.compare, args.scale, args.note))
    write_table()


if __name__ == "__main__":
    main()
