"""Robustness of a checkpoint: clean error, PGD-20 x 10 RLoss/RErr and AutoAttack RErr.

Stutz, Hein & Schiele, ICCV 2021, §4 and Table 1:

    RLoss = (1/N) Σ_n max_{‖δ‖∞ ≤ ε} CE(f(x_n + δ), y_n)      (PGD: per example the max-CE iterate
                                                               over all steps and restarts; --norm l2: ‖δ‖₂)
    RErr  = (1/N) Σ_n [f(x_n) ≠ y_n  or  f(x_n + δ_n) ≠ y_n]  (wrong clean or adversarially)

Usage:   python evaluate.py runs/at/ckpt_last.pt [--use-ema] [--train] [--no-autoattack]
         python evaluate.py --robustbench Carmon2019Unlabeled --model-dir models   # models/cifar10/Linf/<name>.pt
         python evaluate.py --robustbench Rice2020Overfitting --norm l2 --model-dir models   # models/cifar10/L2/<name>.pt
Python:  evaluate.robust_loss_error(model, x, y, **settings) on any nn.Module taking [0, 1] inputs (README
         "Python API"); the command line calls it.
CPU:     python evaluate.py runs/smoke/ckpt_last.pt --n-eval 100 --data-dir ../shared/data/cifar10-jpeg
Writes `eval_<checkpoint>_<hash>.json` beside the checkpoint (e.g. eval_last_1a2b3c4d.json for
ckpt_last.pt), the hash being that of the settings the file records (README "Result files"): a run
with other settings never replaces it, and one with the same settings skips (--force measures again).

The paper's protocol: clean error on the full test set; PGD-20 (step 0.007, ε = 8/255, 10 random
restarts) for RLoss on test images 0…999, split into clean-correct and clean-incorrect examples
(Fig. 2, 5); AutoAttack for RErr on the same images (Table 1), and on train images 0…999 for the
"train" column (--train). The paper's bundled AutoAttack ran APGD-CE, APGD-T and FAB-T without
Square (--aa-version paper); the default is the standard AutoAttack with Square.
--norm l2 (default: the checkpoint's threat model, else linf) attacks the ℓ2 ball instead: PGD-20 × 10 with
ℓ2-normalised gradient steps (ε = 128/255, step 15/255: Rice et al.'s and AWP's values), AutoAttack's L2 version.
--estimator paper-code (ℓ∞ only) estimates RLoss/RErr exactly as the paper's released code did (paper_code_metrics):
its Gaussian ℓ∞-normalised PGD start, ε = 0.0314, per example the restart whose adversarial example makes a wrong
class most probable, and the loss −log(p_y + 1e-12), capped at ≈ 27.63; AutoAttack is unchanged (at that ε).
AutoAttack comes from pyautoattack (PyPI: fra31/auto-attack's attack code behind another wrapper
API) or, when that is not installed, the upstream `autoattack` git package; robust accuracy is
always recomputed by our own eval-mode fp32 forward on the returned x_adv.

Cost (measured): CPU, 1 thread of a shared 2-core machine, width-16 ResNet-18 after 2 epochs of
AT, --n-eval 100, clean on all 10,000 test images: 57 s wall (PGD-20 x 10: 42 s; AutoAttack: 3 s, as
APGD-CE broke every correct point); 2 min 49 s when the machine was busy. Not yet measured on a GPU.
"""
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import types
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common import UsageError, check

# The attacks of each AutoAttack version we offer (the order in which they run).
AA_ATTACKS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
              "paper": ["apgd-ce", "apgd-t", "fab-t"]}  # the paper's bundled copy: Square commented out
# How PGD's RLoss/RErr are estimated: ours (uniform start, per example the max-CE iterate over steps and restarts,
# plain CE) or the paper's released code's (paper_code_metrics: its start, its capped loss, per example the restart
# with the most probable wrong class, ε 0.0314).
ESTIMATORS = ("project", "paper-code")
PAPER_CODE_EPSILON = 0.0314  # the released configs' ε (…_e00314), not 8/255 = 0.031373


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    add_model_source_args(p)
    common.add_runtime_args(p, data_dir=None)
    g = p.add_argument_group("evaluation subsets")
    g.add_argument("--n-eval", type=int, default=1000, help="test images 0…N-1 for PGD and AutoAttack (paper: 1000)")
    g.add_argument("--n-clean", type=int, default=0, help="test images for clean loss/error (0 = the full test set, paper)")
    g.add_argument("--train", action="store_true", help="also attack train images 0…N-1 (Table 1 'train' column)")
    g = p.add_argument_group("attacks")
    g.add_argument("--norm", default=None, choices=tuple(common.THREATS),
                   help="threat model of PGD and AutoAttack: linf ‖δ‖∞ ≤ ε (paper) | l2 ‖δ‖₂ ≤ ε; default: the one our "
                   "checkpoint was trained with, else linf (--robustbench: also which zoo, Linf or L2)")
    g.add_argument("--epsilon", type=common.pixels, default=None,
                   help="radius; None: the --norm's, linf 8/255 (paper; its code 0.0314), l2 128/255 (Rice et al., "
                   "AWP); --estimator paper-code: 0.0314")
    g.add_argument("--attack-step", type=common.pixels, default=None,
                   help="PGD step size; None: linf 0.007 (paper), l2 15/255")
    g.add_argument("--steps", type=int, default=20, help="PGD iterations (paper: 20)")
    g.add_argument("--restarts", type=int, default=10, help="PGD random restarts, per example the max-CE one (paper: 10)")
    g.add_argument("--estimator", default="project", choices=ESTIMATORS,
                   help="PGD's RLoss/RErr: project = uniform start, per example the max-CE iterate over steps and "
                   "restarts, plain CE; paper-code = the paper's released code exactly (Gaussian ℓ∞-normalised start, "
                   "per example the restart with the most probable wrong class, loss −log(p_y + 1e-12) capped at "
                   "27.6, ε 0.0314; ℓ∞ only). AutoAttack is the same under both")
    g.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (PGD only; much faster on a CPU)")
    g.add_argument("--aa-version", default="standard", choices=tuple(AA_ATTACKS),
                   help="standard: APGD-CE, APGD-T, FAB-T, Square; paper: the same without Square (the paper's runs)")
    g.add_argument("--batch-size", type=int, default=128, help="images per attack batch (paper: 128), and the most "
                   "inputs PGD puts through the network at once: a batch's --restarts run in chunks of at most "
                   "--batch-size inputs, so memory does not grow with them (what fits a GPU: docs/speed.md)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="folder for the result file (default: the checkpoint's folder; "
                   "--robustbench: --model-dir)")
    g.add_argument("--force", action="store_true", help="measure again although a result with the same settings exists")
    g.add_argument("--verbose", action="store_true", help="show AutoAttack's per-attack log")
    args = p.parse_args(argv)
    check(args.epsilon is None or args.epsilon > 0,
          f"--epsilon must be in (0, 1] (pixel units, e.g. 8/255), got {args.epsilon}")
    check((args.attack_step is None or args.attack_step > 0) and args.steps >= 0 and args.restarts >= 1,
          "--attack-step must be > 0, --steps >= 0 and --restarts >= 1")
    check(args.n_eval >= 1 and args.n_clean >= 0 and args.batch_size >= 1,
          "--n-eval and --batch-size must be >= 1, --n-clean >= 0")
    check(not (args.use_ema and args.robustbench), "--use-ema needs a checkpoint of this codebase, not --robustbench")
    check(not (args.estimator == "paper-code" and args.norm == "l2"),
          "--estimator paper-code is ℓ∞ only (the paper's code has no ℓ2 attack); drop --norm l2 or the estimator")
    return args


# The flags that determine evaluate.py's numbers, besides the model (README "Result files").
EVAL_SETTINGS = ("n_eval", "n_clean", "train", "norm", "epsilon", "attack_step", "steps", "restarts", "batch_size",
                 "seed", "estimator")


def protocol(args):
    """How evaluate.py measures: EVAL_SETTINGS and the AutoAttack version with its attacks (None: PGD only)."""
    aa = None if args.no_autoattack else args.aa_version
    return {**{k: getattr(args, k) for k in EVAL_SETTINGS}, "autoattack": aa, "aa_attacks": AA_ATTACKS.get(aa)}


def eval_settings(args, info):
    """(settings, non_default) of this evaluation (README "Result files"), after resolve_threat() (--norm, --epsilon
    and --attack-step not given: the model's). `train` only adds the train-image section, so it is no departure
    from the paper's protocol; --norm chooses what is measured, so the protocol it is compared with is that
    norm's (its ε and step). --estimator paper-code is compared with ours: non_default names it (and its ε 0.0314)."""
    resolve_threat(args, info)
    train = ["--train"] if args.train else []
    default = protocol(common.threat_defaults(parse_args(["-", "--norm", args.norm, *train])))
    return result_settings("evaluate.py", "eval", args, info, protocol(args), default)


def norm_of(info):
    """The threat model a model was trained for: our checkpoint's --norm (checkpoints from before --norm: linf),
    else linf (a RobustBench model's is its zoo's, the --norm that chose its file)."""
    return (info.get("args") or {}).get("norm", "linf") if info["source"] == "ours" else "linf"


def resolve_threat(args, info):
    """--norm, --epsilon and --attack-step left unset: the model's threat model (norm_of) and its defaults; with
    --estimator paper-code (ℓ∞ only) ε is the released code's 0.0314 unless given."""
    if getattr(args, "estimator", "project") == "paper-code":  # (a tool without --estimator: ours)
        check((args.norm or norm_of(info)) == "linf", "--estimator paper-code is ℓ∞ only (the paper's code has no "
              "ℓ2 attack), and this checkpoint was trained for --norm l2; give --norm linf or drop the estimator")
        args.epsilon = PAPER_CODE_EPSILON if args.epsilon is None else args.epsilon
    return common.threat_defaults(args, norm_of(info))


# ----------------------------------------------------------------------------------------------
# plumbing: result files that record their settings (README "Result files"); flatness.py uses the same
# functions. A file is named by the tool, the mode, the checkpoint and the hash of its settings, so a
# measurement with other settings lands beside it; one with the same settings finds it and skips.
# ----------------------------------------------------------------------------------------------
def result_folder(args):
    """Where a result goes: --out (evaluate.py), else beside the checkpoint (--robustbench: --model-dir)."""
    return Path(getattr(args, "out", None) or (args.model_dir if args.robustbench else Path(args.checkpoint).parent))


def checkpoint_name(args):
    """The settings' `checkpoint`: `robustbench:NAME`, else the checkpoint's path relative to the result's folder.
    Beside it that is the file name (a short name, and a moved run folder keeps its results); elsewhere (--out) a
    path, so that runs/a/ckpt_last.pt and runs/b/ckpt_last.pt measured into one folder never share a file."""
    if args.robustbench:
        return f"robustbench:{args.robustbench}"
    return Path(os.path.relpath(os.path.abspath(args.checkpoint), os.path.abspath(result_folder(args)))).as_posix()


def result_settings(tool, mode, args, info, how, default):
    """(settings, non_default): which model was measured (checkpoint_name; EMA or not; the architecture flags of
    an external state dict; the data) and how (`how`, the tool's flags); non_default lists the keys of `how` that
    differ from `default`, the paper's protocol."""
    model = {"checkpoint": checkpoint_name(args), "use_ema": args.use_ema, "source": info["source"],
             "arch": info["args"] if info["source"] == "external" else None, "data_dir": str(args.data_dir),
             "dataset": args.dataset}
    return {"tool": tool, "mode": mode, **model, **how}, sorted(k for k in how if how[k] != default[k])


def hashed(settings):
    """The settings a hash is taken of: all, but `norm` only when it is not linf (a result without a norm is an ℓ∞
    one) and `estimator` only when it is not project, so results keep the names they had before --norm and
    --estimator existed and are found as already measured."""
    return {k: v for k, v in settings.items() if not (k == "norm" and v == "linf")
            and not (k == "estimator" and v == "project")}


def settings_hash(settings):
    """8 hex digits of the SHA-256 of the canonical JSON of the settings (keys sorted; hashed())."""
    return hashlib.sha256(json.dumps(hashed(settings), sort_keys=True).encode()).hexdigest()[:8]


def checkpoint_label(checkpoint):
    """A checkpoint's short name, as in result file names and plots.py: `last`, `best`, `epoch045` for
    ckpt_<name>.pt (any other file: its stem), the model's name for `robustbench:NAME`."""
    if checkpoint.startswith("robustbench:"):
        return checkpoint.removeprefix("robustbench:")
    return Path(checkpoint).stem.removeprefix("ckpt_")


def result_path(folder, settings):
    """<folder>/eval_<checkpoint>_<hash>.json or flatness_<mode>_<checkpoint>_<hash>.json; a checkpoint in another
    folder than the result (--out) also names its folder: eval_<folder>_<checkpoint>_<hash>.json."""
    prefix = "eval" if settings["tool"] == "evaluate.py" else f"flatness_{settings['mode']}"
    label, elsewhere = checkpoint_label(settings["checkpoint"]), Path(settings["checkpoint"]).parent.name
    label = f"{elsewhere}_{label}" if elsewhere not in ("", "..") else label  # "": the result lies beside it
    return Path(folder) / f"{prefix}_{label}_{settings_hash(settings)}.json"


def file_sha256(path):
    """SHA-256 of a file's bytes (hex): which state of the checkpoint a result measured."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def already_measured(path, settings, checkpoint_sha256, force=False):
    """True, after one `done:` line, when `path` holds a result with these settings of the checkpoint as it is
    now. With --force, or when the checkpoint changed since (e.g. a resumed run's ckpt_last.pt), it is
    measured again and replaced."""
    if force or not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return False
    check(hashed(old.get("settings") or {}) == hashed(settings),
          f"{path} holds other settings under the same hash; move it aside")
    if old.get("checkpoint_sha256") != checkpoint_sha256:
        print(f"measuring again: {settings['checkpoint']} changed since {path.name} was written "
              f"(then epoch {old.get('epoch')})")
        return False
    print(f"done: {path} (same settings; --force re-measures)")
    return True


def write_result(path, settings, non_default, checkpoint_sha256, result):
    """The result file: settings first, then the checkpoint's fingerprint, then what was measured."""
    common.write_json(path, {"settings": settings, "settings_hash": settings_hash(settings), "non_default": non_default,
                             "checkpoint_sha256": checkpoint_sha256, **result})


# ----------------------------------------------------------------------------------------------
# plumbing: the model under test (a checkpoint of ours, an external state dict, a RobustBench model);
# flatness.py uses the same functions
# ----------------------------------------------------------------------------------------------
def load_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True); a missing or unreadable file is one error line saying what is wrong with it
    and what to do (torch's reasons are internal, and cut to one line they stop mid-sentence)."""
    check(Path(path).is_file(), f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # another pickle protocol: no stray warning line on stderr
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:  # no permission, an I/O error
        raise UsageError(f"{path} cannot be read ({e.strerror or e})")
    except Exception as e:
        with open(path, "rb") as f:
            head, text = f.read(4), str(e)
        zipped, legacy = head == b"PK\x03\x04", head == b"\x80\x02\x8a\x0a"  # torch.save's formats (legacy: < 1.6)
        unsafe, refused = re.search(r"GLOBAL (\S+) was not", text), re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        again = "copy or download it again, or use another checkpoint of the run (ckpt_best.pt, ckpt_epoch*.pt)"
        if unsafe:  # e.g. torch.save(model): weights_only=True runs no pickled code, by design
            why = (f"holds a pickled {unsafe.group(1)}, not only tensors (a whole model saved with torch.save(model)?), "
                   "which torch.load(weights_only=True) does not execute; save its state_dict() and pass that file")
        elif not head or (zipped and not zipfile.is_zipfile(path)) or (  # no zip end record, or the data ends early
                legacy and (isinstance(e, EOFError) or "unexpected EOF" in text)):
            why = f"is {'empty' if not head else 'truncated'} (an interrupted save, copy or download?); {again}"
        elif not (legacy or zipped and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())):
            why = "is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy format); check the path"
        elif refused:
            why = (f"holds data that torch.load(weights_only=True) refuses ({refused.group(1).strip()}; e.g. saved with "
                   "pickle_protocol=4); if you trust the file, load it with weights_only=False and save it again")
        else:
            why = f"is corrupt (torch.save's archive is damaged inside: a failed copy or download?); {again}"
        raise UsageError(f"{path} {why}")
    check(isinstance(ckpt, dict), f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def strip_prefixes(state_dict):
    """Drop `module.` (DDP/DataParallel), `model.` and `_orig_mod.` (torch.compile) prefixes."""
    return {re.sub(r"^(module\.|model\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def state_dict_arch(state_dict):
    """Which of the key layouts of README "Architectures" a state dict is, from its keys and shapes: {arch, width,
    classes} (width: a ResNet's first-stage channels, a WideResNet's K), or None for another layout.
    wrn-D-K: n blocks per stage (block1.layer.0 … n-1) give D = 6n + 4, block1's 16·K channels give K."""
    def shape(key):
        return tuple(state_dict[key].shape) if torch.is_tensor(state_dict.get(key)) else None
    blocks = {int(k.split(".")[2]) for k in state_dict if re.match(r"block1\.layer\.\d+\.", k)}
    if blocks and shape("block1.layer.0.conv1.weight") and shape("fc.weight"):
        widen = shape("block1.layer.0.conv1.weight")[0] // 16
        return {"arch": f"wrn-{6 * len(blocks) + 4}-{widen}", "width": widen, "classes": shape("fc.weight")[0]}
    blocks = {k.split(".")[1] for k in state_dict if re.match(r"layer[1-4]\.\d+\.", k)}
    if blocks == {"0", "1"} and shape("conv1.weight") and shape("linear.weight"):  # 2 blocks per stage: 18 layers
        arch = "resnet18" if "bn1.weight" in state_dict else "preact-resnet18" if "bn.weight" in state_dict else None
        return arch and {"arch": arch, "width": shape("conv1.weight")[0], "classes": shape("linear.weight")[0]}
    return None


def describe_arch(found):
    """`resnet18 of width 64 with 10 classes`, `wrn-34-10 with 10 classes` (K is in the name)."""
    width = "" if found["arch"].startswith("wrn-") else f" of width {found['width']}"
    return f"{found['arch']}{width} with {found['classes']} classes"


def load_weights(model, state_dict):
    """Load a state dict that may carry wrapper prefixes. A mismatch names the keys and what to change: the
    architecture and width its keys are (state_dict_arch) when they are another known layout, else the flag."""
    state_dict, own = strip_prefixes(state_dict), model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        found = "; ".join(f"{what} {', '.join(keys[:4])}" + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                          for what, keys in (("missing", missing), ("unexpected", unexpected),
                                             ("shape mismatch", shapes)) if keys)
        have, built = state_dict_arch(state_dict), state_dict_arch(own)
        if have and built and (have["arch"], have["width"]) != (built["arch"], built["width"]):
            flags = f"--arch {have['arch']}" + ("" if have["arch"].startswith("wrn-") else f" --arch-width {have['width']}")
            raise UsageError(f"checkpoint does not fit the model: its keys are a {describe_arch(have)}, the model "
                             f"built is a {describe_arch(built)}; give {flags} ({found})")
        hint = []
        if any(k.startswith("normalize.") for k in missing):
            hint.append("--normalization none or dataset if the checkpoint has no normalisation layer")
        if have and built and have["classes"] != built["classes"]:
            hint.append(f"the --dataset it was trained on (its head has {have['classes']} classes, the model's "
                        f"{built['classes']})")
        if hint:
            tail = "try " + " or ".join(hint)
        elif have is None:
            tail = "its keys are none of the key layouts of README 'Architectures' (resnet18, preact-resnet18, wrn-D-K)"
        else:
            tail = f"otherwise its keys are the model's layout ({describe_arch(have)})"
        raise UsageError(f"checkpoint does not fit the model: {found}; {tail}")
    model.load_state_dict(state_dict)


def model_from_checkpoint(path, device, use_ema=False):
    """Rebuild the model from a checkpoint of ours (its args hold the architecture)."""
    ckpt = load_checkpoint(path, device)
    check("model" in ckpt and "args" in ckpt, f"{path} is not a checkpoint of this codebase "
          "(no 'model'/'args'); for external state dicts use evaluate.py's --arch flags")
    check(not use_ema or "ema" in ckpt, f"{path} has no EMA weights (train with --ema to get them)")
    model = common.build_model(ckpt["args"]).to(device)
    load_weights(model, ckpt["ema"] if use_ema else ckpt["model"])
    return model.eval(), ckpt


# RobustBench's CIFAR-10 L∞ zoo entries that are one of our architectures in the same key layout, so they load
# from RobustBench's file layout <model-dir>/cifar10/Linf/<name>.pt without the robustbench package (README
# "evaluate.py"). From RobustBench's robustbench/model_zoo/cifar10.py (`linf`) and the classes it builds:
# `WideResNet(depth, widen_factor, sub_block1)` of architectures/wide_resnet.py (ReLU, the TRADES block: a 1×1
# convShortcut on the activated input, avg-pool 8, `fc` with bias) is our wrn-D-K; `ResNet18()` of
# architectures/resnet.py (post-activation BasicBlock, shortcut.0/.1, `linear`) is our resnet18 at width 64.
# Left out: its PreActResNet entries (a shortcut on the raw input, no final BN: not our preact-resnet18), DM
# WideResNets and PreActResNets (Swish/SiLU, own layout), PSSiLU, ResNet-50, ResNeSt, XCiT, SODEF, RobustWideResNet,
# ensembles, Pang2020Boosting (normalised features, no fc bias) and Ding2020MMA (per-image normalisation).
# name → (arch, sub_block1, input normaliser: None = the network takes [0, 1] inputs, else the class's (mean, std)).
RB_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))  # Rice2020Overfitting, Chen2020Efficient
RB_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))                          # Hendrycks2019Using: 2x − 1
ROBUSTBENCH_TABLE = {
    "Carmon2019Unlabeled": ("wrn-28-10", True, None),
    "Sehwag2020Hydra": ("wrn-28-10", True, None),
    "Wang2020Improving": ("wrn-28-10", True, None),
    "Hendrycks2019Using": ("wrn-28-10", False, RB_HALF),
    "Rice2020Overfitting": ("wrn-34-20", False, RB_CIFAR_STATS),
    "Zhang2019Theoretically": ("wrn-34-10", True, None),
    "Huang2020Self": ("wrn-34-10", True, None),
    "Zhang2019You": ("wrn-34-10", True, None),
    "Zhang2020Attacks": ("wrn-34-10", True, None),
    "Wu2020Adversarial_extra": ("wrn-28-10", True, None),
    "Wu2020Adversarial": ("wrn-34-10", False, None),
    "Sehwag2021Proxy": ("wrn-34-10", False, None),
    "Sehwag2021Proxy_R18": ("resnet18", False, None),
    "Sitawarin2020Improving": ("wrn-34-10", True, None),
    "Chen2020Efficient": ("wrn-34-10", True, RB_CIFAR_STATS),
    "Cui2020Learnable_34_20": ("wrn-34-20", True, None),
    "Cui2020Learnable_34_10": ("wrn-34-10", True, None),
    "Zhang2020Geometry": ("wrn-28-10", True, None),
    "Sridhar2021Robust": ("wrn-28-10", True, None),
    "Sridhar2021Robust_34_15": ("wrn-34-15", True, None),
    "Addepalli2021Towards_RN18": ("resnet18", False, None),
    "Addepalli2021Towards_WRN34": ("wrn-34-10", True, None),
    "Chen2021LTD_WRN34_10": ("wrn-34-10", False, None),
    "Chen2021LTD_WRN34_20": ("wrn-34-20", False, None),
    "Standard": ("wrn-28-10", False, None),
    "Jia2022LAS-AT_34_10": ("wrn-34-10", False, None),
    "Jia2022LAS-AT_70_16": ("wrn-70-16", False, None),
    "Addepalli2022Efficient_RN18": ("resnet18", False, None),
    "Addepalli2022Efficient_WRN_34_10": ("wrn-34-10", False, None),
}
# Its CIFAR-10 L2 zoo entries of these architectures (`l2` in the same file), in <model-dir>/cifar10/L2/<name>.pt;
# besides `WideResNet` and `ResNet18()`, its Rice2020OverfittingNetL2 is a PreActResNet of PreActBlockV2 blocks (the
# 1×1 shortcut on the activated input) with `bn` before `linear`: our preact-resnet18 at width 64. Left out: ResNet-50s
# (Engstrom2019Robustness, Augustin2020Adversarial), Ding2020MMA (per-image normalisation), DM WideResNets and
# PreActResNets (Swish/SiLU), MeanSparse.
RB_AUGUSTIN = ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),
               (0.24703225141799082, 0.24348516474564, 0.26158783926049628))
ROBUSTBENCH_L2_TABLE = {
    "Rice2020Overfitting": ("preact-resnet18", False, RB_CIFAR_STATS),
    "Rony2019Decoupling": ("wrn-28-10", False, ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))),
    "Standard": ("wrn-28-10", False, None),
    "Wu2020Adversarial": ("wrn-34-10", False, None),
    "Augustin2020Adversarial_34_10": ("wrn-34-10", False, RB_AUGUSTIN),
    "Augustin2020Adversarial_34_10_extra": ("wrn-34-10", False, RB_AUGUSTIN),
    "Sehwag2021Proxy": ("wrn-34-10", False, None),
    "Sehwag2021Proxy_R18": ("resnet18", False, None),
}
RB_THREAT = {"linf": "Linf", "l2": "L2"}  # --norm → RobustBench's threat model (its folder and zoo)


def robustbench_table(norm):
    """The entries of the --norm's zoo that load without the robustbench package."""
    return ROBUSTBENCH_TABLE if norm == "linf" else ROBUSTBENCH_L2_TABLE


ROBUSTBENCH_ZOO = "the RobustBench model zoo (github.com/RobustBench/robustbench: robustbench/model_zoo/cifar10.py " \
                  "holds each entry's download id)"


def robustbench_file(model_dir, name, norm="linf"):
    """RobustBench's own layout: <model-dir>/cifar10/Linf/<name>.pt (--norm l2: cifar10/L2/<name>.pt)."""
    return Path(model_dir) / "cifar10" / RB_THREAT[norm] / f"{name}.pt"


def robustbench_from_table(name, model_dir, device, norm="linf"):
    """A ROBUSTBENCH_TABLE entry from its file, without the robustbench package: the file read with
    torch.load(weights_only=True), a 'state_dict' wrapper and module./model. prefixes dropped, our architecture
    built by common.build_model and loaded strictly. The class's mean/std buffers (mu, sigma) are taken from the
    file where it has them and from the table where not (RobustBench loads those files non-strictly)."""
    arch, sub_block1, stats = robustbench_table(norm)[name]
    path = robustbench_file(model_dir, name, norm)
    check(path.is_file(), f"--robustbench {name}: no file {path}; download {name}.pt (CIFAR-10, {RB_THREAT[norm]}) from "
          f"{ROBUSTBENCH_ZOO} into {path.parent}")
    ckpt = load_checkpoint(path, device)
    state = ckpt.get("state_dict", ckpt)
    check(isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()),
          f"{path} is not a state dict of tensors (RobustBench's files are, raw or under 'state_dict')")
    state = strip_prefixes(state)
    model_args = {"arch": arch, "width": 64, "act": "relu", "sub_block1": sub_block1,
                  "normalization": "none" if stats is None else {"mean": list(stats[0]), "std": list(stats[1])}}
    model = common.build_model(model_args, normalize=stats is not None, sub_block1=sub_block1).to(device)
    if stats is not None:
        own = {"mean": state.pop("mu", None), "std": state.pop("sigma", None)}
        for key, values in zip(("mean", "std"), stats):
            given = own[key] if own[key] is not None else torch.tensor(values, device=device)
            state[f"normalize.{key}"] = given.reshape(model.normalize.mean.shape).to(model.normalize.mean.dtype)
    load_weights(model, state)
    return model.eval(), {"source": "robustbench", "name": name, "epoch": None, "args": model_args,
                          "loader": "table", "file": str(path)}


def first_line(error):
    """An exception's message, its first line and at most 200 characters (error lines are one line)."""
    return (str(error).splitlines() or [""])[0][:200]


def robustbench_with_package(name, model_dir, device, norm="linf"):
    """Any other zoo entry, through the robustbench package where it imports; one error line where not."""
    known = robustbench_table(norm)
    table = f"{len(known)} {RB_THREAT[norm]} entries load without it: {', '.join(known)}"
    try:
        from robustbench.utils import load_model as rb_load
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] == "robustbench":  # not installed
            raise UsageError(f"--robustbench {name}: not one of the entries this project loads itself, and the "
                             f"robustbench package is not installed (pip install robustbench 'setuptools<81' "
                             f"git+https://github.com/fra31/auto-attack: robustbench 1.1.1 needs both); {table}")
        raise UsageError(f"--robustbench {name}: the robustbench package is installed but does not import "
                         f"({type(e).__name__}: {first_line(e)}); robustbench 1.1.1 needs pkg_resources (pip install "
                         f"'setuptools<81') and the upstream autoattack package (pip install "
                         f"git+https://github.com/fra31/auto-attack); or use one of the {table}")
    try:
        model = rb_load(model_name=name, model_dir=model_dir, dataset="cifar10", threat_model=RB_THREAT[norm])
    except KeyError:
        raise UsageError(f"--robustbench {name}: no such CIFAR-10 {RB_THREAT[norm]} model in RobustBench's zoo")
    except Exception as e:  # a download that failed (no network), a file that does not fit its class
        raise UsageError(f"--robustbench {name}: robustbench could not load it ({type(e).__name__}: "
                         f"{first_line(e)}); place {name}.pt from "
                         f"{ROBUSTBENCH_ZOO} at {robustbench_file(model_dir, name, norm)}")
    path = robustbench_file(model_dir, name, norm)
    return model.to(device).eval(), {"source": "robustbench", "name": name, "epoch": None, "args": None,
                                     "loader": "robustbench", "file": str(path) if path.is_file() else None}


def add_model_source_args(parser):
    """evaluate.py / flatness.py: a checkpoint of ours (architecture from its args), an external state dict
    (architecture from these flags), or a RobustBench model."""
    parser.add_argument("checkpoint", nargs="?", help="checkpoint of ours, or an external state dict (--arch)")
    g = parser.add_argument_group("model source")
    g.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights saved with train_*.py --ema")
    # (None = not given: our checkpoints carry their architecture and refuse flags that contradict it; external state
    # dicts take EXTERNAL_DEFAULTS)
    g.add_argument("--arch", type=common.parse_arch, default=None,
                   help="external state dicts: resnet18 (default) | preact-resnet18 | wrn-D-K, in the public key "
                        "layouts (README 'Architectures'); our checkpoints carry their own")
    g.add_argument("--arch-width", type=int, default=None,
                   help="external state dicts: ResNet width, the first stage's channels (default 64)")
    g.add_argument("--arch-act", default=None, choices=tuple(common.ACTIVATIONS),
                   help="external state dicts: activation (default relu)")
    g.add_argument("--normalization", default="auto", choices=("auto", "none", "dataset"),
                   help="external state dicts: auto = the normaliser inside the model when the keys have one "
                        "(normalize.mean/std), else none; none = the network takes [0, 1] inputs (TRADES, MART, AWP "
                        "WRNs); dataset = the --dataset's mean/std in front (Rice et al.'s code). Recorded in results")
    g.add_argument("--robustbench", metavar="NAME",
                   help="a RobustBench CIFAR-10 Linf model (--norm l2: L2) instead of a checkpoint, from "
                        f"<model-dir>/cifar10/Linf/NAME.pt or L2/NAME.pt ({len(ROBUSTBENCH_TABLE)} Linf and "
                        f"{len(ROBUSTBENCH_L2_TABLE)} L2 WRN/ResNet-18 entries load without the robustbench package, "
                        "README 'Public robust models')")
    g.add_argument("--model-dir", default="models", help="RobustBench's model folder (its layout: cifar10/Linf/NAME.pt, "
                   "cifar10/L2/NAME.pt); --robustbench results go here")
    return g


def model_sha256(args, info):
    """SHA-256 of the measured file: the checkpoint, or a RobustBench model's file (None if the package keeps it
    elsewhere)."""
    if args.robustbench:
        return file_sha256(info["file"]) if info.get("file") else None
    return file_sha256(args.checkpoint)


def data_dir_of(args, info):
    """--data-dir if given, else the data our checkpoint was trained on (its args), else ./data."""
    trained_on = (info.get("args") or {}).get("data_dir") if info["source"] == "ours" else None
    return args.data_dir or trained_on or common.absolute_path("data")


def dataset_of(args, info):
    """--dataset if given, else the one our checkpoint was trained on (its args; checkpoints from before
    --dataset are CIFAR-10's), else cifar10."""
    trained_on = (info.get("args") or {}).get("dataset") if info["source"] == "ours" else None
    return args.dataset or trained_on or "cifar10"


EXTERNAL_DEFAULTS = {"arch": "resnet18", "arch_width": 64, "arch_act": "relu"}  # an external state dict's flags


def check_arch_flags(args, path, recorded):
    """Architecture flags given with one of our checkpoints must agree with the architecture its args record (they
    would be ignored): a contradiction is an error naming the checkpoint's. A WideResNet's width is its K."""
    arch = recorded.get("arch", "resnet18")  # checkpoints from before --arch are ResNet-18s
    width = int(arch.split("-")[2]) if arch.startswith("wrn-") else recorded.get("width")
    normalization = "none" if recorded.get("no_normalize") else "inside"
    trained = f"--arch {arch}" + ("" if arch.startswith("wrn-") else f" --width {width}") + \
        f" --act {recorded.get('act')}" + (", the input normaliser inside" if normalization == "inside" else "")
    for flag, given, own in (("--arch", args.arch, arch), ("--arch-width", args.arch_width, width),
                             ("--arch-act", args.arch_act, recorded.get("act")),
                             ("--normalization", args.normalization, normalization)):
        check(given in (None, "auto", own), f"{path} is a checkpoint of this codebase, trained with {trained} (its "
              f"args); drop {flag} {given}: the --arch flags and --normalization are for external state dicts")


def load_model(args, device):
    """(model in eval mode, info dict for result files) from the flags of add_model_source_args."""
    if args.robustbench:  # the table's entries without the package (README "evaluate.py"), others through it
        norm = args.norm or "linf"  # which zoo: a RobustBench model's threat model is --norm's
        load = robustbench_from_table if args.robustbench in robustbench_table(norm) else robustbench_with_package
        return load(args.robustbench, args.model_dir, device, norm)
    check(args.checkpoint, "give a checkpoint path (or --robustbench NAME)")
    ckpt = load_checkpoint(args.checkpoint, device)
    if "model" in ckpt and "args" in ckpt:  # ours
        check_arch_flags(args, args.checkpoint, ckpt["args"])
        model, ckpt = model_from_checkpoint(args.checkpoint, device, use_ema=args.use_ema)
        return model, {"source": "ours", "epoch": ckpt.get("epoch"), "args": ckpt["args"]}
    check(not args.use_ema, "--use-ema needs a checkpoint of this codebase")
    state = ckpt.get("state_dict", ckpt)
    check(all(torch.is_tensor(v) for v in state.values()), f"{args.checkpoint} is not a state dict of tensors")
    state = strip_prefixes(state)
    inside = "normalize.mean" in state
    check(not inside or args.normalization == "auto", f"{args.checkpoint} carries its own input normaliser "
          f"(normalize.mean/std); drop --normalization {args.normalization}")
    normalization = "inside" if inside else "none" if args.normalization == "auto" else args.normalization
    arch, width, act = (EXTERNAL_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                        for k in ("arch", "arch_width", "arch_act"))
    model_args = {"arch": arch, "width": width, "act": act, "normalization": normalization,
                  "dataset": args.dataset or "cifar10"}  # (classes and, for `dataset`, the normaliser)
    model = common.build_model(model_args, normalize=normalization != "none",
                               sub_block1=any(k.startswith("sub_block1.") for k in state)).to(device)
    if normalization == "dataset":  # the normaliser the checkpoint's own code applied outside the network
        state = {**state, **{f"normalize.{k}": v for k, v in model.normalize.state_dict().items()}}
    load_weights(model, state)
    return model.eval(), {"source": "external", "epoch": None, "normalize": normalization != "none",
                          "args": model_args}


# ----------------------------------------------------------------------------------------------
# PGD: RLoss and RErr, split by clean correctness (Fig. 2, 5)
# ----------------------------------------------------------------------------------------------
def mean(values):
    """Mean in float64 (fp32 sums drift at 10,000 terms); None for an empty group (null in JSON)."""
    return values.double().mean().item() if len(values) else None


def error_rate(ok):
    """Fraction of examples not `ok`, as an exact count / n."""
    return int((~ok).sum()) / len(ok)


def pgd_metrics(model, x, y, args, progress=False):
    """RLoss/RErr of PGD-`steps` × `restarts` (per example the max-CE iterate) in the --norm ball, or with estimator
    paper-code the released code's estimate (paper_code_metrics). `args`: anything with the attributes norm,
    epsilon, attack_step, steps, restarts, batch_size, seed and estimator (the flags, or robust_loss_error's
    settings). Returns the JSON section, the per-example clean and robust correctness (for the union with
    AutoAttack) and the per-example robust loss (CE; paper-code: capped_ce)."""
    t0 = time.time()
    _, clean_ok = common.clean_metrics(model, x, y, args.batch_size)
    common.seed_everything(args.seed)  # the random starts are reproducible per subset
    if args.estimator == "paper-code":
        rloss, robust_ok = paper_code_metrics(model, x, y, args.epsilon, args.attack_step, args.steps, args.restarts,
                                              args.batch_size, progress=progress, clean_ok=clean_ok)
    else:
        rloss, robust_ok = common.robust_metrics(model, x, y, args.epsilon, args.attack_step, args.steps,
                                                 args.restarts, args.batch_size, progress=progress, clean_ok=clean_ok,
                                                 norm=args.norm)
    section = {"rloss": mean(rloss), "rerr": error_rate(robust_ok),
               "rloss_correct": mean(rloss[clean_ok]), "rloss_incorrect": mean(rloss[~clean_ok]),
               "n_correct": int(clean_ok.sum()), "n_incorrect": int((~clean_ok).sum()), "n": len(y),
               "clean_err": error_rate(clean_ok), "time_s": time.time() - t0}
    return section, clean_ok, robust_ok, rloss


# ----------------------------------------------------------------------------------------------
# --estimator paper-code: RLoss and RErr as the paper's released code (davidstutz/robust-generalization-flatness)
# estimated them, which differs from ours in its loss, its PGD start, its ε (PAPER_CODE_EPSILON) and which restart
# it keeps per example. ℓ∞ only: the released code has no ℓ2 attack. flatness.py uses these functions too.
# ----------------------------------------------------------------------------------------------
def capped_ce(logits, y):
    """Per-example −log(softmax(logits)_y + 1e-12) in float32: the released code's robust loss, computed from the
    stored softmax probabilities (common/eval/adversarial_evaluation.py). The 1e-12 caps it at −ln 1e-12 ≈ 27.63,
    where the cross-entropy has no ceiling."""
    p_y = torch.softmax(logits.float(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return -torch.log(p_y + 1e-12)


def paper_code_start(x, eps):
    """The released code's ℓ∞ random start (attacks/initializations.py LInfUniformNormInitialization, via
    common/numpy.py uniform_norm): per example g ~ N(0, I) over all its coordinates, divided by ‖g‖∞, times ε and
    one u ~ U(0, 1), so ‖δ‖∞ = ε·u and most coordinates start near x (ours: U(−ε, ε) per coordinate). Drawn from
    torch's global RNG, all of g and then all u: common.seed_everything(seed) makes it reproducible."""
    g = torch.randn_like(x)
    u = torch.rand(len(x), device=x.device, dtype=x.dtype)
    per_example = (-1, *[1] * (x.dim() - 1))
    return g / g.flatten(1).abs().amax(1).view(per_example) * eps * u.view(per_example)  # g/‖g‖∞ is ±1 at its max


def paper_code_pgd(model, x, y, eps, alpha, steps, restarts, max_inputs):
    """The released code's PGD (attacks/batch_gradient_descent.py: signed gradient, no momentum), `restarts` times
    from paper_code_start, in eval mode with the weights frozen: each iterate, the start included, is projected onto
    [0, 1] and then onto the ε-box before its forward pass; per example the iterate with the highest CE is kept (a
    later one only when strictly higher). Returns the logits there, (restarts, N, classes). Restarts run in chunks of
    at most `max_inputs` inputs, every start drawn before the first chunk (the chunking changes no random number)."""
    b, ones = len(y), [1] * (x.dim() - 1)
    starts = paper_code_start(x.repeat(restarts, *ones), eps)  # restart r: rows r·b … (r+1)·b − 1
    n = max(1, min(restarts, max_inputs // b))  # restarts per chunk
    chosen = []
    with common.bn_mode(model, "eval"), common.frozen_params(model), torch.enable_grad():
        for r in range(0, restarts, n):
            m = min(n, restarts - r)
            xr, yr, delta = x.repeat(m, *ones), y.repeat(m), starts[r * b:(r + m) * b]
            for t in range(steps + 1):  # the last pass only scores the final iterate
                with torch.no_grad():
                    delta = ((xr + delta).clamp(0, 1) - xr).clamp(-eps, eps).requires_grad_(t < steps)
                with torch.set_grad_enabled(t < steps):
                    logits = model(xr + delta)
                    loss = common.cross_entropy_each(logits, yr)
                if t == 0:
                    best_loss, best_logits = loss.detach(), logits.detach()
                else:
                    better = loss.detach() > best_loss
                    best_loss = torch.where(better, loss.detach(), best_loss)
                    best_logits = torch.where(better.view(-1, 1), logits.detach(), best_logits)
                if t < steps:
                    (grad,) = torch.autograd.grad(loss.sum(), delta)
                    with torch.no_grad():  # δ + α·sign(∇CE); the next pass projects it as above
                        delta = common.ascent_step(delta, grad, eps, alpha)
            chosen.append(best_logits)
    return torch.cat(chosen).view(restarts, b, -1)


def most_wrong_restart(logits, y):
    """Per example the restart whose adversarial example gives a wrong class the highest softmax probability: the
    released notebook's choice (common/eval/adversarial_evaluation.py: errors = −max wrong-class probability, argmin
    over the attempts, the first on a tie), not the restart of highest CE. `logits`: (restarts, N, classes); returns
    the chosen restart's logits, (N, classes)."""
    p = torch.softmax(logits, dim=-1)
    p_wrong = p.masked_fill(F.one_hot(y, p.shape[-1]).bool(), -1).amax(-1)  # (restarts, N)
    return logits[p_wrong.argmax(0), torch.arange(len(y), device=y.device)]


def paper_code_metrics(model, x, y, eps, alpha, steps, restarts, batch_size, progress=False, clean_ok=None):
    """Per example the released code's robust loss and correctness, PGD-`steps` × `restarts` (step `alpha`) in the
    ℓ∞ ball of radius `eps`: paper_code_pgd, the restart most_wrong_restart chooses, its capped_ce, and correct =
    correct on the clean input and on that adversarial example (the argmax of its probabilities). `clean_ok`: the
    clean correctness, if known; for a perturbed model the released code counts the unperturbed model's clean
    predictions, so flatness.py passes those. At most `batch_size` inputs go through the network at once.
    Returns (losses, correct)."""
    losses, correct = [], []
    for i in common.progress_loop(range(0, len(y), batch_size), f"PGD-{steps}x{restarts} (paper code)",
                                  disable=not progress):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = most_wrong_restart(paper_code_pgd(model, xb, yb, eps, alpha, steps, restarts, batch_size), yb)
        if clean_ok is None:
            with torch.no_grad(), common.bn_mode(model, "eval"):
                ok = model(xb).argmax(1) == yb
        else:
            ok = clean_ok[i:i + batch_size]
        losses.append(capped_ce(adv, yb))
        correct.append(ok & (torch.softmax(adv, dim=1).argmax(1) == yb))
    return torch.cat(losses), torch.cat(correct)


# ----------------------------------------------------------------------------------------------
# AutoAttack: an adapter for the two packagings, then our own forward on x_adv
# ----------------------------------------------------------------------------------------------
def make_autoattack(model, eps, version, device, seed, verbose=False, norm="linf"):
    """(AutoAttack object, run(x, y, batch_size) -> x_adv, package name); `norm` l2: AutoAttack's L2 version.
    pyautoattack (PyPI) has keyword-only arguments, `attacks=`, no `verbose`, logs to the
    'auto-attack' logger and returns (x_adv, y_adv); the upstream git package takes
    `attacks_to_run=`, `verbose=`, `bs=` and returns x_adv. The attack code is the same."""
    try:
        from pyautoattack import AutoAttack
        package = "pyautoattack"
    except ImportError:
        try:
            from autoattack import AutoAttack
            package = "autoattack"
        except ImportError:
            raise UsageError("AutoAttack needs the pyautoattack package (pip install pyautoattack) "
                             "or fra31/auto-attack; or pass --no-autoattack")
    kwargs = dict(norm=RB_THREAT[norm], eps=eps, device=device, seed=seed)  # (AutoAttack's names: Linf, L2)
    if version == "paper":  # a custom attack list; the attacks' parameters are set below
        kwargs.update(version="custom", **{"attacks" if package == "pyautoattack" else "attacks_to_run": AA_ATTACKS[version]})
    else:
        kwargs.update(version="standard")
    if package == "pyautoattack":
        aa = AutoAttack(model, **kwargs)
        logger = logging.getLogger("auto-attack")  # pyautoattack logs its progress at DEBUG
        logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        if verbose and not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("auto-attack: %(message)s"))
            logger.addHandler(handler)
    else:
        aa = AutoAttack(model, verbose=verbose, **kwargs)
    if version == "paper":
        # version='custom' keeps the constructor's defaults (APGD-CE and FAB with 5 restarts);
        # set what set_version('standard') sets for these attacks (L∞ and L2 alike), as the paper's copy did:
        # APGD-CE 1 restart; APGD-T and FAB-T 1 restart, 9 target classes; 100 iterations each.
        aa.apgd.n_restarts = 1
        aa.apgd_targeted.n_restarts = 1
        aa.apgd_targeted.n_target_classes = 9
        aa.fab.n_restarts = 1
        aa.fab.n_target_classes = 9
    if package == "pyautoattack":
        def run(x, y, batch_size):
            return aa.run_standard_evaluation(x, y, batch_size=batch_size)[0]
    else:
        def run(x, y, batch_size):
            return aa.run_standard_evaluation(x, y, bs=batch_size)
    return aa, run, package


def autoattack_metrics(model, x, y, clean_ok, pgd_ok, args, device, progress=False):
    """RErr under AutoAttack, counted by our own eval-mode forward on x_adv: an example is wrong if it is
    wrong clean or on x_adv; `rerr_any` also counts PGD's adversarial examples. Returns the JSON section and
    the per-example correctness under AutoAttack (clean and on x_adv)."""
    t0 = time.time()
    common.seed_everything(args.seed)
    aa, run, package = make_autoattack(model, args.epsilon, args.aa_version, device, args.seed, args.verbose, args.norm)
    # one call per batch of --batch-size images, as the paper's code did (batches of 128), so the
    # progress bar moves; each attack reseeds itself per batch either way. The weights are frozen
    # meanwhile: the attacks' backward passes then compute input gradients only.
    with common.frozen_params(model):
        x_adv = torch.cat([run(x[i:i + args.batch_size], y[i:i + args.batch_size], args.batch_size)
                           for i in common.progress_loop(range(0, len(y), args.batch_size), "AutoAttack batches",
                                                         disable=not progress)])
    max_linf = (x_adv - x).abs().amax().item()
    max_l2 = (x_adv - x).flatten(1).norm(dim=1).amax().item()
    largest = max_linf if args.norm == "linf" else max_l2
    if largest > args.epsilon + 1e-6 or x_adv.min() < 0 or x_adv.max() > 1:
        print(f"warning: AutoAttack returned ‖x_adv − x‖ = {largest:.6f} > ε = {args.epsilon:.6f} ({args.norm}) or "
              "pixels outside [0, 1]; projected back before counting", file=sys.stderr)
        x_adv = (x + common.project(x_adv - x, args.epsilon, args.norm)).clamp(0, 1)
    _, aa_ok = common.clean_metrics(model, x_adv, y, args.batch_size)
    robust_ok = clean_ok & aa_ok
    return {"rerr": error_rate(robust_ok), "rerr_any": error_rate(robust_ok & pgd_ok),
            "n": len(y), "max_linf": max_linf, "max_l2": max_l2, "package": package, "time_s": time.time() - t0}, \
        robust_ok


def attack_subset(model, x, y, args, progress):
    """PGD and (unless --no-autoattack) AutoAttack on one fixed subset: robust_loss_error with the flags'
    settings, as the result file's sections."""
    r = robust_loss_error(model, x, y, progress=progress, verbose=args.verbose, **api_settings_of(args))
    return {"pgd": r.pgd, "autoattack": r.autoattack}


# ----------------------------------------------------------------------------------------------
# Python API (README "Python API"): RLoss and RErr of any nn.Module that takes [0, 1] inputs. The command
# line calls robust_loss_error too (attack_subset); flatness.py's API shares the checks below.
# ----------------------------------------------------------------------------------------------
class SettingError(UsageError, ValueError):
    """A bad setting or input of the Python API: a ValueError to Python callers, one `error:` line from the
    command line (a UsageError)."""


def settings_with_defaults(function, defaults, settings):
    """The defaults (the paper's, from the command line's) updated by `settings`; an unknown key is refused
    with the known ones named."""
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise SettingError(f"{function}: unknown setting {', '.join(map(repr, unknown))}; "
                           f"the settings are {', '.join(defaults)}")
    return {**defaults, **settings}


def require(function, condition, message):
    if not condition:
        raise SettingError(f"{function}: {message}")


def is_int(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def check_attack(function, s):
    """The PGD settings every measure shares."""
    require(function, is_real(s["epsilon"]) and 0 < s["epsilon"] <= 1,
            f"epsilon must be in (0, 1] (pixel units, e.g. 8/255), got {s['epsilon']!r}")
    require(function, is_real(s["attack_step"]) and s["attack_step"] > 0,
            f"attack_step must be > 0, got {s['attack_step']!r}")
    require(function, is_int(s["steps"], 0), f"steps must be an integer >= 0, got {s['steps']!r}")
    require(function, is_int(s["batch_size"], 1), f"batch_size must be an integer >= 1, got {s['batch_size']!r}")
    require(function, is_int(s["seed"], 0), f"seed must be an integer >= 0, got {s['seed']!r}")


def check_inputs(function, model, x, y):
    """A module, images in [0, 1] (N, ...) and N integer labels, on the model's device."""
    require(function, isinstance(model, torch.nn.Module),
            f"model must be a torch.nn.Module, got {type(model).__name__}")
    require(function, torch.is_tensor(x) and torch.is_tensor(y), "x and y must be tensors")
    require(function, x.is_floating_point(), f"x must be float images in [0, 1], got dtype {x.dtype}")
    require(function, not y.is_floating_point() and y.dtype != torch.bool and y.dim() == 1,
            f"y must be a 1-D tensor of integer class labels, got dtype {y.dtype} and shape {tuple(y.shape)}")
    require(function, len(x) == len(y) >= 1, f"x and y must hold the same number (>= 1) of examples, "
            f"got {len(x)} and {len(y)}")
    low, high = (v.item() for v in torch.aminmax(x))
    require(function, low >= 0 and high <= 1,
            f"x must be in [0, 1] (the model normalises inside), got values in [{low:.3g}, {high:.3g}]")
    param = next(model.parameters(), None)
    require(function, param is None or param.device == x.device,
            f"x is on {x.device} but the model on {param.device if param is not None else '?'}")


@contextlib.contextmanager
def model_kept(model):
    """Every module's train/eval mode and every parameter's requires_grad as they were, afterwards; gradients
    enabled inside (a caller's torch.no_grad() does not reach the attacks). The measures never write a weight
    (the perturbed models are functional calls), so the weights stay bit-identical."""
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    try:
        with torch.enable_grad():
            yield model
    finally:
        for m, t in zip(model.modules(), modes):
            m.training = t
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)


# robust_loss_error's settings: the command line's flags of the same names, autoattack = None (PGD only),
# "standard" or "paper" (the --aa-version choices)
ROBUST_SETTINGS = ("norm", "epsilon", "attack_step", "steps", "restarts", "batch_size", "seed", "estimator",
                   "autoattack")


def api_settings_of(args):
    """robust_loss_error's settings from evaluate.py's flags."""
    return {**{k: getattr(args, k) for k in ROBUST_SETTINGS[:-1]},
            "autoattack": None if args.no_autoattack else args.aa_version}


@dataclasses.dataclass
class Robustness:
    """What robust_loss_error returns (README "Python API").
    rloss: RLoss, the mean over examples of the highest cross-entropy over PGD's iterates and restarts (estimator
    "paper-code": of the capped loss of the restart paper_code_metrics chooses);
    rerr: RErr, the fraction wrong on the clean or an adversarial input (AutoAttack's where it ran, else PGD's);
    pgd, autoattack: the sections of evaluate.py's result file (RLoss split by clean correctness, n, times;
    autoattack None when not run); losses, robust_ok: per example the robust loss and whether it stayed
    correct (clean and adversarially: under AutoAttack where it ran, else under PGD); settings: every setting
    used, defaults filled in."""
    rloss: float
    rerr: float
    pgd: dict
    autoattack: dict | None
    losses: torch.Tensor
    robust_ok: torch.Tensor
    settings: dict


def robust_loss_error(model, x, y, progress=False, verbose=False, **settings):
    """RLoss and RErr of `model` (any nn.Module mapping [0, 1] images to logits) on (x, y), in eval mode and
    as the model's dtype: PGD-`steps` × `restarts` (per example its highest-CE iterate) and, with
    autoattack="standard" or "paper", AutoAttack on the same examples. Settings and their defaults (the
    paper's, §4): norm="linf", epsilon=8/255, attack_step=0.007 (norm="l2": 128/255, 15/255), steps=20,
    restarts=10, batch_size=128, seed=0, estimator="project" ("paper-code": the released code's estimate,
    paper_code_metrics, ℓ∞ only, epsilon 0.0314 unless given), autoattack=None. Returns a Robustness; the model's
    weights, modes and requires_grad flags are unchanged. Seeds the global RNGs with `seed`, as the command line
    does."""
    name = "evaluate.robust_loss_error"
    norm, estimator = settings.get("norm", "linf"), settings.get("estimator", "project")
    require(name, norm in common.THREATS, f"norm must be {' or '.join(map(repr, common.THREATS))}, got {norm!r}")
    require(name, estimator in ESTIMATORS,
            f"estimator must be {' or '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    require(name, estimator == "project" or norm == "linf",
            f"estimator {estimator!r} is ℓ∞ only (the paper's code has no ℓ2 attack), got norm {norm!r}")
    # ε and step follow the norm and the estimator (the API's model has no recorded threat model: its norm is given)
    defaults = resolve_threat(parse_args(["-", "--norm", norm, "--estimator", estimator]), {"source": "python"})
    s = settings_with_defaults(name, {**api_settings_of(defaults), "autoattack": None}, settings)
    check_attack(name, s)
    require(name, is_int(s["restarts"], 1), f"restarts must be an integer >= 1, got {s['restarts']!r}")
    require(name, s["autoattack"] in (None, *AA_ATTACKS),
            f"autoattack must be None, {' or '.join(map(repr, AA_ATTACKS))}, got {s['autoattack']!r}")
    check_inputs(name, model, x, y)
    ns = types.SimpleNamespace(**s, aa_version=s["autoattack"], verbose=verbose)
    with model_kept(model):
        pgd, clean_ok, robust_ok, losses = pgd_metrics(model, x, y, ns, progress)
        aa = None
        if s["autoattack"] is not None:
            aa, robust_ok = autoattack_metrics(model, x, y, clean_ok, robust_ok, ns, x.device, progress)
    return Robustness(rloss=pgd["rloss"], rerr=aa["rerr"] if aa else pgd["rerr"], pgd=pgd, autoattack=aa,
                      losses=losses, robust_ok=robust_ok, settings=s)


def autoattack_version_string():
    import importlib.metadata
    for dist in ("pyautoattack", "autoattack"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def print_table(result, settings):
    def pct(v):
        return f"{100 * v:6.2f}%" if v is not None else "      -"

    def num(v):
        return f"{v:.4f}" if v is not None else "-"
    rows = [("clean (test)", result["clean"]["n"], result["clean"]["err"], result["clean"]["loss"], "")]
    for name, part in (("test", result), ("train", result.get("train"))):
        if part is None:
            continue
        p, aa = part["pgd"], part["autoattack"]
        rows.append((f"PGD-{settings['steps']}x{settings['restarts']} ({name})", p["n"], p["rerr"], p["rloss"],
                     f"RLoss correct {num(p['rloss_correct'])} (n={p['n_correct']}), "
                     f"incorrect {num(p['rloss_incorrect'])} (n={p['n_incorrect']}); clean err {pct(p['clean_err']).strip()}"
                     f"; estimator {settings['estimator']}, ε {settings['epsilon']:.5f}"))
        if aa is not None:
            rows.append((f"AutoAttack-{settings['autoattack']} ({name})", aa["n"], aa["rerr"], None,
                         f"any attack {pct(aa['rerr_any']).strip()}; max ‖δ‖∞ {aa['max_linf']:.5f}, "
                         f"‖δ‖₂ {aa['max_l2']:.5f}"))
    print(f"{'':26s} {'n':>6s} {'err':>8s} {'loss':>7s}")
    for label, n, err, loss, note in rows:
        print(f"{label:26s} {n:6d} {pct(err):>8s} {num(loss) if loss is not None else '':>7s}  {note}")


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    progress = True  # common.progress_loop: tqdm on a terminal, a line every 30 s in a log file

    # ---- model: ours (architecture from its args), an external state dict, or RobustBench
    model, info = load_model(args, device)
    model = model.float().eval()  # every reported number is fp32 (README 'Conventions')
    args.data_dir, args.dataset = data_dir_of(args, info), dataset_of(args, info)
    settings, non_default = eval_settings(args, info)  # (also --norm: the checkpoint's unless given, its ε and step)
    out = result_path(result_folder(args), settings)
    check(out.parent.is_dir(), f"output folder {out.parent} does not exist (choose --out)")
    sha256 = model_sha256(args, info)
    if already_measured(out, settings, sha256, args.force):
        return

    # ---- data: clean on the full test set (or --n-clean), attacks on test images 0…n-1
    n_test = len(common.load_images(args.data_dir, train=False, dataset=args.dataset)[1])
    check(args.n_eval <= n_test, f"--n-eval {args.n_eval} is larger than the test set ({n_test} images)")
    check(args.n_clean <= n_test, f"--n-clean {args.n_clean} is larger than the test set ({n_test} images)")
    n_clean = args.n_clean or n_test
    x, y = common.eval_split(args.data_dir, "eval", max(n_clean, args.n_eval), device, args.dataset)
    clean_loss, clean_ok = common.clean_metrics(model, x[:n_clean], y[:n_clean], max(args.batch_size, 500), progress)

    result = {"epoch": info["epoch"], "source": info["source"], "model_args": info["args"],
              "versions": {**common.versions(device), "autoattack": autoattack_version_string()},
              "clean": {"loss": mean(clean_loss), "err": error_rate(clean_ok), "n": n_clean}}

    # ---- attacks on the eval subset (and the train-eval subset): fixed seeds, eval mode, fp32
    result.update(attack_subset(model, x[:args.n_eval], y[:args.n_eval], args, progress))
    if args.train:
        x_tr, y_tr = common.eval_split(args.data_dir, "train-eval", args.n_eval, device, args.dataset)
        result["train"] = attack_subset(model, x_tr, y_tr, args, progress)

    write_result(out, settings, non_default, sha256, result)
    print(f"{settings['checkpoint']} (epoch {result['epoch']}, {'EMA' if args.use_ema else 'model'} weights)")
    print_table(result, settings)
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run_cli(main)
