"""`optim4rl reproduce`: the paper's experiments (docs/paper_settings.md §5) as `compare` runs, plus a report.

Experiments:
  a_big_dense_long  A2C on big_dense_long: Optim4RL vs Adam, RMSProp, L2L, Lin, STAR (all learned
                    optimizers meta-trained on big_dense_long).
  b_brax            transfer: the grid6 optimizer (meta-trained only on gridworlds) with PPO on Brax
                    tasks vs Adam and RMSProp.
  b_brax_reacher    (cpu budget only) the same on reacher, with Brax's published reacher settings
                    and 512k steps; in the paper budget reacher is one of b_brax's tasks.
  b_brax_ant        (cpu budget only) the same on ant with 512k steps (docs/paper_settings.md §4's ant settings at
                    128 envs); b_brax_humanoid and b_brax_walker2d likewise.
  c_gymnax          transfer beyond Brax: the grid6 optimizer with PPO on gymnax / MinAtar tasks.
  d_ablations       Optim4RL vs its ablations (raw gradient inputs; no pipeline training) on
                    big_dense_long, with the untrained Optim4RL as a floor.
  e_catch           A2C on Catch: Optim4RL meta-trained on Catch vs Adam, RMSProp and the untrained
                    φ, every optimizer at α = 1e-3, 3e-3, 1e-2 (a task whose compare horizon, 156 updates,
                    is about one pipeline lifetime, 128); e_catch_vs_init is the same runs with
                    the untrained φ as the reference of the paired tests, e_catch_lr1e-3 the same
                    runs at the learned optimizer's meta-training step size only.
  f_big_dense_long_64env  A2C on big_dense_long with 64 envs for 1e6 steps, 10 seeds: the files
                    meta-trained with agents that live that long (optim4rl/presets/big_dense_long-64env.toml)
                    vs Adam, RMSProp and the untrained φ, at the best of α = 1e-3, 3e-3, 1e-2
                    (RMSProp at 3e-3 only, the untrained φ at 3e-3 and 1e-2).
  g_paper_regime    A2C on big_dense_long in the final paper version's evaluation regime: 512 envs,
                    score = mean return of the last 20 updates (Lan et al., RLC 2024), clip 1:
                    Adam and RMSProp, fixed-step sign descent (sign_sgd, signum, and the untrained
                    φ of both Optim4RL configurations, which step α·sign(g)) and the shipped
                    big_dense_long files. cpu: 1e7 steps x 3 seeds; paper: 3e7 steps x 10 seeds,
                    Adam and RMSProp swept over 3e-2 ... 1e-4 as in the paper.
  g_paper_regime_long  the same regime at the paper's 3e7 steps, 5 seeds (cpu budget only): Adam,
                    the big_dense_long-64env-actor file and sign_sgd at its learned step.
  h_layout_map, h_layout_authors  Adam vs fixed-step sign descent on big_dense_long (A2C, 64 envs,
                    1e6 steps, 5 seeds) with this project's network (conv over the map) and with
                    the authors' layout (conv over plane x row, columns as channels): does the
                    network change the gap?
  i_metappo, i_metappo_vs_init, i_metappo_reacher  the shipped MetaPPO files (meta-trained with PPO
                    on inverted_double_pendulum) on that task, against Adam and against the
                    untrained φ, and on the unseen reacher (5 seeds; only when the files are shipped).

The report (`results.md`) is generated from the comparison directories, never typed by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optim4rl import compare
from optim4rl import config as config_lib
from optim4rl.errors import ConfigError
from optim4rl.optimizers import list_pretrained


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    agent: str
    envs: tuple[str, ...]
    optimizers: tuple[str, ...]  # entries may name pretrained files that are absent: see resolve()
    steps: int | None
    seeds: int
    overrides: dict = field(default_factory=dict)
    claim: str = ""
    reference: str = "adam"  # the paired tests and verdicts are against this entry's label
    # Where its training runs live, under the output directory. A run directory is named by task,
    # optimizer and step size only, so experiments that train the same optimizer on the same task
    # with other seeds or settings need their own (else each overwrites the other's runs).
    runs: str = "runs"
    score_last_updates: int | None = None  # None: compare's default score (last 10% of returns)


def _learned(name: str, pretrained: str) -> str:
    """A shipped optimizer if present, else the untrained φ (stated in the report)."""
    return f"{name}:{pretrained}" if pretrained in list_pretrained() else f"{name}:init"


def experiments(budget: str) -> list[Experiment]:
    if budget not in ("smoke", "cpu", "paper"):
        raise ConfigError(f"unknown budget {budget!r}; choose smoke, cpu or paper")
    o4r_bdl = _learned("optim4rl", "big_dense_long")
    o4r_grid6 = _learned("optim4rl", "grid6")
    o4r_catch = _learned("optim4rl", "catch")
    baselines = tuple(_learned(n, f"{n}-big_dense_long") for n in ("l2l", "lin", "star"))
    if budget == "cpu":
        # An untrained baseline says little and costs a full run on a CPU: only shipped ones.
        baselines = tuple(b for b in baselines if not b.endswith(":init"))
    long_lifetime = tuple(f"optim4rl:{name}" for name in ("big_dense_long-64env-actor", "big_dense_long-64env")
                          if name in list_pretrained())
    ablations = (_learned("optim4rl", "big_dense_long-raw"), _learned("optim4rl", "big_dense_long-no_pipeline"))
    if budget == "smoke":
        # Minutes on a CPU: the same pipeline (compare, statistics, report) on the cheapest tasks.
        return [
            Experiment("a_big_dense_long", "Smoke: learned vs Adam with A2C (Catch stands in for big_dense_long)",
                       "a2c", ("catch",), ("adam", _learned("optim4rl", "catch")), 10_000, 2, {"num_envs": 16}),
            Experiment("c_gymnax", "Smoke: transfer with PPO (CartPole-v1 stands in for Brax)", "ppo",
                       ("CartPole-v1",), ("adam", o4r_grid6), 8_192, 2,
                       {"num_envs": 16, "batch_size": 16, "num_minibatches": 2, "unroll_length": 16,
                        "num_eval_envs": 4}),
        ]
    paper = budget == "paper"
    seeds = 10 if paper else 5
    steps_grid = None if paper else 1_000_000
    # Hand-designed optimizers get a step-size sweep (the best is reported); learned ones run at
    # the step size they were meta-trained with (docs/paper_settings.md §2: 3e-3 on big_dense_long).
    adam, rmsprop = ("adam@3e-4,1e-3,3e-3", "rmsprop@3e-4,1e-3,3e-3") if paper else ("adam@1e-3,3e-3", "rmsprop@1e-3,3e-3")
    return [
        Experiment("a_big_dense_long", "Optim4RL vs baselines on big_dense_long (A2C)", "a2c",
                   ("big_dense_long",), (adam, rmsprop, o4r_bdl, *baselines), steps_grid, seeds,
                   claim="paper: Optim4RL matches Adam/RMSProp and beats L2L, Lin and STAR"),
        Experiment("b_brax", "Transfer: grid6 optimizer with PPO on Brax", "ppo",
                   ("inverted_double_pendulum", "reacher", "ant", "humanoid", "walker2d") if paper
                   else ("inverted_double_pendulum",),
                   ("adam", "rmsprop", o4r_grid6), None if paper else 200_000, seeds,
                   claim="paper: competitive with Adam and RMSProp on unseen Brax tasks"),
        # CPU budget: the other Brax tasks as their own experiments, with more steps than b_brax
        # (still 100-200x below the paper's: read them as early learning, not final returns).
        *([] if paper else [Experiment(f"b_brax_{env}", f"Transfer: grid6 optimizer with PPO on Brax {env}", "ppo",
                                       (env,), ("adam", "rmsprop", o4r_grid6), 512_000, seeds,
                                       claim="paper: competitive with Adam and RMSProp on unseen Brax tasks")
                            for env in ("reacher", "ant", "humanoid", "walker2d")]),
        Experiment("c_gymnax", "Transfer beyond Brax: gymnax / MinAtar with PPO", "ppo",
                   ("CartPole-v1", "Breakout-MinAtar") if paper else ("CartPole-v1",),
                   ("adam", "rmsprop", o4r_grid6), None if paper else 200_000, seeds,
                   claim="not in the paper: asked for by the seed"),
        Experiment("d_ablations", "Ablations on big_dense_long (A2C)", "a2c", ("big_dense_long",),
                   (adam, o4r_bdl, *ablations, "optim4rl:init"), steps_grid, seeds,
                   claim="paper: gradient processing and pipeline training both matter"),
        # Catch: the compare horizon (2e5 steps of 64 envs = 156 updates) is about one pipeline
        # lifetime of catch-cpu (reset 32 x K 4 = 128 updates); on big_dense_long it is 5x longer and
        # no optimizer learns within a lifetime (docs/findings.md). Every optimizer gets three step
        # sizes: the learned one was meta-trained at 1e-3.
        *[Experiment(name, title, "a2c", ("catch",),
                     tuple(f"{o}@{lrs}" for o in ("adam", "rmsprop", o4r_catch, "optim4rl:init")),
                     None, 10, claim=claim, reference=ref)
          for name, title, lrs, ref, claim in (
              ("e_catch", "Meta-trained on Catch, tested on Catch (A2C)", "1e-3,3e-3,1e-2", "adam",
               "not a separate figure in the paper (Catch is one of its meta-training tasks): does pipeline "
               "training give a better optimizer than its initialisation when the test horizon is about "
               "one pipeline lifetime?"),
              ("e_catch_vs_init", "The same Catch runs, paired against the untrained φ", "1e-3,3e-3,1e-2",
               "optim4rl:init", "meta-trained vs untrained: what pipeline training itself added"),
              ("e_catch_lr1e-3", "The same Catch runs at α = 1e-3 only, the learned optimizer's "
               "meta-training step size", "1e-3", "adam",
               "every optimizer at one step size; the learned one was meta-trained at this α"))],
        # big_dense_long with agent lifetimes as long as the test (optim4rl/presets/big_dense_long-64env.toml:
        # each meta-training agent lives 800 updates of 64 envs, the 1e6 steps tested here). Only
        # files meta-trained that way are compared, with 10 seeds, each at its best of the α swept.
        *([Experiment("f_big_dense_long_64env", "Meta-trained with agent lifetimes as long as the test: "
                      "big_dense_long (A2C, 64 envs, 1e6 steps)", "a2c", ("big_dense_long",),
                      ("adam@1e-3,3e-3,1e-2", "rmsprop@3e-3", "optim4rl:init@3e-3,1e-2",
                       *(f"{o}@1e-3,3e-3,1e-2" for o in long_lifetime)),
                      1_000_000, 10, {"num_envs": 64}, runs="runs-f_big_dense_long_64env",
                      claim="not in the paper: the paper's big_dense_long agents live 576 updates of one env "
                      "and are tested as long; on a CPU only 64-env agents learn big_dense_long within 1e6 "
                      "steps, so these files were meta-trained with 64-env agents living that long")]
          if long_lifetime else []),
        paper_regime(budget),
        *paper_regime_long(budget),
        *layout_experiments(budget),
        *metappo_experiments(budget),
    ]


def layout_experiments(budget: str) -> list[Experiment]:
    """Adam vs sign descent with both readings of the big gridworlds' conv layer (A2CConfig.conv_layout)."""
    steps, seeds = (1_000_000, 5) if budget != "smoke" else (20_000, 2)
    claim = ("not in the paper: the authors' code convolves over (plane, row) with the map's columns as "
             "channels (39,482 parameters on big_dense_long; ours 85,178). Is sign descent's gap to Adam "
             "the same with their layout?")
    return [Experiment(f"h_layout_{layout}", f"Adam vs sign descent, conv layout '{layout}': big_dense_long "
                       "(A2C, 64 envs, 1e6 steps)", "a2c", ("big_dense_long",), ("adam@3e-3", "sign_sgd@1e-3"),
                       steps, seeds, {"num_envs": 64, "conv_layout": layout}, runs=f"runs-h_layout_{layout}",
                       claim=claim)
            for layout in ("map", "authors")]


METAPPO_PRESET = "metappo-inverted_double_pendulum-cpu"
METAPPO_FILES = ("metappo-inverted_double_pendulum", "metappo-inverted_double_pendulum-rmsprop")


def metappo_agent() -> dict:
    """PPO settings of the MetaPPO CPU preset's agents, as `compare` overrides: the files
    meta-trained there are evaluated with agents of the same shape (8 evaluation envs)."""
    meta = config_lib.load_preset(METAPPO_PRESET)["meta"]
    return {"num_envs": meta["envs_per_agent"], **dict(meta["ppo"]), "num_eval_envs": 8}


def metappo_experiments(budget: str) -> list[Experiment]:
    """Optimizers meta-trained with PPO on inverted_double_pendulum (MetaPPO), on that task and on
    an unseen one (reacher), against Adam at its best of three step sizes and the untrained φ.

    The learned files run at their meta-training step size, 3e-4. Only shipped files are
    evaluated (none shipped: no experiment); the smoke budget has none.
    """
    files = tuple(f"optim4rl:{name}@3e-4" for name in METAPPO_FILES if name in list_pretrained())
    if budget == "smoke" or not files:
        return []
    seeds = 10 if budget == "paper" else 5
    agent = metappo_agent()
    optimizers = ("adam@3e-4,1e-3,3e-3", "optim4rl:init@3e-4", *files)
    claim = ("paper: MetaPPO, Optim4RL meta-trained with PPO agents on a Brax task; here one CPU-scale meta-training "
             "run from scratch and one from an RMSProp imitation, with agents of the meta-training's shape")
    runs = "runs-i_metappo"
    return [
        Experiment("i_metappo", "MetaPPO: meta-trained on inverted_double_pendulum, tested there (PPO)", "ppo",
                   ("inverted_double_pendulum",), optimizers, 81_920, seeds, agent, claim=claim, runs=runs),
        Experiment("i_metappo_vs_init", "The same MetaPPO runs, paired against the untrained φ", "ppo",
                   ("inverted_double_pendulum",), optimizers, 81_920, seeds, agent,
                   claim="meta-trained vs untrained: what MetaPPO itself added", reference="optim4rl:init", runs=runs),
        Experiment("i_metappo_reacher", "MetaPPO transfer: meta-trained on inverted_double_pendulum, tested on the "
                   "unseen reacher (PPO)", "ppo", ("reacher",), optimizers, 204_800, seeds, agent,
                   claim=claim + "; reacher was never seen in meta-training", runs=runs),
    ]


def paper_regime(budget: str) -> Experiment:
    """Evaluation as in the final paper version (RLC 2024): 512 envs, last-20-update score.

    Fixed-step sign descent is what every Optim4RL file meta-trained from scratch here turned out
    to be; this asks whether, with the paper's 8x larger batches and longer training, it comes
    within Adam's confidence interval. The cpu budget runs Adam and RMSProp at 3e-3 and 1e-3 (the
    paper's best region for A2C on the gridworlds) with 3 seeds of 1e7 steps.
    """
    paper = budget == "paper"
    sweep = "3e-2,1e-2,3e-3,1e-3,3e-4,1e-4" if paper else "3e-3,1e-3"
    shipped = tuple(f"optim4rl:{name}@3e-3" for name in ("big_dense_long-gpu", "big_dense_long-64env-actor",
                                                          "big_dense_long-rlc2024-cpu")
                    if name in list_pretrained())
    return Experiment(
        "g_paper_regime", "The paper's regime: big_dense_long with 512 envs, score = mean return of the last "
        "20 updates (A2C)", "a2c", ("big_dense_long",),
        # sign_sgd at 2.7e-3 = 0.9 x 3e-3, the step that the final recipe meta-trained from scratch
        # learned (big_dense_long-rlc2024-cpu: sign descent at 0.907 alpha): is that step all it learned?
        (f"adam@{sweep}", "rlc2024:init@3e-3", "sign_sgd@2.7e-3,1e-3,3e-4", f"rmsprop@{sweep}", "signum@1e-3,3e-4",
         "optim4rl:init@3e-3", *shipped),
        None if paper else 10_000_000, 10 if paper else 3, {"num_envs": 512},
        runs="g_paper_regime/runs", score_last_updates=20,
        claim="paper (RLC 2024): Optim4RL meta-trained on big_dense_long matches Adam and RMSProp in this regime. "
              "Here: is fixed-step sign descent within Adam's confidence interval when the batch is 512 envs?")


def paper_regime_long(budget: str) -> list[Experiment]:
    """The paper's full evaluation length (3e7 steps) on a CPU budget: 5 seeds of Adam, of the
    learned file that tied with it at 1e7 steps, and of sign descent at its learned step. (The paper
    budget's g_paper_regime already runs 3e7 steps with 10 seeds.)"""
    if budget != "cpu":
        return []
    tied = "big_dense_long-64env-actor"
    learned = (f"optim4rl:{tied}@3e-3",) if tied in list_pretrained() else ()
    return [Experiment(
        "g_paper_regime_long", "The paper's regime at the paper's length: big_dense_long, 512 envs, 3e7 steps, "
        "5 seeds, score = mean return of the last 20 updates (A2C)", "a2c", ("big_dense_long",),
        ("adam@3e-3", *learned, "sign_sgd@2.7e-3"), 30_000_000, 5, {"num_envs": 512},
        runs="g_paper_regime_long/runs", score_last_updates=20,
        claim="paper (RLC 2024): agents trained for 3e7 steps. Does the 1e7-step tie of the file meta-trained "
              "with long-lived 64-env agents hold at three times the length, and does sign descent catch up?")]


def run(budget: str, out: Path | str, callback: Callable[[dict], None] | None = None,
        only: tuple[str, ...] = (), report_only: bool = False) -> Path:
    """Runs the experiments (resuming) and writes the report. ``report_only`` trains nothing: the
    report is written from the runs finished so far (the others are listed as not finished)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selected = [e for e in experiments(budget) if not only or e.name in only]
    if only and not selected:
        raise ConfigError(f"no experiment named {', '.join(only)}; known: "
                          f"{', '.join(e.name for e in experiments(budget))}")
    for exp in selected:
        spec = compare.CompareSpec(envs=exp.envs, optimizers=exp.optimizers, agent=exp.agent,
                                   seeds=exp.seeds, steps=exp.steps, agent_overrides=exp.overrides,
                                   reference=exp.reference, score_last_updates=exp.score_last_updates,
                                   scale="paper" if budget == "paper" else "cpu")
        if callback:
            callback({"event": "experiment", "name": exp.name, "title": exp.title})
        # One runs/ directory for all experiments: a run two experiments share is trained once.
        compare.run(spec, out / exp.name, callback=callback, runs_dir=out / exp.runs, only_finished=report_only)
    return write_report(out, budget, selected, report_only=report_only)


def write_report(out: Path, budget: str, selected: list[Experiment], report_only: bool = False) -> Path:
    """results.md from the comparison directories: tables, figures and a verdict per task."""
    names = [e.name for e in selected]
    only = "" if names == [e.name for e in experiments(budget)] else " --only " + " ".join(names)
    only += " --report-only" if report_only else ""
    lines = [f"# optim4rl: reproduction of the paper's experiments (`{budget}` budget)", "",
             f"Generated by `optim4rl reproduce --budget {budget}{only} --out {out}`. Every number below is read "
             "from the comparison directories' `summary.json`; each run directory records its config, "
             "seeds and code version.", ""]
    header_end = len(lines)
    shipped = list_pretrained()
    if budget != "paper":
        lines += ["Budgets: agents are trained far below the paper's budgets, and the shipped optimizers were "
                  "meta-trained on a CPU at 100-1000x smaller budgets than the paper's (their sizes and "
                  "evaluations are in `optim4rl/pretrained/README.md`). Read a tie as 'no difference detected "
                  "with 5 seeds (10 on Catch and in f_big_dense_long_64env, 3 in g_paper_regime)', not as equivalence.", ""]
    lines += ["Learned optimizers used: " + (", ".join(f"`{p}`" for p in shipped) if shipped else "none shipped")
              + ". An entry `NAME:init` means no meta-trained file was available and the untrained φ was used.", ""]
    verdicts: list[str] = []
    versions: set[str] = set()
    for exp in selected:
        summary_path = out / exp.name / "summary.json"
        if not summary_path.exists():
            continue
        data = json.loads(summary_path.read_text())
        versions.update(data.get("code_versions", {}))
        lines += [f"## {exp.title}", "", f"_{exp.claim}_" if exp.claim else "", ""]
        body = (out / exp.name / "summary.md").read_text().split("\n", 2)[-1]
        # Figure links are relative to the comparison directory; make them relative to the report.
        body = body.replace("](curves_", f"]({exp.name}/curves_").replace("](scores_", f"]({exp.name}/scores_")
        lines += [body, ""]
        for task, info in data["tasks"].items():
            for row in info["rows"]:
                if row["verdict"] in ("better", "worse", "tie") and not row["optimizer"].startswith(("adam", "rmsprop")):
                    against = "Adam" if exp.reference == "adam" else f"`{exp.reference}`"
                    verdicts.append(f"- {exp.name} / {task}: `{row['optimizer']}` vs {against}: **{row['verdict']}** "
                                    f"(mean difference {row['diff']:.4g}, 90% CI [{row['diff_ci_low']:.4g}, "
                                    f"{row['diff_ci_high']:.4g}], paired t-test p = {row['pvalue']:.3g}, n = {row['n']})")
    if versions:
        lines[header_end:header_end] = ["Code versions of the runs read: " + ", ".join(f"`{v}`" for v in sorted(versions))
                      + (" (several: finished runs are reused when their config matches; a fresh `--out` "
                         "retrains them all with one version)." if len(versions) > 1 else "."), ""]
    lines += ["## Where the learned optimizers win, tie and lose (against Adam unless named)", "",
              "Verdict at α = 0.05 (paired t-test on the same seeds, no multiple-comparison correction):", "",
              *verdicts, ""]
    if budget != "smoke":
        lines += _step_response_section(shipped)
    report = out / "results.md"
    report.write_text("\n".join(lines))
    return report


def _step_response_section(shipped: list[str]) -> list[str]:
    """What each shipped optimizer does to one coordinate (`optim4rl inspect`), beside Adam."""
    from optim4rl.analysis import response
    from optim4rl.optimizers.files import load
    from optim4rl.optimizers.registry import pretrained_path

    specs = ["adam", "optim4rl:init"] + [f"{load(pretrained_path(name))[0].name}:{name}" for name in shipped]
    lines = ["## What the optimizers do to one coordinate", "",
             "`optim4rl inspect` feeds coordinates a gradient of fixed size |g| whose sign flips with the "
             "given probability and reads |Δθ|/α after 20 updates. Adam gives about 1 for a consistent "
             "gradient of any size and much less for noise. A learned optimizer that gives the same "
             "number everywhere is sign descent with a fixed step. The second table gives |Δθ|/α of a "
             "last gradient 0.01× … 100× the size of the 19 noisy ones before it: RMSProp's step "
             "follows the ratio (|g|/rms), Adam's less (its momentum holds the history), sign "
             "descent's not at all.", ""]
    for spec in specs:
        result = response.step_response(spec, magnitudes=(1e-6, 1e-4, 1e-2, 1.0), flip_probs=(0.0, 0.5))
        relative = response.relative_response(spec, magnitudes=(1e-4, 1e-2))
        lines += [response.format_response(result), "", response.format_relative(relative), ""]
    return lines



_VERDICTS = "## Where the learned optimizers win, tie and lose"
_RESPONSE = "## What the optimizers do to one coordinate"


def _sections(text: str, titles: list[str]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Splits a report into its preamble, its experiment sections (by title) and the rest
    (the verdict list and what follows)."""
    lines = text.split("\n")
    heads = {f"## {t}": t for t in titles}
    preamble, sections, rest, current = [], {}, [], None
    for line in lines:
        if line in heads:
            current = heads[line]
            sections[current] = [line]
        elif line.startswith(_VERDICTS) or current == "rest":
            current = "rest"
            rest.append(line)
        elif current is None:
            preamble.append(line)
        else:
            sections[current].append(line)
    return preamble, sections, rest


def merge_report(existing: str, new: str, budget: str, names: list[str], command: str) -> str:
    """`existing` (a full report of the same budget) with the sections and verdicts of the
    experiments `names` taken from `new`: `reproduce --only X --docs results.md` updates X's part
    of the shipped report and keeps the others, which were generated from other run directories."""
    exps = experiments(budget)
    titles = [e.title for e in exps]
    pre, old_sections, old_rest = _sections(existing, titles)
    _, new_sections, new_rest = _sections(new, titles)
    by_name = {e.name: e.title for e in exps}
    merged = dict(old_sections)
    for name in names:
        if by_name[name] in new_sections:
            merged[by_name[name]] = new_sections[by_name[name]]
    note = (f"Sections regenerated by `{command}` (the others are from the run directories named above): "
            + ", ".join(f"'{by_name[n]}'" for n in names) + ".")
    pre = [line for line in pre if line != note]  # notes of other experiments' updates stay
    pre = [line for i, line in enumerate(pre) if line.strip() or (i and pre[i - 1].strip())]
    while pre and not pre[-1].strip():
        pre.pop()
    pre += ["", note, ""]
    body = [line for t in titles if t in merged for line in merged[t]]

    def verdict_lines(rest):
        return [line for line in rest if line.startswith("- ")]

    prefixes = tuple(f"- {n} /" for n in names)
    verdicts = [v for v in verdict_lines(old_rest) if not v.startswith(prefixes)]
    verdicts += [v for v in verdict_lines(new_rest) if v.startswith(prefixes)]
    order = {n: i for i, n in enumerate(by_name)}
    verdicts.sort(key=lambda v: order.get(v[2:].split(" /")[0], len(order)))
    head_end = next((i for i, line in enumerate(old_rest) if line.startswith("- ")), len(old_rest))
    tail_start = next((i for i, line in enumerate(old_rest) if line.startswith(_RESPONSE)), len(old_rest))
    rest = old_rest[:head_end] + verdicts + [""] + old_rest[tail_start:]
    return "\n".join(pre + body + rest)
