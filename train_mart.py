"""MART (Wang et al. 2020) — a Table 1 row of Stutz, Hein & Schiele (ICCV 2021), on the AT
baseline's data, model, optimiser, schedule, snapshots and logging (train_at.py; diff the two files).

    min_w  E_(x,y) [ BCE(p(x'), y) + β · KL(p(x) ‖ p(x')) · (1 − p_y(x)) ],   p = softmax ∘ f   (MART Eq. 9)
    BCE(p', y) = −log p'_y − log(1 − max_{k≠y} p'_k)                                  (boosted CE)

(x' = x + δ from PGD-7 on CE, step 0.007, ε = 8/255, eval-mode BN, exactly as AT; both terms are
averaged over the batch, the KL summed over classes)

Usage:   python train_mart.py                                    # Table 1 row: β = 6 (MART paper 5-6; paper sweep 1, 3, 6, 9)
CPU:     python train_mart.py --data-dir ../shared/data/cifar10-jpeg --width 16 --train-subset 2000 --epochs 2
Resume:  python train_mart.py --out runs/mart --resume           # continues from runs/mart/ckpt_last.pt
Multi-GPU: torchrun --nproc_per_node=4 train_mart.py ...         # global batch stays --batch-size

Cost (measured, see docs/speed.md): not yet measured on a GPU; per batch one clean training
forward/backward more than AT. Paper: AutoAttack RErr 61.0 % at epoch 150, 54.7 % early-stopped
(paper Table 1); PGD-CE overestimates MART's robustness, report AutoAttack.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
from common import check, fraction

METHOD = "mart"


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
    g = p.add_argument_group("MART")
    g.add_argument("--beta", type=fraction, default=6.0,
                   help="β: weight of the misclassification-aware KL term (MART paper: 5 for ResNet-18, 6 for WRN; "
                   "paper sweep 1, 3, 6, 9)")
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
    g.add_argument("--amp", action="store_true", help="bf16 autocast for the training attack and forward (δ stays fp32; "
                   "test, early-stopping and evaluation numbers are fp32)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (saved weights come from the plain module)")
    args = common.threat_defaults(p.parse_args(argv))
    check(args.beta >= 0, f"--beta must be >= 0, got {args.beta}")
    check(args.attack_steps >= 0 and args.attack_step > 0, "--attack-steps must be >= 0 and --attack-step > 0")
    check(args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch-size must be >= 1")
    check(args.lr > 0 and args.wd >= 0, "--lr must be > 0 and --wd >= 0")
    check(0 <= args.label_smoothing < 1 and 0 <= args.label_noise <= 1, "--label-smoothing in [0, 1), --label-noise in [0, 1]")
    check(args.clip >= 0 and 0 <= args.ema < 1, "--clip must be >= 0 and --ema in [0, 1)")
    check(args.eval_every >= 1 and args.es_every >= 1, "--eval-every and --es-every must be >= 1")
    args.method = METHOD
    return args


# ----------------------------------------------------------------------------------------------
# The method: PGD on CE (as AT), then boosted CE on x' + β·KL(clean ‖ adversarial) weighted by 1 − p_y
# ----------------------------------------------------------------------------------------------
def adversarial_batch(model, x, y, args):
    """x + δ with δ from PGD-`attack_steps` on true-label CE (eval-mode BN by default)."""
    if args.attack_steps == 0:
        return x
    delta, _ = common.pgd(model, x, y, args.epsilon, args.attack_step, args.attack_steps,
                          bn=args.attack_bn, autocast=args.amp, norm=args.norm)
    return x + delta


def mart_loss(logits_clean, logits_adv, y, beta, label_smoothing=0.0):
    """MART Eq. 9 as the reference `mart_loss` computes it, with p = softmax f(x), p' = softmax f(x'):
        mean_i [ CE(f(x'_i), y_i) − log(1.0001 − p'_i[y'_i] + 1e-12) ]            boosted CE (BCE)
      + β · (1/B) Σ_i KL(p_i ‖ p'_i) · (1.0000001 − p_i[y_i])                     misclassification-aware KL
    where y'_i is the most probable wrong class under p'_i, and the KL is Σ_k p_k (log p_k − log(p'_k + 1e-12)).
    The 1.0001, 1e-12 and 1.0000001 are the reference's guards. Nothing is detached: gradients flow
    through p, p' and the weight 1 − p_y, as in the reference."""
    logits_clean, logits_adv = logits_clean.float(), logits_adv.float()
    p_clean, p_adv = F.softmax(logits_clean, 1), F.softmax(logits_adv, 1)
    y_wrong = p_adv.detach().scatter(1, y[:, None], -1.0).argmax(1)  # most probable class other than y
    p_wrong = p_adv.gather(1, y_wrong[:, None]).squeeze(1)
    bce = F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing) - torch.log(1.0001 - p_wrong + 1e-12).mean()
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(1)
    p_true = p_clean.gather(1, y[:, None]).squeeze(1)  # squeeze(1), not squeeze(): batch size 1 works
    return bce + beta * (kl * (1.0000001 - p_true)).mean()


def training_loss(logits_clean, logits, y, args):
    """The MART loss on the clean and adversarial logits. Label noise replaces the training labels of
    every term (y, y' and p_y); label smoothing changes the target of the CE term only."""
    if args.label_noise > 0:
        y = common.noisy_labels(y, args.label_noise, logits.shape[1])
    return mart_loss(logits_clean, logits, y, args.beta, args.label_smoothing)


def train_step(model, attack_model, opt, sched, ema, x, y, args):
    """One MART step: the attack, the loss on the clean and adversarial logits (train-mode BN), the
    optimiser step, then the per-step schedule, weight clipping and EMA. Returns the log sums."""
    x_adv = adversarial_batch(attack_model, x, y, args)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        logits_clean = model(x)  # train-mode BN sees the clean batch, then the adversarial one (MART code)
        logits = model(x_adv)
    loss = training_loss(logits_clean, logits, y, args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if args.clip:
        common.clip_weights(common.unwrap(model), args.clip)
    if ema is not None:
        ema.update_parameters(common.unwrap(model))
    return common.batch_stats(logits, y)


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
            common.add_stats(sums, train_step(model, attack_model, opt, sched, ema, x, y, args))
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
