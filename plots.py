"""Figures, Table 1 and the correlations of Stutz, Hein & Schiele, "Relating Adversarially Robust
Generalization to Flat Minima" (ICCV 2021), redrawn from run folders.

Usage:   python plots.py runs/ --out figures/ [--baseline NAME] [--robustbench-dir models/]

Reads every run folder under the given path (any folder with an args.json): `args.json`,
`metrics.jsonl`, and every result of evaluate.py / flatness.py beside the checkpoints. Each result file
says what it measured in its "settings" ("checkpoint" names last / best / epochNNN; "mode", "loss",
"subset", "xi", the attack, n, ...); results are chosen by those, never by file name. Writes, as PNG and PDF:

  fig1_rloss_vs_flatness     Fig. 1: test RLoss vs average-case flatness, one labelled point per run; with
                             --robustbench-dir, ▲ for each RobustBench model measured into that folder
  fig2_robust_overfitting    Fig. 2: train/test RLoss and RErr over training (baseline run), ES epoch
  fig4_landscape             Fig. 4: RLoss along random and adversarial weight directions
  fig5_training_curves       Fig. 5: training curves per method (test solid, train dotted)
  fig6_flatness_over_training_<run>  Fig. 6: flatness and RLoss per snapshot; RLoss vs flatness
  fig7_hyperparameters       Fig. 7: RLoss vs average flatness across hyper-parameters, fit per method
  fig8_rloss_flatness        Fig. 8: RErr vs RLoss (two fits split at RLoss 2.3); RLoss and RErr vs
                             average flatness; RLoss vs worst-case flatness
  fig9_generalisation        Fig. 9: flatness on train examples; test−train RLoss; last−ES RLoss;
                             early-stopped vs last models
and table1.md / table1.csv / table1.json (Table 1 with the Good/Average/Poor group means),
correlations.json (Pearson, Spearman and Kendall with p-values and n), summary.json (every number read), and the
measures table: measures.md / measures.csv / measures.json and fig_measures (every flatness measure of the runs and
two baselines, the weight norm and train RLoss, against test RLoss, test − train RLoss and test RErr: Pearson,
Spearman, Kendall τ with p-values, and Jiang et al.'s granulated Kendall Ψ over the hyper-parameters the runs vary).
A figure whose inputs are missing is skipped with one line that says what is missing; a figure that leaves
runs out names them and why in one line, in small print under it and in its files' metadata.

One threat model per call: --norm linf|l2 (default: the --baseline's, else linf where a run was trained under it):
runs trained under the other norm, and results measured under it, are left out of every figure and of Table 1, and
each figure names them. The AT baseline (Fig. 2, the grey "AT") is a plain AT run (no Table 1 flag off the paper's
value, ε and PGD steps those of its norm) of any
length, width or subset: of several, the one whose size most runs share (choose_baseline()). Labels name the
method and what the paper varies; run length, width and subset only where nothing else tells runs apart.

Conventions (paper §4, README "plots.py"): RLoss = PGD-20×10 robust cross-entropy on test images
0…999 (an evaluation's "pgd"); RErr = AutoAttack where the run folder has it, else PGD (marked);
average-case flatness at ξ = 0.5 and worst-case at ξ = 0.00075 where several ξ were measured.
"""
import csv
import itertools
import json
import math
import re
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; no LaTeX needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from common import check  # noqa: E402
from evaluate import checkpoint_label  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Run labels: method name + the flags that differ from the paper's AT baseline (the Table 1 rows)
# ---------------------------------------------------------------------------------------------
METHOD_NAMES = {"at": "AT", "trades": "TRADES", "mart": "MART", "awp": "AWP", "rotation": "AT+rotation",
                "unlabeled": "AT+unlabeled", "entropy-sgd": "Entropy-SGD", "pgd-tau": "PGD-τ",
                "autoaugment": "AT+AutoAugment"}
# The method's own hyper-parameter, always part of the label ("TRADES β=9").
METHOD_FLAGS = {"trades": ["beta"], "mart": ["beta"], "awp": ["xi"], "rotation": ["rot_weight"],
                "unlabeled": ["unlabeled_fraction"], "entropy-sgd": ["L"], "pgd-tau": ["tau"]}
# Flags Table 1 varies, with the baseline's value: a run whose value differs gets "flag=value".
BASELINE = {"wd": 5e-4, "label_smoothing": 0.0, "label_noise": 0.0, "clip": 0.0, "ema": 0.0, "act": "relu",
            "lr_schedule": "multistep", "optimizer": "sgd", "epsilon": 8 / 255, "attack_steps": 7, "momentum": 0.9,
            "nesterov": False, "awp_warmup": 0, "grad_clip": 0.0, "adv_fraction": 1.0}
# ... whose ε and PGD steps are those of the run's --norm (train_at.py's defaults; runs from before --norm: linf)
THREAT_BASELINE = {"linf": {"epsilon": 8 / 255, "attack_steps": 7}, "l2": {"epsilon": 128 / 255, "attack_steps": 10}}
NORM_NAMES = {"linf": "ℓ∞", "l2": "ℓ2"}
# Flags whose reference is the baseline run's value, not the paper's: a CPU reproduction may shrink them for
# every run alike, while a run that differs from its baseline in them is a variant the paper draws (Fig. 4:
# batch size 8, Adam with lr 0.1).
RUN_SCALE = ("batch_size", "lr")
# Settings that size a run rather than define its method (a CPU reproduction trains fewer epochs of a narrower
# ResNet on a subset): a label names them only where nothing else tells two runs apart (name_run_size()).
RUN_SIZE = ("epochs", "width", "train_subset", "arch", "dataset")
SYMBOLS = {"beta": "β", "xi": "ξ", "rot_weight": "λ", "tau": "τ", "L": "L", "unlabeled_fraction": "fraction",
           "wd": "wd", "label_smoothing": "label-smoothing", "label_noise": "label-noise", "clip": "clip",
           "ema": "EMA", "act": "act", "lr_schedule": "schedule", "optimizer": "optimizer", "epsilon": "ε",
           "attack_steps": "PGD-steps", "momentum": "momentum", "nesterov": "nesterov", "awp_warmup": "warm-up",
           "grad_clip": "grad-clip", "adv_fraction": "adv-fraction", "epochs": "epochs", "batch_size": "batch",
           "lr": "lr", "width": "width", "train_subset": "subset", "arch": "arch", "dataset": "dataset"}
FLATNESS_METHODS = ("awp", "entropy-sgd")  # "◆" in Fig. 1 (with weight averaging); AT variants "●"
PAPER_XI = {"average": 0.5, "worst": 0.00075}  # the paper's ξ (§3.3, Eq. 3, 5), preferred when several ξ exist
METHOD_ORDER = list(METHOD_NAMES)


def is_off(v):
    return v is None or v is False or (isinstance(v, (int, float)) and v == 0)


def differs(value, reference):
    if is_off(value) and is_off(reference):
        return False
    if isinstance(value, (int, float)) and isinstance(reference, (int, float)) and not isinstance(value, bool):
        return not math.isclose(value, reference, rel_tol=1e-6, abs_tol=1e-12)
    return value != reference


def format_value(flag, v):
    if flag == "epsilon" and isinstance(v, (int, float)) and abs(v * 255 - round(v * 255)) < 1e-3:
        return f"{round(v * 255)}/255"
    if flag == "train_subset" and v == 0:
        return "all"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def differing_flags(args, reference):
    """[(flag, value)] of the AT hyper-parameters that differ from the paper's (BASELINE, THREAT_BASELINE) or, for
    RUN_SCALE, from `reference` (the baseline run's values)."""
    out, baseline = [], {**BASELINE, **THREAT_BASELINE.get(args.get("norm", "linf"), {})}
    for flag, ref in list(baseline.items()) + [(f, reference.get(f)) for f in RUN_SCALE]:
        if flag in args and ref is not None and differs(args[flag], ref):
            out.append((flag, args[flag]))
    return out


def flag_text(flag, v):
    if v is True:
        return SYMBOLS.get(flag, flag)
    return f"{SYMBOLS.get(flag, flag)}={format_value(flag, v)}"


def describe(args, reference, size=()):
    """(label, family, sweep value): label "TRADES β=9" / "AT wd=0.05"; family groups a sweep of
    one method (Fig. 7): the method plus the flags that differ, numeric ones by name only
    ("AT label-noise"), others with their value ("AT act=silu"). `size`: run-size flags [(flag, value)] to
    name as well (name_run_size())."""
    method = args.get("method", "at")
    name = METHOD_NAMES.get(method, method)
    own = [(f, args[f]) for f in METHOD_FLAGS.get(method, []) if f in args]
    other = differing_flags(args, reference) + list(size)
    label = " ".join([name] + [flag_text(f, v) for f, v in own + other])
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    family = " ".join([name] + [SYMBOLS.get(f, f) if numeric(v) else flag_text(f, v) for f, v in other])
    varied = own + other
    sweep = varied[0][1] if varied and isinstance(varied[0][1], (int, float)) else 0.0
    return label, family, float(sweep)


# ---------------------------------------------------------------------------------------------
# Reading run folders: each result file identifies itself by its fields
# ---------------------------------------------------------------------------------------------
class Log:
    """Collects the one-line messages (skipped files, skipped figures) and prints them."""

    def __init__(self):
        self.lines = []
        self.left_out = {}  # figure → {run: why}, from left_out()
        self.norm = "linf"  # the threat model drawn (keep_norm())
        self.other_norm = {}  # {run: why} of the runs of the other norm, named by every figure (left_out())

    def __call__(self, text):
        self.lines.append(text)
        print(text, flush=True)


def read_json(path, log):
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        log(f"skip {path}: not readable JSON ({type(e).__name__})")
        return None
    if not isinstance(obj, dict):
        log(f"skip {path}: not a JSON object")
        return None
    return obj


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# flatness.py's measures: one number per result (the landscape is a figure), in the measures table's order
MEASURE_MODES = ("average", "worst", "adaptive-average", "adaptive-worst", "pac-bayes", "pac-bayes-mag", "hessian",
                 "hessian-trace")
MODES = ("eval", "landscape") + MEASURE_MODES  # evaluate.py's, then flatness.py's (a figure, then the measures)


def measured_value(obj, mode):
    """A flatness result's measure: the Hessian's largest eigenvalue, else `value` (PAC-Bayes: 1/σ'²)."""
    return obj.get("eigenvalue" if mode == "hessian" else "value")


def has_numbers(obj, mode):
    """The numbers a result of `mode` is read for."""
    if mode == "eval":
        return isinstance(obj.get("pgd"), dict) and is_number(obj["pgd"].get("rloss"))
    if mode == "landscape":
        return isinstance(obj.get("s"), list)
    return is_number(measured_value(obj, mode))


def load_result(path, log):
    """One result of evaluate.py or flatness.py, identified by its settings (README "Result files"); None
    (with one line) for a file that is not one or lacks its numbers."""
    obj = read_json(path, log)
    if obj is None:
        return None
    settings = obj.get("settings")
    if isinstance(settings, dict) and settings.get("tool") == "flatness.py" and settings.get("mode") not in MODES:
        log(f"skip {path}: flatness.py mode {settings.get('mode')!r} is unknown to plots.py (a newer flatness.py: "
            f"add it to plots.py's MEASURE_MODES)")
        return None
    if not isinstance(settings, dict) or settings.get("mode") not in MODES:
        log(f"skip {path}: no 'settings' of evaluate.py or flatness.py (a result file from before they recorded "
            "them, or not a result; measure again)")
        return None
    mode = settings["mode"]
    if Path(settings.get("checkpoint", "")).parent != Path("."):  # evaluate.py --out put it here: not this run's
        log(f"skip {path}: it measured {settings['checkpoint']}, a checkpoint of another folder")
        return None
    if not has_numbers(obj, mode):
        log(f"skip {path}: {mode} result without its numbers")
        return None
    if mode != "hessian":  # (of the clean CE: no threat model) a result from before --norm is an ℓ∞ one
        settings = {"norm": "linf", **settings}
    if mode in ("eval", "average", "worst"):  # and one from before --estimator is ours
        settings = {"estimator": "project", **settings}
    return {"kind": checkpoint_label(settings["checkpoint"]),  # last, best, epoch045, ...
            "norm": settings.get("norm"),
            "epoch": obj.get("epoch"), "ema": settings["use_ema"], "mode": mode,
            "settings": settings, "data": obj, "file": path, "default": not obj.get("non_default"),
            "n": settings["n_eval"] if mode == "eval" else obj.get("n"), "hash": obj.get("settings_hash", ""),
            "loss": settings.get("loss"), "subset": settings.get("subset"), "xi": settings.get("xi"),
            # a rescaled model (--scale α, §3.2) is a check of scale invariance, not a run's value
            "scale": settings.get("scale", 1.0)}


def load_run(folder, log):
    """One run: args, metrics (one dict per epoch), evaluation and flatness entries (every *.json of the folder
    but args.json)."""
    args = read_json(folder / "args.json", log)
    if args is None:
        return None
    metrics = []
    if (folder / "metrics.jsonl").exists():
        bad = 0
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            try:
                m = json.loads(line) if line.strip() else None
            except ValueError:
                m, bad = None, bad + 1
            if isinstance(m, dict) and "epoch" in m:
                metrics.append(m)
        if bad:
            log(f"skip {bad} unparsable line(s) of {folder / 'metrics.jsonl'}")
    results = [r for r in (load_result(p, log) for p in sorted(folder.glob("*.json")) if p.name != "args.json") if r]
    return {"name": str(folder), "dir": folder, "args": args, "metrics": metrics,
            "evals": [r for r in results if r["mode"] == "eval"], "flats": [r for r in results if r["mode"] != "eval"]}


def choose_baseline(runs, name, log):
    """The AT baseline (paper §4: PGD-7 AT, ResNet-18, no regulariser): the run of Fig. 2, the grey "AT" of every
    figure, and the reference of the labels' batch size and lr. --baseline NAME, else a plain AT run (method
    at, every Table 1 flag at the paper's value) whatever its epochs, width or data; of several, the one whose
    run size (RUN_SIZE, RUN_SCALE) most other runs share (then the first folder), so a 2-epoch quick start
    beside 1-epoch method runs is their baseline when it is the only plain AT run. One line says which."""
    if name:
        found = [r for r in runs if r["name"] == name or r["dir"].name == name]
        check(found, f"--baseline {name}: no such run folder (have: {', '.join(r['name'] for r in runs)})")
        log(f"baseline: {found[0]['name']} (--baseline)")
        return found[0]
    plain = [r for r in runs if r["args"].get("method", "at") == "at" and not differing_flags(r["args"], {})]
    if not plain:
        log("skip fig2: no AT baseline run (method at without regularisers); pass --baseline NAME")
        return None
    size = RUN_SIZE + RUN_SCALE

    def shared(r):  # (other runs of exactly its size, other runs' settings equal to its own)
        same = [[not differs(o["args"].get(f), r["args"].get(f)) for f in size] for o in runs if o is not r]
        return sum(all(s) for s in same), sum(map(sum, same))
    best = max(plain, key=shared)  # the first of equals
    what = ", ".join(flag_text(f, best["args"][f]) for f in RUN_SIZE + RUN_SCALE if f in best["args"])
    why = "the only plain AT run" if len(plain) == 1 else \
        (f"of the plain AT runs {', '.join(r['name'] for r in plain)} the one whose run size most other runs share "
         f"({shared(best)[0]} of {len(runs) - 1} exactly)")
    log(f"baseline: {best['name']} ({what}; {why})")
    return best


def name_run_size(runs, base, reference):
    """Run-size settings (RUN_SIZE) enter a label only where they alone tell runs apart: a plain AT run of
    another size than the baseline ("AT epochs=1", a family of its own, so Table 1's "AT" row and Fig. 2 stay
    the baseline's), and runs that share a label ("TRADES β=6 epochs=1" / "... epochs=2", still one family)."""
    for r in runs:
        r["size"] = []
        if base is not None and r is not base and r["label"] == base["label"]:
            r["size"] = [(f, r["args"][f]) for f in RUN_SIZE
                         if f in r["args"] and differs(r["args"][f], reference.get(f))]
            if r["size"]:
                r["label"], r["family"], r["sweep"] = describe(r["args"], reference, r["size"])
    by_label = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    for same in by_label.values():
        varying = [f for f in RUN_SIZE if len({r["args"].get(f) for r in same}) > 1]
        for r in same if len(same) > 1 else ():
            extra = [(f, r["args"][f]) for f in varying if f in r["args"] and f not in dict(r["size"])]
            r["label"] = describe(r["args"], reference, r["size"] + extra)[0]


def run_norm(run):
    return run["args"].get("norm", "linf")  # runs from before --norm: linf


def keep_norm(runs, norm, baseline, log):
    """The runs of one threat model (log.norm): --norm, else the --baseline run's, else linf where a run was trained
    under it (the paper's), else l2. The others are named once here and by every figure (log.other_norm); of the
    runs kept, results measured under the other norm (evaluate.py --norm) are skipped with one line each. Figures
    and Table 1 never mix norms: one call of plots.py per norm, each with its own --out."""
    named = [run_norm(r) for r in runs if baseline in (r["name"], r["dir"].name)][:1]  # (choose_baseline's run)
    if norm is None:
        norm = named[0] if named else "linf" if any(run_norm(r) == "linf" for r in runs) else "l2"
    check(named in ([], [norm]), f"--baseline {baseline} was trained under --norm {named and named[0]}, not {norm}")
    have = sorted({run_norm(r) for r in runs})
    check(norm in have, f"no run folder trained under --norm {norm} (the runs' norms: {', '.join(have)})")
    log.norm = norm
    kept = [r for r in runs if run_norm(r) == norm]
    log.other_norm = {r["name"]: f"trained under {NORM_NAMES.get(run_norm(r), run_norm(r))}: plots.py --norm "
                      f"{run_norm(r)} draws it" for r in runs if run_norm(r) != norm}
    if log.other_norm:
        log(f"norm: {NORM_NAMES[norm]} (--norm {norm}); left out, trained under another norm: "
            f"{', '.join(log.other_norm)}")
    for r in kept:
        for key in ("evals", "flats"):
            other = [e for e in r[key] if e["norm"] not in (None, norm)]
            for e in other:
                log(f"skip {e['file']}: measured under --norm {e['norm']}, these figures are {NORM_NAMES[norm]}'s")
            r[key] = [e for e in r[key] if e not in other]
    return kept


def run_reference(runs, base):
    """The reference of RUN_SCALE and RUN_SIZE in labels: the baseline run's batch size, lr and size; without one,
    the values most runs share."""
    return {f: base["args"].get(f) if base else Counter(r["args"].get(f) for r in runs).most_common(1)[0][0]
            for f in RUN_SCALE + RUN_SIZE}


def find_runs(root, log, baseline=None, norm=None):
    root = Path(root)
    check(root.exists(), f"{root} does not exist; give the folder that holds the run folders (e.g. runs/)")
    folders = [root] if (root / "args.json").exists() else sorted(p.parent for p in root.rglob("args.json"))
    check(folders, f"no run folder (a folder with args.json) under {root}")
    runs = [r for r in (load_run(f, log) for f in folders) if r is not None]
    check(runs, f"no readable run folder under {root}")
    names = [r["dir"].relative_to(root).as_posix() if r["dir"] != root else r["dir"].name for r in runs]
    for r, n in zip(runs, names):
        r["name"] = n
    runs = keep_norm(runs, norm, baseline, log)
    base = choose_baseline(runs, baseline, log)
    reference = run_reference(runs, base)
    for r in runs:
        r["label"], r["family"], r["sweep"] = describe(r["args"], reference)
        r["baseline"] = r is base
    name_run_size(runs, base, reference)
    counts = Counter(r["label"] for r in runs)
    for r in runs:  # two runs with the same flags (e.g. seeds): the folder name tells them apart
        if counts[r["label"]] > 1:
            r["label"] = f"{r['label']} [{r['name']}]"
    return runs


# ---------------------------------------------------------------------------------------------
# What each checkpoint measured: one flat dict of numbers per (run, checkpoint)
# ---------------------------------------------------------------------------------------------
def pick(entries, prefer_ema, **want):
    """The entry matching `want`; EMA results for EMA runs (weight averaging is evaluated with
    --use-ema) and plain ones otherwise, falling back to the other kind. Among several results for
    the same checkpoint, by their recorded fields only: the paper's protocol first (no non-default
    setting), then the most images, then the fewest non-default settings (the settings hash breaks a
    tie, so the choice never depends on file names or times): a quick check never replaces a measurement."""
    found = [e for e in entries if all(e.get(k) == v for k, v in want.items())]
    if not found:
        return None
    preferred = [e for e in found if e["ema"] == prefer_ema] or found
    return max(preferred, key=lambda e: (e["default"], e["n"] if is_number(e["n"]) else 0,
                                         -len(e["data"].get("non_default") or []), e["hash"]))


def flatness_results(run, kind, mode, loss="robust", subset="eval", ema=None, scale=1.0):
    """Every flatness result of one checkpoint that measured `mode` of `loss` on `subset`, at --scale `scale`; with
    `ema` given, only those of that model (averaged or not)."""
    return [e for e in run["flats"] if e["kind"] == kind and e["mode"] == mode and e["loss"] == loss
            and e["subset"] == subset and e["scale"] == scale and (ema is None or e["ema"] == ema)]


def pick_flatness(run, kind, mode, loss="robust", subset="eval", ema=None, scale=1.0):
    """The flatness entry of one checkpoint, at the paper's ξ when several ξ were measured; with
    `ema` given, only a measurement of that model (averaged or not), never the other one."""
    prefer_ema = bool(run["args"].get("ema"))
    found = flatness_results(run, kind, mode, loss, subset, ema, scale)
    at_paper_xi = [e for e in found if is_number(e["xi"]) and math.isclose(e["xi"], PAPER_XI.get(mode, -1))]
    return pick(at_paper_xi or found, prefer_ema)


def attack_name(settings, autoattack=False):
    """'PGD-20×10' or 'AutoAttack-standard'."""
    return f"AutoAttack-{settings['autoattack']}" if autoattack else f"PGD-{settings['steps']}×{settings['restarts']}"


def rerr_of(section):
    """(RErr, source): AutoAttack when the evaluation ran it, else PGD."""
    aa = section.get("autoattack")
    if isinstance(aa, dict) and is_number(aa.get("rerr")):
        return aa["rerr"], "AutoAttack"
    return (section.get("pgd") or {}).get("rerr"), "PGD"


# Settings of an evaluation that do not change its test RLoss and RErr: which model, and what else was
# measured beside them (train images, the clean error's images). Every other one must agree before two
# numbers are subtracted (README "Result files").
NOT_PROTOCOL = ("checkpoint", "use_ema", "source", "arch", "train", "n_clean")


def protocol(settings):
    return {k: v for k, v in settings.items() if k not in NOT_PROTOCOL}


def comparable(run, p, q, what, log):
    """Whether p − q may be taken: both evaluations used the same protocol (attack, its steps, restarts, ε,
    step size, images, seed, ...). If not, one line names both and the settings that differ."""
    a, b = p.get("protocol"), q.get("protocol")
    if a is None or b is None:
        return False
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        def name(s):
            aa = f" + AutoAttack-{s['autoattack']}" if s["autoattack"] else ""
            return f"PGD-{s['steps']}×{s['restarts']}{aa} on {s['n_eval']} images"
        log(f"skip {what} of {run}: {p['kind']} measured with {name(a)}, {q['kind']} with {name(b)} "
            f"(settings differ: {', '.join(differ)})")
    return not differ


def measures(run, kind):
    """RLoss, RErr (test and train), flatness and Hessian of one checkpoint of a run."""
    prefer_ema = bool(run["args"].get("ema"))
    ev = pick(run["evals"], prefer_ema, kind=kind)
    out = {"kind": kind}
    model_ema = ev["ema"] if ev is not None else None  # every number of the row is of the evaluated model
    if ev is not None:
        d, settings = ev["data"], ev["settings"]
        out.update(epoch=ev["epoch"], eval_file=str(ev["file"]), ema=ev["ema"], rloss=d["pgd"]["rloss"],
                   rloss_correct=d["pgd"].get("rloss_correct"), rloss_incorrect=d["pgd"].get("rloss_incorrect"),
                   clean_err=(d.get("clean") or {}).get("err"), protocol=protocol(settings),
                   rloss_attack=attack_name(settings), rerr_n=settings["n_eval"])
        out["rerr"], out["rerr_source"] = rerr_of(d)
        out["rerr_attack"] = attack_name(settings, autoattack=out["rerr_source"] == "AutoAttack")
        train = d.get("train")
        if isinstance(train, dict) and isinstance(train.get("pgd"), dict):  # the same attack on train images
            out["rloss_train"] = train["pgd"].get("rloss")
            out["rerr_train"], out["rerr_train_source"] = rerr_of(train)
    for key, mode, loss, subset in (("flat_avg", "average", "robust", "eval"), ("flat_worst", "worst", "robust", "eval"),
                                    ("flat_avg_train", "average", "robust", "train-eval"),
                                    ("flat_worst_train", "worst", "robust", "train-eval"),
                                    ("flat_avg_clean", "average", "clean", "eval"),
                                    ("flat_worst_clean", "worst", "clean", "eval")):
        e = pick_flatness(run, kind, mode, loss, subset, ema=model_ema)
        if e is not None:
            out[key] = e["data"]["value"]
            out[key + "_xi"] = e["xi"]
            if key in ("flat_avg", "flat_worst") and is_number(e["data"].get("reference")):
                out.setdefault("rloss_reference", e["data"]["reference"])
            out.setdefault("epoch", e["epoch"])
    hess = pick([e for e in run["flats"] if e["mode"] == "hessian" and e["scale"] == 1], prefer_ema, kind=kind)
    if hess is not None:
        out["hessian"] = hess["data"]["eigenvalue"]
    return {k: v for k, v in out.items() if v is not None}


def generalisation_gaps(run, log):
    """Fig. 9's differences, in the run's last-checkpoint measures: test − train RLoss (two numbers of one
    evaluation) and RLoss(last) − RLoss(ES) (two evaluations, only with the same settings)."""
    last, best = run["last"], run["best"]
    if is_number(last.get("rloss")) and is_number(last.get("rloss_train")):
        last["gap"] = last["rloss"] - last["rloss_train"]
    if is_number(last.get("rloss")) and is_number(best.get("rloss")) and \
            comparable(run["name"], last, best, "fig9 RLoss(last) − RLoss(ES)", log):
        last["last_minus_es"] = last["rloss"] - best["rloss"]


def es_epoch(run):
    """The early-stopping epoch: first minimum of the per-snapshot es_rerr (the paper's protocol;
    README 'Run folder, early stopping, resume'), else the epoch recorded in the best checkpoint's
    evaluation."""
    es = [(m["es_rerr"], m["epoch"]) for m in run["metrics"] if is_number(m.get("es_rerr"))]
    if es:
        return min(es, key=lambda t: (t[0], t[1]))[1]
    best = run["best"].get("epoch")
    return best if isinstance(best, int) else None


def total_epochs(run):
    e = run["args"].get("epochs")
    if isinstance(e, int) and e > 0:
        return e
    return max([m["epoch"] for m in run["metrics"]] or [1])


def over_epochs(run):
    """Per snapshot epoch: test RLoss, average / worst flatness, Hessian (Fig. 6), from the
    `flatness.py --epochs` files. The RLoss is their reference (the PGD RLoss of that snapshot), so the
    curve's points share one protocol; an evaluation's RLoss only where a snapshot has no flatness."""
    kinds = {e["kind"] for e in run["flats"] + run["evals"] if re.fullmatch(r"epoch\d+", e["kind"])}
    if not kinds:
        return []
    rows = {}
    for kind in sorted(kinds) + ["last"]:
        m = measures(run, kind)
        epoch = m.get("epoch")
        if not isinstance(epoch, int) or (kind == "last" and epoch in rows):
            continue
        rloss = m.get("rloss_reference", m.get("rloss"))
        row = {"epoch": epoch, "rloss": rloss, "flat_avg": m.get("flat_avg"), "flat_worst": m.get("flat_worst"),
               "hessian": m.get("hessian")}
        if any(row[k] is not None for k in ("flat_avg", "flat_worst", "hessian")):
            rows[epoch] = row
    return [rows[e] for e in sorted(rows)]


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------
plt.rcParams.update({"text.usetex": False, "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 11,
                     "axes.labelsize": 10, "legend.fontsize": 7, "lines.linewidth": 1.8, "figure.dpi": 100,
                     # ticks below ~1e-3 or above 1e4 as multiples of a power of ten, shown once at the axis end:
                     # short labels (worst-case flatness at ξ = 0.00075 can be ~1e-4)
                     "axes.formatter.limits": (-3, 4)})
PALETTE = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors + plt.get_cmap("Set1").colors
GREY = (0.6, 0.6, 0.6)
OTHER = (0.82, 0.82, 0.82)  # runs outside the selection when there are many (lighter than the AT baseline's grey)
ROSE, GREEN = (0.85, 0.35, 0.55), (0.2, 0.6, 0.3)  # Fig. 2: clean-correct rose, clean-incorrect green (the paper's)


def family_colours(runs):
    """One colour per method family, stable across figures; the AT baseline is grey (as the paper)."""
    families = sorted({r["family"] for r in runs}, key=lambda f: (f != "AT", f))
    colours, i = {}, 0
    for f in families:
        if f == "AT":
            colours[f] = GREY
        else:
            colours[f] = PALETTE[i % len(PALETTE)]
            i += 1
    return colours


def shade(colour, factor):
    """Darken (< 1) or lighten (> 1) a colour: hyper-parameter sweeps in shades of the family's colour."""
    c = np.array(colour[:3])
    return tuple(np.clip(c * factor, 0, 1)) if factor <= 1 else tuple(1 - (1 - c) / factor)


def marker_of(run):
    method = run["args"].get("method", "at")
    return "D" if method in FLATNESS_METHODS or run["args"].get("ema") else "o"


SAVE = {"formats": ("png", "pdf"), "dpi": 150, "norm": "linf"}  # set from --formats / --dpi / the runs' norm in main()
CAPTION_LINES = 3  # a longer "left out" note is cut in the figure (it is whole in the metadata and summary.json)


def save(fig, out, name, written, rect=None, note=None):
    """Lay out (tick labels untangled), write every --formats file, close. `note` (left_out(): the runs the figure
    leaves out and why) is printed small under the axes and kept in each file's metadata (PNG / SVG
    "Description", PDF "Subject")."""
    if SAVE["norm"] != "linf":  # the paper's figures are ℓ∞'s; any other set says its threat model
        note = f"threat model {NORM_NAMES[SAVE['norm']]}" + (f"; {note}" if note else "")
    if note:
        rect = caption(fig, note, rect)
    fig.tight_layout(rect=rect)
    if untangle_ticks(fig):
        fig.tight_layout(rect=rect)
    for ext in SAVE["formats"]:
        path = out / f"{name}.{ext}"
        meta = {"Subject" if ext == "pdf" else "Description": note} if note else None
        fig.savefig(path, dpi=SAVE["dpi"] if ext == "png" else None, metadata=meta)
        written.append(str(path))
    plt.close(fig)
    print(f"wrote {out / name}.{'/.'.join(SAVE['formats'])}")


def caption(fig, note, rect):
    """`note` in 6-pt grey under everything; figure legends below the axes (Fig. 8, 9) move up above it.
    Returns the layout rect with room for both."""
    chars = int(fig.get_figwidth() * 72 / 3.4)  # a 6-pt character is ~3.3 pt wide
    lines = textwrap.wrap(note, chars)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:chars - 30] + " … (whole: summary.json)"
    fig.text(0.005, 0.005, "\n".join(lines), fontsize=6, color="0.3", ha="left", va="bottom")
    h = (len(lines) * 6 * 1.3 + 4) / 72 / fig.get_figheight()  # its height, as a fraction of the figure
    for legend in fig.legends:
        anchor = legend.get_bbox_to_anchor().transformed(fig.transFigure.inverted())
        legend.set_bbox_to_anchor((anchor.x0, max(anchor.y0, 0) + h), transform=fig.transFigure)
    left, bottom, right, top = rect or (0, 0, 1, 1)
    return left, bottom + h, right, top


def shown_ticks(axis):
    """The major tick labels drawn (inside the view, with text)."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = axis.get_major_ticks(len(axis.get_majorticklocs()))
    return [t.label1 for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text()]


def ticks_overlap(axis, renderer):
    boxes = [t.get_window_extent(renderer) for t in shown_ticks(axis)]
    return any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def untangle_ticks(fig):
    """Tick labels never run into each other: an axis whose labels overlap gets fewer ticks, and x labels that
    still do are turned by 30°. Returns whether anything changed."""
    from matplotlib.ticker import MaxNLocator
    fig.canvas.draw()
    renderer, changed = fig.canvas.get_renderer(), False
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "linear":
                continue
            for nbins in (5, 4, 3, 2):
                if not ticks_overlap(axis, renderer):
                    break
                axis.set_major_locator(MaxNLocator(nbins))
                fig.canvas.draw()
                changed = True
            if axis is ax.xaxis and ticks_overlap(axis, renderer):
                plt.setp(shown_ticks(axis), rotation=30, ha="right")
    return changed


def percent_axis(ax):
    """An error axis in % ends at 0 and 100 (margins would show 104 %): call after drawing."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0), min(hi, 100))


# What a run lacks for a figure's panel: left_out()'s reasons
MISSING = {"rloss": "no evaluation of ckpt_last.pt", "rerr": "no evaluation of ckpt_last.pt",
           "flat_avg": "no average-case flatness of ckpt_last.pt",
           "flat_worst": "no worst-case flatness of ckpt_last.pt",
           "flat_avg_train": "no flatness on train examples (--subset train-eval)",
           "gap": "no train RLoss (evaluate.py --train)",
           "last_minus_es": "no evaluation of ckpt_best.pt with the same settings"}


def lacking(points, keys):
    """{run: why} of the points that lack one of `keys` (MISSING); without an evaluation, what an evaluation
    would give (RErr, the gaps) is not named again."""
    out = {}
    for p in points:
        gone = [k for k in keys if not is_number(p.get(k))]
        if "rloss" in gone:
            gone = [k for k in gone if k not in ("rerr", "gap", "last_minus_es")] + ["rloss"]
        whys = list(dict.fromkeys(MISSING[k] for k in sorted(gone, key=lambda k: k != "rloss")))
        if whys:
            out[p["run"]] = " and ".join(whys)
    return out


def left_out(figure, reasons, log, where="left out"):
    """One line naming the runs `figure` leaves out and why ({run: why}), the runs of the other norm too
    (log.other_norm), printed and kept in summary.json ("skipped", "left_out"); returns it for the figure's caption
    (save(note=...)), None when none was."""
    def named(reasons):
        by_why = {}
        for run, why in reasons.items():
            by_why.setdefault(why, []).append(run)
        return "; ".join(f"{', '.join(runs)} ({why})" for why, runs in by_why.items())
    if not reasons and not log.other_norm:
        return None
    text = "; ".join(([f"{where}: {named(reasons)}"] if reasons else [])
                     + ([f"left out: {named(log.other_norm)}"] if log.other_norm else []))
    log(f"{figure}: {text}")
    log.left_out[figure] = {**reasons, **log.other_norm}
    return text


def no_data(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, wrap=True)


MIN_FIT_POINTS = 3  # a line through two points is no fit
MANY_POINTS = 12  # past this many runs, Fig. 1/8 colour the Table 1 rows and draw the rest grey (the paper's "Other")


def fit_line(ax, x, y, what="fit", **style):
    """Least-squares line (scipy.stats.linregress) drawn between the smallest and largest x; with fewer than
    MIN_FIT_POINTS distinct x the axes say so instead (returns None)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < MIN_FIT_POINTS:
        note = f"{what}: {len(np.unique(x))} distinct point(s), too few for a fit"
        if getattr(ax, "fit_note", None) is None:  # one text box per axes, a line per missing fit
            ax.fit_note = ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=6, va="bottom", color="0.3")
        else:
            ax.fit_note.set_text(ax.fit_note.get_text() + "\n" + note)
        return None
    fit = scipy.stats.linregress(x, y)
    xs = np.array([x.min(), x.max()])
    ax.plot(xs, fit.intercept + fit.slope * xs, **style)
    return fit


def points_with(points, *keys):
    return [p for p in points if all(is_number(p.get(k)) for k in keys)]


def scatter(ax, points, xkey, ykey, colours, yscale=1.0, annotate=False):
    """One point per run, coloured by family; a point marked `other` (not a Table 1 row among many runs,
    highlighted()) is small, grey, behind and unlabelled. Returns the number drawn."""
    ps = points_with(points, xkey, ykey)
    for p in ps:
        other = p.get("other", False)
        ax.scatter(p[xkey], p[ykey] * yscale, color=OTHER if other else colours[p["family"]], marker=p["marker"],
                   s=16 if other else 36, edgecolor="0.5" if other else "k", linewidth=0.4, zorder=2 if other else 3)
        if annotate and not other:
            ax.annotate(p["label"], (p[xkey], p[ykey] * yscale), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    return len(ps)


def highlighted(points, selected):
    """With more than MANY_POINTS runs, every run that is not a Table 1 row (`selected`: their run names) is
    marked `other` (drawn grey, as the paper's Fig. 1/8 draw the models outside their selection)."""
    many = len(points) > MANY_POINTS
    return [{**p, "other": many and p["run"] not in selected} for p in points]


def family_legend(fig_or_ax, points, colours, extra=(), **kw):
    """A legend entry per method family drawn in colour with the marker its points use, one "Other" for the grey
    points, the two markers and the `extra` handles."""
    from matplotlib.lines import Line2D
    def marker(ps):  # the marker the points use (a family is one method, so one marker)
        return Counter(p["marker"] for p in ps).most_common(1)[0][0]
    fams = sorted({p["family"] for p in points if not p.get("other")}, key=lambda f: (f != "AT", f))
    handles = [Line2D([], [], marker=marker([p for p in points if p["family"] == f and not p.get("other")]), ls="",
                      color=colours[f], markeredgecolor="k", label=f) for f in fams]
    if any(p.get("other") for p in points):
        handles.append(Line2D([], [], marker=marker([p for p in points if p.get("other")]), ls="", color=OTHER,
                              markeredgecolor="0.5", label="Other runs"))
    markers = {p["marker"] for p in points}
    handles += [Line2D([], [], marker=m, ls="", color="w", markeredgecolor="k", label=text)
                for m, text in (("o", "AT variants"), ("D", "flatness-oriented (AWP, Entropy-SGD, EMA)")) if m in markers]
    handles += list(extra)
    if handles:
        fig_or_ax.legend(handles=handles, **kw)


LABELS = {"rloss": "test RLoss (cross-entropy under PGD)", "rerr": "test RErr (%)",
          "flat_avg": "average-case flatness (ΔRLoss, ξ=0.5)", "flat_worst": "worst-case flatness (ΔRLoss, ξ=0.00075)",
          "flat_avg_train": "average-case flatness on train examples (ΔRLoss)",
          "epochs": "epoch / total epochs"}


def flat_label(points, key):
    """Axis label of a flatness measure with the ξ actually measured."""
    xis = sorted({p.get(key + "_xi") for p in points if is_number(p.get(key + "_xi"))})
    kind = "average-case" if key.startswith("flat_avg") else "worst-case"
    where = " on train examples" if key.endswith("_train") else ""
    xi = f", ξ={'/'.join(f'{x:g}' for x in xis)}" if xis else ""
    return f"{kind} flatness{where} (ΔRLoss{xi})"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
RB_COLOUR = (0.85, 0.33, 0.1)  # RobustBench's public models in Fig. 1: ▲ in one colour of their own


def fig1(points, colours, out, log, written, public=()):
    """Fig. 1: RLoss vs average-case flatness, every run labelled; "◆" flatness-oriented methods
    (AWP, Entropy-SGD, weight averaging), "●" other AT variants, "▲" RobustBench's public models (`public`, from
    --robustbench-dir: early-stopped models of other papers, as the paper's Fig. 1; not in the fit). Returns
    [(label, marker)] of what was drawn."""
    ps = points_with(points, "flat_avg", "rloss")
    pub = points_with(public, "flat_avg", "rloss")
    if not ps and not pub:
        log("skip fig1: needs runs with an evaluation (RLoss) and average-case flatness of ckpt_last.pt")
        return []
    note = left_out("fig1", lacking(points, ("rloss", "flat_avg")), log)
    fig, ax = plt.subplots(figsize=(9, 5))
    scatter(ax, ps, "flat_avg", "rloss", colours, annotate=True)
    fit_line(ax, [p["flat_avg"] for p in ps], [p["rloss"] for p in ps], "least-squares line", color="k", ls=":", lw=1)
    for p in pub:
        ax.scatter(p["flat_avg"], p["rloss"], color=RB_COLOUR, marker="^", s=48, edgecolor="k", linewidth=0.4,
                   zorder=3)
        ax.annotate(p["label"], (p["flat_avg"], p["rloss"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    from matplotlib.lines import Line2D
    rb = [Line2D([], [], marker="^", ls="", color=RB_COLOUR, markeredgecolor="k",
                 label="RobustBench (public, early-stopped)")] if pub else []
    family_legend(ax, ps, colours, extra=rb, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)  # beside the data
    ax.set(xlabel=flat_label(ps + pub, "flat_avg"), ylabel=LABELS["rloss"],
           title="Fig. 1 — robust loss vs. flatness (● AT variants, ◆ flatness-oriented"
                 + (", ▲ RobustBench)" if pub else ")"))
    save(fig, out, "fig1_rloss_vs_flatness", written, note=note)
    return [(p["label"], p["marker"]) for p in ps] + [(p["label"], "^") for p in pub]


def robustbench_points(folder, log):
    """One Fig. 1 point per RobustBench model measured into `folder` (evaluate.py / flatness.py --robustbench NAME
    --model-dir FOLDER): its results are read by their settings (source robustbench), as a run's, and chosen as
    for a run's checkpoint (README "plots.py")."""
    folder = Path(folder)
    check(folder.is_dir(), f"--robustbench-dir {folder} is not a folder (the --model-dir of evaluate.py / flatness.py "
          "--robustbench)")
    results = [r for r in (load_result(p, log) for p in sorted(folder.glob("*.json"))) if r]
    results = [r for r in results if r["settings"].get("source") == "robustbench"]
    other = sorted({r["kind"] for r in results if r["norm"] not in (None, log.norm)})
    if other:  # (a model of RobustBench's other zoo: --robustbench NAME --norm ...)
        log(f"note: RobustBench results under another norm than {NORM_NAMES[log.norm]} left out: {', '.join(other)}")
    results = [r for r in results if r["norm"] in (None, log.norm)]
    if not results:
        log(f"note: no RobustBench results in {folder} (evaluate.py and flatness.py --robustbench NAME "
            f"--model-dir {folder})")
        return []
    run = {"name": str(folder), "args": {}, "evals": [r for r in results if r["mode"] == "eval"],
           "flats": [r for r in results if r["mode"] != "eval"]}
    points = []
    for name in sorted({r["kind"] for r in results}):
        m = measures(run, name)
        points.append({"run": f"robustbench:{name}", "label": name, "family": "RobustBench", "marker": "^", **m})
        if "rloss" not in m or "flat_avg" not in m:
            what = "an evaluation (evaluate.py" if "rloss" not in m else "average-case flatness (flatness.py"
            log(f"note: RobustBench model {name} lacks {what} --robustbench {name}): not drawn in fig1")
    return points


def fig2(run, out, log, written):
    """Fig. 2: robust overfitting of one run: train/test RLoss (test split into clean-correct and
    clean-incorrect examples) and RErr over normalised epochs; the early-stopping epoch."""
    ms = [m for m in run["metrics"] if is_number(m.get("test_rloss"))]
    if len(ms) < 2:
        log(f"skip fig2: {run['name']}/metrics.jsonl has fewer than 2 epochs with test_rloss")
        return
    T = total_epochs(run)
    x = np.array([m["epoch"] for m in ms]) / T
    col = lambda k: np.array([m.get(k) if is_number(m.get(k)) else np.nan for m in ms], float)  # noqa: E731
    es = es_epoch(run)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(x, col("train_loss"), ":", color="C0", label="train (CE on the adversarial training batches)")
    a.plot(x, col("test_rloss"), "-", color="C3", label="test")
    a.plot(x, col("test_rloss_correct"), "--", color=ROSE, label="test, clean-correct examples")
    a.plot(x, col("test_rloss_incorrect"), "-.", color=GREEN, label="test, clean-incorrect examples")
    a.set(xlabel=LABELS["epochs"], ylabel="RLoss (PGD-7 cross-entropy)", title=f"Fig. 2 — RLoss, {run['label']}")
    # the first epochs of a fresh network can reach RLoss ≫ 10 and would flatten the curves that
    # matter (the rise after the lr decay): the y range ends above the largest value of the later 90 %
    later = np.concatenate([col(k)[x > 0.1] for k in ("train_loss", "test_rloss", "test_rloss_incorrect")])
    if np.isfinite(later).any():
        a.set_ylim(0, 1.15 * np.nanmax(later))
    b.plot(x, 100 * col("train_err"), ":", color="C0", label="train")
    b.plot(x, 100 * col("test_rerr"), "-", color="C3", label="test")
    b.set(xlabel=LABELS["epochs"], ylabel="RErr (%, PGD-7)", title=f"Fig. 2 — RErr, {run['label']}")
    percent_axis(b)
    if es is not None:
        for ax in (a, b):
            ax.axvline(es / T, color="k", ls=":", lw=1, label=f"early stopping (epoch {es})")
        at_es = [m["test_rerr"] for m in ms if m["epoch"] == es]
        if at_es:
            b.axhline(100 * at_es[0], color="k", ls="--", lw=0.8, label=f"test RErr at ES ({100 * at_es[0]:.1f} %)")
    a.legend()
    b.legend()
    save(fig, out, "fig2_robust_overfitting", written)


def mean_curve(curves):
    c = np.asarray(curves, float)
    return (c, c, c) if c.ndim == 1 else (c.mean(0), c.min(0), c.max(0))


def fig4(runs, out, log, written):
    """Fig. 4: mean RLoss over 10 directions along random (s ∈ [−1, 1]) and adversarial
    (s ∈ [0, 1]) weight directions, RLoss recomputed by PGD at every step; clean loss dotted. A
    rescaled copy of a model (flatness.py --mode landscape --scale α, §3.2) is drawn dashed (α > 1) or
    dash-dotted (α < 1) on top of its original, when both were measured with the same settings otherwise
    (directions normalised per layer follow the rescaling, so they overlap). Returns the curves drawn."""
    def unscaled(e):
        return {k: v for k, v in e["settings"].items() if k not in ("scale", "scale_bn_eps")}

    curves, originals, reasons = [], 0, {}  # curves: (label, colour, line style, result)
    for r in runs:
        prefer = bool(r["args"].get("ema"))
        landscapes = [e for e in r["flats"] if e["mode"] == "landscape" and e["kind"] == "last"]
        original = pick([e for e in landscapes if e["scale"] == 1], prefer)
        if original is None:
            reasons[r["name"]] = "no landscape of ckpt_last.pt"
            continue
        colour, originals = f"C{originals}", originals + 1
        curves.append((r["label"], colour, "-", original))
        for alpha in sorted({e["scale"] for e in landscapes} - {1}):
            e = pick([e for e in landscapes if e["scale"] == alpha], prefer)
            if unscaled(e) != unscaled(original):
                log(f"fig4: skip {e['file']}: the ×{alpha:g} landscape of {r['name']} has other settings than its "
                    f"original {original['file'].name}")
                continue
            curves.append((f"{r['label']} ×{alpha:g} (rescaled)", colour, "--" if alpha > 1 else "-.", e))
    if not curves:
        log("skip fig4: no landscape (flatness.py CKPT --mode landscape) of a ckpt_last.pt")
        return
    note = left_out("fig4", reasons, log)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, colour, style, e in curves:
        d, s = e["data"], np.asarray(e["data"]["s"], float)
        for ax, direction in zip(axes, ("random", "adversarial")):
            part = d.get(direction) or {}
            keep = s >= 0 if direction == "adversarial" else np.ones_like(s, bool)
            if part.get("robust") is not None:
                mean, lo, hi = mean_curve(part["robust"])
                ax.plot(s[keep], mean[keep], style, color=colour, label=f"{label} RLoss")
                if style == "-":
                    ax.fill_between(s[keep], lo[keep], hi[keep], color=colour, alpha=0.15)
            if part.get("clean") is not None and style == "-":
                mean, _, _ = mean_curve(part["clean"])
                ax.plot(s[keep], mean[keep], ":", color=colour, lw=1, label=f"{label} clean loss")
    for ax, direction in zip(axes, ("random", "adversarial")):
        ax.set(xlabel="step s along the normalised direction (w + s·d)",
               ylabel="loss (mean over directions; band: min–max)",
               title=f"Fig. 4 — {direction} weight directions")
        if ax.lines:
            ax.legend()
        else:
            no_data(ax, f"no {direction} curves")
    save(fig, out, "fig4_landscape", written, note=note)
    return curves


def fig5(runs, out, log, written):
    """Fig. 5: training curves, one column per method: RLoss and RErr (test solid, train dotted)
    and test RLoss on clean-correct (solid) / clean-incorrect (dashed) examples."""
    logged = {r["name"]: sum(is_number(m.get("test_rloss")) for m in r["metrics"]) for r in runs}
    rs = [r for r in runs if logged[r["name"]] >= 2]
    if not rs:
        log("skip fig5: no run has metrics.jsonl with at least 2 epochs of test_rloss")
        return
    note = left_out("fig5", {n: f"{k} epoch(s) of test_rloss in metrics.jsonl, a curve needs 2"
                             for n, k in logged.items() if k < 2}, log)
    methods = sorted({r["args"].get("method", "at") for r in rs},
                     key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    fig, axes = plt.subplots(3, len(methods), figsize=(4.2 * len(methods), 10), squeeze=False)
    for j, method in enumerate(methods):
        col = [r for r in rs if r["args"].get("method", "at") == method]
        for i, r in enumerate(col):
            ms = [m for m in r["metrics"] if is_number(m.get("test_rloss"))]
            x = np.array([m["epoch"] for m in ms]) / total_epochs(r)
            get = lambda k: np.array([m.get(k) if is_number(m.get(k)) else np.nan for m in ms], float)  # noqa: E731
            c = PALETTE[i % len(PALETTE)]
            axes[0, j].plot(x, get("test_rloss"), "-", color=c, label=r["label"])
            axes[0, j].plot(x, get("train_loss"), ":", color=c)
            axes[1, j].plot(x, 100 * get("test_rerr"), "-", color=c, label=r["label"])
            axes[1, j].plot(x, 100 * get("train_err"), ":", color=c)
            axes[2, j].plot(x, get("test_rloss_correct"), "-", color=c, label=r["label"])
            axes[2, j].plot(x, get("test_rloss_incorrect"), "--", color=c)
        name = METHOD_NAMES.get(method, method)
        axes[0, j].set(title=f"Fig. 5 — {name}: RLoss (test —, train ···)", ylabel="RLoss (PGD-7 CE; train: training loss)")
        axes[1, j].set(title=f"{name}: RErr (test —, train ···)", ylabel="RErr (%, PGD-7)")
        axes[2, j].set(title=f"{name}: test RLoss, clean-correct — / incorrect - -", ylabel="RLoss (PGD-7 CE)",
                       xlabel=LABELS["epochs"])
        percent_axis(axes[1, j])
        for i in range(3):
            axes[i, j].legend()
    save(fig, out, "fig5_training_curves", written, note=note)


def fig6(run, out, log, written):
    """Fig. 6: test RLoss, average- and worst-case flatness (and the Hessian's largest eigenvalue)
    per snapshot; RLoss vs flatness per snapshot coloured early (blue) → late (red)."""
    rows = over_epochs(run)
    if len(rows) < 2:
        return False
    T = total_epochs(run)
    x = np.array([r["epoch"] for r in rows]) / T
    get = lambda k: np.array([r[k] if is_number(r[k]) else np.nan for r in rows], float)  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    a = axes[0]
    a.plot(x, get("rloss"), "-o", ms=3, color="C3", label="test RLoss (PGD, flatness reference)")
    a.plot(x, get("flat_avg"), "-o", ms=3, color="C0", label="average-case flatness")
    a.plot(x, get("flat_worst"), "-o", ms=3, color="C2", label="worst-case flatness")
    es = es_epoch(run)
    if es is not None:
        a.axvline(es / T, color="k", ls=":", lw=1, label=f"early stopping (epoch {es})")
    if np.isfinite(get("hessian")).any():
        h = a.twinx()
        h.plot(x, get("hessian"), "--s", ms=3, color="C4", label="Hessian λ_max (right axis)")
        h.set_ylabel("largest Hessian eigenvalue (clean CE)")
        h.grid(False)
        h.legend(loc="upper right")
    a.set(xlabel=LABELS["epochs"], ylabel="RLoss / ΔRLoss", title=f"Fig. 6 — over training, {run['label']}")
    a.legend(loc="upper left")
    cmap = plt.get_cmap("seismic")  # the paper's colours: early = dark blue, late = dark red
    norm = plt.Normalize(rows[0]["epoch"], rows[-1]["epoch"])
    colours = cmap(norm(np.array([r["epoch"] for r in rows])))
    for ax, key, name in ((axes[1], "flat_avg", "average-case"), (axes[2], "flat_worst", "worst-case")):
        v, y = get(key), get("rloss")
        ok = np.isfinite(v) & np.isfinite(y)
        if not ok.any():
            no_data(ax, f"no {name} flatness per snapshot")
        else:
            ax.scatter(v[ok], y[ok], c=colours[ok], s=40, edgecolor="k", linewidth=0.4, zorder=3)
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
            fig.colorbar(sm, ax=ax, label="epoch (early → late)")
        ax.set(xlabel=f"{name} flatness (ΔRLoss)", ylabel=LABELS["rloss"], title=f"RLoss vs {name} flatness per epoch")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run["name"])
    save(fig, out, f"fig6_flatness_over_training_{safe}", written)
    return True


def fig7(points, colours, out, log, written):
    """Fig. 7: RLoss vs average-case flatness across the hyper-parameters of each method, in shades
    of the family's colour (darker = larger value), a dotted least-squares line per family."""
    ps = points_with(points, "flat_avg", "rloss")
    by_family = {}
    for p in ps:
        by_family.setdefault(p["family"], []).append(p)
    sweeps = {f: sorted(v, key=lambda p: p["sweep"]) for f, v in by_family.items() if len(v) >= 2}
    if not sweeps:
        log("skip fig7: needs a hyper-parameter sweep (at least 2 runs of one method with RLoss and "
            "average-case flatness)")
        return
    note = left_out("fig7", lacking(points, ("rloss", "flat_avg")), log)
    fig, ax = plt.subplots(figsize=(7, 5))
    for f, v in by_family.items():
        base = colours[f]
        factors = np.linspace(1.3, 0.7, len(v)) if len(v) > 1 else [1.0]
        for p, k in zip(sorted(v, key=lambda p: p["sweep"]), factors):
            ax.scatter(p["flat_avg"], p["rloss"], color=shade(base, k), marker=p["marker"], s=40, edgecolor="k",
                       linewidth=0.4, zorder=3)
            ax.annotate(p["label"].replace(f + " ", "") if len(v) > 1 else "", (p["flat_avg"], p["rloss"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        if f in sweeps:
            fit_line(ax, [p["flat_avg"] for p in v], [p["rloss"] for p in v], f, color=base, ls=":", lw=1.5)
    family_legend(ax, ps, colours, loc="best")
    ax.set(xlabel=flat_label(ps, "flat_avg"), ylabel=LABELS["rloss"],
           title="Fig. 7 — flatness across hyper-parameters (dotted: fit per method)")
    save(fig, out, "fig7_hyperparameters", written, note=note)


def fig8(points, colours, out, log, written, split=2.3):
    """Fig. 8: RErr vs RLoss with two least-squares lines (RLoss < split and ≥ split); RLoss and
    RErr vs average-case flatness; RLoss vs worst-case flatness."""
    if not points_with(points, "rloss", "rerr"):
        log("skip fig8: needs runs with an evaluation (evaluate.py) of ckpt_last.pt")
        return
    note = left_out("fig8", lacking(points, ("rloss", "rerr", "flat_avg", "flat_worst")), log,
                    "left out of the panels that need it")
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    a = axes[0]
    scatter(a, points, "rloss", "rerr", colours, yscale=100)
    ps = points_with(points, "rloss", "rerr")
    for what, side in ((f"RLoss < {split:g}", [p for p in ps if p["rloss"] < split]),
                       (f"RLoss ≥ {split:g}", [p for p in ps if p["rloss"] >= split])):
        fit_line(a, [p["rloss"] for p in side], [100 * p["rerr"] for p in side], what, color="r", ls=":", lw=1.5)
    a.axvline(split, color="k", lw=0.5, alpha=0.5)
    srcs = sorted({p["rerr_source"] for p in ps})
    a.set(xlabel=LABELS["rloss"], ylabel=f"test RErr (%, {'/'.join(srcs)})",
          title=f"Fig. 8 — RErr vs RLoss (fits split at RLoss {split:g})")
    for ax, (xk, yk, ys, yl) in zip(axes[1:], (("flat_avg", "rloss", 1, LABELS["rloss"]),
                                              ("flat_avg", "rerr", 100, f"test RErr (%, {'/'.join(srcs)})"),
                                              ("flat_worst", "rloss", 1, LABELS["rloss"]))):
        n = scatter(ax, points, xk, yk, colours, yscale=ys)
        if n == 0:
            what = f"flatness.py --mode {'average' if xk == 'flat_avg' else 'worst'}"
            no_data(ax, f"no run has {what}")
            log(f"fig8: panel {yk} vs {xk} empty (no {what} of a ckpt_last.pt)")
        ax.set(xlabel=flat_label(points_with(points, xk), xk), ylabel=yl,
               title=f"{'RLoss' if yk == 'rloss' else 'RErr'} vs {'average' if xk == 'flat_avg' else 'worst'}-case flatness")
    percent_axis(axes[0])
    percent_axis(axes[2])
    family_legend(fig, ps, colours, loc="lower center", ncol=min(8, len(colours)), bbox_to_anchor=(0.5, -0.02))
    save(fig, out, "fig8_rloss_flatness", written, rect=(0, 0.08, 1, 1), note=note)


def fig9(points, es_points, colours, out, log, written):
    """Fig. 9: test RLoss vs flatness on train examples; test−train RLoss vs flatness; RLoss(last)
    − RLoss(ES) vs flatness; early-stopped vs last models (a line from last to ES)."""
    es_by_run = {q["run"]: q for q in es_points}
    panels = (("flat_avg_train", "rloss", LABELS["rloss"], "RLoss vs flatness on train examples",
               "flatness_average on --subset train-eval"),
              ("flat_avg", "gap", "test RLoss − train RLoss", "generalisation gap vs flatness",
               "evaluate.py --train (train RLoss)"),
              ("flat_avg", "last_minus_es", "RLoss(last) − RLoss(early-stopped)", "overfitting vs flatness",
               "an evaluation of ckpt_best.pt with the same settings"))
    pairs = [(p, es_by_run[p["run"]]) for p in points if p["run"] in es_by_run
             and all(is_number(v.get(k)) for v in (p, es_by_run[p["run"]]) for k in ("flat_avg", "rloss"))]
    if not pairs and not any(points_with(points, x, y) for x, y, *_ in panels):
        log("skip fig9: needs train-example flatness, evaluate.py --train, or an evaluation and flatness of "
            "ckpt_best.pt")
        return
    reasons = lacking(points, ("flat_avg_train", "rloss", "flat_avg", "gap", "last_minus_es"))
    for p in points:  # the ES panel also needs ckpt_best.pt's flatness
        q = es_by_run.get(p["run"], {})
        if is_number(q.get("rloss")) and not is_number(q.get("flat_avg")):
            why = "no average-case flatness of ckpt_best.pt"
            reasons[p["run"]] = f"{reasons[p['run']]} and {why}" if p["run"] in reasons else why
    note = left_out("fig9", reasons, log, "left out of the panels that need it")
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    for ax, (xk, yk, yl, title, missing) in zip(axes, panels):
        if scatter(ax, points, xk, yk, colours) == 0:
            no_data(ax, f"missing: {missing}")
            log(f"fig9: panel '{title}' empty (missing {missing})")
        ax.set(xlabel=flat_label(points_with(points, xk), xk), ylabel=yl, title=f"Fig. 9 — {title}")
    ax = axes[3]
    for p, q in pairs:
        c = colours[p["family"]]
        ax.annotate("", xy=(q["flat_avg"], q["rloss"]), xytext=(p["flat_avg"], p["rloss"]),
                    arrowprops=dict(arrowstyle="->", color=c, lw=1))
        ax.scatter(p["flat_avg"], p["rloss"], color=c, marker="o", s=36, edgecolor="k", linewidth=0.4, zorder=3)
        ax.scatter(q["flat_avg"], q["rloss"], color=c, marker="s", s=36, edgecolor="k", linewidth=0.4, zorder=3)
    if not pairs:
        no_data(ax, "missing: evaluation and average-case flatness of ckpt_best.pt")
        log("fig9: panel 'ES vs last' empty (missing an evaluation / average-case flatness of ckpt_best.pt)")
    ax.set(xlabel="average-case flatness (ΔRLoss)", ylabel=LABELS["rloss"],
           title="early stopping: last ● → ES ■")
    drawn = [p for p in points if any(is_number(p.get(k)) for k in ("flat_avg", "flat_avg_train"))]
    family_legend(fig, drawn, colours, loc="lower center", ncol=min(8, len(colours)), bbox_to_anchor=(0.5, -0.02))
    save(fig, out, "fig9_generalisation", written, rect=(0, 0.08, 1, 1), note=note)


# ---------------------------------------------------------------------------------------------
# Table 1 and the correlations
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("rerr_test", "rerr_train", "train_minus_test", "flat_avg", "flat_worst", "rerr_es", "es_minus_test")


def table1(points, es_points, log=print, exact_thresholds=False):
    """Table 1 as the paper builds it: one row per method family (describe(): the method plus the Table 1
    flags that differ from AT, so a sweep such as label noise 0.2 / 0.4 is one family), the run with the
    family's lowest test RErr (%); rows sorted by it; groups Good / Average / Poor split at the 30th / 70th
    percentile of the rows' test RErr (numpy linear interpolation, rounded to whole percent as the paper's
    57 % / 60 %), group means over the rows. Train − test compares two numbers of one evaluation; ES − test
    only two evaluations with the same settings (comparable())."""
    es_by_run = {q["run"]: q for q in es_points}
    measured = sorted((p for p in points if is_number(p.get("rerr"))), key=lambda p: (p["rerr"], p["label"]))
    best = {}  # family → its run with the lowest test RErr
    for p in measured:
        best.setdefault(p["family"], p)
    runs_of = Counter(p["family"] for p in measured)
    rows = []
    for family, p in best.items():
        q = es_by_run.get(p["run"], {})
        row = {"label": p["label"], "run": p["run"], "family": family, "family_runs": runs_of[family],
               "rerr_test": 100 * p["rerr"], "rerr_test_source": p["rerr_source"], "rerr_test_n": p.get("rerr_n"),
               "rerr_test_attack": p.get("rerr_attack"), "rloss_test": p.get("rloss"),
               "rerr_train": 100 * p["rerr_train"] if is_number(p.get("rerr_train")) else None,
               "rerr_train_source": p.get("rerr_train_source"),
               "flat_avg": p.get("flat_avg"), "flat_worst": p.get("flat_worst"),
               "rerr_es": 100 * q["rerr"] if is_number(q.get("rerr")) else None, "rerr_es_source": q.get("rerr_source"),
               "es_epoch": q.get("epoch")}
        row["train_minus_test"] = row["rerr_train"] - row["rerr_test"] if row["rerr_train"] is not None else None
        row["es_minus_test"] = row["rerr_es"] - row["rerr_test"] \
            if row["rerr_es"] is not None and comparable(p["run"], p, q, "Table 1 ES − test RErr", log) else None
        rows.append(row)
    rows.sort(key=lambda r: (r["rerr_test"], r["label"]))
    if not rows:
        return None
    test = np.array([r["rerr_test"] for r in rows])
    pct = np.percentile(test, [30, 70])
    lo, hi = (float(pct[0]), float(pct[1])) if exact_thresholds else (float(np.round(pct[0])), float(np.round(pct[1])))
    for r in rows:
        r["group"] = "Good" if r["rerr_test"] < lo else ("Average" if r["rerr_test"] < hi else "Poor")
    groups = []
    for g in ("Good", "Average", "Poor"):
        members = [r for r in rows if r["group"] == g]
        if not members:  # e.g. tied RErr (all 100 % after one epoch): no "mean of 0" row
            continue
        mean = {}
        for c in TABLE_COLUMNS:
            vals = [r[c] for r in members if r[c] is not None]
            mean[c] = float(np.mean(vals)) if vals else None
        groups.append({"group": g, "n": len(members), **mean})
    return {"rows": rows, "groups": groups, "percentiles": [float(pct[0]), float(pct[1])],
            "thresholds": [lo, hi], "rounded": not exact_thresholds}


def fmt(v, digits=1, signed=False):
    if v is None:
        return "–"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return s.replace("-", "−")


def table1_markdown(t):
    def rerr(v, source):
        return fmt(v) + ("†" if source == "PGD" and v is not None else "")

    lo, hi = t["thresholds"]
    lines = ["| # | model | RErr test (%) | RErr train (%) (train−test) | avg flatness | worst flatness | "
             "RErr ES (%) (ES−test) | group |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(t["rows"], 1):
        train = f"{rerr(r['rerr_train'], r['rerr_train_source'])} ({fmt(r['train_minus_test'], signed=True)})" \
            if r["rerr_train"] is not None else "–"
        es = f"{rerr(r['rerr_es'], r['rerr_es_source'])} ({fmt(r['es_minus_test'], signed=True)})" \
            if r["rerr_es"] is not None else "–"
        label = r["label"] + (f" (best of {r['family_runs']})" if r["family_runs"] > 1 else "")
        lines.append(f"| {i} | {label} | {rerr(r['rerr_test'], r['rerr_test_source'])} | {train} | "
                     f"{fmt(r['flat_avg'], 2)} | {fmt(r['flat_worst'], 2)} | {es} | {r['group']} |")
    bounds = {"Good": f"RErr < {lo:g} %", "Average": f"{lo:g} % ≤ RErr < {hi:g} %", "Poor": f"RErr ≥ {hi:g} %"}
    for g in t["groups"]:
        train = f"{fmt(g['rerr_train'])} ({fmt(g['train_minus_test'], signed=True)})" if g["rerr_train"] is not None else "–"
        es = f"{fmt(g['rerr_es'])} ({fmt(g['es_minus_test'], signed=True)})" if g["rerr_es"] is not None else "–"
        lines.append(f"| | **{g['group']}** (mean of {g['n']}; {bounds[g['group']]}) | {fmt(g['rerr_test'])} | {train} | "
                     f"{fmt(g['flat_avg'], 2)} | {fmt(g['flat_worst'], 2)} | {es} | |")
    p30, p70 = t["percentiles"]
    how = "rounded to whole percent" if t["rounded"] else "exact"
    shown = {g["group"] for g in t["groups"]}
    splits = {"Good": f"Good RErr < {lo:g} %", "Average": f"Average {lo:g}–{hi:g} %", "Poor": f"Poor ≥ {hi:g} %"}
    attacks = Counter(r["rerr_test_attack"] for r in t["rows"])
    ns = sorted({r["rerr_test_n"] for r in t["rows"] if r["rerr_test_n"]})
    lines += ["", f"Groups: {', '.join(v for k, v in splits.items() if k in shown)}"
              + (f" (no {' or '.join(k for k in splits if k not in shown)} row)" if len(shown) < 3 else "")
              + f" — the 30th / 70th percentiles of test RErr are {p30:.2f} % / {p70:.2f} % ({how}).",
              "RErr: AutoAttack where available; † = PGD (no AutoAttack result). Test RErr from "
              + ", ".join(f"{k} for {v} run(s)" for k, v in attacks.items())
              + (f", on n = {'/'.join(map(str, ns))} test images." if ns else "."),
              "Flatness: ΔRLoss at ξ = 0.5 (average-case) and ξ = 0.00075 (worst-case) unless the files say "
              "otherwise (see summary.json); ES = the early-stopped checkpoint ckpt_best.pt.",
              "One row per method family: its run with the lowest test RErr (\"best of N\": N runs of the family); "
              "correlations.json is over all runs."]
    norm = t.get("norm", "linf")
    lines.append(f"Threat model: {NORM_NAMES[norm]} (--norm {norm}), every run trained and measured under it"
                 + (f"; left out, trained under another: {', '.join(t['other_norm'])}." if t.get("other_norm") else "."))
    return "\n".join(lines) + "\n"


def write_table1_csv(t, path):
    keys = ["rank", "label", "run", "family", "family_runs", "group", "rerr_test", "rerr_test_source", "rerr_test_attack",
            "rerr_test_n", "rerr_train",
            "rerr_train_source", "train_minus_test", "flat_avg", "flat_worst", "rerr_es", "rerr_es_source",
            "es_minus_test", "es_epoch", "rloss_test"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(t["rows"], 1):
            w.writerow({**r, "rank": i})
        for g in t["groups"]:
            w.writerow({"label": f"{g['group']} (mean of {g['n']})", "group": g["group"], **{c: g[c] for c in TABLE_COLUMNS}})


EXACT_P_MAX_N = 8  # up to 8 models the p-values enumerate all n! pairings (8! = 40,320)


def pearson(x, y):
    """Pearson's r of every row of x (shape (..., n)) with y (shape (n,))."""
    xc, yc = x - x.mean(-1, keepdims=True), y - y.mean()
    return (xc * yc).sum(-1) / np.sqrt((xc ** 2).sum(-1) * (yc ** 2).sum())


def kendall_s(x, y):
    """Kendall's S (concordant − discordant pairs) of every row of x (shape (..., n)) with y (shape (n,)). τ_b is
    S over a norm that pairing x differently keeps (ties stay ties), so S orders the pairings as τ_b does."""
    i, j = np.triu_indices(len(y), 1)
    return (np.sign(x[..., i] - x[..., j]) * np.sign(y[i] - y[j])).sum(-1)


def exact_p(x, y, statistic=pearson):
    """Two-sided permutation p-value of `statistic` (Pearson's r; kendall_s for Kendall's τ): the fraction of all
    n! pairings of x with y whose |statistic| reaches the observed one (the observed pairing is one of them, so it
    is never 0)."""
    r = statistic(x[np.array(list(itertools.permutations(range(len(x)))))], y)
    return float(np.mean(np.abs(r) >= abs(statistic(x, y)) - 1e-12))


def correlation(xs, ys):
    """Pearson, Spearman and Kendall (τ_b) coefficients with two-sided p-values, n and how the p-values were
    computed. Up to EXACT_P_MAX_N models by an exact permutation test (Spearman's: Pearson's on ranks), since
    scipy's t-distribution p-value is 0.0 for a perfect correlation at small n; above it, scipy.stats'."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    out = {"n": len(x)}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "needs at least 3 points with non-constant values"
        return out
    pr, sr, kt = scipy.stats.pearsonr(x, y), scipy.stats.spearmanr(x, y), scipy.stats.kendalltau(x, y)
    if len(x) <= EXACT_P_MAX_N:
        rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
        p_pearson, p_spearman, p_kendall = exact_p(x, y), exact_p(rx, ry), exact_p(x, y, kendall_s)
        method = f"exact permutation test (all {math.factorial(len(x))} pairings)"
    else:
        p_pearson, p_spearman, p_kendall = pr.pvalue, sr.pvalue, kt.pvalue
        method = "scipy.stats.pearsonr / spearmanr (t-distribution), kendalltau (exact without ties, else normal)"
    out.update(pearson_r=float(pr.statistic), pearson_p=float(p_pearson), spearman_rho=float(sr.statistic),
               spearman_p=float(p_spearman), kendall_tau=float(kt.statistic), kendall_p=float(p_kendall),
               p_method=method)
    return out


CORRELATIONS = (("rloss", "flat_avg"), ("rloss", "flat_worst"), ("rerr", "flat_avg"), ("rerr", "flat_worst"))


def distinct_es(points, es_points):
    """The early-stopped checkpoints but where early stopping chose the last epoch (ckpt_best.pt is then
    ckpt_last.pt again, one model)."""
    last_epoch = {p["run"]: p.get("epoch") for p in points}
    return [q for q in es_points if q.get("epoch") is None or q["epoch"] != last_epoch.get(q["run"])]


def checkpoint_id(p):
    return f"{p['run']}:{p['kind']}"


def correlations(points, es_points):
    """Over the last checkpoints of all runs, and again with the early-stopped checkpoints added
    (distinct_es())."""
    result = {}
    for name, ps in (("last", points), ("last_and_es", points + distinct_es(points, es_points))):
        block = {}
        for yk, xk in CORRELATIONS:
            use = points_with(ps, yk, xk)
            c = correlation([p[xk] for p in use], [p[yk] for p in use])
            c["models"] = [checkpoint_id(p) for p in use]
            block[f"{yk}_vs_{xk}"] = c
        result[name] = block
    return result


def print_correlations(result):
    for name, block in result.items():
        print(f"correlations ({'last checkpoints' if name == 'last' else 'last + early-stopped checkpoints'}):")
        for key, c in block.items():
            if "pearson_r" in c:
                print(f"  {key:22s} n={c['n']:3d}  Pearson r={c['pearson_r']:+.3f} (p={c['pearson_p']:.2g})  "
                      f"Spearman ρ={c['spearman_rho']:+.3f} (p={c['spearman_p']:.2g})")
            else:
                print(f"  {key:22s} n={c['n']:3d}  – ({c['note']})")


# ---------------------------------------------------------------------------------------------
# The measures table: which flatness measure predicts robust generalization
# ---------------------------------------------------------------------------------------------
## Every measure flatness.py wrote, and two baselines, ranked as Jiang et al. ("Fantastic Generalization Measures
## and Where to Find Them", ICLR 2020) rank generalization measures: Kendall's τ with the target over all
## checkpoints, and their granulated Kendall coefficient Ψ (Eq. 4–5), which asks whether the measure follows the
## target when one hyper-parameter changes and every other stays.
TARGETS = {"rloss": "test RLoss", "gap": "test − train RLoss", "rerr": "test RErr"}
POINT_SETS = {"last": "last checkpoints", "last_and_es": "last + early-stopped checkpoints"}
LOSS_NAMES = {"robust": "RLoss", "clean": "clean", None: "clean"}  # the Hessian records no loss: the clean CE's
DEFAULT_SUBSETS = ("eval", None)  # test images 0…999; the Hessians record none (they use the last test images)
# Settings that say which model a result measured, or how fast: results that differ only in them are one measure
NOT_MEASURE = NOT_PROTOCOL + ("tool", "data_dir", "batch_size")
SETTING_NAMES = {"xi": "ξ", "rho": "ρ", "sharpness_norm": "sharpness-norm", "logit_normalise": "logit-normalise"}


def measure_name(mode, loss):
    """"adaptive-worst (RLoss)", "pac-bayes-mag (clean)", "hessian λ_max (clean)"."""
    return f"{'hessian λ_max' if mode == 'hessian' else mode} ({LOSS_NAMES.get(loss, loss)})"


def measure_setting(e):
    """What a flatness result measured, as its settings without NOT_MEASURE (ξ, ρ, images, steps, seed, ...)."""
    return {k: v for k, v in e["settings"].items() if k not in NOT_MEASURE}


def setting_key(setting):
    return json.dumps(setting, sort_keys=True)


def setting_text(setting, non_default=()):
    """"ρ=0.002, sharpness-norm=linf, logit-normalise": the SETTING_NAMES a result has (a switch only when on), then
    its other non-default settings."""
    named = [SETTING_NAMES[k] if setting[k] is True else f"{SETTING_NAMES[k]}={format_value(k, setting[k])}"
             for k in SETTING_NAMES if k in setting and setting[k] is not False]
    other = [f"{k}={format_value(k, setting[k])}" for k in non_default if k not in SETTING_NAMES and k in setting]
    return ", ".join(named + other) or "defaults"


def setting_difference(a, b):
    """a's values of the settings in which a and b differ ("ρ=0.2, n_eval=100")."""
    return ", ".join(f"{SETTING_NAMES.get(k, k)}={format_value(k, a.get(k))}" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))


def measure_points(points, es_points):
    """The table's checkpoints: every one with an evaluation, in two sets as correlations.json (the last ones; with
    the early-stopped ones added, distinct_es()); each with its robust generalization gap, test − train RLoss of
    one evaluation (evaluate.py --train)."""
    def with_gap(p):
        return {**p, "gap": p["rloss"] - p["rloss_train"]} if is_number(p.get("rloss_train")) else p
    last = [with_gap(p) for p in points if is_number(p.get("rloss"))]
    es = [with_gap(q) for q in distinct_es(points, es_points) if is_number(q.get("rloss"))]
    return {"last": last, "last_and_es": last + es}


def flatness_columns(runs, points, log):
    """One column per measure (mode, loss) of MEASURE_MODES that a checkpoint of `points` has at scale 1 on the
    default subset: its value per checkpoint, of the evaluated model (EMA or not). Of several results of one
    checkpoint, pick_flatness()'s (the paper's ξ and protocol, then the most images). Where the checkpoints' choices
    differ in a setting (ρ, ξ, images, ...), the column keeps the setting most of them have (a tie: the paper's
    protocol) and leaves the others out, named by left_out(), rather than mix two measures in one row."""
    by_run = {r["name"]: r for r in runs}
    chosen = {}  # (mode, loss) → {checkpoint: (pick_flatness()'s result, every candidate, prefer EMA)}
    for p in points:
        run = by_run[p["run"]]
        measured = {(e["mode"], e["loss"], e["subset"]) for e in run["flats"] if e["kind"] == p["kind"]
                    and e["mode"] in MEASURE_MODES and e["subset"] in DEFAULT_SUBSETS}
        for mode, loss, subset in measured:
            found = flatness_results(run, p["kind"], mode, loss, subset, ema=p["ema"])  # at scale 1
            if found:
                first = pick_flatness(run, p["kind"], mode, loss, subset, ema=p["ema"])
                chosen.setdefault((mode, loss), {})[checkpoint_id(p)] = (first, found, bool(run["args"].get("ema")))
    columns = []
    for (mode, loss), per_point in sorted(chosen.items(), key=lambda kv: (MEASURE_MODES.index(kv[0][0]),
                                                                          kv[0][1] != "robust", str(kv[0][1]))):
        count = Counter(setting_key(measure_setting(first)) for first, _, _ in per_point.values())
        paper = {setting_key(measure_setting(first)) for first, _, _ in per_point.values() if first["default"]}
        keep = max(count, key=lambda k: (count[k], k in paper, k))
        values, files, left, example = {}, {}, {}, None
        for cid, (first, found, prefer_ema) in per_point.items():
            same = [e for e in found if setting_key(measure_setting(e)) == keep]
            if same:
                e = pick(same, prefer_ema)
                values[cid], files[cid] = float(measured_value(e["data"], mode)), str(e["file"])
                example = example or e
            else:
                left[cid] = f"measured with {setting_difference(measure_setting(first), json.loads(keep))} only"
        setting = measure_setting(example)
        column = {"name": measure_name(mode, loss), "type": "measure", "mode": mode, "loss": loss, "setting": setting,
                  "settings": setting_text(setting, example["data"].get("non_default") or []),
                  "values": values, "files": files, "left_out": left}
        if left:
            left_out(f"measures table, {column['name']}", left, log,
                     f"left out (the row's setting: {column['settings']})")
        columns.append(column)
    return columns


def baseline_columns(runs, points):
    """The two baselines as columns: the weight norm Σ_l ‖w_l‖² over the tensors flatness.py perturbs (conv /
    linear weights and biases; `weight_norm_sq` of any flatness result at scale 1 of the evaluated model) and train
    RLoss (the evaluation's train section, evaluate.py --train)."""
    by_run = {r["name"]: r for r in runs}
    norms, files = {}, {}
    for p in points:
        run = by_run[p["run"]]
        found = [e for e in run["flats"] if e["kind"] == p["kind"] and e["scale"] == 1 and e["ema"] == p["ema"]
                 and is_number(e["data"].get("weight_norm_sq"))]
        if found:
            e = pick(found, bool(run["args"].get("ema")))
            norms[checkpoint_id(p)], files[checkpoint_id(p)] = float(e["data"]["weight_norm_sq"]), str(e["file"])
    train = [p for p in points if is_number(p.get("rloss_train"))]
    return [{"name": "weight norm Σ‖w_l‖²", "type": "baseline", "mode": None, "loss": None, "setting": {},
             "settings": "weight_norm_sq of the flatness results", "values": norms, "files": files, "left_out": {}},
            {"name": "train RLoss", "type": "baseline", "mode": None, "loss": None, "setting": {},
             "settings": "evaluate.py --train", "values": {checkpoint_id(p): float(p["rloss_train"]) for p in train},
             "files": {checkpoint_id(p): p["eval_file"] for p in train}, "left_out": {}}]


def hyper_parameters(runs, points):
    """{checkpoint: {axis: value}}, the axes of the granulated Kendall coefficient: the method; every flag that
    differs from the AT baseline in some run (differing_flags()) and the methods' own hyper-parameters
    (METHOD_FLAGS), "–" where a run has the baseline's value or none; the run-size settings (RUN_SIZE) in which
    runs differ; and the checkpoint, last or early-stopped (best)."""
    base = next((r for r in runs if r["baseline"]), None)
    reference = run_reference(runs, base)
    varied = {r["name"]: {**dict(differing_flags(r["args"], reference)),
                          **{f: r["args"].get(f) for f in METHOD_FLAGS.get(r["args"].get("method", "at"), [])}}
              for r in runs}
    flags = sorted(set().union(*varied.values()))
    size = [f for f in RUN_SIZE if len({format_value(f, r["args"].get(f)) for r in runs}) > 1]
    by_run = {r["name"]: r for r in runs}
    out = {}
    for p in points:
        args, own = by_run[p["run"]]["args"], varied[p["run"]]
        out[checkpoint_id(p)] = {"method": args.get("method", "at"),
                                 **{f: format_value(f, own[f]) if f in own else "–" for f in flags},
                                 **{f: format_value(f, args.get(f)) for f in size}, "checkpoint": p["kind"]}
    return out


def axis_name(axis):
    return "checkpoint (last / ES)" if axis == "checkpoint" else SYMBOLS.get(axis, axis)


def axis_groups(hyper, axis):
    """Jiang et al.'s groups for `axis`: the checkpoints (indices into `hyper`) that agree on every other axis,
    where `axis` takes at least two values (a group of repeats, or of one checkpoint, says nothing about it)."""
    groups = {}
    for k, h in enumerate(hyper):
        groups.setdefault(tuple(v for a, v in h.items() if a != axis), []).append(k)
    return [g for g in groups.values() if len({hyper[k][axis] for k in g}) >= 2]


def granulated_kendall(x, y, hyper):
    """Jiang et al.'s granulated Kendall coefficient (ICLR 2020, Eq. 4–5) of measure values x with targets y, one
    per checkpoint, whose hyper-parameters are hyper[k] ({axis: value}, the same axes for all). For axis i:
    Kendall's τ of x with y in each group of axis_groups(); ψ_i = the mean over the groups (Eq. 4); Ψ = the mean of
    ψ_i over the axes that have a group (Eq. 5). A group whose x or y is constant has no τ and is not counted
    ("undefined"); an axis without a counted group is named as not estimable."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    psi, not_estimable = {}, []
    for axis in (list(hyper[0]) if hyper else []):
        taus, undefined = [], 0
        for g in axis_groups(hyper, axis):
            if np.ptp(x[g]) == 0 or np.ptp(y[g]) == 0:
                undefined += 1
                continue
            taus.append(float(scipy.stats.kendalltau(x[g], y[g]).statistic))
        if taus:
            psi[axis] = {"psi": float(np.mean(taus)), "groups": len(taus), "undefined": undefined}
        else:
            not_estimable.append(axis)
    return {"Psi": float(np.mean([v["psi"] for v in psi.values()])) if psi else None, "axes": psi,
            "not_estimable": not_estimable}


def measure_correlations(columns, point_sets, hyper):
    """{point set: {measure: {target: correlation() + granulated Kendall + the checkpoints}}}: each column with
    each target over the checkpoints that have both."""
    out = {}
    for set_name, ps in point_sets.items():
        out[set_name] = {}
        for col in columns:
            out[set_name][col["name"]] = {}
            for target in TARGETS:
                use = [p for p in ps if checkpoint_id(p) in col["values"] and is_number(p.get(target))]
                x, y = [col["values"][checkpoint_id(p)] for p in use], [p[target] for p in use]
                c = correlation(x, y)
                c.update(granulated=granulated_kendall(x, y, [hyper[checkpoint_id(p)] for p in use]),
                         models=[checkpoint_id(p) for p in use])
                out[set_name][col["name"]][target] = c
    return out


def coefficient(c, key, p_key):
    return f"{fmt(c[key], 2, signed=True)} ({c[p_key]:.2g})" if key in c else "–"


def measures_markdown(t):
    """measures.md: a header saying what the points are, then per point set and target a table, one row per
    measure and baseline: Pearson, Spearman, Kendall (p), n, Ψ and ψ per axis (groups)."""
    n_last, n_all = len(t["points"]["last"]), len(t["points"]["last_and_es"])
    n_runs = len({c.rsplit(":", 1)[0] for c in t["points"]["last_and_es"]})
    rerr = ", ".join(f"{k} for {v} checkpoints" for k, v in Counter(t["rerr_sources"].values()).items())
    lines = ["# Which flatness measure predicts robust generalization", "",
             f"n = {n_all} checkpoints with an evaluation, of {n_runs} runs: {n_last} last (ckpt_last.pt), "
             f"{n_all - n_last} early-stopped (ckpt_best.pt; one where early stopping chose the last epoch counts "
             f"once). Threat model {NORM_NAMES[t['norm']]} (--norm {t['norm']}). Targets: test RLoss (the "
             "evaluation's PGD), test − train RLoss (one evaluation with evaluate.py --train), test RErr "
             f"({rerr}). Measures: flatness.py's results at scale 1 on the default images, of the evaluated model; "
             f"baselines: the weight norm, train RLoss. p-values are two-sided: for n ≤ {EXACT_P_MAX_N} exact "
             "permutation tests (all n! pairings of measure and target), above scipy.stats'. n per cell: the "
             "checkpoints with the measure and the target.",
             "Ψ: the granulated Kendall coefficient of Jiang et al. (ICLR 2020, Eq. 4–5), the mean over axes of ψ_i, "
             "the mean Kendall τ within groups of checkpoints that differ in axis i only; ψ per axis with its number "
             "of groups in brackets."]
    for set_name, title in POINT_SETS.items():
        axes = t["axes"][set_name]
        lines += ["", f"## {title} (n = {len(t['points'][set_name])})", "",
                  f"Axes: {', '.join(map(axis_name, axes['all']))}"
                  + (f"; not estimable (no two checkpoints differ in it alone): "
                     f"{', '.join(map(axis_name, axes['not_estimable']))}." if axes["not_estimable"] else ".")]
        for target, target_name in TARGETS.items():
            lines += ["", f"### {target_name} — {title}", "", "| measure | settings | Pearson r (p) | Spearman ρ (p) | "
                      "Kendall τ (p) | n | Ψ | ψ per axis (groups) |", "|---|---|---|---|---|---|---|---|"]
            for col in t["columns"]:
                c = t["correlations"][set_name][col["name"]][target]
                g = c["granulated"]
                per_axis = ", ".join(f"{axis_name(a)} {fmt(v['psi'], 2, signed=True)} ({v['groups']})"
                                     for a, v in g["axes"].items())
                name = col["name"] + (" *(baseline)*" if col["type"] == "baseline" else "")
                lines.append(f"| {name} | {col['settings']} | {coefficient(c, 'pearson_r', 'pearson_p')} | "
                             f"{coefficient(c, 'spearman_rho', 'spearman_p')} | "
                             f"{coefficient(c, 'kendall_tau', 'kendall_p')} | {c['n']} | "
                             f"{fmt(g['Psi'], 2, signed=True)} | {per_axis or '–'} |")
    left = [f"{col['name']}: {', '.join(f'{k} ({why})' for k, why in col['left_out'].items())}"
            for col in t["columns"] if col["left_out"]]
    if left:
        lines += ["", "Left out, measured with another setting than the row's: " + "; ".join(left) + "."]
    if t.get("not_drawn"):
        lines += ["", "Not drawn in fig_measures: " + "; ".join(f"{k} ({v})" for k, v in t["not_drawn"].items()) + "."]
    return "\n".join(lines) + "\n"


MEASURES_CSV = ["point_set", "measure", "type", "mode", "loss", "settings", "target", "n", "pearson_r", "pearson_p",
                "spearman_rho", "spearman_p", "kendall_tau", "kendall_p", "p_method", "granulated_kendall",
                "psi_per_axis", "not_estimable", "left_out", "note"]


def write_measures_csv(t, path):
    """measures.csv: one row per point set × measure × target; psi_per_axis is JSON ({axis: {psi, groups,
    undefined}}), not_estimable and left_out are "; "-separated."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MEASURES_CSV, extrasaction="ignore")
        w.writeheader()
        for set_name in POINT_SETS:
            for col in t["columns"]:
                for target in TARGETS:
                    c = t["correlations"][set_name][col["name"]][target]
                    g = c["granulated"]
                    w.writerow({**c, "point_set": set_name, "measure": col["name"], "type": col["type"],
                                "mode": col["mode"], "loss": col["loss"], "settings": col["settings"], "target": target,
                                "granulated_kendall": g["Psi"], "psi_per_axis": json.dumps(g["axes"]),
                                "not_estimable": "; ".join(g["not_estimable"]),
                                "left_out": "; ".join(f"{k} ({why})" for k, why in col["left_out"].items())})


def print_measures(t):
    for set_name, title in POINT_SETS.items():
        print(f"measures ({title}): Kendall τ (p) with each target; Ψ with test RLoss")
        for col in t["columns"]:
            cs = t["correlations"][set_name][col["name"]]
            taus = "  ".join(f"{TARGETS[k]} {coefficient(c, 'kendall_tau', 'kendall_p'):16s}" for k, c in cs.items())
            psi = fmt(cs["rloss"]["granulated"]["Psi"], 2, signed=True)
            print(f"  {col['name']:28s} n={cs['rloss']['n']:3d}  {taus}  Ψ={psi}")


def fig_measures(t, points, colours, out, log, written):
    """Small multiples: one scatter per measure and baseline, x = its value, y = test RLoss, over the last (● / ◆
    as every figure) and early-stopped (■) checkpoints, coloured by method family; each panel titled with Kendall's
    τ. A measure of fewer than MIN_FIT_POINTS checkpoints is named, not drawn. Returns {measure: why} not drawn."""
    by_id = {checkpoint_id(p): p for p in points}
    drawn, not_drawn = [], {}
    for col in t["columns"]:
        n = t["correlations"]["last_and_es"][col["name"]]["rloss"]["n"]
        if n >= MIN_FIT_POINTS:
            drawn.append(col)
        else:
            not_drawn[col["name"]] = f"{n} checkpoint(s) with test RLoss, a panel needs {MIN_FIT_POINTS}"
    if not drawn:
        log("skip fig_measures: no measure of at least 3 evaluated checkpoints")
        return not_drawn
    note = left_out("fig_measures", not_drawn, log)
    ncols = min(4, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.2 * nrows + 0.7), squeeze=False)
    for k, (ax, col) in enumerate(zip(axes.flat, drawn)):
        c = t["correlations"]["last_and_es"][col["name"]]["rloss"]
        for cid in c["models"]:
            p = by_id[cid]
            ax.scatter(col["values"][cid], p["rloss"], color=colours[p["family"]],
                       marker="s" if p["kind"] == "best" else p["marker"], s=30, edgecolor="k", linewidth=0.4, zorder=3)
        tau = f"τ = {fmt(c['kendall_tau'], 2, signed=True)} (p = {c['kendall_p']:.2g})" if "kendall_tau" in c \
            else "τ: –"
        what = "default settings" if col["settings"] == "defaults" else col["settings"]
        ax.set(title=f"{col['name']}\n{tau}, n = {c['n']}", ylabel=LABELS["rloss"] if k % ncols == 0 else "")
        if col["type"] == "measure":  # its settings, wrapped to the panel's width (they can be long)
            ax.set_xlabel(textwrap.fill(f"value ({what})", 52), fontsize="x-small")
        else:
            ax.set_xlabel(col["name"])
    for ax in axes.flat[len(drawn):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    es = Line2D([], [], marker="s", ls="", color="w", markeredgecolor="k", label="early-stopped (ckpt_best.pt)")
    family_legend(fig, [p for p in points if p["kind"] != "best"], colours, extra=[es], loc="lower center",
                  ncol=min(6, len(colours) + 3), bbox_to_anchor=(0.5, 0))
    save(fig, out, "fig_measures", written, rect=(0, 0.5 / fig.get_figheight(), 1, 1), note=note)
    return not_drawn


def measures_table(runs, points, es_points, colours, out, log, written):
    """The measures table: every measure's and baseline's correlation with test RLoss, the robust generalization
    gap and test RErr over the evaluated checkpoints; measures.md, measures.csv, measures.json and fig_measures.
    Returns the table (None without an evaluated checkpoint)."""
    point_sets = measure_points(points, es_points)
    every = point_sets["last_and_es"]
    if not every:
        log("skip measures table: no checkpoint has an evaluation (evaluate.py)")
        return None
    columns = flatness_columns(runs, every, log) + baseline_columns(runs, every)
    hyper = hyper_parameters(runs, every)
    t = {"norm": log.norm, "points": {k: [checkpoint_id(p) for p in ps] for k, ps in point_sets.items()},
         "targets": TARGETS, "columns": columns, "hyper_parameters": hyper,
         "rerr_sources": {checkpoint_id(p): p["rerr_source"] for p in every},
         "correlations": measure_correlations(columns, point_sets, hyper)}
    t["axes"] = {}
    for set_name, ps in point_sets.items():
        hs = [hyper[checkpoint_id(p)] for p in ps]
        t["axes"][set_name] = {"all": list(hs[0]) if hs else [],
                               "not_estimable": [a for a in (hs[0] if hs else []) if not axis_groups(hs, a)]}
    t["not_drawn"] = fig_measures(t, every, colours, out, log, written)
    (out / "measures.md").write_text(measures_markdown(t))
    write_measures_csv(t, out / "measures.csv")
    common.write_json(out / "measures.json", {**t, "versions": common.versions(torch.device("cpu"))})
    written += [str(out / "measures.md"), str(out / "measures.csv"), str(out / "measures.json")]
    print_measures(t)
    return t


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    p.add_argument("runs", help="folder holding run folders (each with args.json), or one run folder")
    p.add_argument("--out", default=None, help="output folder for figures, tables and JSON (default: figures; "
                   "figures_l2 for --norm l2)")
    p.add_argument("--norm", default=None, choices=tuple(NORM_NAMES),
                   help="the threat model drawn: runs trained under it, results measured under it (figures never mix "
                        "norms); default: the --baseline's, else linf (the paper's) where a run was trained under it")
    p.add_argument("--baseline", default=None, help="run folder (relative to RUNS) of the AT baseline (Fig. 2, the "
                   "labels' reference); default: the plain AT run whose size most runs share")
    p.add_argument("--split", type=float, default=2.3, help="RLoss at which Fig. 8's two linear fits split (paper: 2.3)")
    p.add_argument("--exact-thresholds", action="store_true",
                   help="Table 1 groups at the exact 30th/70th percentiles (default: rounded to whole percent, "
                        "which gives the paper's 57 %% / 60 %%)")
    p.add_argument("--robustbench-dir", default=None, metavar="MODEL_DIR",
                   help="also draw the RobustBench models measured into this folder (evaluate.py / flatness.py "
                        "--robustbench NAME --model-dir MODEL_DIR) as ▲ in Fig. 1")
    p.add_argument("--formats", default="png,pdf", help="comma-separated figure formats")
    p.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figures")
    args = p.parse_args(argv)
    args.formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    check(args.formats and all(f in ("png", "pdf", "svg") for f in args.formats),
          f"--formats takes png, pdf and/or svg, got {','.join(args.formats) or 'nothing'}")
    check(args.dpi > 0, f"--dpi must be positive, got {args.dpi}")
    return args


def run_meta(r):
    return {"run": r["name"], "label": r["label"], "family": r["family"], "sweep": r["sweep"],
            "marker": marker_of(r), "method": r["args"].get("method", "at"), "baseline": r.get("baseline", False)}


def main(argv=None):
    args = parse_args(argv)
    log = Log()
    runs = find_runs(args.runs, log, args.baseline, args.norm)
    out = Path(args.out or ("figures" if log.norm == "linf" else f"figures_{log.norm}"))
    out.mkdir(parents=True, exist_ok=True)
    SAVE.update(formats=args.formats, dpi=args.dpi, norm=log.norm)
    written = []

    # ---- one point per run (last checkpoint) and per early-stopped checkpoint
    for r in runs:
        r["last"], r["best"] = measures(r, "last"), measures(r, "best")
        generalisation_gaps(r, log)
    colours = family_colours(runs)
    points = [{**run_meta(r), **r["last"]} for r in runs]
    es_points = [{**run_meta(r), **r["best"]} for r in runs if "rloss" in r["best"]]
    for r in runs:
        if "rloss" not in r["last"]:
            log(f"note: {r['name']} has no evaluation of ckpt_last.pt (evaluate.py {r['name']}/ckpt_last.pt): "
                "left out of Table 1 and the scatter plots")

    public = robustbench_points(args.robustbench_dir, log) if args.robustbench_dir else []
    t = table1(points, es_points, log, args.exact_thresholds)
    shown = highlighted(points, {r["run"] for r in t["rows"]} if t else set())  # Fig. 1/8: Table 1 rows in colour

    # ---- figures
    fig1(shown, colours, out, log, written, public)
    baseline = next((r for r in runs if r["baseline"]), None)  # choose_baseline(): None has said so
    if baseline is not None:
        fig2(baseline, out, log, written)
    fig4(runs, out, log, written)
    fig5(runs, out, log, written)
    drawn6 = [fig6(r, out, log, written) for r in runs]
    if not any(drawn6):
        log("skip fig6: no run has flatness of at least 2 snapshots (flatness.py --epochs runs/NAME)")
    else:  # a figure per run: the others are named once
        left_out("fig6", {r["name"]: "flatness of fewer than 2 snapshots: flatness.py --epochs"
                          for r, ok in zip(runs, drawn6) if not ok}, log)
    fig7(points, colours, out, log, written)
    fig8(shown, colours, out, log, written, split=args.split)
    fig9(points, es_points, colours, out, log, written)

    # ---- Table 1, correlations, everything read
    vers = common.versions(torch.device("cpu"))
    if t is None:
        log("skip table1: no run has an evaluation of ckpt_last.pt")
    else:
        t.update(norm=log.norm, other_norm=sorted(log.other_norm))
        md = table1_markdown(t)
        (out / "table1.md").write_text(md)
        write_table1_csv(t, out / "table1.csv")
        common.write_json(out / "table1.json", {**t, "versions": vers})
        written += [str(out / "table1.md"), str(out / "table1.csv"), str(out / "table1.json")]
        print(md)
    corr = correlations(points, es_points)
    print_correlations(corr)
    common.write_json(out / "correlations.json", {**corr, "norm": log.norm, "runs_dir": str(args.runs),
                                                  "versions": vers})
    measures_table(runs, points, es_points, colours, out, log, written)
    written += [str(out / "correlations.json"), str(out / "summary.json")]
    summary = {"runs": [{**run_meta(r), "dir": str(r["dir"]), "args": r["args"], "last": r["last"], "best": r["best"],
                         "es_epoch": es_epoch(r), "over_epochs": over_epochs(r)} for r in runs],
               "robustbench": public, "skipped": log.lines, "left_out": log.left_out, "norm": log.norm,
               "other_norm": log.other_norm, "written": written, "versions": vers}
    common.write_json(out / "summary.json", summary)
    print(f"wrote {len(written)} files to {out}")
    return summary


if __name__ == "__main__":
    common.run_cli(main)
