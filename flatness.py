"""Robust flatness of a checkpoint: the measures of Stutz, Hein & Schiele (ICCV 2021), §3.3, Eq. 3-5.

Weight perturbations ν live in the relative per-layer ball (Eq. 4), each conv/linear weight or bias
tensor l being one "layer" (BatchNorm, the input normaliser and auxiliary heads are never perturbed):

    B_ξ(w) = { ν : ‖ν_l‖₂ ≤ ξ‖w_l‖₂ for every layer l }

    average-case (Eq. 3):  E_ν [ RLoss(w + ν) ] − RLoss(w),   ν_l = ξ‖w_l‖·g_l/‖g_l‖, g_l ~ N(0, I)
    worst-case   (Eq. 5):  max_{ν ∈ B_ξ(w)} RLoss(w + ν) − RLoss(w)   (joint PGD on ν and δ)
    RLoss(w) = (1/N) Σ_n max_{‖δ‖∞ ≤ ε} CE(f(x_n + δ; w), y_n)     (--norm l2: ‖δ‖₂ ≤ ε; default: the checkpoint's)

RLoss(w) is the reference: PGD-20 × 10 restarts on the unperturbed model (common.robust_metrics, the
same estimator as evaluate.py). On every perturbed model the adversarial examples are recomputed.
Also here: the clean variants (--loss clean), 1-D landscapes along random and adversarial weight
directions (Fig. 4), the largest Hessian eigenvalue, and the BN-compensated rescaling check (§3.2).

Choices where the paper's text and its released code differ (README "flatness.py"): ν of
the average case exactly on the sphere, one PGD restart per draw (code); the worst case shares one ν
across the batches of a restart and evaluates the final iterates (code; --per-batch for the text's
reading); the reference takes per example the max-CE restart (the notebook: the restart with the
largest wrong-class probability); the Hessian is of the mean CE (the code summed batch means).

Usage:   python flatness.py runs/at/ckpt_last.pt --mode both          # flatness_{average,worst}_last_<hash>.json
         python flatness.py --epochs runs/at --mode both               # every ckpt_epoch*.pt snapshot (Fig. 6)
         python flatness.py runs/at/ckpt_last.pt --mode landscape      # Fig. 4 curves (--scale 2: rescaled)
         python flatness.py runs/at/ckpt_last.pt --mode hessian --scale 2
         python flatness.py --robustbench Carmon2019Unlabeled --model-dir models   # a public model (README)
Python:  flatness.average_case(model, x, y, **settings), flatness.worst_case(...) on any nn.Module taking [0, 1]
         inputs (README "Python API"); the command line calls them.
CPU:     python flatness.py runs/smoke/ckpt_last.pt --mode both --n-eval 100 --samples 3 --restarts 2 \\
             --data-dir ../shared/data/cifar10-jpeg
Writes `flatness_<mode>_<checkpoint>_<hash>.json` beside the checkpoint (e.g. flatness_worst_last_1a2b3c4d.json
for ckpt_last.pt), the hash being that of the settings the file records, in the same format as evaluate.py's
(README "Result files"): a run with other settings never replaces it, and one with the same settings
skips it (--force measures again), for every snapshot of --epochs too.

Paper values (Table 1): AT baseline average-case 1.21 (ξ = 0.5), worst-case 6.48 (ξ = 0.00075);
Hessian λ_max 1990 (505 at ×2, 7936 at ×0.5; their code sums 4 batch means, see --hessian-reduction).
Cost (measured): CPU, 1 thread, width-16 ResNet-18, 100 test images, the CPU line above: 64 s
(reference PGD-20 × 10: 47 s, 3 average-case draws: 7 s, 2 worst-case restarts: 7 s). GPU: not yet
measured (estimate: 5-20 s per checkpoint for both measures on an H100).
"""
import copy
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common
from common import check, fraction
from evaluate import (ESTIMATORS, PAPER_CODE_EPSILON, add_model_source_args, already_measured, capped_ce,
                      check_attack, check_inputs, data_dir_of, dataset_of, is_int, is_real, load_model, model_kept,
                      model_sha256, paper_code_metrics, paper_code_start, require, resolve_threat, result_folder,
                      result_path, result_settings, settings_with_defaults, write_result)

MEASURES = ("average", "worst", "adaptive-worst", "adaptive-average", "pac-bayes", "pac-bayes-mag", "hessian-trace",
            "hessian")  # --mode all: every measure (the landscape is a figure)
MODES = ("average", "worst", "both", "landscape", "hessian", "adaptive-worst", "adaptive-average", "pac-bayes",
         "pac-bayes-mag", "hessian-trace", "all")
DEFAULT_XI = {"average": 0.5, "worst": 0.00075}      # the paper's ξ (Table 1)
ADAPTIVE_NORM = {"adaptive-worst": "linf", "adaptive-average": "l2"}
# ρ: the middle of Andriushchenko et al.'s ResNet-18 grids (sh/eval_sharpness_final.sh: worst linf 0.001-0.008,
# l2 0.25-2; average l2 0.05-0.4, linf 0.1-0.8)
ADAPTIVE_RHO = {("adaptive-worst", "linf"): 0.002, ("adaptive-worst", "l2"): 0.5,
                ("adaptive-average", "l2"): 0.1, ("adaptive-average", "linf"): 0.2}
NU_SEED_OFFSET = 1_000_003  # ν draws use their own generator, seeded apart from the PGD starts


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    add_model_source_args(p)
    common.add_runtime_args(p, data_dir=None)
    p.add_argument("--epochs", metavar="RUN_DIR", default=None,
                   help="measure every ckpt_epoch*.pt snapshot of this run folder (Fig. 6), skipping those "
                        "measured with the same settings")
    p.add_argument("--mode", default="both", choices=MODES,
                   help="average (Eq. 3) | worst (Eq. 5) | both | landscape (Fig. 4) | hessian (λ_max) | "
                   "adaptive-worst | adaptive-average | pac-bayes | pac-bayes-mag | hessian-trace (README 'Other "
                   "flatness measures') | all (every measure: the paper's, the others, λ_max)")
    g = p.add_argument_group("flatness (average and worst case)")
    g.add_argument("--xi", type=fraction, default=None,
                   help="relative per-layer radius ξ (paper: 0.5 average-case, 0.00075 worst-case); "
                        "only with --mode average or worst")
    g.add_argument("--loss", default="robust", choices=("robust", "clean"),
                   help="robust: RLoss (PGD on every perturbed model); clean: clean CE (supplementary)")
    g.add_argument("--subset", default="eval", choices=("eval", "train-eval"),
                   help="eval = test images 0…N-1; train-eval = train images 0…N-1 (Fig. 9)")
    g.add_argument("--n-eval", type=int, default=1000, help="images of the subset (paper: 1000)")
    g.add_argument("--samples", type=int, default=None, help="average-case draws of ν (paper: 10; clean: 50)")
    g.add_argument("--restarts-perturbed", type=int, default=1,
                   help="PGD restarts on each perturbed model (paper's code: 1, vs 10 for the reference)")
    g.add_argument("--restarts", type=int, default=10, help="worst-case restarts, the max is taken (paper: 10)")
    g.add_argument("--passes", type=int, default=20, help="worst-case passes over the subset (paper: 20)")
    g.add_argument("--weight-step", type=fraction, default=0.01,
                   help="worst-case step on ν_l, relative to ‖w_l‖ (paper's code: 0.01)")
    g.add_argument("--per-batch", action="store_true",
                   help="worst-case: one ν per mini-batch (the paper's text) instead of one ν shared by all "
                        "batches of a restart (the released code, default)")
    g.add_argument("--estimator", default="project", choices=ESTIMATORS,
                   help="paper-code: the released code's estimator (README 'Deviations'): its loss −log(p_y + 1e-12), "
                   "its PGD start, ε 0.0314, per example the restart with the most probable wrong class, a perturbed "
                   "model's RErr with the unperturbed model's clean predictions; ℓ∞, average and worst case only")
    g.add_argument("--joint-batch-size", type=int, default=128,
                   help="worst-case mini-batch; ν is updated after each one, so this changes the measure (paper: 128)")
    g = p.add_argument_group("other flatness measures (README 'Other flatness measures'; --loss and --subset apply)")
    g.add_argument("--rho", type=fraction, default=None,
                   help="adaptive radius ρ (default: adaptive-worst 0.002 linf / 0.5 l2, adaptive-average 0.1 l2 / "
                        "0.2 linf); only with --mode adaptive-worst or adaptive-average")
    g.add_argument("--sharpness-norm", default=None, choices=("linf", "l2"),
                   help="the adaptive ball ‖ν ⊘ |w|‖ ≤ ρ (default: linf for adaptive-worst, l2 = Gaussian noise for "
                        "adaptive-average)")
    g.add_argument("--sharpness-batch", type=int, default=128,
                   help="m: images per batch; the adaptive measures are per batch, averaged (Andriushchenko et al.: 128)")
    g.add_argument("--sharpness-steps", type=int, default=20, help="adaptive-worst ascent steps (theirs: 20)")
    g.add_argument("--step-mult", type=fraction, default=1.0, help="adaptive-worst first step: 2ρ × this (theirs: 1)")
    g.add_argument("--sharpness-samples", type=int, default=20, help="adaptive-average draws per batch (theirs: 20)")
    g.add_argument("--logit-normalise", action="store_true",
                   help="adaptive measures of the CE of centred, ℓ2-normalised logits (Andriushchenko et al.)")
    g.add_argument("--target-deviation", type=fraction, default=0.1,
                   help="PAC-Bayes: the error increase σ' is searched for (Jiang et al.: 0.1)")
    g.add_argument("--deviation-tolerance", type=fraction, default=0.01, help="PAC-Bayes: bisection stops within this")
    g.add_argument("--search-depth", type=int, default=15, help="PAC-Bayes: most bisection steps (Jiang et al.: 15)")
    g.add_argument("--mc-samples", type=int, default=10, help="PAC-Bayes: noise draws per σ (Jiang et al.: 10)")
    g.add_argument("--sigma-max", type=fraction, default=2.0, help="PAC-Bayes: bisection on [0, this]")
    g.add_argument("--magnitude-eps", type=fraction, default=1e-3, help="pac-bayes-mag: ε of the noise variance "
                   "σ'²w² + ε² (Jiang et al.: 1e-3)")
    g.add_argument("--probes", type=int, default=100, help="hessian-trace: Rademacher probes (Hutchinson)")
    g = p.add_argument_group("PGD (reference RLoss, perturbed models, the joint ascent's δ, landscapes)")
    g.add_argument("--norm", default=None, choices=tuple(common.THREATS),
                   help="threat model of every RLoss: linf ‖δ‖∞ ≤ ε (paper) | l2 ‖δ‖₂ ≤ ε; default: the one our "
                   "checkpoint was trained with, else linf (--robustbench: also which zoo, Linf or L2)")
    g.add_argument("--epsilon", type=common.pixels, default=None,
                   help="radius; None: the --norm's, linf 8/255 (paper; its code 0.0314), l2 128/255 (Rice et al., AWP)")
    g.add_argument("--attack-step", type=common.pixels, default=None,
                   help="PGD step size; None: linf 0.007 (paper), l2 15/255")
    g.add_argument("--steps", type=int, default=20, help="PGD iterations (paper: 20)")
    g.add_argument("--ref-restarts", type=int, default=10, help="PGD restarts of the reference RLoss (paper: 10)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="images per PGD batch (paper: 128), and the most inputs PGD puts through the network at "
                   "once (restarts in chunks); only speed, memory and the order of random draws depend on it")
    g = p.add_argument_group("1-D landscape (Fig. 4)")
    g.add_argument("--directions", type=int, default=10, help="random and adversarial directions each (paper: 10)")
    g.add_argument("--points", type=int, default=51, help="steps s in [-1, 1] (paper: 51)")
    g.add_argument("--n-landscape", type=int, default=100, help="the last N test images (paper: 100)")
    g.add_argument("--landscape-steps", type=int, default=10, help="PGD iterations at every s (paper: 10)")
    g.add_argument("--direction-norm", default="l2", choices=("l2", "max-abs"),
                   help="l2: d_l scaled to ‖w_l‖ (Eq. 2); max-abs: max|d_l| scaled to c·max|w_l| "
                        "(the released code, c = 0.5 random, 0.01 adversarial)")
    g.add_argument("--random-scale", type=fraction, default=None,
                   help="c of the random directions (default: 1 for l2, 0.5 for max-abs)")
    g.add_argument("--adversarial-scale", type=fraction, default=None,
                   help="c of the adversarial directions (default 0.01 for both norms, the released code's size: "
                        "at c = 1 an adversarial direction as large as w makes the RLoss explode for s > 0.02)")
    g.add_argument("--adversarial-xi", type=fraction, default=0.005,
                   help="ξ of the weights-only ascent that finds adversarial directions (paper's code: 0.005)")
    g.add_argument("--adversarial-passes", type=int, default=7, help="passes of that ascent (paper's code: 7)")
    g = p.add_argument_group("Hessian")
    g.add_argument("--n-hessian", type=int, default=500, help="the last N test images (paper: 500)")
    g.add_argument("--hessian-iters", type=int, default=100, help="maximum power iterations")
    g.add_argument("--hessian-tol", type=fraction, default=1e-3,
                   help="stop when the eigenvalue estimate changes by less than this fraction")
    g.add_argument("--hessian-reduction", default="mean", choices=("mean", "batch-sum"),
                   help="mean: Hessian of the mean CE over the N images; batch-sum: sum over --batch-size "
                        "batches of the batch-mean CE (the released code; ≈ N/batch × larger)")
    g = p.add_argument_group("scale invariance (§3.2)")
    g.add_argument("--scale", type=fraction, default=1.0,
                   help="α: multiply every conv feeding a BN by α, its running mean by α and variance by α² "
                        "(paper: 0.5 and 2); the logits do not change, the measures should not either")
    g.add_argument("--scale-bn-eps", action="store_true",
                   help="also multiply each rescaled BN's eps by α², which makes the rescaling exact (the paper "
                        "leaves eps, so the logits change slightly where running variances are small)")
    g.add_argument("--scale-tol", type=fraction, default=1e-3,
                   help="largest allowed logit change of the rescaled model, relative to max |logit|")
    g = p.add_argument_group("output")
    g.add_argument("--force", action="store_true", help="measure again although a result with the same settings exists")
    args = p.parse_args(argv)

    check(args.checkpoint or args.robustbench or args.epochs,
          "give a checkpoint, --epochs RUN_DIR or --robustbench NAME")
    check(not (args.epochs and (args.checkpoint or args.robustbench)),
          "give either a checkpoint / --robustbench or --epochs RUN_DIR, not both")
    check(args.xi is None or args.mode in ("average", "worst"),
          "--xi needs --mode average or --mode worst (their paper values differ: 0.5 and 0.00075)")
    check(args.xi is None or args.xi >= 0, f"--xi must be >= 0, got {args.xi}")
    check(args.estimator == "project" or args.mode in ("average", "worst", "both"),
          "--estimator paper-code is the paper's measures' estimator: it needs --mode average, worst or both")
    check(not (args.estimator == "paper-code" and args.norm == "l2"),
          "--estimator paper-code is ℓ∞ only (the paper's code has no ℓ2 attack); drop --norm l2 or the estimator")
    check(args.rho is None or args.mode in ADAPTIVE_NORM,
          "--rho needs --mode adaptive-worst or --mode adaptive-average (their defaults differ: 0.002 and 0.1)")
    check(args.rho is None or args.rho >= 0, f"--rho must be >= 0, got {args.rho}")
    check(min(args.sharpness_batch, args.sharpness_steps, args.sharpness_samples, args.search_depth, args.mc_samples,
              args.probes) >= 1,
          "--sharpness-batch, --sharpness-steps, --sharpness-samples, --search-depth, --mc-samples and --probes must be >= 1")
    check(args.step_mult > 0 and args.sigma_max > 0 and args.deviation_tolerance > 0 and args.magnitude_eps >= 0,
          "--step-mult, --sigma-max and --deviation-tolerance must be > 0, --magnitude-eps >= 0")
    check(0 < args.target_deviation < 1, f"--target-deviation must be in (0, 1), got {args.target_deviation}")
    check(args.epsilon is None or args.epsilon > 0,
          f"--epsilon must be in (0, 1] (pixel units, e.g. 8/255), got {args.epsilon}")
    check((args.attack_step is None or args.attack_step > 0) and args.weight_step >= 0,
          "--attack-step must be > 0 and --weight-step >= 0")
    check(min(args.steps, args.landscape_steps) >= 0, "--steps and --landscape-steps must be >= 0")
    check(min(args.ref_restarts, args.restarts_perturbed, args.restarts, args.passes, args.directions,
              args.adversarial_passes, args.hessian_iters) >= 1,
          "--ref-restarts, --restarts-perturbed, --restarts, --passes, --directions, --adversarial-passes and "
          "--hessian-iters must be >= 1")
    check(args.samples is None or args.samples >= 1, "--samples must be >= 1")
    check(min(args.n_eval, args.n_landscape, args.n_hessian, args.batch_size, args.joint_batch_size) >= 1,
          "--n-eval, --n-landscape, --n-hessian, --batch-size and --joint-batch-size must be >= 1")
    check(args.points >= 2, "--points must be >= 2")
    check(args.scale > 0, f"--scale must be > 0, got {args.scale}")
    check(args.adversarial_xi >= 0 and args.hessian_tol >= 0, "--adversarial-xi and --hessian-tol must be >= 0")
    if args.samples is None:
        args.samples = 50 if args.loss == "clean" else 10  # the paper's code: at50 for clean, at10 for robust
    default_c = {"l2": (1.0, 0.01), "max-abs": (0.5, 0.01)}[args.direction_norm]
    args.random_scale = default_c[0] if args.random_scale is None else args.random_scale
    args.adversarial_scale = default_c[1] if args.adversarial_scale is None else args.adversarial_scale
    return args


# ----------------------------------------------------------------------------------------------
# The model at w + ν, computed functionally: the loaded weights are never written to
# ----------------------------------------------------------------------------------------------
class Perturbed(nn.Module):
    """f(·; w + ν) as a module (so common.pgd can attack it): a functional_call with the perturbed
    conv/linear tensors; every other parameter and buffer (BN, normaliser) is the model's own."""

    def __init__(self, model, params):
        super().__init__()
        self.model = model
        self.params = params  # a plain dict of tensors: not registered, not saved

    def forward(self, x):
        return functional_call(self.model, self.params, (x,))


def plus(weights, nu, s=1.0):
    """{name: w_l + s·ν_l} (new tensors; w is detached, so no graph reaches the model)."""
    return {k: weights[k] + nu[k] if s == 1 else weights[k] + s * nu[k] for k in weights}  # (no ×1 pass)


def in_box(weights, nu, box):
    """ν with w + ν clamped to the training box [−box, box] of a weight-clipped model (--clip; the
    released code applies the box to every perturbed model). box = None: ν unchanged."""
    if not box:
        return nu
    return {k: (weights[k] + v).clamp_(-box, box) - weights[k] for k, v in nu.items()}


def frozen_weights(model):
    """The perturbable tensors (the layers l of Eq. 4), detached: the centre w of every perturbation."""
    return {k: p.detach() for k, p in common.perturbable_params(model).items()}


def layer_norms(tensors):
    """{name: ‖t‖₂} per tensor (each tensor is one layer)."""
    return {k: v.detach().norm() for k, v in tensors.items()}


def relative_random(weights, xi, generator=None, on_sphere=True, norms=None):
    """ν_l = ξ‖w_l‖ · g_l/‖g_l‖ with g_l ~ N(0, I) (on the sphere, Eq. 3); with on_sphere=False
    the radius is additionally scaled by U(0, 1) (the worst-case start, README "flatness.py"). `norms`: the
    precomputed ‖w_l‖ (layer_norms), when the same weights are perturbed many times."""
    norms = layer_norms(weights) if norms is None else norms
    nu = {}
    for k, w in weights.items():
        g = torch.randn(w.shape, device=w.device, dtype=w.dtype, generator=generator)
        radius = xi * norms[k]
        if not on_sphere:
            radius = radius * torch.rand((), device=w.device, generator=generator)
        nu[k] = g.mul_(radius / g.norm().clamp_min(1e-12))  # g is fresh: scaled in place
    return nu


def project_relative(nu, weights, xi, norms=None):
    """Project each ν_l onto the relative ball ‖ν_l‖ ≤ ξ‖w_l‖ (Eq. 4). New tensors; `norms` as in
    relative_random."""
    norms = layer_norms(weights) if norms is None else norms
    return {k: v * torch.clamp(xi * norms[k] / v.norm().clamp_min(1e-12), max=1.0) for k, v in nu.items()}


def nu_generator(seed, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed + NU_SEED_OFFSET)
    return g


def loss_of(model, x, y, loss, eps, alpha, steps, restarts, batch_size, progress=False, norm="linf",
            estimator="project", clean_ok=None):
    """Per-example loss and correctness: RLoss by PGD in the `norm` ball (max over iterates and restarts) or
    clean CE; with estimator "paper-code" the released code's (evaluate.paper_code_metrics: its start, restart choice
    and capped loss; `clean_ok` the clean correctness its RErr counts; clean: the capped loss)."""
    if estimator == "paper-code":
        if loss == "clean":
            with torch.no_grad(), common.bn_mode(model, "eval"):
                logits = torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(y), batch_size)])
            return capped_ce(logits, y), logits.argmax(1) == y
        return paper_code_metrics(model, x, y, eps, alpha, steps, restarts, batch_size, progress, clean_ok)
    if loss == "clean":
        return common.clean_metrics(model, x, y, batch_size)
    return common.robust_metrics(model, x, y, eps, alpha, steps, restarts, batch_size, progress, norm=norm)


def reference_each(model, x, y, loss="robust", eps=8 / 255, alpha=0.007, steps=20, restarts=10, batch_size=128,
                   seed=0, norm="linf", estimator="project"):
    """Per example the loss and correctness of the unperturbed model: RLoss (PGD-`steps` × `restarts`, the
    max-CE iterate; correct = clean and adversarially correct) or the clean CE (`estimator`: loss_of)."""
    common.seed_everything(seed)
    return loss_of(model, x, y, loss, eps, alpha, steps, restarts, batch_size, norm=norm, estimator=estimator)


def reference(model, x, y, loss="robust", eps=8 / 255, alpha=0.007, steps=20, restarts=10, batch_size=128,
              seed=0, norm="linf", estimator="project"):
    """RLoss(w) (PGD-20 × 10 restarts, per example the max-CE iterate) or the clean CE of the
    unperturbed model: (mean loss, error) as floats."""
    ce, ok = reference_each(model, x, y, loss, eps, alpha, steps, restarts, batch_size, seed, norm, estimator)
    return ce.mean().item(), 1 - ok.float().mean().item()


# ----------------------------------------------------------------------------------------------
# Average-case flatness (Eq. 3)
# ----------------------------------------------------------------------------------------------
def average_case_draws(model, x, y, xi=0.5, samples=10, loss="robust", eps=8 / 255, alpha=0.007, steps=20,
                       restarts=1, batch_size=128, seed=0, progress=False, on_sample=None, box=None, norm="linf",
                       estimator="project"):
    """Per draw ν (exactly on the per-layer sphere ‖ν_l‖ = ξ‖w_l‖, as the released code), the
    loss of f(·; w + ν) with adversarial examples recomputed on the perturbed model (PGD-`steps`,
    `restarts` restarts). Returns (losses, errors): one mean over the subset per draw, as tensors.
    `on_sample(ν)` sees every draw (tests). `box`: a weight-clipped model's --clip (in_box). `estimator`
    "paper-code": the released code's loss and RErr, the latter with the unperturbed model's clean predictions."""
    clean_ok = common.clean_metrics(model, x, y, batch_size)[1] if estimator == "paper-code" else None
    common.seed_everything(seed)  # the PGD starts
    generator = nu_generator(seed, x.device)
    weights = frozen_weights(model)
    norms = layer_norms(weights)
    losses, errors = [], []
    for _ in common.progress_loop(range(samples), f"average-case ξ={xi:g} draws", disable=not progress):
        nu = relative_random(weights, xi, generator, norms=norms)  # Eq. 3: ν on the sphere
        if on_sample is not None:
            on_sample(nu)
        ce, ok = loss_of(Perturbed(model, plus(weights, in_box(weights, nu, box))), x, y, loss, eps, alpha, steps,
                         restarts, batch_size, progress, norm, estimator, clean_ok)
        losses.append(ce.mean())
        errors.append(1 - ok.float().mean())
    return torch.stack(losses), torch.stack(errors)


# ----------------------------------------------------------------------------------------------
# Worst-case flatness (Eq. 5): joint PGD on the weights and the inputs
# ----------------------------------------------------------------------------------------------
def joint_ascent(model, x, y, xi, passes=20, weight_step=0.01, batch_size=128, eps=8 / 255, alpha=0.007,
                 attack_inputs=True, per_batch=False, generator=None, progress=False, box=None, norm="linf",
                 clean_ok=None):
    """One restart of the joint maximisation of Σ CE(f(x + δ; w + ν), y) over ν ∈ B_ξ(w) and δ:
    per layer ν_l starts in a uniformly random direction at radius ξ‖w_l‖·U(0, 1) (relative_random), δ at common.pgd's random start in the ε-ball of `norm`; `passes`
    passes over the data in mini-batches, each batch one backward for ∂/∂ν and ∂/∂δ, then
        ν_l ← Π_ξ(ν_l + weight_step·‖w_l‖·g_l/‖g_l‖),   δ ← Π_ε,[0,1](δ + α·sign(g_δ))
    (ℓ2: δ + α·g_δ/‖g_δ‖ per example, common.ascent_step, as PGD).
    One ν is shared by all batches and updated after each (the released code), or, `per_batch`,
    every batch has its own. With `attack_inputs=False` only ν moves (clean CE, or CE on fixed
    adversarial inputs for the landscape's directions). With `box` (a weight-clipped model's --clip)
    w + ν is clamped to [−box, box] before each projection onto the ball, the released code's order;
    the ball projection keeps w + ν in the box (both sets are convex and contain w). The final iterates are returned
    (no best tracking): (list of ν per batch group, δ, per-example CE, per-example correctness). Given `clean_ok`
    (the unperturbed model's clean correctness), the released code's estimator (--estimator paper-code): δ starts at
    evaluate.paper_code_start, not projected before the first pass (its model clamps the input to [0, 1] first, as
    here), the loss is evaluate.capped_ce and an example is correct only where clean_ok is."""
    weights = frozen_weights(model)
    norms = layer_norms(weights)
    batches = [slice(i, i + batch_size) for i in range(0, len(y), batch_size)]
    nus = [relative_random(weights, xi, generator, on_sphere=False, norms=norms)
           for _ in (batches if per_batch else batches[:1])]
    if box:
        nus = [project_relative(in_box(weights, nu, box), weights, xi, norms) for nu in nus]
    paper_code = clean_ok is not None
    if attack_inputs and paper_code:
        delta = paper_code_start(x, eps)
    elif attack_inputs:
        delta = common.random_start(x, eps, norm)
        delta = (x + delta).clamp_(0, 1) - x
    else:
        delta = torch.zeros_like(x)
    with common.bn_mode(model, "eval"):
        for _ in common.progress_loop(range(passes), "joint ascent passes", disable=not progress):
            for b, sl in enumerate(batches):
                j = b if per_batch else 0
                nu = {k: v.detach().requires_grad_(True) for k, v in nus[j].items()}
                d = delta[sl].clone().requires_grad_(attack_inputs)
                inputs = (x[sl] + d).clamp(0, 1) if paper_code else x[sl] + d  # (the released model's clamp)
                logits = functional_call(model, plus(weights, nu), (inputs,))
                ce = F.cross_entropy(logits.float(), y[sl], reduction="sum")  # sums: steps are scale-free
                grads = torch.autograd.grad(ce, list(nu.values()) + ([d] if attack_inputs else []))
                with torch.no_grad():
                    # per layer, the gradient normalised to ‖w_l‖ (the released code's relative step),
                    # then back into the relative ball (Eq. 4)
                    # (the gradients are fresh tensors: scaled in place)
                    stepped = {k: g.mul_(weight_step * norms[k] / g.norm().clamp_min(1e-12)).add_(nu[k])
                               for k, g in zip(nu, grads)}
                    nus[j] = project_relative(in_box(weights, stepped, box), weights, xi, norms)
                    if attack_inputs:
                        step = common.ascent_step(d, grads[-1], eps, alpha, norm)
                        delta[sl] = (x[sl] + step).clamp_(0, 1) - x[sl]
        # RLoss of the restart: CE at the final ν and the final δ of every example
        with torch.no_grad():
            ce, ok = [], []
            for b, sl in enumerate(batches):
                inputs = (x[sl] + delta[sl]).clamp(0, 1) if paper_code else x[sl] + delta[sl]
                logits = functional_call(model, plus(weights, nus[b if per_batch else 0]), (inputs,)).float()
                ce.append(capped_ce(logits, y[sl]) if paper_code else F.cross_entropy(logits, y[sl], reduction="none"))
                ok.append((logits.argmax(1) == y[sl]) & (clean_ok[sl] if paper_code else True))
    return nus, delta, torch.cat(ce), torch.cat(ok)


def worst_case_restarts(model, x, y, xi=0.00075, restarts=10, loss="robust", passes=20, weight_step=0.01,
                        batch_size=128, eps=8 / 255, alpha=0.007, per_batch=False, seed=0, progress=False,
                        on_restart=None, box=None, norm="linf", estimator="project"):
    """Per restart the loss at the final iterates of joint_ascent (ν and δ for RLoss; ν only for
    clean CE). Returns (losses, errors) per restart as tensors; the measure takes the max.
    `on_restart(nus, delta)` sees every restart's final iterates (tests). `estimator`: joint_ascent's."""
    clean_ok = common.clean_metrics(model, x, y, batch_size)[1] if estimator == "paper-code" else None
    common.seed_everything(seed)  # the δ starts
    generator = nu_generator(seed, x.device)
    losses, errors = [], []
    for _ in common.progress_loop(range(restarts), f"worst-case ξ={xi:g} restarts", disable=not progress):
        nus, delta, ce, ok = joint_ascent(model, x, y, xi, passes, weight_step, batch_size, eps, alpha,
                                          attack_inputs=(loss == "robust"), per_batch=per_batch,
                                          generator=generator, progress=progress, box=box, norm=norm,
                                          clean_ok=clean_ok)
        if on_restart is not None:
            on_restart(nus, delta)
        losses.append(ce.mean())
        errors.append(1 - ok.float().mean())
    return torch.stack(losses), torch.stack(errors)


# ----------------------------------------------------------------------------------------------
# Python API (README "Python API"): both measures on any nn.Module that takes [0, 1] inputs. The command
# line calls these very functions (measure_checkpoint).
# ----------------------------------------------------------------------------------------------
# Their settings: the command line's flags of the same names, with its defaults (the paper's, Table 1)
API_SETTINGS = {
    "average": ("xi", "samples", "loss", "restarts_perturbed", "steps", "ref_restarts", "norm", "epsilon",
                "attack_step", "batch_size", "seed", "estimator"),
    "worst": ("xi", "restarts", "loss", "passes", "weight_step", "per_batch", "joint_batch_size", "steps",
              "ref_restarts", "norm", "epsilon", "attack_step", "batch_size", "seed", "estimator"),
    "adaptive-worst": ("rho", "sharpness_norm", "sharpness_batch", "sharpness_steps", "step_mult", "logit_normalise",
                       "loss", "steps", "ref_restarts", "norm", "epsilon", "attack_step", "batch_size", "seed"),
    "adaptive-average": ("rho", "sharpness_norm", "sharpness_batch", "sharpness_samples", "logit_normalise", "loss",
                         "restarts_perturbed", "steps", "ref_restarts", "norm", "epsilon", "attack_step", "batch_size",
                         "seed"),
    "pac-bayes": ("target_deviation", "deviation_tolerance", "search_depth", "mc_samples", "sigma_max", "loss",
                  "restarts_perturbed", "steps", "ref_restarts", "norm", "epsilon", "attack_step", "batch_size", "seed"),
    "hessian-trace": ("probes", "hessian_reduction", "loss", "steps", "ref_restarts", "norm", "epsilon", "attack_step",
                      "batch_size", "seed"),
}
API_SETTINGS["pac-bayes-mag"] = API_SETTINGS["pac-bayes"][:5] + ("magnitude_eps",) + API_SETTINGS["pac-bayes"][5:]
API_NAMES = {"average": "average_case", "worst": "worst_case", "adaptive-worst": "adaptive_worst_case",
             "adaptive-average": "adaptive_average_case", "pac-bayes": "pac_bayes", "pac-bayes-mag": "pac_bayes",
             "hessian-trace": "hessian_trace"}


@dataclasses.dataclass
class Flatness:
    """What average_case and worst_case return (README "Python API").
    value: the measure, mean (average case, Eq. 3) or max (worst case, Eq. 5) of `values` minus `reference`;
    reference, reference_err: RLoss (PGD-`steps` × `ref_restarts`) or clean CE, and the error, of the
    unperturbed model; values, errs: the loss and the error of f(·; w + ν) per draw of ν (average case) or per
    restart (worst case); settings: every setting used, defaults filled in; details: what else a measure
    reports (the other measures: see their functions)."""
    value: float
    reference: float
    reference_err: float
    values: list
    errs: list
    settings: dict
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def value_std(self):
        """Standard deviation of `values` (0 for one value)."""
        return torch.tensor(self.values, dtype=torch.float64).std().item() if len(self.values) > 1 else 0.0


def mode_defaults(mode, s):
    """The settings left None filled with the mode's: ξ (the paper's), the adaptive ball's norm and ρ."""
    if "xi" in s and s["xi"] is None:
        s["xi"] = DEFAULT_XI[mode]
    if mode in ADAPTIVE_NORM:
        s["sharpness_norm"] = s["sharpness_norm"] or ADAPTIVE_NORM[mode]
        if s["rho"] is None:
            s["rho"] = ADAPTIVE_RHO.get((mode, s["sharpness_norm"]))
    return s


def api_settings(mode, settings):
    """The settings of `mode`'s measure with the command line's defaults (ξ: the mode's paper value; draws:
    10 for RLoss, 50 for clean CE; ε and step: the norm's; ρ: the adaptive ball's), checked; a bad one is one
    SettingError."""
    name = f"flatness.{API_NAMES[mode]}"
    loss, norm = settings.get("loss", "robust"), settings.get("norm", "linf")
    require(name, loss in ("robust", "clean"), f"loss must be 'robust' or 'clean', got {loss!r}")
    require(name, norm in common.THREATS, f"norm must be {' or '.join(map(repr, common.THREATS))}, got {norm!r}")
    require(name, settings.get("sharpness_norm") in (None, "linf", "l2"),
            f"sharpness_norm must be 'linf' or 'l2', got {settings.get('sharpness_norm')!r}")
    estimator = settings.get("estimator", "project")
    require(name, estimator in ESTIMATORS, f"estimator must be {' or '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    require(name, estimator == "project" or norm == "linf",
            f"estimator {estimator!r} is ℓ∞ only (the paper's code has no ℓ2 attack), got norm {norm!r}")
    # --samples follows --loss, --epsilon and --attack-step follow --norm (and --estimator: 0.0314)
    defaults = parse_args(["-", "--mode", mode, "--loss", loss, "--norm", norm])
    defaults.epsilon = PAPER_CODE_EPSILON if estimator == "paper-code" else None
    defaults = common.threat_defaults(defaults)
    s = mode_defaults(mode, settings_with_defaults(name, {k: getattr(defaults, k) for k in API_SETTINGS[mode]},
                                                   settings))
    for key in ("xi", "rho", "magnitude_eps"):
        if key in s:
            require(name, is_real(s[key]) and s[key] >= 0, f"{key} must be a number >= 0, got {s[key]!r}")
    check_attack(name, s)
    for key in ("samples", "restarts_perturbed", "ref_restarts", "restarts", "passes", "joint_batch_size",
                "sharpness_batch", "sharpness_steps", "sharpness_samples", "search_depth", "mc_samples", "probes"):
        if key in s:
            require(name, is_int(s[key], 1), f"{key} must be an integer >= 1, got {s[key]!r}")
    for key in ("step_mult", "deviation_tolerance", "sigma_max"):
        if key in s:
            require(name, is_real(s[key]) and s[key] > 0, f"{key} must be a number > 0, got {s[key]!r}")
    if "target_deviation" in s:
        require(name, is_real(s["target_deviation"]) and 0 < s["target_deviation"] < 1,
                f"target_deviation must be in (0, 1), got {s['target_deviation']!r}")
    if "hessian_reduction" in s:
        require(name, s["hessian_reduction"] in ("mean", "batch-sum"),
                f"hessian_reduction must be 'mean' or 'batch-sum', got {s['hessian_reduction']!r}")
    for key in ("per_batch", "logit_normalise"):
        if key in s:
            require(name, isinstance(s[key], bool), f"{key} must be True or False, got {s[key]!r}")
    if mode == "worst":
        require(name, is_real(s["weight_step"]) and s["weight_step"] >= 0,
                f"weight_step must be a number >= 0, got {s['weight_step']!r}")
    return s


def api_reference(name, model, x, y, s, given):
    """(RLoss, RErr) of the unperturbed model: measured with the settings, or the caller's pair (the command
    line's --mode both measures it once for both measures)."""
    if given is None:
        return reference(model, x, y, s["loss"], s["epsilon"], s["attack_step"], s["steps"], s["ref_restarts"],
                         s["batch_size"], s["seed"], s["norm"], s["estimator"])
    require(name, isinstance(given, (tuple, list)) and len(given) == 2 and all(map(is_real, given)),
            f"reference must be None or a pair (loss, error) from flatness.reference, got {given!r}")
    return float(given[0]), float(given[1])


def average_case(model, x, y, reference=None, box=None, progress=False, **settings):
    """Average-case robust flatness (Eq. 3) of `model` (any nn.Module mapping [0, 1] images to logits) on
    (x, y): the mean RLoss of f(·; w + ν) over `samples` draws of ν on the per-layer sphere ‖ν_l‖ = ξ‖w_l‖
    (PGD-`steps` × `restarts_perturbed` recomputed on every perturbed model), minus RLoss(w)
    (PGD-`steps` × `ref_restarts`). Settings and defaults (the paper's): xi=0.5, samples=10 (50 with
    loss="clean"), loss="robust", restarts_perturbed=1, steps=20, ref_restarts=10, norm="linf", epsilon=8/255,
    attack_step=0.007 (norm="l2": 128/255, 15/255), batch_size=128, seed=0. `reference`: a (loss, error) pair
    already measured with these settings; `box`: keep w + ν in [−box, box] (a weight-clipped model). Eval mode
    throughout; the weights
    stay bit-identical, modes and requires_grad flags are restored. Returns a Flatness."""
    name = "flatness.average_case"
    s = api_settings("average", settings)
    check_inputs(name, model, x, y)
    with model_kept(model):
        ref = api_reference(name, model, x, y, s, reference)
        losses, errors = average_case_draws(model, x, y, s["xi"], s["samples"], s["loss"], s["epsilon"],
                                            s["attack_step"], s["steps"], s["restarts_perturbed"], s["batch_size"],
                                            s["seed"], progress, box=box, norm=s["norm"], estimator=s["estimator"])
    return Flatness(value=losses.mean().item() - ref[0], reference=ref[0], reference_err=ref[1],
                    values=losses.tolist(), errs=errors.tolist(), settings=s)


def worst_case(model, x, y, reference=None, box=None, progress=False, **settings):
    """Worst-case robust flatness (Eq. 5) of `model` (any nn.Module mapping [0, 1] images to logits) on
    (x, y): the max over `restarts` joint ascents on ν ∈ B_ξ(w) and δ (`passes` passes in mini-batches of
    `joint_batch_size`, ν steps of `weight_step`·‖w_l‖; one ν shared by the batches unless per_batch) of the
    RLoss at the final iterates, minus RLoss(w) (PGD-`steps` × `ref_restarts`). Settings and defaults (the
    paper's): xi=0.00075, restarts=10, loss="robust", passes=20, weight_step=0.01, per_batch=False,
    joint_batch_size=128, steps=20, ref_restarts=10, norm="linf", epsilon=8/255, attack_step=0.007 (norm="l2":
    128/255, 15/255; the joint ascent's δ steps as PGD's in that norm), batch_size=128, seed=0.
    `reference`, `box` and what stays unchanged as in average_case. Returns a Flatness."""
    name = "flatness.worst_case"
    s = api_settings("worst", settings)
    check_inputs(name, model, x, y)
    with model_kept(model):
        ref = api_reference(name, model, x, y, s, reference)
        losses, errors = worst_case_restarts(model, x, y, s["xi"], s["restarts"], s["loss"], s["passes"],
                                             s["weight_step"], s["joint_batch_size"], s["epsilon"], s["attack_step"],
                                             s["per_batch"], s["seed"], progress, box=box, norm=s["norm"],
                                             estimator=s["estimator"])
    return Flatness(value=losses.max().item() - ref[0], reference=ref[0], reference_err=ref[1],
                    values=losses.tolist(), errs=errors.tolist(), settings=s)


# ----------------------------------------------------------------------------------------------
# The measures that came after the paper, on the same RLoss (README "Other flatness measures"). Each
# perturbs the same tensors as Eq. 3-5 (conv/linear weights and biases; never BN) and, with loss="robust",
# attacks the inputs on every perturbed model as the paper's measures do.
# ----------------------------------------------------------------------------------------------
class LogitNormalised(nn.Module):
    """f(x) − mean_c f(x), divided by its ℓ2 norm (Andriushchenko et al. 2023, §4: sharpness of the CE of
    normalised logits, which a rescaling of the last layer cannot change)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return normalise_logits(self.model(x))


def normalise_logits(z):
    z = z - z.mean(dim=-1, keepdim=True)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-10)


def scored(model, logit_normalise):
    """The model whose CE a measure perturbs: itself, or with normalised logits."""
    return LogitNormalised(model) if logit_normalise else model


def batch_slices(n, m):
    return [slice(i, i + m) for i in range(0, n, m)]


# -- Adaptive worst-case sharpness (Kwon et al. 2021, Eq. 6; Andriushchenko et al. 2023, Eq. 2 with |w|) --------
def halving_checkpoints(steps):
    """The iterations at which the ascent may halve its step (APGD's schedule, Croce & Hein 2020, §3.1, as
    Andriushchenko et al.'s sharpness.py: first at 22 % of the steps, then at gaps shrinking by 3 % to 6 %)."""
    p, w = [0, 0.22], [0, math.ceil(steps * 0.22)]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * steps))
    return set(w[1:])


def adaptive_step(nu, prev, grads, scale, rho, eta, sharpness_norm):
    """One ascent step on ν in the adaptive ball A_ρ(w) = {ν : ‖ν ⊘ |w|‖ ≤ ρ}, then the momentum of
    sharpness.py (0.75 of the new point, 0.25 of the iterate before the current one):
        ℓ∞: z = clip(ν + η·sign(g)⊙|w|, ±ρ|w|)                       (as sharpness.py)
        ℓ2: in u = ν ⊘ |w|: z = Π_{‖u‖₂≤ρ}(u + η·(g⊙|w|)/‖g⊙|w|‖₂) ⊙ |w|  (steepest ascent in u; sharpness.py
            steps along g/‖g‖ and projects onto the ellipsoid in ν, which a rescaling of a layer changes)
        ν ← 0.75·z + 0.25·prev.
    In place on `grads` (consumed) and on z: on CPU a new 11M-element tensor costs more than its arithmetic."""
    with torch.no_grad():
        if sharpness_norm == "linf":
            z = {k: g.sign_().mul_(scale[k]).mul_(eta).add_(nu[k]).clamp_(-rho * scale[k], rho * scale[k])
                 for k, g in zip(nu, grads)}
        else:
            gu = {k: g * scale[k] for k, g in zip(nu, grads)}
            gnorm = torch.sqrt(sum((v ** 2).sum() for v in gu.values())).clamp_min(1e-12)
            z = {k: nu[k] + eta * scale[k] * gu[k] / gnorm for k in nu}
            unorm = torch.sqrt(sum((torch.where(scale[k] > 0, z[k] / scale[k], 0) ** 2).sum() for k in z))
            z = {k: v * torch.clamp(rho / unorm.clamp_min(1e-12), max=1.0) for k, v in z.items()}
        return {k: z[k].mul_(0.75).add_(prev[k], alpha=0.25) for k in z}  # (0.25·prev is exact: fused or not alike)


def adaptive_ascent(model, x, y, init_loss, init_err, rho, sharpness_norm="linf", steps=20, step_mult=1.0,
                    logit_normalise=False, delta=None, eps=8 / 255, alpha=0.007, norm="linf"):
    """max over the iterates of CE(f(x + δ; w + ν), y) on one batch, ν ∈ A_ρ(w), by the estimator of
    Andriushchenko et al. (sharpness.py `eval_APGD_sharpness`): ν from 0, step η = 2ρ·step_mult, `steps` steps
    with momentum (adaptive_step); at each halving_checkpoints iteration the step halves when fewer than 75 % of
    the iterations since the last checkpoint improved the best loss, or neither the step nor the best loss
    changed; the next gradient is then taken at the best iterate (sharpness.py reloads the best weights while ν
    goes on from the current iterate). Given a start `delta` (RLoss: the unperturbed model's adversarial
    perturbations, so that at ν = 0 the ascent starts at RLoss(w)), δ moves jointly: one PGD step in the ε-ball
    per ν step, from the best δ after a halving. The best starts at the unperturbed batch's (init_loss, init_err),
    so the sharpness, best − init_loss, is >= 0. Returns (best loss, its error) as 0-dim tensors; host syncs
    only at the checkpoints."""
    weights = frozen_weights(model)
    scale = {k: w.abs() for k, w in weights.items()}
    nu = prev = {k: torch.zeros_like(w) for k, w in weights.items()}
    attack_inputs = delta is not None
    delta = delta if attack_inputs else torch.zeros_like(x)
    best_loss, best_err, best_nu, best_delta = init_loss.clone(), init_err.clone(), nu, delta
    eta, checks = 2 * rho * step_mult, halving_checkpoints(steps)
    updates, last_check, last = 0, 0, (eta, init_loss.item())
    i, reload = 0, False  # i: steps taken; reload: this pass takes the gradient at the best iterate
    with common.bn_mode(model, "eval"):
        while True:
            point_nu, point_delta = (best_nu, best_delta) if reload else (nu, delta)
            params = {k: v.detach().requires_grad_(i < steps) for k, v in point_nu.items()}
            d = point_delta.clone().requires_grad_(attack_inputs and i < steps)
            with torch.set_grad_enabled(i < steps):
                logits = functional_call(model, plus(weights, params), (x + d,)).float()
                ce = F.cross_entropy(normalise_logits(logits) if logit_normalise else logits, y)
            if i > 0 and not reload:  # score iterate i (sharpness.py's iteration i − 1, after its step)
                with torch.no_grad():
                    better = ce > best_loss
                    updates = updates + better.int()
                    best_loss = torch.where(better, ce, best_loss)
                    best_err = torch.where(better, (logits.argmax(1) != y).float().mean(), best_err)
                    best_nu = {k: torch.where(better, nu[k], best_nu[k]) for k in nu}
                    best_delta = torch.where(better, delta, best_delta)
                if i - 1 in checks:
                    now = (eta, best_loss.item())
                    stalled = int(updates) < 0.75 * (i - 1 - last_check) or now == last
                    last, last_check, updates = now, i - 1, 0
                    if stalled:
                        eta *= 0.5
                        reload = i < steps
                        if reload:
                            continue
            if i == steps:
                break
            grads = torch.autograd.grad(ce, list(params.values()) + ([d] if attack_inputs else []))
            nu, prev = adaptive_step(nu, prev, grads[:len(params)], scale, rho, eta, sharpness_norm), nu
            if attack_inputs:
                with torch.no_grad():
                    delta = (x + common.ascent_step(point_delta, grads[-1], eps, alpha, norm)).clamp_(0, 1) - x
            i, reload = i + 1, False
    return best_loss, best_err


def adaptive_worst_batches(model, x, y, ref_ce, ref_ok, rho, sharpness_norm="linf", sharpness_batch=128,
                           sharpness_steps=20, step_mult=1.0, logit_normalise=False, loss="robust", eps=8 / 255,
                           alpha=0.007, steps=20, ref_restarts=10, batch_size=128, seed=0, norm="linf", progress=False):
    """Per batch of `sharpness_batch` images, adaptive_ascent's (best loss, error) and the batch's reference:
    clean CE, the unperturbed per-example ref_ce, ref_ok averaged over the batch; RLoss, the same ascent with
    ρ = 0, so that both sides get the same input attack — the reference's adversarial examples (PGD-`steps` ×
    `ref_restarts`, the same seed: reference_each's examples) and `sharpness_steps` joint steps from them —
    and the measure is exactly 0 at ρ = 0. Returns four tensors over batches."""
    delta = None
    if loss == "robust":
        delta = adversarial_inputs(scored(model, logit_normalise), x, y, eps, alpha, steps, ref_restarts, batch_size,
                                   seed, norm) - x
    out = []
    for sl in common.progress_loop(batch_slices(len(y), sharpness_batch), "adaptive worst-case batches",
                                   disable=not progress):
        init_loss, init_err = ref_ce[sl].mean(), 1 - ref_ok[sl].float().mean()
        start = None if delta is None else delta[sl]
        if start is not None:  # RLoss(w) with the ascent's input attack
            init_loss, init_err = adaptive_ascent(model, x[sl], y[sl], init_loss, init_err, 0.0, sharpness_norm,
                                                  sharpness_steps, step_mult, logit_normalise, start, eps, alpha, norm)
        best = adaptive_ascent(model, x[sl], y[sl], init_loss, init_err, rho, sharpness_norm, sharpness_steps,
                               step_mult, logit_normalise, start, eps, alpha, norm)
        out.append(torch.stack([*best, init_loss, init_err]))
    return torch.stack(out).T


# -- Adaptive average-case sharpness (Andriushchenko et al. 2023, Eq. 3 with |w|) ---------------------------------
def adaptive_noise(weights, rho, sharpness_norm, generator):
    """ν_i = ρ|w_i|·z_i with z_i ~ N(0, 1) (ℓ2) or U(−1, 1) (ℓ∞), independently per element (sharpness.py
    `random_init_lw` with adaptive=True)."""
    nu = {}
    for k, w in weights.items():
        if sharpness_norm == "l2":
            z = torch.randn(w.shape, device=w.device, dtype=w.dtype, generator=generator)
        else:
            z = 2 * torch.rand(w.shape, device=w.device, dtype=w.dtype, generator=generator) - 1
        nu[k] = z.mul_(rho * w.abs())
    return nu


def adaptive_average_batches(model, x, y, ref_ce, ref_ok, rho, sharpness_norm="l2", sharpness_batch=128,
                             samples=20, logit_normalise=False, loss="robust", eps=8 / 255, alpha=0.007, steps=20,
                             restarts=1, seed=0, norm="linf", progress=False):
    """Per batch of `sharpness_batch` images (sharpness.py `eval_average_sharpness`), the loss of f(·; w + ν)
    averaged over `samples` fresh draws of adaptive_noise (RLoss: PGD-`steps` × `restarts` recomputed on every
    perturbed model), its error, and the batch's reference. Returns four tensors over batches."""
    common.seed_everything(seed)  # the PGD starts
    generator = nu_generator(seed, x.device)
    weights = frozen_weights(model)
    out = []
    for sl in common.progress_loop(batch_slices(len(y), sharpness_batch), "adaptive average-case batches",
                                   disable=not progress):
        draws = []
        for _ in range(samples):
            nu = adaptive_noise(weights, rho, sharpness_norm, generator)
            perturbed = scored(Perturbed(model, plus(weights, nu)), logit_normalise)
            ce, ok = loss_of(perturbed, x[sl], y[sl], loss, eps, alpha, steps, restarts, len(y[sl]), norm=norm)
            draws.append(torch.stack([ce.mean(), 1 - ok.float().mean()]))
        mean_loss, mean_err = torch.stack(draws).mean(0)
        out.append(torch.stack([mean_loss, mean_err, ref_ce[sl].mean(), 1 - ref_ok[sl].float().mean()]))
    return torch.stack(out).T


# -- PAC-Bayes flatness and its magnitude-aware variant (Jiang et al. 2020, §C, Eq. 52-53 and 60-61) ---------------
def pac_bayes_noise(weights, sigma, magnitude_eps, generator):
    """u_i ~ N(0, σ'²) (plain), or N(0, σ'²w_i² + ε²) (magnitude-aware, `magnitude_eps` = ε not None)."""
    nu = {}
    for k, w in weights.items():
        z = torch.randn(w.shape, device=w.device, dtype=w.dtype, generator=generator)
        std = sigma if magnitude_eps is None else torch.sqrt(sigma ** 2 * w ** 2 + magnitude_eps ** 2)
        nu[k] = z.mul_(std)
    return nu


def pac_bayes_sigma(model, x, y, ref_err, magnitude_eps=None, target_deviation=0.1, deviation_tolerance=0.01,
                    search_depth=15, mc_samples=10, sigma_max=2.0, loss="robust", eps=8 / 255, alpha=0.007, steps=20,
                    restarts=1, batch_size=128, seed=0, norm="linf", progress=False):
    """σ': the largest noise level whose expected error increase E_u[err(w + u)] − err(w) reaches the target
    deviation, by bisection on [0, sigma_max] (Jiang et al., §C.2: target 0.1, `mc_samples` draws per σ, stop
    within `deviation_tolerance`; err = the clean error, or the robust error with PGD recomputed on every
    perturbed model). Returns (σ', the σ tried, the mean error at each)."""
    common.seed_everything(seed)  # the PGD starts
    generator = nu_generator(seed, x.device)
    weights = frozen_weights(model)
    low, high, tried, errors = 0.0, sigma_max, [], []
    for _ in common.progress_loop(range(search_depth), "PAC-Bayes bisection (at most)", disable=not progress):
        sigma = (low + high) / 2
        err = torch.stack([1 - loss_of(Perturbed(model, plus(weights, pac_bayes_noise(weights, sigma, magnitude_eps,
                                                                                    generator))),
                                       x, y, loss, eps, alpha, steps, restarts, batch_size, norm=norm)[1].float().mean()
                           for _ in range(mc_samples)]).mean().item()
        tried.append(sigma)
        errors.append(err)
        deviation = abs(err - ref_err)
        if abs(deviation - target_deviation) < deviation_tolerance:
            break
        low, high = (low, sigma) if deviation > target_deviation else (sigma, high)
    return sigma, tried, errors


# -- Hessian trace (Hutchinson 1989; PyHessian, Yao et al. 2020, §3.2) --------------------------------------------
def hessian_trace_probes(model, x, y, probes=100, batch_size=128, reduction="mean", seed=0, progress=False):
    """vᵀHv for `probes` Rademacher vectors v (E[vᵀHv] = tr H) over the conv/linear weights (dim > 1, as
    hessian_top_eigenvalue), of the CE at the given inputs (clean, or fixed adversarial ones). Returns a tensor."""
    weights = {k: p.detach() for k, p in common.perturbable_params(model, weights_only=True).items()}
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    out = []
    for _ in common.progress_loop(range(probes), "Hutchinson probes", disable=not progress):
        v = {k: torch.randint(0, 2, w.shape, device=w.device, generator=g).to(w.dtype).mul_(2).sub_(1)
             for k, w in weights.items()}
        hv = hessian_vector_product(model, weights, x, y, v, batch_size, reduction)
        out.append(sum((hv[k] * v[k]).sum() for k in v))
    return torch.stack(out)


def adversarial_inputs(model, x, y, eps, alpha, steps, restarts, batch_size, seed=0, norm="linf"):
    """x + δ with δ PGD's max-CE iterate on the unperturbed model (the inputs the robust Hessian is taken at)."""
    common.seed_everything(seed)
    return torch.cat([x[sl] + common.pgd(model, x[sl], y[sl], eps, alpha, steps, restarts, norm=norm,
                                         max_inputs=batch_size)[0] for sl in batch_slices(len(y), batch_size)])


# -- Their Python API: the shape of average_case / worst_case ---------------------------------------------------
def api_reference_each(name, model, x, y, s, given):
    """Per-example (loss, correctness) of the unperturbed model (of its normalised logits with logit_normalise):
    measured with the settings, or the caller's pair from flatness.reference_each."""
    if given is None:
        return reference_each(scored(model, s.get("logit_normalise", False)), x, y, s["loss"], s["epsilon"],
                              s["attack_step"], s["steps"], s["ref_restarts"], s["batch_size"], s["seed"], s["norm"])
    require(name, isinstance(given, (tuple, list)) and len(given) == 2 and all(torch.is_tensor(t) and t.shape == y.shape
                                                                              for t in given),
            "reference must be None or a pair (per-example losses, per-example correctness) from "
            "flatness.reference_each")
    return given


def adaptive_worst_case(model, x, y, reference=None, progress=False, **settings):
    """Adaptive worst-case sharpness (Kwon et al. 2021, Eq. 6; Andriushchenko et al. 2023, Eq. 2 with the
    adaptive ball) of the robust loss: the mean over batches b of `sharpness_batch` images of
        max_{ν ∈ A_ρ(w)} L_b(w + ν) − L_b(w),    A_ρ(w) = {ν : ‖ν ⊘ |w|‖_p ≤ ρ},  p = ∞ or 2 (sharpness_norm),
    L_b the batch's RLoss (δ ascended jointly with ν from the reference's adversarial examples, PGD-`steps` ×
    `ref_restarts`) or clean CE
    (loss="clean"), of the normalised logits with logit_normalise; estimated by adaptive_ascent. Elementwise
    relative, so a rescaling that keeps the function keeps the measure. Settings and defaults: rho (None: 0.002
    for linf, 0.5 for l2, the middle of Andriushchenko et al.'s ResNet-18 grids), sharpness_norm="linf",
    sharpness_batch=128, sharpness_steps=20, step_mult=1.0, logit_normalise=False, loss="robust", steps=20,
    ref_restarts=10, norm="linf", epsilon=8/255, attack_step=0.007, batch_size=128, seed=0. `reference`: a pair
    from flatness.reference_each. Returns a Flatness (values, errs: per batch, the best loss and its error)."""
    name = "flatness.adaptive_worst_case"
    s = api_settings("adaptive-worst", settings)
    check_inputs(name, model, x, y)
    with model_kept(model):
        ref_ce, ref_ok = api_reference_each(name, model, x, y, s, reference)
        best, best_err, init, init_err = adaptive_worst_batches(
            model, x, y, ref_ce, ref_ok, s["rho"], s["sharpness_norm"], s["sharpness_batch"], s["sharpness_steps"],
            s["step_mult"], s["logit_normalise"], s["loss"], s["epsilon"], s["attack_step"], s["steps"],
            s["ref_restarts"], s["batch_size"], s["seed"], s["norm"], progress)
    return Flatness(value=(best - init).mean().item(), reference=init.mean().item(),
                    reference_err=init_err.mean().item(), values=best.tolist(), errs=best_err.tolist(), settings=s)


def adaptive_average_case(model, x, y, reference=None, progress=False, **settings):
    """Adaptive average-case sharpness (Andriushchenko et al. 2023, Eq. 3 with ν scaled by |w|) of the robust
    loss: the mean over batches b of `sharpness_batch` images of
        E_z[L_b(w + ρ|w| ⊙ z)] − L_b(w),    z ~ N(0, I) (sharpness_norm="l2") or U(−1, 1)^d ("linf"),
    over `sharpness_samples` draws per batch, with PGD-`steps` × `restarts_perturbed` recomputed on every perturbed model
    (loss="robust") or the clean CE. Settings and defaults: rho (None: 0.1 for l2, 0.2 for linf),
    sharpness_norm="l2", sharpness_batch=128, sharpness_samples=20, logit_normalise=False, loss="robust",
    restarts_perturbed=1, steps=20, ref_restarts=10, norm="linf", epsilon=8/255, attack_step=0.007,
    batch_size=128, seed=0. Returns a Flatness (values, errs: per batch, the mean over its draws)."""
    name = "flatness.adaptive_average_case"
    s = api_settings("adaptive-average", settings)
    check_inputs(name, model, x, y)
    with model_kept(model):
        ref_ce, ref_ok = api_reference_each(name, model, x, y, s, reference)
        mean, mean_err, init, init_err = adaptive_average_batches(
            model, x, y, ref_ce, ref_ok, s["rho"], s["sharpness_norm"], s["sharpness_batch"], s["sharpness_samples"],
            s["logit_normalise"], s["loss"], s["epsilon"], s["attack_step"], s["steps"], s["restarts_perturbed"],
            s["seed"], s["norm"], progress)
    return Flatness(value=(mean - init).mean().item(), reference=init.mean().item(),
                    reference_err=init_err.mean().item(), values=mean.tolist(), errs=mean_err.tolist(), settings=s)


def pac_bayes(model, x, y, magnitude_aware=False, reference=None, progress=False, **settings):
    """PAC-Bayes flatness 1/σ'² (Jiang et al. 2020, Eq. 53), or its magnitude-aware variant (Eq. 61) with noise
    u_i ~ N(0, σ'²w_i² + ε²), of the robust error (PGD-`steps` × `restarts_perturbed` on every perturbed model;
    the reference PGD-`steps` × `ref_restarts`) or the clean error: σ' from pac_bayes_sigma. Larger = sharper.
    The plain variant's noise is absolute, so a rescaling that keeps the function changes it; the
    magnitude-aware one is invariant up to ε. Settings and defaults (Jiang et al.'s): target_deviation=0.1,
    deviation_tolerance=0.01, search_depth=15, mc_samples=10, sigma_max=2.0, magnitude_eps=1e-3 (magnitude-aware
    only), loss="robust", restarts_perturbed=1, steps=20, ref_restarts=10, norm="linf", epsilon=8/255,
    attack_step=0.007, batch_size=128, seed=0. Returns a Flatness: value 1/σ'², reference the error of w, values
    the σ of the bisection, errs the mean error at each, details {"sigma": σ', "converged": within tolerance}."""
    mode = "pac-bayes-mag" if magnitude_aware else "pac-bayes"
    name = "flatness.pac_bayes"
    s = api_settings(mode, settings)
    check_inputs(name, model, x, y)
    with model_kept(model):
        ref_ce, ref_ok = api_reference_each(name, model, x, y, s, reference)
        ref_err = 1 - ref_ok.float().mean().item()
        sigma, tried, errors = pac_bayes_sigma(
            model, x, y, ref_err, s.get("magnitude_eps"), s["target_deviation"], s["deviation_tolerance"],
            s["search_depth"], s["mc_samples"], s["sigma_max"], s["loss"], s["epsilon"], s["attack_step"], s["steps"],
            s["restarts_perturbed"], s["batch_size"], s["seed"], s["norm"], progress)
    converged = abs(abs(errors[-1] - ref_err) - s["target_deviation"]) < s["deviation_tolerance"]
    return Flatness(value=1 / sigma ** 2, reference=ref_err, reference_err=ref_err, values=tried, errs=errors,
                    settings=s, details={"sigma": sigma, "converged": converged, "reference_loss": ref_ce.mean().item()})


def hessian_trace(model, x, y, progress=False, **settings):
    """tr ∇²_w L(w) by Hutchinson's estimator (mean of vᵀHv over `probes` Rademacher v; PyHessian's), w the
    conv/linear weights (dim > 1, as for λ_max), L the mean CE at fixed adversarial inputs (PGD-`steps` ×
    `ref_restarts` on the unperturbed model, the max-CE iterate; the Hessian ignores δ's dependence on w) or at
    the clean inputs (loss="clean"). Not reparameterisation-invariant: a layer scaled by α has its block of H
    scaled by 1/α². Settings and defaults: probes=100, hessian_reduction="mean" (or "batch-sum", as
    --hessian-reduction), loss="robust", steps=20, ref_restarts=10, norm="linf", epsilon=8/255,
    attack_step=0.007, batch_size=128, seed=0. Returns a Flatness: value the estimate, values vᵀHv per probe,
    reference the loss at those inputs, details {"stderr": the standard error of the mean}."""
    name = "flatness.hessian_trace"
    s = api_settings("hessian-trace", settings)
    check_inputs(name, model, x, y)
    with model_kept(model):
        if s["loss"] == "robust":
            x = adversarial_inputs(model, x, y, s["epsilon"], s["attack_step"], s["steps"], s["ref_restarts"],
                                   s["batch_size"], s["seed"], s["norm"])
        ce, ok = common.clean_metrics(model, x, y, s["batch_size"])
        vhv = hessian_trace_probes(model, x, y, s["probes"], s["batch_size"], s["hessian_reduction"], s["seed"],
                                   progress)
    stderr = (vhv.double().std() / len(vhv) ** 0.5).item() if len(vhv) > 1 else float("nan")
    return Flatness(value=vhv.mean().item(), reference=ce.mean().item(), reference_err=1 - ok.float().mean().item(),
                    values=vhv.tolist(), errs=[], settings=s, details={"stderr": stderr})


# ----------------------------------------------------------------------------------------------
# 1-D landscapes along random and adversarial weight directions (Fig. 4, Eq. 2)
# ----------------------------------------------------------------------------------------------
def normalise_direction(d, weights, norm, c):
    """Per layer: l2 scales d_l to c·‖w_l‖ (Eq. 2); max-abs scales max|d_l| to c·max|w_l| (the
    released code's `weight_direction`)."""
    if norm == "l2":
        return {k: v * (c * weights[k].norm() / v.norm().clamp_min(1e-12)) for k, v in d.items()}
    return {k: v * (c * weights[k].abs().max() / v.abs().max().clamp_min(1e-12)) for k, v in d.items()}


def landscape_directions(model, x, y, kind, count, args, generator):
    """`count` raw directions, normalised: random (Gaussian per layer) or adversarial (weights-only
    ascent on the CE of fixed PGD-`landscape_steps` examples, ξ = adversarial_xi, from a random start
    inside the ball; the final ν is the direction)."""
    weights = frozen_weights(model)
    if kind == "random":
        raw = [relative_random(weights, 1.0, generator) for _ in range(count)]
        c = args.random_scale
    else:
        delta, _ = common.pgd(model, x, y, args.epsilon, args.attack_step, args.landscape_steps, norm=args.norm)
        raw = [joint_ascent(model, x + delta, y, args.adversarial_xi, args.adversarial_passes, args.weight_step,
                            args.batch_size, attack_inputs=False, generator=generator)[0][0] for _ in range(count)]
        c = args.adversarial_scale
    return [normalise_direction(d, weights, args.direction_norm, c) for d in raw]


def landscape(model, x, y, args, progress=False):
    """Robust and clean loss (and error) of f(·; w + s·d) for s in linspace(-1, 1, points), PGD
    recomputed on every perturbed model: {kind: {"robust": [[...]], ...}} per direction."""
    common.seed_everything(args.seed)
    generator = nu_generator(args.seed, x.device)
    weights = frozen_weights(model)
    s_values = [-1 + 2 * i / (args.points - 1) for i in range(args.points)]  # 51 points: steps of 0.04
    out = {}
    for kind in ("random", "adversarial"):
        curves = {"robust": [], "robust_err": [], "clean": [], "clean_err": []}
        for d in common.progress_loop(landscape_directions(model, x, y, kind, args.directions, args, generator),
                                      f"{kind} directions", total=args.directions, disable=not progress):
            points = []
            for s in s_values:
                perturbed = Perturbed(model, plus(weights, d, s))
                rce, rok = common.robust_metrics(perturbed, x, y, args.epsilon, args.attack_step,
                                                 args.landscape_steps, 1, args.batch_size, norm=args.norm)
                cce, cok = common.clean_metrics(perturbed, x, y, args.batch_size)
                points.append(torch.stack([rce.mean(), 1 - rok.float().mean(), cce.mean(), 1 - cok.float().mean()]))
            for key, column in zip(curves, torch.stack(points).T.tolist()):  # one curve over s per key
                curves[key].append(column)
        out[kind] = curves
    return s_values, out


# ----------------------------------------------------------------------------------------------
# Largest Hessian eigenvalue (power iteration on Hessian-vector products)
# ----------------------------------------------------------------------------------------------
def hessian_vector_product(model, weights, x, y, v, batch_size=128, reduction="mean"):
    """H·v of the clean CE w.r.t. `weights` by double backward, accumulated over batches.
    reduction 'mean': the Hessian of the mean CE over all examples; 'batch-sum': of the sum of the
    batch-mean CEs (the released code)."""
    hv = {k: torch.zeros_like(w) for k, w in weights.items()}
    with common.bn_mode(model, "eval"):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            w = {k: t.detach().requires_grad_(True) for k, t in weights.items()}
            ce = F.cross_entropy(functional_call(model, w, (xb,)).float(), yb, reduction="sum")
            ce = ce / (len(y) if reduction == "mean" else len(yb))
            grads = torch.autograd.grad(ce, list(w.values()), create_graph=True)
            dot = sum((g * v[k]).sum() for k, g in zip(w, grads))
            for k, h in zip(w, torch.autograd.grad(dot, list(w.values()))):
                hv[k] += h
    return hv


def hessian_top_eigenvalue(model, x, y, iters=100, tol=1e-3, batch_size=128, reduction="mean", seed=0,
                           progress=False):
    """Power iteration v ← Hv/‖Hv‖ w.r.t. the conv/linear weights (dim > 1, as the released code),
    λ = vᵀHv. It converges to the eigenvalue of largest magnitude, which is the largest one near
    a minimum (there |λ_min|/λ_max ≈ 0.08, per the released notebook). Returns
    (λ, iterations, converged, history)."""
    weights = {k: p.detach() for k, p in common.perturbable_params(model, weights_only=True).items()}
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    v = {k: torch.randn(w.shape, device=w.device, generator=g) for k, w in weights.items()}
    history, converged = [], False
    for it in common.progress_loop(range(1, iters + 1), "power iterations (at most)", disable=not progress):
        norm = torch.sqrt(sum((t ** 2).sum() for t in v.values()))
        v = {k: t / norm for k, t in v.items()}
        hv = hessian_vector_product(model, weights, x, y, v, batch_size, reduction)
        history.append(sum((hv[k] * v[k]).sum() for k in v).item())   # Rayleigh quotient vᵀHv
        v = hv
        if it > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            converged = True
            break
    return history[-1], len(history), converged, history


# ----------------------------------------------------------------------------------------------
# Scale invariance (§3.2): a BN-compensated rescaling that keeps the function
# ----------------------------------------------------------------------------------------------
def conv_bn_pairs(model):
    """(conv name, BN name) for every BatchNorm whose input is exactly one conv's output (found
    by tracing the forward with torch.fx, so the pairing follows the data flow, not names)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:
        raise common.UsageError(f"--scale needs a model torch.fx can trace ({type(e).__name__}: {str(e)[:200]})")
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1):
                pairs.append((src.target, node.target))
    return pairs


def rescale(model, alpha, bn_eps=False):
    """A copy of the model with every conv kernel (and bias) that feeds a BN multiplied by α, and
    that BN's running_mean by α and running_var by α². In eval mode BN(α·z) = γ(α·z − α·μ)/√(α²σ² + eps) + β
    equals BN(z) up to the BN eps: exactly if `bn_eps` also multiplies eps by α² (then, for α a
    power of two, bit for bit). The linear head is left alone, so the logits do not change (the
    released code also scaled the head, multiplying the logits by α)."""
    scaled = copy.deepcopy(model)
    pairs = conv_bn_pairs(scaled)
    check(pairs, "--scale found no conv feeding a BatchNorm in this model")
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = scaled.get_submodule(conv_name), scaled.get_submodule(bn_name)
            check(bn.running_mean is not None, f"--scale needs BN running statistics ({bn_name} has none)")
            conv.weight.mul_(alpha)
            if conv.bias is not None:
                conv.bias.mul_(alpha)
            bn.running_mean.mul_(alpha)
            bn.running_var.mul_(alpha ** 2)
            if bn_eps:
                bn.eps = bn.eps * alpha ** 2
    return scaled.eval(), pairs


@torch.no_grad()
def logit_change(model, scaled, x, batch_size=500):
    """(max |Δlogit|, max |logit|) between the model and its rescaled copy (eval mode)."""
    diff, top = 0.0, 0.0
    with common.bn_mode(model, "eval"), common.bn_mode(scaled, "eval"):
        for i in range(0, len(x), batch_size):
            a, b = model(x[i:i + batch_size]), scaled(x[i:i + batch_size])
            diff, top = max(diff, (a - b).abs().max().item()), max(top, a.abs().max().item())
    return diff, top


# ----------------------------------------------------------------------------------------------
# Driver: one checkpoint, all requested modes
# ----------------------------------------------------------------------------------------------
def selected_modes(args):
    return {"both": ["average", "worst"], "all": list(MEASURES)}.get(args.mode, [args.mode])


# The flags that determine each mode's numbers, besides the model, the seed, the PGD batch size and the
# rescaling (README "Result files")
MODE_SETTINGS = {  # (the Hessian, of the clean CE, has no threat model)
    "average": ("loss", "subset", "n_eval", "xi", "samples", "restarts_perturbed", "steps", "ref_restarts", "norm",
                "epsilon", "attack_step", "estimator"),
    "worst": ("loss", "subset", "n_eval", "xi", "restarts", "passes", "weight_step", "per_batch", "joint_batch_size",
              "steps", "ref_restarts", "norm", "epsilon", "attack_step", "estimator"),
    "landscape": ("directions", "points", "n_landscape", "landscape_steps", "direction_norm", "random_scale",
                  "adversarial_scale", "adversarial_xi", "adversarial_passes", "weight_step", "norm", "epsilon",
                  "attack_step"),
    "hessian": ("n_hessian", "hessian_iters", "hessian_tol", "hessian_reduction"),
    "hessian-trace": ("loss", "n_hessian", "probes", "hessian_reduction", "steps", "ref_restarts", "norm", "epsilon",
                      "attack_step"),
}
for _mode in ("adaptive-worst", "adaptive-average", "pac-bayes", "pac-bayes-mag"):  # the API's, on the --subset
    MODE_SETTINGS[_mode] = ("subset", "n_eval") + tuple(k for k in API_SETTINGS[_mode] if k not in ("batch_size", "seed"))


def protocol(args, mode):
    """How `mode` measures: its MODE_SETTINGS (ξ resolved to the mode's paper value when not given) and the
    settings every mode shares."""
    how = {k: getattr(args, k) for k in MODE_SETTINGS[mode] + ("batch_size", "seed", "scale", "scale_bn_eps")}
    return mode_defaults(mode, how)


def flatness_settings(args, info, mode):
    """(settings, non_default) of one mode's result, after resolve_threat() (--norm, --epsilon and --attack-step not
    given: the model's). --loss, --subset, --direction-norm, --scale, --norm and --sharpness-norm choose what is
    measured, so the paper's protocol they are compared with follows them (e.g. 50 draws for --loss clean, ε 128/255 for --norm l2)."""
    resolve_threat(args, info)
    chosen = ["--sharpness-norm", args.sharpness_norm] if args.sharpness_norm else []
    default = common.threat_defaults(parse_args(["-", "--mode", mode, "--loss", args.loss, "--subset", args.subset,
                                                 "--direction-norm", args.direction_norm, "--scale", str(args.scale),
                                                 "--norm", args.norm, *chosen]))
    return result_settings("flatness.py", mode, args, info, protocol(args, mode), protocol(default, mode))


class Data:
    """The paper's fixed subsets (README 'Data'), loaded once and shared by every checkpoint of --epochs."""

    def __init__(self, args, device):
        self.args, self.device, self.cache = args, device, {}

    def get(self, name, n):
        if (name, n) not in self.cache:
            self.cache[(name, n)] = common.eval_split(self.args.data_dir, name, n, self.device, self.args.dataset)
        return self.cache[(name, n)]

    def for_mode(self, mode):
        """(x, y) a mode measures on: the --subset for the flatness measures, the last test images
        for the landscape and the Hessian."""
        if mode == "landscape":
            return self.get("early-stop", self.args.n_landscape)
        if mode in ("hessian", "hessian-trace"):
            return self.get("early-stop", self.args.n_hessian)
        return self.get(self.args.subset, self.args.n_eval)


def measure_checkpoint(model, info, todo, checkpoint_sha256, args, data, device, progress):
    """Run every mode of `todo` ({mode: (result path, settings, non_default)}) on one model; one JSON per mode."""
    model = model.float().eval()  # every reported number is fp32 (README 'Conventions')
    base = {"epoch": info["epoch"], "source": info["source"], "model_args": info["args"],
            "versions": common.versions(device),  # Σ_l ‖w_l‖² of the perturbed tensors: plots.py's weight-norm baseline
            "weight_norm_sq": sum((w.double() ** 2).sum() for w in frozen_weights(model).values()).item()}
    if args.scale != 1:
        x_check, _ = data.for_mode(next(iter(todo)))
        scaled, pairs = rescale(model, args.scale, args.scale_bn_eps)
        diff, top = logit_change(model, scaled, x_check)
        check(diff <= args.scale_tol * max(top, 1.0),
              f"--scale {args.scale:g} changed the logits by {diff:.3g} (max |logit| {top:.3g}), more than "
              f"--scale-tol {args.scale_tol:g}; the BN eps makes the rescaling approximate for tiny running variances")
        print(f"scale α={args.scale:g}: {len(pairs)} conv→BN pairs rescaled, max |Δlogit| = {diff:.2e} "
              f"(max |logit| {top:.2f}, {len(x_check)} images)")
        base.update(scale_pairs=len(pairs), scale_logit_max_diff=diff, scale_logit_max=top, scale_check_n=len(x_check))
        model = scaled

    refs = {}  # per example, of the model or its normalised logits: shared by the measures on the --subset
    for mode, (path, settings, non_default) in todo.items():
        t0 = time.time()
        x, y = data.for_mode(mode)
        api = {k: settings[k] for k in API_SETTINGS.get(mode, ())}
        key = (api.get("logit_normalise", False), api.get("estimator", "project"))
        if mode in API_SETTINGS and mode != "hessian-trace" and key not in refs:
            refs[key] = (reference_each(scored(model, key[0]), x, y, args.loss, args.epsilon, args.attack_step,
                                        args.steps, args.ref_restarts, args.batch_size, args.seed, args.norm, key[1]),
                         time.time() - t0)
            t0 = time.time()
        if mode in ("average", "worst"):
            (ce, ok), ref_time = refs[key]
            box = (info["args"] or {}).get("clip") or None  # a weight-clipped model stays in its box
            measure = average_case if mode == "average" else worst_case
            m = measure(model, x, y, reference=(ce.mean().item(), 1 - ok.float().mean().item()), box=box,
                        progress=progress, **api)
            result = {"n": len(y), "reference": m.reference, "reference_err": m.reference_err,
                      "reference_time_s": ref_time, "values": m.values, "errs": m.errs, "value": m.value,
                      "value_std": m.value_std, "box": box}
            print(f"{mode}-case {args.loss} flatness ({args.norm}, ξ={m.settings['xi']:g}, n={len(y)}): "
                  f"reference {m.reference:.4f}, perturbed {'mean' if mode == 'average' else 'max'} "
                  f"{m.value + m.reference:.4f} → {m.value:.4f}")
        elif mode in API_SETTINGS:  # the other measures
            if mode == "hessian-trace":
                m = hessian_trace(model, x, y, progress=progress, **api)
            else:
                measure = {"adaptive-worst": adaptive_worst_case, "adaptive-average": adaptive_average_case,
                           "pac-bayes": pac_bayes, "pac-bayes-mag": functools.partial(pac_bayes, magnitude_aware=True)}
                m = measure[mode](model, x, y, reference=refs[key][0], progress=progress, **api)
            result = {"n": len(y), "reference": m.reference, "reference_err": m.reference_err, "values": m.values,
                      "errs": m.errs, "value": m.value, "value_std": m.value_std, **m.details}
            how = {"adaptive-worst": f"ρ={m.settings.get('rho')}, {m.settings.get('sharpness_norm')}",
                   "adaptive-average": f"ρ={m.settings.get('rho')}, {m.settings.get('sharpness_norm')}",
                   "pac-bayes": f"σ'={m.details.get('sigma', 0):.4g}", "pac-bayes-mag": f"σ'={m.details.get('sigma', 0):.4g}",
                   "hessian-trace": f"± {m.details.get('stderr', 0):.3g} (std. error)"}[mode]
            print(f"{mode} {args.loss} ({args.norm}, n={len(y)}): reference {m.reference:.4f} → {m.value:.5g} ({how})")
            if m.details.get("converged") is False:
                print(f"  not converged: after {len(m.values)} bisection steps the error increase is "
                      f"{abs(m.errs[-1] - m.reference):.3f}, not {args.target_deviation:g} ± {args.deviation_tolerance:g} "
                      f"(raise --search-depth; with σ' near --sigma-max {args.sigma_max:g} the target is out of reach of "
                      f"an error of {m.reference:.3f} for w: lower --target-deviation)")
        elif mode == "landscape":
            s_values, curves = landscape(model, x, y, args, progress)
            result = {"subset": "early-stop", "n": len(y), "s": s_values, **curves}
            mean = {k: [sum(col) / len(col) for col in zip(*curves[k]["robust"])] for k in curves}
            mid = args.points // 2
            print(f"landscape (n={len(y)}): mean RLoss at s = -1 / {s_values[mid]:g} / +1: random "
                  f"{mean['random'][0]:.3f} / {mean['random'][mid]:.3f} / {mean['random'][-1]:.3f}, adversarial "
                  f"{mean['adversarial'][0]:.3f} / {mean['adversarial'][mid]:.3f} / {mean['adversarial'][-1]:.3f}")
        else:  # hessian
            eig, iters, converged, history = hessian_top_eigenvalue(
                model, x, y, args.hessian_iters, args.hessian_tol, args.batch_size, args.hessian_reduction,
                args.seed, progress)
            result = {"eigenvalue": eig, "iterations": iters, "converged": converged, "history": history,
                      "subset": "early-stop", "n": len(y), "params": "conv/linear weights (dim > 1), clean CE"}
            print(f"Hessian λ_max = {eig:.4g} after {iters} power iterations"
                  f"{'' if converged else ' (not converged: raise --hessian-iters)'} (n={len(y)})")
        write_result(path, settings, non_default, checkpoint_sha256, {**result, **base, "time_s": time.time() - t0})
        print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    progress = True  # common.progress_loop: tqdm on a terminal, a line every 30 s in a log file
    data = Data(args, device)
    if args.epochs is None:  # one checkpoint, or a RobustBench model (None)
        checkpoints = [None if args.robustbench else Path(args.checkpoint)]
    else:  # every snapshot of a run (Fig. 6); those measured with these settings are skipped
        run_dir = Path(args.epochs)
        check(run_dir.is_dir(), f"--epochs {run_dir} is not a folder")
        checkpoints = sorted(run_dir.glob("ckpt_epoch*.pt"))
        check(checkpoints, f"no ckpt_epoch*.pt snapshots in {run_dir} (train_*.py writes one every --es-every epochs)")

    for checkpoint in common.progress_loop(checkpoints, "snapshots", disable=len(checkpoints) == 1):
        if checkpoint is not None:
            args.checkpoint = str(checkpoint)
        model, info = load_model(args, device)
        args.data_dir, args.dataset = data_dir_of(args, info), dataset_of(args, info)  # --epochs: the run's data
        folder = result_folder(args)  # beside the checkpoint (--robustbench: --model-dir)
        check(folder.is_dir(), f"output folder {folder} does not exist")
        sha256 = model_sha256(args, info)
        todo = {}
        for mode in selected_modes(args):
            settings, non_default = flatness_settings(args, info, mode)  # (--norm: the checkpoint's unless given)
            path = result_path(folder, settings)
            if not already_measured(path, settings, sha256, args.force):
                todo[mode] = (path, settings, non_default)
        if todo:
            print(f"{args.checkpoint or args.robustbench} (epoch {info['epoch']})")
            measure_checkpoint(model, info, todo, sha256, args, data, device, progress)


if __name__ == "__main__":
    common.run_cli(main)
