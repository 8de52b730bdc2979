"""Adversarial weight perturbation (AT-AWP, Wu et al. 2020) — a Table 1 row of Stutz, Hein & Schiele (ICCV
2021), on the AT baseline's data, model, optimiser, schedule, snapshots, logging (diff with train_at.py).

    min_w  E_(x,y) [ max_{‖ν_l‖ ≤ ξ‖w_l‖} max_{‖δ‖∞ ≤ ε} CE(f(x + δ; w + ν), y) ]     (Wu et al. Eq. 6, per layer l)

Per batch, one ascent step for each max (Wu et al.'s AT_AWP code):
  1. x' = x + δ from PGD-7 on CE at the current weights w (step 0.007, ε = 8/255, eval-mode BN), as AT;
  2. g = ∇_w CE(f(x'; w), y) for the conv/linear weights (dim > 1: no biases, no BN);
     per layer ν_l = ξ · d_l with d_l = g_l · ‖w_l‖ / ‖g_l‖, so ‖ν_l‖ = ξ‖w_l‖ (the paper's relative ball, Eq. 4);
  3. w ← w + ν; one optimiser step with the gradient of CE(f(x'; w + ν), y) (train-mode BN);
     then w ← w − ν with the same ν (the restore follows the step, as in Wu et al.).
The paper's released 1-step variant returns the unperturbed weights by a bookkeeping bug; not copied.

Usage:   python train_awp.py --xi 0.005
CPU:     python train_awp.py --data-dir ../shared/data/cifar10-jpeg --width 16 --train-subset 2000 --epochs 2
Resume:  python train_awp.py --out runs/awp --resume             # continues from runs/awp/ckpt_last.pt
Multi-GPU: torchrun --nproc_per_node=4 train_awp.py ...          # global batch stays --batch-size

Cost (measured, see docs/speed.md): not yet measured on a GPU; per batch one forward/backward more
than AT (the direction g). Paper: AutoAttack RErr 54.3 % at epoch 150, 53.6 % early-stopped (paper Table 1).
"""
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
from common import check, fraction

METHOD = "awp"


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__)
    common.add_runtime_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--train-subset", type=int, default=0, help="class-balanced subset of N training images (0 = all)")
    common.add_model_args(p)
    common.add_optim_args(p)
    g = p.add_argument_group("training attack")
    g.add_argument("--norm", default="linf", choices=tuple(common.THREATS),
                   help="threat model: linf ‖δ‖∞ ≤ ε (paper) | l2 ‖δ‖₂ ≤ ε (Rice et al., AWP); sets the defaults below "
                   "and the ε of the test and early-stopping metrics (linf 8/255, l2 128/255)")
    g.add_argument("--epsilon", type=common.pixels, default=None,
                   help="radius during training; None: the --norm's, linf 8/255 (Table 1 'larger ε': 9/255), l2 128/255")
    g.add_argument("--attack-step", type=common.pixels, default=None,
                   help="PGD step size; None: linf 0.007 (paper), l2 15/255")
    g.add_argument("--attack-steps", type=int, default=None,
                   help="PGD iterations; None: linf 7 (paper), l2 10 (Rice et al., AWP); 0 = standard training")
    g.add_argument("--attack-bn", default="eval", choices=("eval", "train"),
                   help="BN mode during the attack (paper code: eval; Rice et al./AWP code: train)")
    g = p.add_argument_group("AWP")
    g.add_argument("--xi", type=fraction, default=0.005,
                   help="ξ: relative per-layer size ‖ν_l‖/‖w_l‖ of the weight perturbation (Wu et al.: 5e-3 for "
                   "ResNets, their PRN-18 run 1e-2; paper sweep 1e-4 ... 5e-2; 0 = plain AT)")
    g.add_argument("--awp-warmup", type=int, default=0, help="epochs of plain AT before AWP starts (Wu et al.: 0 for AT-AWP)")
    g.add_argument("--grad-clip", type=fraction, default=0.0,
                   help="C: clamp every gradient element to [−C, C] before the AWP step (the paper's own AWP "
                   "variant: 0.05; 0 = off, as Wu et al.; not during --awp-warmup)")
    g = p.add_argument_group("regularisers (Table 1 rows)")
    g.add_argument("--label-smoothing", type=fraction, default=0.0, help="τ: target (1−τ)·onehot + τ/K (best 0.3)")
    g.add_argument("--label-noise", type=fraction, default=0.0, help="p: labels resampled uniformly w.p. p per step (best 0.4)")
    g.add_argument("--clip", type=fraction, default=0.0, help="w: clamp weights to [−w, w] after each step (best 0.005)")
    g.add_argument("--ema", type=fraction, default=0.0, help="τ: EMA of the weights per step, saved as 'ema' (paper 0.9975)")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--out", default=f"runs/{METHOD}", help="run folder")
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt_last.pt")
    g.add_argument("--eval-every", type=int, default=1, help="log test clean/PGD-7 metrics every N epochs")
    g.add_argument("--n-log", type=int, default=1280, help="test images for per-epoch logging (paper: first 10 batches)")
    g.add_argument("--es-every", type=int, default=5, help="early-stopping check (and snapshot) every N epochs")
    g.add_argument("--n-early-stop", type=int, default=500, help="last N test images for early stopping (paper: 500)")
    g.add_argument("--es-restarts", type=int, default=5, help="PGD-7 restarts of the early-stopping check (paper: 5)")
    g = p.add_argument_group("speed (GPU)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast for the training attack only (δ stays fp32); the "
                   "AWP direction and the update at w + ν stay fp32: bf16 rounding (2^-8) is of the order of ξ")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (saved weights come from the plain module)")
    args = common.threat_defaults(p.parse_args(argv))
    check(args.xi >= 0 and args.awp_warmup >= 0 and args.grad_clip >= 0,
          "--xi, --awp-warmup and --grad-clip must be >= 0")
    check(args.attack_steps >= 0 and args.attack_step > 0, "--attack-steps must be >= 0 and --attack-step > 0")
    check(args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch-size must be >= 1")
    check(args.lr > 0 and args.wd >= 0, "--lr must be > 0 and --wd >= 0")
    check(0 <= args.label_smoothing < 1 and 0 <= args.label_noise <= 1, "--label-smoothing in [0, 1), --label-noise in [0, 1]")
    check(args.clip >= 0 and 0 <= args.ema < 1, "--clip must be >= 0 and --ema in [0, 1)")
    check(args.eval_every >= 1 and args.es_every >= 1, "--eval-every and --es-every must be >= 1")
    args.method = METHOD
    return args


# ----------------------------------------------------------------------------------------------
# The method: PGD at w, one ascent step in weight space, then the update with the gradient at w + ν
# ----------------------------------------------------------------------------------------------
def adversarial_batch(model, x, y, args):
    """x + δ with δ from PGD-`attack_steps` on true-label CE (eval-mode BN by default)."""
    if args.attack_steps == 0:
        return x
    delta, _ = common.pgd(model, x, y, args.epsilon, args.attack_step, args.attack_steps,
                          bn=args.attack_bn, autocast=args.amp, norm=args.norm)
    return x + delta


def training_loss(logits, y, args):
    """CE on the adversarial batch; label noise and smoothing change the training target only."""
    if args.label_noise > 0:
        y = common.noisy_labels(y, args.label_noise, logits.shape[1])
    return F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)


def weight_perturbation(net, weights, x_adv, y, xi, world=1):
    """({name: ν_l}, logits at w) with ν_l = ξ · g_l · ‖w_l‖ / ‖g_l‖ and g = ∇_w CE(f(x'; w), y) for the
    layers in `weights` (conv/linear weights with dim > 1, as Wu et al.), in fp32. This is Wu et al.'s proxy step:
    their proxy takes one SGD step on −CE and uses the difference, whose per-layer normalisation makes
    the proxy's lr irrelevant; the same 1e-20 guards a zero gradient.

    BatchNorm: train mode (batch statistics), as Wu et al.'s proxy and as the update's forward (the
    direction uses plain CE on the true labels, as Wu et al., even under label smoothing or noise);
    the forward runs on throwaway copies of the BN running
    statistics (their proxy is a copy of the model), so the real running statistics are untouched.
    Under DDP g is averaged over the ranks before normalising, so every replica adds the same ν
    (a per-rank ν makes the replicas drift apart; tests/test_methods.py checks that they stay identical)."""
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    with common.bn_mode(net, "train"):
        logits = torch.func.functional_call(net, buffers, (x_adv,))
    grads = torch.autograd.grad(F.cross_entropy(logits.float(), y), list(weights.values()))
    if world > 1:  # one collective for all layers
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        grads = [g.view_as(w) for g, w in zip(flat.split([w.numel() for w in weights.values()]), weights.values())]
    nu = {k: xi * g * (w.detach().norm() / (g.norm() + 1e-20)) for (k, w), g in zip(weights.items(), grads)}
    return nu, logits.detach()


@torch.no_grad()
def add_to_weights(weights, nu, alpha):
    """w_l ← w_l + alpha · ν_l in place (alpha = +1 perturbs, −1 restores with the same ν)."""
    for k, v in nu.items():
        weights[k].add_(v, alpha=alpha)


def train_step(model, attack_model, opt, sched, ema, x, y, args, xi):
    """One AT-AWP step on the adversarial batch x' = x + δ (PGD at w, as AT; Wu et al. Alg. 1):
    ν from weight_perturbation, w ← w + ν, the training loss at w + ν through `model` (the network, or
    its DDP wrapper) in train-mode BN, optional element-wise gradient clipping, the optimiser step
    (momentum and weight decay act at w + ν, as in Wu et al.), w ← w − ν with the same ν; then the
    per-step schedule, weight clipping and EMA. With xi = 0 (--awp-warmup epochs) it is train_at.py's
    step. The direction pass and the update at w + ν run in fp32. The training forward updates the BN
    running statistics at w + ν (as Wu et al.; the paper's code copies them from a forward at w).
    Returns the log sums at w (from the direction pass), comparable with every other method's."""
    net = common.unwrap(model)
    x_adv = adversarial_batch(attack_model, x, y, args)
    weights = common.perturbable_params(net, weights_only=True)
    nu, logits_w = weight_perturbation(net, weights, x_adv, y, xi, common.world_size()) if xi > 0 else ({}, None)
    add_to_weights(weights, nu, +1)
    logits = model(x_adv)
    loss = training_loss(logits, y, args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip and xi > 0:  # part of the paper's AWP variant; warm-up epochs are plain AT
        torch.nn.utils.clip_grad_value_(net.parameters(), args.grad_clip)
    opt.step()
    add_to_weights(weights, nu, -1)
    sched.step()
    if args.clip:
        common.clip_weights(net, args.clip)
    if ema is not None:
        ema.update_parameters(net)
    return common.batch_stats(logits if logits_w is None else logits_w, y)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup_distributed(args.device)
    check(args.batch_size % world == 0, f"--batch-size {args.batch_size} must divide over {world} processes")
    common.seed_everything(args.seed + rank)  # attack starts and label noise differ per rank; DDP broadcasts rank 0's init
    common.check_out(args)  # a folder that holds a run needs --resume; nothing is written before epoch 1 ends

    # ---- data: training set on the device; fixed logging / early-stopping subsets (README "Data")
    x_train, y_train = common.load_images(args.data_dir, train=True, dataset=args.dataset)
    if args.train_subset:
        idx = common.balanced_subset(y_train, args.train_subset)
        x_train, y_train = x_train[idx], y_train[idx]
    check(len(y_train) >= args.batch_size, f"{len(y_train)} training images < --batch-size {args.batch_size}")
    loader = common.DeviceLoader(x_train, y_train, args.batch_size, device, args.seed, rank, world,
                                augment=common.DATASETS[args.dataset]["augment"])
    x_log, y_log = common.eval_split(args.data_dir, "log", args.n_log, device, args.dataset)
    x_es, y_es = common.eval_split(args.data_dir, "early-stop", args.n_early_stop, device, args.dataset)

    # ---- model, optimiser, schedule (stepped per batch), EMA; --resume restores all of them
    net = common.build_model(vars(args)).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.clip:
        common.clip_weights(net, args.clip)
    opt, sched = common.make_optimizer(net, args, len(loader))
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    es_model = net if ema is None else ema.module  # what early stopping selects (README "Deviations")
    epoch, history, best = 0, [], None  # epochs done, one metrics dict per epoch, early-stopping choice
    ckpt = common.resume_checkpoint(args, device, rank)  # ckpt_last.pt, or the newest intact snapshot
    if ckpt is not None:
        epoch, history, best = common.restore(ckpt, args, net, opt, sched, ema, loader, rank, world)
    attack_model = torch.compile(net) if args.compile else net  # attacks run on the unwrapped module
    model = DistributedDataParallel(net) if world > 1 else net  # only the training forward goes through DDP
    if args.compile:
        model = torch.compile(model)

    while epoch < args.epochs:
        epoch += 1
        last = epoch == args.epochs
        t0 = time.time()
        net.train()
        lr, sums = opt.param_groups[0]["lr"], {}  # logged: the lr of the epoch's first step
        for x, y in common.progress_loop(loader, f"epoch {epoch}", disable=rank != 0):
            xi = args.xi if epoch > args.awp_warmup else 0.0  # --awp-warmup epochs of plain AT first
            common.add_stats(sums, train_step(model, attack_model, opt, sched, ema, x, y, args, xi))
        metrics = {"epoch": epoch, "lr": lr, **common.train_means(sums, world),
                   "train_time_s": time.time() - t0}
        common.sync_buffers(net, world)  # BN statistics of rank 0 on every rank
        if ema is not None:  # its BN buffers average each rank's own statistics: rank 0's on every rank
            common.sync_buffers(ema, world)

        # ---- test metrics (fp32): clean and PGD-7 on the first --n-log test images
        if epoch % args.eval_every == 0 or last:
            metrics.update(common.epoch_metrics(net, x_log, y_log, args.attack_step, 1, "test_", rank, world,
                                                norm=args.norm))
        # ---- after the last epoch: the EMA model's BN statistics, re-estimated on the training set
        if last and ema is not None:
            common.reestimate_bn(ema, loader, world)
        # ---- early stopping (paper §4): every --es-every epochs and the last, PGD-7 with --es-restarts
        # restarts on the last --n-early-stop test images; the first minimum of RErr is the best epoch.
        # With --ema it checks the averaged model (its averaged BN buffers; re-estimated in the last epoch)
        snapshot = epoch % args.es_every == 0 or last
        if snapshot:
            es = common.epoch_metrics(es_model, x_es, y_es, args.attack_step, args.es_restarts, "es_", rank, world,
                                      norm=args.norm)
            metrics.update(es_rerr=es["es_rerr"], es_rloss=es["es_rloss"])
            if best is None or es["es_rerr"] < best["es_rerr"]:
                best = {"epoch": epoch, "es_rerr": es["es_rerr"]}
        # ---- checkpoints: snapshot, ckpt_best.pt, then ckpt_last.pt (the commit point), metrics.jsonl
        metrics["time_s"] = time.time() - t0
        history.append(metrics)
        state = common.training_state(args, epoch, net, opt, sched, ema, loader, history, best, world)
        common.save_epoch(state, snapshot, is_best=snapshot and best["epoch"] == epoch, rank=rank)
    common.teardown_distributed()


if __name__ == "__main__":
    common.run_cli(main)
