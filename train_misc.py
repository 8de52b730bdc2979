"""The Table 1 AT variants that change the data, the optimiser or the attack rather than the loss
(Stutz, Hein & Schiele, ICCV 2021, §4, Table 1), one clearly separated section each:

  --method rotation     AT + rotation self-supervision (Hendrycks et al. 2019)    Table 1 "Self-supervision"
  --method unlabeled    AT on batches mixed with pseudo-labelled images (Carmon et al. 2019)    "+Unlabeled"
  --method entropy-sgd  Entropy-SGD (Chaudhari et al. 2017) on the adversarial loss             "Entropy-SGD"
  --method pgd-tau      AT with early-stopped PGD-τ (Zhang et al. 2020, "FAT")
  --method autoaugment  AT on AutoAugment + Cutout images (Cubuk et al. 2019; DeVries & Taylor 2017)   "AutoAugment"

Everything else — data, ResNet-18, optimiser, schedule, the PGD-7 training attack, the Table 1
regulariser flags, logging, snapshots, early stopping, resume, DDP — is train_at.py's, in the same
block order, so `diff train_at.py train_misc.py` shows the five methods and little else.

Usage:   python train_misc.py --method rotation --rot-weight 4                       # runs/rotation
         python train_misc.py --method unlabeled --unlabeled-data ti_500K_pseudo_labeled.pickle
         python train_misc.py --method entropy-sgd --L 2 --epochs 75                  # paper: epochs 150/L
         python train_misc.py --method pgd-tau --tau 2
         python train_misc.py --method autoaugment --workers 4
CPU:     python train_misc.py --method rotation --data-dir ../shared/data/cifar10-jpeg --width 16 --train-subset 2000 --epochs 2
Resume:  python train_misc.py --method rotation --out runs/rotation --resume

Cost per epoch relative to train_at.py: rotation ≈ 2× (B labelled + B rotated images per step),
unlabeled 1×, entropy-sgd L× (an epoch is len(loader) outer steps of L batches each), pgd-tau ≤ 1×
(examples stop early), autoaugment 1× on the GPU if --workers keep up; measured on 1 CPU thread (width 16, 2,000 images): 2.0×, 1.0×, 1.9× (L = 2),
0.8× (τ = 2: 2.2 of 7 steps on average). Not yet measured on a GPU. Paper (Table 1), AutoAttack RErr at epoch 150:
+Unlabeled 48.9 %, Self-supervision 57.1 %, Entropy-SGD 58.6 % (AT baseline 62.8 %).
"""
import itertools
import math
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
from common import UsageError, check, fraction

METHODS = ("rotation", "unlabeled", "entropy-sgd", "pgd-tau", "autoaugment")


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
    g = p.add_argument_group("regularisers (Table 1 rows)")
    g.add_argument("--label-smoothing", type=fraction, default=0.0, help="τ: target (1−τ)·onehot + τ/K (best 0.3)")
    g.add_argument("--label-noise", type=fraction, default=0.0, help="p: labels resampled uniformly w.p. p per step (best 0.4)")
    g.add_argument("--clip", type=fraction, default=0.0, help="w: clamp weights to [−w, w] after each step (best 0.005)")
    g.add_argument("--ema", type=fraction, default=0.0, help="τ: EMA of the weights per step, saved as 'ema' (paper 0.9975)")
    g = p.add_argument_group("method (Table 1 rows)")
    g.add_argument("--method", required=True, choices=METHODS, help="which variant; recorded in args.json for plots.py")
    g = p.add_argument_group("--method rotation (Hendrycks et al.; Table 1 'Self-supervision')")
    g.add_argument("--rot-weight", type=fraction, default=4.0,
                   help="λ in CE_class + λ·CE_rot (paper sweep 0.5, 1, 2, 4, 8; best 4)")
    g.add_argument("--adv-fraction", type=fraction, default=1.0,
                   help="fraction f of each set (labelled, rotated) that is attacked; the first 1−f stay clean "
                   "(the released code effectively used 0.5)")
    g = p.add_argument_group("--method unlabeled (Carmon et al.; Table 1 '+Unlabeled')")
    g.add_argument("--unlabeled-data", metavar="FILE", help="pickle or .npz with 'data' (uint8 N×32×32×3) and "
                   "'extrapolated_targets' (int N): the format of ti_500K_pseudo_labeled.pickle")
    g.add_argument("--unlabeled-fraction", type=fraction, default=0.7,
                   help="share of pseudo-labelled images per batch (paper code 0.7 = 89 of 128; Carmon et al. 0.5)")
    g = p.add_argument_group("--method entropy-sgd (Chaudhari et al.; Table 1 'Entropy-SGD')")
    g.add_argument("--L", type=int, default=1, help="inner Langevin steps per outer step (paper sweep 1, 2, 3, 5 "
                   "with --epochs 150, 75, 50, 30)")
    g.add_argument("--esgd-gamma", type=fraction, default=1e-4, help="coupling γ (paper code: 1e-4)")
    g.add_argument("--esgd-scoping", type=fraction, default=1e-3, help="γ_t = γ(1 + scoping)^t, t = outer step, capped at "
                   "1/η' (paper code: 1e-3, but never applied; 0 reproduces that)")
    g.add_argument("--esgd-noise", type=fraction, default=1e-4, help="Langevin noise ε (paper code: 1e-4)")
    g.add_argument("--esgd-inner-lr", type=fraction, default=0.1, help="inner (Langevin) lr η' (paper code: 0.1)")
    g = p.add_argument_group("--method pgd-tau (Zhang et al. 2020, FAT)")
    g.add_argument("--tau", type=int, default=2, help="an example stops τ steps after it is first misclassified "
                   "(paper sweep 0-4, best not recorded; FAT's final τ: 2; τ >= --attack-steps is plain PGD)")
    g = p.add_argument_group("--method autoaugment (Table 1 'AutoAugment')")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers that augment the images")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--out", default=None, help="run folder (default runs/<method>)")
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
    check(args.attack_steps >= 0 and args.attack_step > 0, "--attack-steps must be >= 0 and --attack-step > 0")
    check(args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch-size must be >= 1")
    check(args.lr > 0 and args.wd >= 0, "--lr must be > 0 and --wd >= 0")
    check(0 <= args.label_smoothing < 1 and 0 <= args.label_noise <= 1, "--label-smoothing in [0, 1), --label-noise in [0, 1]")
    check(args.clip >= 0 and 0 <= args.ema < 1, "--clip must be >= 0 and --ema in [0, 1)")
    check(args.eval_every >= 1 and args.es_every >= 1, "--eval-every and --es-every must be >= 1")
    check(args.rot_weight >= 0 and 0 <= args.adv_fraction <= 1, "--rot-weight must be >= 0 and --adv-fraction in [0, 1]")
    check(0 <= args.unlabeled_fraction < 1, f"--unlabeled-fraction must be in [0, 1), got {args.unlabeled_fraction}")
    check(args.method != "unlabeled" or args.unlabeled_data, "--method unlabeled needs --unlabeled-data FILE (a pickle "
          "or .npz with 'data' and 'extrapolated_targets', e.g. ti_500K_pseudo_labeled.pickle)")
    check(args.L >= 1 and args.esgd_inner_lr > 0, "--L must be >= 1 and --esgd-inner-lr > 0")
    check(min(args.esgd_gamma, args.esgd_scoping, args.esgd_noise) >= 0, "--esgd-gamma/-scoping/-noise must be >= 0")
    check(args.tau >= 0, f"--tau must be >= 0, got {args.tau}")
    args.out = args.out or f"runs/{args.method}"
    return args


# ----------------------------------------------------------------------------------------------
# The AT step of train_at.py: PGD on the current weights, then CE on the adversarial batch
# (train-mode BN). Every method below builds on it.
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


def update(model, opt, sched, ema, loss, args):
    """The optimiser step on `loss`, then the per-step schedule, and weight clipping and EMA of the
    classifier (a rotation head is neither clipped nor averaged)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    net = classifier(model)
    if args.clip:
        common.clip_weights(net, args.clip)
    if ema is not None:
        ema.update_parameters(net)


def classifier(model):
    """The ResNet-18 inside `model` (DDP/compile wrappers and a rotation head around it removed)."""
    model = common.unwrap(model)
    return getattr(model, "net", model)


# ==============================================================================================
# --method rotation: AT with rotation self-supervision (Hendrycks et al. 2019)
#   loss = CE_class(f(x'), y) + λ · CE_rot(h(x'_rot), k),   x'_rot = adversarial rot90^k(augmented image)
# ==============================================================================================
class RotationHead(nn.Module):
    """Linear d→d/2, ReLU, BN, Linear d/2→4 on the pooled features (d = 512 at width 64: 512→256→4), the
    paper's code's order and initialisation (Kaiming-normal fan_in weights, zero biases).
    `auxiliary = True` keeps it out of common.perturbable_params (it is never perturbed or measured)."""
    auxiliary = True

    def __init__(self, features):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, features // 2), nn.ReLU(), nn.BatchNorm1d(features // 2),
                                    nn.Linear(features // 2, 4))
        for m in self.layers[0], self.layers[3]:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, features):
        return self.layers(features)


class WithRotationHead(nn.Module):
    """The classifier `net` (a common.ResNet18, saved as the checkpoint's 'model', so evaluate.py and
    flatness.py load it unchanged) and `rotation_head` (saved under 'aux').
    forward(x): [10 class logits | 4 rotation logits] of every image (what the attack maximises over);
    forward(x, n_labelled): class logits of the first n_labelled images, rotation logits of the rest
    (the training forward: one pass, BN statistics over the whole mixed batch as in the paper's code)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.rotation_head = RotationHead(net.head.in_features)

    def forward(self, x, n_labelled=None):
        features = self.net.features(x)
        if n_labelled is None:
            return torch.cat([self.net.head(features), self.rotation_head(features)], 1)
        return self.net.head(features[:n_labelled]), self.rotation_head(features[n_labelled:])


def rotate(x, k):
    """Image i rotated by k_i·90° (torch.rot90 over H, W), batched per k (no per-image loop)."""
    out = x.clone()
    for quarter in (1, 2, 3):
        sel = k == quarter
        out[sel] = torch.rot90(x[sel], quarter, dims=(2, 3))
    return out


def rotation_batch(x_uint8, n, generator):
    """The second set of n images: drawn with replacement from the training set (as the paper's
    code), crop+flip augmented, THEN each rotated by k·90°, k ~ U{0, 1, 2, 3}; returns (images, k).
    Rotating after the flip keeps k unambiguous (the released code flipped after rotating, which
    makes a flipped 90° image look like a 270° one)."""
    idx = torch.randint(len(x_uint8), (n,), device=x_uint8.device, generator=generator)
    k = torch.randint(4, (n,), device=x_uint8.device, generator=generator)
    return rotate(common.augment_crop_flip(x_uint8[idx], generator), k), k


def rotation_attack_loss(logits, target):
    """Per-example attack objective on [K class | 4 rotation] logits: class CE where target < K, rotation
    CE on target − K elsewhere. Examples are independent in eval mode, so maximising the sum is
    attacking each set with its own loss, as the paper's code does."""
    k = logits.shape[1] - 4
    is_rotated = target >= k
    class_ce = F.cross_entropy(logits[:, :k], target.clamp(max=k - 1), reduction="none")
    rot_ce = F.cross_entropy(logits[:, k:], (target - k).clamp(min=0), reduction="none")
    return torch.where(is_rotated, rot_ce, class_ce)


def rotation_loss(model, attack_model, x, y, x_rot, k, args):
    """(loss, sums for the log) of one self-supervised AT step on B labelled images x and B rotated
    images x_rot. Of each set the first (1 − --adv-fraction)·B images stay clean, the rest are
    attacked (PGD-7, class CE / rotation CE); loss = CE_class + λ·CE_rot, both means over B."""
    n = len(y)
    x_all = torch.cat([x, x_rot])
    if args.attack_steps > 0:
        n_clean = round((1 - args.adv_fraction) * n)
        attacked = (torch.arange(n, device=x.device) >= n_clean).repeat(2)
        target = torch.cat([y, k + common.DATASETS[args.dataset]["classes"]])
        delta, _ = common.pgd(attack_model, x_all[attacked], target[attacked], args.epsilon, args.attack_step,
                              args.attack_steps, loss_fn=rotation_attack_loss, bn=args.attack_bn, autocast=args.amp,
                              norm=args.norm)
        x_all[attacked] = x_all[attacked] + delta
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        class_logits, rot_logits = model(x_all, n_labelled=n)
    class_loss = training_loss(class_logits, y, args)
    rot_loss = F.cross_entropy(rot_logits.float(), k)
    loss = class_loss + args.rot_weight * rot_loss
    with torch.no_grad():
        stats = dict(common.batch_stats(class_logits, y), rot_loss=rot_loss.detach() * n,
                     rot_err=(rot_logits.argmax(1) != k).sum().float())
    return loss, stats

def rotation_train_step(model, attack_model, opt, sched, ema, batch, args):
    """One step of --method rotation on (x, y, x_rot, k) from RotationLoader. Returns the log sums."""
    x, y, x_rot, k = batch
    loss, stats = rotation_loss(model, attack_model, x, y, x_rot, k, args)
    update(model, opt, sched, ema, loss, args)
    return stats


class RotationLoader(common.DeviceLoader):
    """common.DeviceLoader's batches (x, y) plus the second set (x_rot, k) of as many images, drawn for
    the global batch from the same generator and split by rank like the first."""

    def __iter__(self):
        for x, y in super().__iter__():
            x_rot, k = rotation_batch(self.x, len(y) * self.world, self.generator)
            yield x, y, x_rot[self.rank::self.world], k[self.rank::self.world]


# ==============================================================================================
# --method unlabeled: AT on batches mixing CIFAR-10 and pseudo-labelled images (Carmon et al. 2019)
# ==============================================================================================
class ArrayUnpickler(pickle.Unpickler):
    """Reads numpy arrays and plain containers (dict, list, str, numbers) and nothing else. A pickle
    reaches code only through find_class, so a crafted file is refused before anything runs."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | {
        (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}  # protocol 5 (3.14's default)

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}; only numpy arrays and plain containers "
                                         "are read (convert it to .npz)")
        return super().find_class(module, name)


def load_unlabeled(path, classes):
    """(uint8 N×3×32×32, int64 N) from a pickle or .npz holding 'data' (uint8 N×32×32×3, HWC) and
    'extrapolated_targets' (the pseudo-labels, int N): the format of ti_500K_pseudo_labeled.pickle.
    Nothing in the file is executed: .npz without pickled objects, pickles through ArrayUnpickler."""
    path = Path(path)
    check(path.is_file(), f"--unlabeled-data {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                content = {k: z[k] for k in z.files}
        else:
            with open(path, "rb") as f:
                content = ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise UsageError(f"--unlabeled-data {path} is not a readable pickle or .npz ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})")
    check(isinstance(content, dict), f"--unlabeled-data {path} holds a {type(content).__name__}, not a dict "
          "with 'data' and 'extrapolated_targets'")
    missing = [k for k in ("data", "extrapolated_targets") if k not in content]
    check(not missing, f"--unlabeled-data {path} has no {' and no '.join(repr(k) for k in missing)} "
          f"(keys: {', '.join(map(str, content)) or 'none'}); it needs 'data' (uint8 N×32×32×3) and "
          "'extrapolated_targets' (int N pseudo-labels), as ti_500K_pseudo_labeled.pickle")
    x, y = np.asarray(content["data"]), np.asarray(content["extrapolated_targets"])
    check(x.dtype != object and y.dtype != object, f"--unlabeled-data {path}: arrays of Python objects are not read")
    check(x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (32, 32, 3) and len(x) > 0,
          f"--unlabeled-data {path}: 'data' must be uint8 N×32×32×3, got {x.dtype} {'×'.join(map(str, x.shape))}")
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    check(np.issubdtype(y.dtype, np.integer) and y.shape == (len(x),),
          f"--unlabeled-data {path}: 'extrapolated_targets' must be {len(x)} integers, got {y.dtype} "
          f"{'×'.join(map(str, y.shape))}")
    check(y.min() >= 0 and y.max() < classes, f"--unlabeled-data {path}: pseudo-labels must be in "
          f"0..{classes - 1} (the classes of --dataset), got {y.min()}..{y.max()}")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64))


def mix_batch(x_lab, y_lab, lab_idx, x_unl, y_unl, n_unlabeled, generator):
    """One mixed batch: the labelled images `lab_idx` plus n_unlabeled pseudo-labelled images drawn with
    replacement (as the paper's and Carmon et al.'s samplers), crop+flip augmented alike, shuffled
    together (so no DDP rank or BN batch sees a block of one kind). Returns (x, y, is_unlabeled)."""
    unl_idx = torch.randint(len(y_unl), (n_unlabeled,), device=x_unl.device, generator=generator)
    x = torch.cat([x_lab[lab_idx], x_unl[unl_idx]])
    y = torch.cat([y_lab[lab_idx], y_unl[unl_idx]])
    is_unlabeled = torch.arange(len(y), device=y.device) >= len(lab_idx)
    perm = torch.randperm(len(y), device=y.device, generator=generator)
    return common.augment_crop_flip(x[perm], generator), y[perm], is_unlabeled[perm]


class MixedLoader(common.DeviceLoader):
    """Batches of B = --batch-size images, floor(f·B) of them pseudo-labelled (f = --unlabeled-fraction;
    89 of 128 at f = 0.7, the paper's code). An epoch is ceil(N/B) batches for N labelled images:
    50,000 labelled-equivalent examples = 391 batches on full CIFAR-10, the paper's epoch; with
    --train-subset N it is N examples. Labelled images come from a fresh permutation per epoch (each
    seen at most once per epoch, (1 − f)·N of them). Everything stays on the device, like
    common.DeviceLoader; under DDP each rank takes every world-th image of each batch."""

    def __init__(self, x, y, x_unl, y_unl, batch_size, unlabeled_fraction, device, seed, rank=0, world=1):
        super().__init__(x, y, batch_size, device, seed, rank, world)  # labelled set, generator, len
        self.x_unl, self.y_unl = x_unl.to(device), y_unl.to(device)
        self.n_unlabeled = math.floor(unlabeled_fraction * batch_size + 1e-9)

    def __iter__(self):
        g, n_lab = self.generator, self.batch_size - self.n_unlabeled
        order = torch.randperm(len(self.y), device=self.device, generator=g)
        for i in range(len(self)):
            lab_idx = order[i * n_lab:(i + 1) * n_lab]
            x, y, is_unlabeled = mix_batch(self.x, self.y, lab_idx, self.x_unl, self.y_unl, self.n_unlabeled, g)
            yield x[self.rank::self.world], y[self.rank::self.world], is_unlabeled[self.rank::self.world]

def unlabeled_train_step(model, attack_model, opt, sched, ema, batch, args):
    """One AT step of --method unlabeled on a mixed batch (x, y, is_unlabeled) from MixedLoader; the
    pseudo-labelled images are trained on like labelled ones. Returns the log sums, with the CIFAR
    part also alone (*_labelled)."""
    x, y, is_unlabeled = batch
    x_adv = adversarial_batch(attack_model, x, y, args)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        logits = model(x_adv)
    update(model, opt, sched, ema, training_loss(logits, y, args), args)
    stats = common.batch_stats(logits, y)
    with torch.no_grad():
        labelled = (~is_unlabeled).float()
        stats.update(loss_labelled=(F.cross_entropy(logits.float(), y, reduction="none") * labelled).sum(),
                     err_labelled=((logits.argmax(1) != y).float() * labelled).sum(), n_labelled=labelled.sum())
    return stats


# ==============================================================================================
# --method entropy-sgd: Entropy-SGD on the adversarial loss (Chaudhari et al. 2017, Alg. 1, with
# the update of the authors' PyTorch port that the paper's code copied)
# ==============================================================================================
def outer_steps(loader, L):
    """An epoch of Entropy-SGD = len(loader) outer steps (the paper's count: 391 on CIFAR-10), each on
    L fresh batches, so an epoch makes L passes over the training set."""
    stream = itertools.chain.from_iterable(iter(loader) for _ in range(L))
    for _ in range(len(loader)):
        yield [next(stream) for _ in range(L)]


def scoped_gamma(gamma, scoping, t, inner_lr):
    """γ_t = γ·(1 + scoping)^t ("scoping", Chaudhari et al. §4.3), t = outer steps taken so far.
    Capped at 1/η': with η'·γ_t > 2 the inner recursion w' − w_c ← (1 − η'γ_t)(w' − w_c) − η'∇ diverges,
    which the paper's constants reach after ≈12k outer steps (epoch ≈ 31 of 391 steps). At the cap,
    each inner step restarts from w_c, so Entropy-SGD tends to SGD as scoping intends."""
    growth = math.exp(min(t * math.log1p(scoping), 700.0))  # (1 + scoping)^t without float overflow
    return min(gamma * growth, 1.0 / inner_lr)


def langevin_noise(params, world=1):
    """N(0, I) per parameter. Under DDP all replicas must take the same Langevin step (their
    gradients are averaged, the outer gradient is not): each rank draws, the draws are summed and
    divided by √world, which is again N(0, I), and the same on every rank."""
    z = [torch.randn_like(p) for p in params]
    if world > 1:
        flat = torch.cat([t.flatten() for t in z])
        dist.all_reduce(flat)
        flat /= math.sqrt(world)
        z = [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in params]), params)]
    return z


def entropy_sgd_step(params, opt, inner_loss, L, gamma, noise, inner_lr, wd, centres, mu_decay=0.75, world=1):
    """One outer step. `inner_loss(i)` returns (loss, sums for the log) on the i-th fresh batch at the
    current weights. With w_c the current weights, w' ← w_c, μ ← w_c, for i = 1..L:
        g  = ∇CE(w') + wd·(w' − c) − γ·(w_c − w') + noise·N(0, I)/√(0.5·η')
        w' ← w' − η'·g,      μ ← 0.75·μ + 0.25·w'
    (c = `centres`: 1 for the BN scales, 0 elsewhere, as common.make_optimizer's weight decay), then
    w ← w_c and `opt` steps with the outer gradient (w_c − μ); its weight decay adds wd·(w_c − c), and
    its momentum and lr schedule apply (the released code ran with momentum 0 and a constant lr, by
    accident). Under DDP the noise is shared by the replicas (langevin_noise), so they stay identical.
    Returns the log sums over the L inner batches."""
    with torch.no_grad():
        w_c = [p.detach().clone() for p in params]
        mu = [w.clone() for w in w_c]
    sums = {}
    for i in range(L):
        loss, stats = inner_loss(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # (not autograd.grad: DDP averages gradients in backward hooks)
        with torch.no_grad():
            z = langevin_noise(params, world) if noise > 0 else [None] * len(params)
            for p, w, m, zp, c in zip(params, w_c, mu, z, centres):
                g = (p.grad if p.grad is not None else torch.zeros_like(p)) + wd * (p - c) - gamma * (w - p)
                if zp is not None:
                    g = g + (noise / math.sqrt(0.5 * inner_lr)) * zp
                p.sub_(inner_lr * g)
                m.mul_(mu_decay).add_(p, alpha=1 - mu_decay)
        common.add_stats(sums, stats)
    with torch.no_grad():
        for p, w, m in zip(params, w_c, mu):
            p.copy_(w)     # w ← w_c: the Langevin iterate only served to estimate μ
            p.grad = w - m  # outer gradient of the local entropy (up to the factor γ)
    opt.step()
    return sums

def entropy_sgd_train_step(model, attack_model, opt, sched, ema, batches, args):
    """One outer step of --method entropy-sgd on L = --L fresh batches (outer_steps), each inner step
    AT's loss on its PGD-7 batch; γ_t is scoped by the outer steps taken so far (the schedule's
    count). Returns the log sums over the L inner batches and γ_t."""
    gamma = scoped_gamma(args.esgd_gamma, args.esgd_scoping, sched.last_epoch, args.esgd_inner_lr)

    def inner_loss(i):
        x, y = batches[i]
        x_adv = adversarial_batch(attack_model, x, y, args)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
            logits = model(x_adv)
        return training_loss(logits, y, args), common.batch_stats(logits, y)

    params = [p for p in model.parameters() if p.requires_grad]
    scales = {id(p) for p in common.bn_scales(model)} if common.bn_decays_to_one(args) else set()
    sums = entropy_sgd_step(params, opt, inner_loss, args.L, gamma, args.esgd_noise, args.esgd_inner_lr, args.wd,
                            [float(id(p) in scales) for p in params], world=common.world_size())
    sched.step()
    net = classifier(model)
    if args.clip:
        common.clip_weights(net, args.clip)
    if ema is not None:
        ema.update_parameters(net)
    return {**sums, "esgd_gamma": gamma * sums["n"]}  # logged as the epoch's mean γ_t


# ==============================================================================================
# --method pgd-tau: early-stopped PGD (Zhang et al. 2020, "FAT")
# ==============================================================================================
def pgd_tau(model, x, y, eps, alpha, steps, tau, start="uniform", bn="eval", autocast=False, norm="linf"):
    """PGD-`steps` in which example i stops at its (τ+1)-th misclassified iterate — τ steps after it is
    first misclassified when it stays misclassified — and keeps that iterate (FAT's counter, which the
    paper's code shares). Examples never stopped return the LAST iterate, as FAT does (the paper's
    released code returned δ = 0 for them, i.e. trained them clean). τ >= steps is plain PGD's last
    iterate. Eval-mode BN, input gradients by autograd.grad, per-example masks (no Python loop over
    examples). FAT also adds 0.001·N(0, I) to each step; the paper's code does not, nor do we. `norm`: the ℓ∞ or
    ℓ2 ball, with common.pgd's start and step. Returns (δ, number of steps each example took)."""
    if start == "uniform":
        delta = common.random_start(x, eps, norm)
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    counter = torch.full_like(y, tau)                   # misclassified iterates still allowed
    active = torch.ones_like(y, dtype=torch.bool)
    steps_taken = torch.zeros_like(y)
    shape = (-1,) + (1,) * (x.dim() - 1)
    with common.bn_mode(model, bn), common.frozen_params(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
                logits = model(x + delta)
            wrong = logits.argmax(1) != y
            stop = active & wrong & (counter == 0)
            counter = counter - (active & wrong & ~stop).long()
            active = active & ~stop
            if not active.any():  # one host sync per step buys skipping the rest (the paper's code stops too)
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), delta)
            with torch.no_grad():
                stepped = common.ascent_step(delta, grad, eps, alpha, norm)
                stepped = (x + stepped).clamp_(0, 1) - x
                delta = torch.where(active.view(shape), stepped, delta.detach())
            steps_taken += active
    return delta.detach(), steps_taken

def pgd_tau_train_step(model, attack_model, opt, sched, ema, batch, args):
    """One AT step of --method pgd-tau: PGD-τ instead of PGD-7, then AT's loss and update. Returns the
    log sums with the number of attack steps each example took."""
    x, y = batch
    steps = torch.zeros_like(y)
    if args.attack_steps > 0:
        delta, steps = pgd_tau(attack_model, x, y, args.epsilon, args.attack_step, args.attack_steps, args.tau,
                               bn=args.attack_bn, autocast=args.amp, norm=args.norm)
        x = x + delta
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        logits = model(x)
    update(model, opt, sched, ema, training_loss(logits, y, args), args)
    return {**common.batch_stats(logits, y), "attack_steps": steps.sum().float()}


# ==============================================================================================
# --method autoaugment: AT on images augmented by AutoAugment's CIFAR-10 policy and Cutout
# (Cubuk et al. 2019; DeVries & Taylor 2017) on top of crop and flip
# ==============================================================================================
class Cutout:
    """One 16×16 hole at a uniformly drawn centre, clipped at the border (DeVries & Taylor 2017), filled with
    `fill` per channel (the paper's code: the CIFAR-10 mean colour) on float images."""

    def __init__(self, size=16, fill=common.CIFAR_MEAN):
        self.size, self.fill = size, torch.tensor(fill).view(-1, 1, 1)

    def __call__(self, img):
        _, h, w = img.shape
        cy, cx, s = random.randrange(h), random.randrange(w), self.size // 2
        img = img.clone()
        img[:, max(cy - s, 0):min(cy + s, h), max(cx - s, 0):min(cx + s, w)] = self.fill
        return img


def mean_uint8(dataset):
    """The data set's mean colour on uint8 images: (125, 123, 114) for CIFAR-10."""
    return tuple(round(255 * m) for m in common.DATASETS[dataset]["mean"])


class AutoAugmentLoader:
    """Per image: random crop + flip (not for SVHN), torchvision's AutoAugment policy of the data set (CIFAR-10's
    for CIFAR-10/100, SVHN's for SVHN), Cutout, in --workers DataLoader workers (on uint8 tensors). Padding,
    AutoAugment's empty areas and the Cutout hole take the data set's mean colour, as the paper's code
    (round(255·mean) = (125, 123, 114) on CIFAR-10's uint8 images). Each epoch's
    order and worker seeds come from a generator seeded by (seed, epoch), so resume reproduces it (with
    --workers 0 the transforms draw from the process's RNG, which checkpoints restore); under DDP the ranks
    share the order and split each global batch."""

    def __init__(self, x, y, batch_size, device, seed, workers=2, rank=0, world=1, dataset="cifar10"):
        from torchvision import transforms as T
        from torchvision.transforms import v2  # (v2's RandomCrop pads tensors with a per-channel fill)
        fill = mean_uint8(dataset)
        crop_flip = [v2.RandomCrop(32, padding=4, fill=fill), T.RandomHorizontalFlip()]
        policy = T.AutoAugmentPolicy.SVHN if dataset == "svhn" else T.AutoAugmentPolicy.CIFAR10
        self.transform = T.Compose([*(crop_flip if common.DATASETS[dataset]["augment"] else []),
                                    T.AutoAugment(policy, fill=list(fill)), T.ConvertImageDtype(torch.float32),
                                    Cutout(16, fill=common.DATASETS[dataset]["mean"])])
        self.x, self.y, self.batch_size, self.device = x, y, batch_size, device
        self.seed, self.workers, self.rank, self.world, self.epoch = seed, workers, rank, world, 0

    def __len__(self):
        return len(self.y) // self.batch_size if self.world > 1 else math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.y), generator=g)[: len(self) * self.batch_size][self.rank::self.world]
        if self.world > 1:  # the order is shared; the workers' augmentation seeds must differ per rank
            g.manual_seed(g.initial_seed() * 1009 + self.rank)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self, order.tolist()), batch_size=self.batch_size // self.world,
            num_workers=self.workers, generator=g, persistent_workers=False, worker_init_fn=_seed_worker,
            pin_memory=self.device.type == "cuda")
        self.epoch += 1
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32  # torch seeds each worker; random (Cutout) and numpy follow it
    random.seed(seed)
    np.random.seed(seed)


def autoaugment_train_step(model, attack_model, opt, sched, ema, batch, args):
    """One AT step of --method autoaugment: train_at.py's step on AutoAugmentLoader's batches."""
    x, y = batch
    x_adv = adversarial_batch(attack_model, x, y, args)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        logits = model(x_adv)
    update(model, opt, sched, ema, training_loss(logits, y, args), args)
    return common.batch_stats(logits, y)


TRAIN_STEPS = {"rotation": rotation_train_step, "unlabeled": unlabeled_train_step,
               "entropy-sgd": entropy_sgd_train_step, "pgd-tau": pgd_tau_train_step,
               "autoaugment": autoaugment_train_step}


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
    if args.method == "rotation":  # labelled batches plus as many rotated images
        loader = RotationLoader(x_train, y_train, args.batch_size, device, args.seed, rank, world,
                                augment=common.DATASETS[args.dataset]["augment"])
    elif args.method == "unlabeled":  # batches mixed with pseudo-labelled images
        x_unl, y_unl = load_unlabeled(args.unlabeled_data, common.DATASETS[args.dataset]["classes"])
        loader = MixedLoader(x_train, y_train, x_unl, y_unl, args.batch_size, args.unlabeled_fraction, device,
                             args.seed, rank=rank, world=world)
    elif args.method == "autoaugment":  # AutoAugment + Cutout in DataLoader workers
        loader = AutoAugmentLoader(x_train, y_train, args.batch_size, device, args.seed, args.workers, rank, world,
                                   args.dataset)
    else:
        loader = common.DeviceLoader(x_train, y_train, args.batch_size, device, args.seed, rank, world,
                                augment=common.DATASETS[args.dataset]["augment"])
    # an outer step of Entropy-SGD takes --L batches: its epoch makes L passes over the loader
    epoch_batches = (lambda: outer_steps(loader, args.L)) if args.method == "entropy-sgd" else (lambda: loader)
    x_log, y_log = common.eval_split(args.data_dir, "log", args.n_log, device, args.dataset)
    x_es, y_es = common.eval_split(args.data_dir, "early-stop", args.n_early_stop, device, args.dataset)

    # ---- model (+ rotation head), optimiser, schedule (stepped per batch / outer step), EMA; --resume
    # restores all of them
    net = common.build_model(vars(args)).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.clip:
        common.clip_weights(net, args.clip)
    trained = WithRotationHead(net).to(device) if args.method == "rotation" else net  # what the optimiser trains
    aux = trained.rotation_head if args.method == "rotation" else None  # saved as 'aux', outside 'model'
    opt, sched = common.make_optimizer(trained, args, len(loader))
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    es_model = net if ema is None else ema.module  # what early stopping selects (README "Deviations")
    epoch, history, best = 0, [], None  # epochs done, one metrics dict per epoch, early-stopping choice
    ckpt = common.resume_checkpoint(args, device, rank)  # ckpt_last.pt, or the newest intact snapshot
    if ckpt is not None:
        epoch, history, best = common.restore(ckpt, args, net, opt, sched, ema, loader, rank, world, aux=aux)
    attack_model = torch.compile(trained) if args.compile else trained  # attacks run on the unwrapped module
    model = DistributedDataParallel(trained) if world > 1 else trained  # only training forwards go through DDP
    if args.compile:
        model = torch.compile(model)
    train_step = TRAIN_STEPS[args.method]

    while epoch < args.epochs:
        epoch += 1
        last = epoch == args.epochs
        t0 = time.time()
        loader.epoch = epoch - 1  # AutoAugmentLoader seeds its workers by (seed, epoch)
        trained.train()
        lr, sums = opt.param_groups[0]["lr"], {}  # logged: the lr of the epoch's first step
        for batch in common.progress_loop(epoch_batches(), f"epoch {epoch}", total=len(loader), disable=rank != 0):
            common.add_stats(sums, train_step(model, attack_model, opt, sched, ema, batch, args))
        metrics = {"epoch": epoch, "lr": lr, **common.train_means(sums, world),
                   "train_time_s": time.time() - t0}
        common.sync_buffers(trained, world)  # BN statistics of rank 0 on every rank
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
        state = common.training_state(args, epoch, net, opt, sched, ema, loader, history, best, world, aux=aux)
        common.save_epoch(state, snapshot, is_best=snapshot and best["epoch"] == epoch, rank=rank)
    common.teardown_distributed()


if __name__ == "__main__":
    common.run_cli(main)
