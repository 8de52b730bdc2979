"""What every script needs (README "Conventions"): data, the CIFAR ResNet-18, PGD, the per-layer weight helper,
optimiser and schedules, checkpoints and the run folder, the distributed setup. Method logic lives in the method
files; blocks headed `# plumbing:` are infrastructure a reader of a method may skip.
Conventions: inputs in [0, 1]; the per-channel normaliser is the model's first module; every attack runs the
model in eval mode (BN running statistics) and restores the caller's mode.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)  # the correct CIFAR-10 std, not the widely copied 0.2023...
NUM_CLASSES = 10
# --dataset: classes, per-channel mean/std of the training images (the model's normaliser), and whether training
# crops and flips (not SVHN: a flipped digit is another digit; Rice et al. and AWP train SVHN unaugmented)
DATASETS = {"cifar10": {"name": "CIFAR-10", "classes": 10, "mean": CIFAR_MEAN, "std": CIFAR_STD, "augment": True},
            "cifar100": {"name": "CIFAR-100", "classes": 100, "mean": (0.5071, 0.4865, 0.4409),
                         "std": (0.2673, 0.2564, 0.2762), "augment": True},
            "svhn": {"name": "SVHN", "classes": 10, "mean": (0.4377, 0.4438, 0.4728), "std": (0.1980, 0.2010, 0.1970),
                     "augment": False}}


# plumbing: errors and the command line ----------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input from the user: reported as one `error:` line and exit code 1, never as a traceback."""


def run_cli(main, kept="result files already written are kept; the same command measures only what is missing"):
    """A script's entry point: bad input is one `error:` line and exit code 1; Ctrl-C one line saying what was
    kept (`kept`; a training run's folder says its own, see check_out) and exit code 130; a CUDA out-of-memory
    error one `error:` line that names --batch-size, exit code 1."""
    _interrupted.clear()
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)) as e:
        first = (str(e).strip().splitlines() or ["no message"])[0]
        print(f"error: out of GPU memory ({first}); lower --batch-size (it bounds the images, and in evaluate.py and "
              "flatness.py the attack inputs, that go through the network at once; docs/speed.md)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_interrupted[0]() if _interrupted else kept}", file=sys.stderr)
        sys.exit(130)


_interrupted = []  # what Ctrl-C reports, set by check_out for a training run


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the same contract (a bad flag is one `error:` line and exit code 1, not the usage text and
    exit code 2); --help shows every default and the script's first docstring paragraph, whole."""

    def __init__(self, description=None, **kwargs):
        description = " ".join(description.split("\n\n")[0].split()) if description else None
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def fraction(text):
    """argparse type for `8/255`, `0.007` or `2e-4`."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255")


def pixels(text):
    """argparse type for a size in pixel units, a fraction of the [0, 1] range (ε, PGD steps): `8/255`, `0.007`.
    `8` (the 0-255 scale) is refused with the fraction to pass instead."""
    value = fraction(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]: inputs are in [0, 1], so ε and step sizes are "
                                         f"fractions of it" + (f"; for {text} of 255 levels pass {text}/255" if value > 1 else ""))
    return value


PROGRESS_EVERY = 30  # seconds between progress lines in a log file
_open_loops, _last_line = [], [0.0]


def progress_loop(iterable, desc, total=None, disable=False):
    """tqdm on a terminal; in a log file (nohup, SLURM, `> log`) one line at most every PROGRESS_EVERY seconds
    naming each open loop, how far it is, its elapsed time and an estimate of the time left."""
    if disable:
        return iterable
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, leave=False)
    return _log_progress(iterable, desc, total if total is not None else len(iterable))


def _log_progress(iterable, desc, total):
    loop = {"desc": desc, "done": 0, "total": total, "start": time.monotonic()}
    if not _open_loops:
        _last_line[0] = loop["start"]
    _open_loops.append(loop)
    try:
        for item in iterable:
            yield item
            loop["done"] += 1
            now = time.monotonic()
            if now - _last_line[0] >= PROGRESS_EVERY:
                _last_line[0] = now
                print(" | ".join(_loop_status(o, now) for o in _open_loops), file=sys.stderr, flush=True)
    finally:
        _open_loops.remove(loop)


def _loop_status(loop, now):
    clock = lambda s: f"{int(s) // 3600}:{int(s) % 3600 // 60:02d}:{int(s) % 60:02d}"
    elapsed, done, total = now - loop["start"], loop["done"], loop["total"]
    left = f", ~{clock(elapsed / done * (total - done))} left" if done else ""
    return f"{loop['desc']}: {done}/{total} ({100 * done / max(total, 1):.0f} %), {clock(elapsed)} elapsed{left}"


def threat_defaults(args, norm="linf"):
    """--norm, --epsilon, --attack-step and --attack-steps left unset (None) take the threat model's defaults: the norm
    is `norm` (evaluate.py, flatness.py: the checkpoint's), ε and the step THREATS[norm], the training PGD 7 steps
    (ℓ∞, the paper) or 10 (ℓ2, Rice et al. and AWP). Returns args."""
    args.norm = args.norm or norm
    args.epsilon = THREATS[args.norm]["eps"] if args.epsilon is None else args.epsilon
    args.attack_step = THREATS[args.norm]["step"] if args.attack_step is None else args.attack_step
    if getattr(args, "attack_steps", 0) is None:
        args.attack_steps = 7 if args.norm == "linf" else 10
    return args


def check(condition, message):
    if not condition:
        raise UsageError(message)


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def absolute_path(text):
    """argparse type: the path made absolute, so that results and checkpoints name it wherever they are read."""
    return str(Path(text).expanduser().resolve())


def add_runtime_args(parser, data_dir="data"):
    """--data-dir, --dataset, --device, --seed; data_dir=None (evaluate.py, flatness.py): data and data set default
    to those our checkpoint was trained on."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--data-dir", type=absolute_path, default=data_dir, help="torchvision root of --dataset (downloaded "
                   "if missing) or an ImageFolder tree with train/ and test/ (e.g. ../shared/data/cifar10-jpeg)"
                   + ("; default: the one our checkpoint was trained on, else ./data" if data_dir is None else ""))
    g.add_argument("--dataset", choices=tuple(DATASETS), default="cifar10" if data_dir else None,
                   help="classes, normalisation and augmentation (README 'Data')"
                   + ("; default: our checkpoint's, else cifar10" if data_dir is None else ""))
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seeds every random draw; recorded in results")


# plumbing: device, distributed setup, RNG state (README "Multi-GPU") ----------------------------------------------
def resolve_device(flag):
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag)
    except RuntimeError:
        raise UsageError(f"unknown --device {flag!r}; use auto, cpu, cuda or cuda:N")
    check(device.type != "cuda" or torch.cuda.is_available(),
          f"--device {flag} asked for CUDA but torch sees no GPU; use --device cpu")
    if device.type == "cuda":  # fp32 means fp32: no TF32 (10-bit mantissa) convs or matmuls (README "Conventions")
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return device


def setup_distributed(device_flag):
    """(rank, world, device): under `torchrun --nproc_per_node=N` one process per device (NCCL on GPUs, gloo on
    CPU); a plain `python script.py` is rank 0 of 1."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), resolve_device(device_flag)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def teardown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(loader=None):
    """All RNG states as tensors and ints, so a checkpoint loads with weights_only=True."""
    _, python, pos = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(python), "python_pos": pos}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(loader, "generator"):
        state["loader"] = loader.generator.get_state()
    return state


def set_rng_state(state, loader=None):
    # RNG states must be CPU byte tensors, CUDA generators' too; map_location=cuda put them on the GPU
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "loader" in state and hasattr(loader, "generator"):
        loader.generator.set_state(state["loader"].cpu())


# plumbing: data loading and caching (README "Data") ---------------------------------------------------------------
def _imagefolder_arrays(root):
    """An ImageFolder split as uint8 N×32×32×3 + labels (folder order). Decoding 60k JPEGs takes ~10 s, so the
    arrays are cached as .npz under ~/.cache (read-only trees work)."""
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(str(root))
    key = str(Path(root).resolve()).replace(os.sep, "_").strip("_")
    cache = Path(os.environ.get("ROBUST_FLATNESS_CACHE", Path.home() / ".cache" / "robust_flatness"))
    cache_file = cache / f"{key}_{len(folder.samples)}.npz"
    if cache_file.exists():
        with np.load(cache_file) as z:
            return torch.from_numpy(z["x"]), torch.from_numpy(z["y"])
    x = np.empty((len(folder.samples), 32, 32, 3), np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        image = folder.loader(path)
        check(image.size == (32, 32), f"{path} is {image.size[0]}x{image.size[1]}; CIFAR images are 32x32")
        x[i] = np.asarray(image.convert("RGB"))
    y = np.asarray(folder.targets, np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")  # one per process: DDP ranks may decode at once
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache_file)
    return torch.from_numpy(x), torch.from_numpy(y)


def class_interleaved_order(labels):
    """Indices visiting image i of every class in turn: 'the first N' is then class-balanced, as it is for the
    real CIFAR-10 test set."""
    labels = torch.as_tensor(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in labels.unique(sorted=True)]
    order = [int(p[i]) for i in range(max(len(p) for p in per_class)) for p in per_class if i < len(p)]
    return torch.tensor(order, dtype=torch.long)


def load_images(data_dir, train, dataset="cifar10"):
    """The whole split of `dataset` as (uint8 N×3×32×32, int64 labels) in the canonical order: torchvision's, or
    class-interleaved for an ImageFolder tree (README "Data")."""
    root, split, classes = Path(data_dir), "train" if train else "test", DATASETS[dataset]["classes"]
    if (root / split).is_dir():  # ImageFolder tree, e.g. ../shared/data/cifar10-jpeg
        x, y = _imagefolder_arrays(root / split)
        check(len(y.unique()) == classes, f"{root / split} has {len(y.unique())} class folders, but --dataset "
              f"{dataset} has {classes} classes; pass the matching --dataset")
        order = class_interleaved_order(y)
        return x[order].permute(0, 3, 1, 2).contiguous(), y[order]
    import torchvision.datasets as tv
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    try:
        if dataset == "svhn":
            ds = tv.SVHN(str(root), split=split, download=True)
            return torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).long()
        ds = (tv.CIFAR100 if dataset == "cifar100" else tv.CIFAR10)(str(root), train=train, download=True)
    except Exception as e:  # no network, bad path, corrupt archive
        if created is not None:  # a mistyped --data-dir leaves no folders behind
            shutil.rmtree(created, ignore_errors=True)
        name = DATASETS[dataset]["name"]
        raise UsageError(f"could not find or download {name} in {root.resolve()} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}); point --data-dir at a {name} root "
                         "or an ImageFolder tree with train/ and test/, e.g. --data-dir ../shared/data/cifar10-jpeg")
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)


def balanced_subset(labels, n):
    """The first n // K indices of every class (class-balanced `--train-subset`)."""
    labels = torch.as_tensor(labels)
    classes = labels.unique(sorted=True)
    check(n % len(classes) == 0 and n > 0, f"--train-subset {n} must be a positive multiple of the {len(classes)} classes")
    picked = [torch.nonzero(labels == c).flatten()[: n // len(classes)] for c in classes]
    check(all(len(p) == n // len(classes) for p in picked), f"--train-subset {n} asks for more images per class than the data has")
    return torch.sort(torch.cat(picked)).values


def eval_split(data_dir, name, n, device, dataset="cifar10"):
    """A fixed evaluation subset as float [0, 1] tensors on `device` (README "Data"): eval and log = test
    0…n-1, train-eval = train 0…n-1, early-stop = the last n test images."""
    check(name in ("eval", "train-eval", "early-stop", "log"), f"unknown subset {name!r}")
    x, y = load_images(data_dir, train=(name == "train-eval"), dataset=dataset)
    check(0 < n <= len(y), f"subset {name} needs 1..{len(y)} images, got {n}")
    sl = slice(len(y) - n, len(y)) if name == "early-stop" else slice(0, n)
    return x[sl].to(device).float().div_(255), y[sl].to(device)


class DeviceLoader:
    """The training set on the device as uint8; shuffle, random crop and flip (unless augment=False) happen there
    per batch, drawn from a seeded device generator. Under DDP every rank augments the whole global batch (so the
    ranks' generators stay in step) and keeps every world-th image; the last partial batch is dropped."""

    def __init__(self, x, y, batch_size, device, seed, rank=0, world=1, augment=True):
        self.x, self.y, self.augment = x.to(device), y.to(device), augment
        self.batch_size, self.device, self.rank, self.world = batch_size, device, rank, world
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self):
        return len(self.y) // self.batch_size if self.world > 1 else math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        g, b = self.generator, self.batch_size
        order = torch.randperm(len(self.y), device=self.device, generator=g)
        for i in range(len(self)):
            idx = order[i * b:(i + 1) * b]
            x = augment_crop_flip(self.x[idx], g) if self.augment else self.x[idx].float().div_(255)
            yield x[self.rank::self.world], self.y[idx][self.rank::self.world]


def augment_crop_flip(x_uint8, generator):
    """Random 32×32 crop of the 4-px zero-padded image and random horizontal flip, batched: one gather builds
    every crop (no per-image Python loop)."""
    n, _, h, w = x_uint8.shape
    device = x_uint8.device
    dy = torch.randint(0, 9, (n, 1, 1), device=device, generator=generator)
    dx = torch.randint(0, 9, (n, 1, 1), device=device, generator=generator)
    flip = torch.rand(n, 1, 1, device=device, generator=generator) < 0.5
    rows = torch.arange(h, device=device).view(1, h, 1) + dy  # n×h×1
    cols = torch.arange(w, device=device).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx  # n×1×w
    flat = (rows * (w + 8) + cols).view(n, 1, h * w).expand(-1, 3, -1)
    return F.pad(x_uint8, (4, 4, 4, 4)).flatten(2).gather(2, flat).view(n, 3, h, w).float().div_(255)


# The model: CIFAR ResNet-18 with the normaliser inside (paper §4; README "Conventions") ---------------------------
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, never trained and never perturbed."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD):  # the data set's (DATASETS)
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """Post-activation block: conv-BN-act-conv-BN, + shortcut, act."""

    def __init__(self, c_in, c_out, stride, act):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.act = act()
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Sequential())

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Key layout `conv1, bn1, layer1..4.{0,1}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear` (the
    widespread CIFAR layout), with `normalize.*` buffers in front when `normalize=True`."""

    def __init__(self, width=64, act="relu", num_classes=NUM_CLASSES, normalize=True):
        super().__init__()
        check(act in ACTIVATIONS, f"unknown --act {act!r}; choose one of {', '.join(ACTIVATIONS)}")
        check(width >= 1, f"--width must be positive, got {width}")
        a = ACTIVATIONS[act]
        self.normalize = Normalize() if normalize else nn.Identity()
        self.conv1, self.bn1, self.act = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), a()
        stages, c_in = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            c_out = width * mult
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, 1 if i == 0 else 2, a), BasicBlock(c_out, c_out, 1, a)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():  # BN keeps PyTorch's γ = 1, β = 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")  # fan_in, as the paper's code
        nn.init.zeros_(self.linear.bias)

    def features(self, x):
        out = self.act(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    @property
    def head(self):  # the linear classifier on features(x), under each architecture's own key name
        return self.linear

    def forward(self, x):
        return self.linear(self.features(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016): BN-act-conv-BN-act-conv + shortcut; a 1×1 shortcut conv takes the
    activated input."""

    def __init__(self, c_in, c_out, stride, act):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.act = act()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(self.act(self.bn2(self.conv1(out)))) + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 in the key layout of Rice et al.'s and AWP's code: `conv1, layer1..4.{0,1}.{bn1,conv1,bn2,
    conv2,shortcut.0}, bn, linear` (their checkpoints normalise outside the model: load with normalize=False)."""

    def __init__(self, width=64, act="relu", num_classes=NUM_CLASSES, normalize=True):
        super().__init__()
        a = ACTIVATIONS[act]
        self.normalize = Normalize() if normalize else nn.Identity()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        stages, c_in = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            stages.append(nn.Sequential(PreActBlock(c_in, width * mult, 1 if i == 0 else 2, a),
                                        PreActBlock(width * mult, width * mult, 1, a)))
            c_in = width * mult
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn, self.act, self.linear = nn.BatchNorm2d(c_in), a(), nn.Linear(c_in, num_classes)

    def features(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x))))))
        return F.avg_pool2d(self.act(self.bn(out)), out.shape[2:]).flatten(1)  # the public code's pooling, bit for bit

    @property
    def head(self):  # the linear classifier on features(x), under each architecture's own key name
        return self.linear

    def forward(self, x):
        return self.linear(self.features(x))


class WideBlock(nn.Module):
    """The WideResNet block of the TRADES/MART/AWP/RobustBench code: BN-act-conv-BN-act-conv + shortcut, where a
    1×1 `convShortcut` (channel change) takes the activated input and the identity takes the raw one."""

    def __init__(self, c_in, c_out, stride, act):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), act()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), act()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if c_in != c_out else None

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        return self.conv2(self.relu2(self.bn2(self.conv1(out)))) + shortcut


class NetworkBlock(nn.Module):
    """One WideResNet stage, `block<i>.layer.<j>` as in the public code."""

    def __init__(self, n, c_in, c_out, stride, act):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, act)
                                     for j in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) in the key layout of the TRADES/MART/AWP/RobustBench code: `conv1,
    block1..3.layer.<j>.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc`. `sub_block1`: the unused extra first stage
    that TRADES-derived checkpoints carry (never called; marked auxiliary, so never perturbed or measured)."""

    def __init__(self, depth=34, widen=10, act="relu", num_classes=NUM_CLASSES, normalize=True, sub_block1=False):
        super().__init__()
        check((depth - 4) % 6 == 0 and depth >= 10 and widen >= 1,
              f"wrn-{depth}-{widen}: the depth must be 6n+4 (10, 16, 22, 28, 34, 40, 70, …) and the widen factor >= 1")
        a, n, c = ACTIVATIONS[act], (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize() if normalize else nn.Identity()
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, c[0], c[1], 1, a)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, c[0], c[1], 1, a)
            self.sub_block1.auxiliary = True
        self.block2, self.block3 = NetworkBlock(n, c[1], c[2], 2, a), NetworkBlock(n, c[2], c[3], 2, a)
        self.bn1, self.relu, self.fc = nn.BatchNorm2d(c[3]), a(), nn.Linear(c[3], num_classes)
        for m in self.modules():  # the public code's init: He-normal (fan_out) convs, zero linear bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def features(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return F.avg_pool2d(self.relu(self.bn1(out)), out.shape[2:]).flatten(1)

    @property
    def head(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.features(x))


def parse_arch(text):
    """`resnet18`, `preact-resnet18` or `wrn-D-K` → (name, depth, widen); argparse type of --arch."""
    if text in ("resnet18", "preact-resnet18"):
        return text
    parts = text.split("-")
    if len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit():
        depth, widen = int(parts[1]), int(parts[2])
        if (depth - 4) % 6 == 0 and depth >= 10 and widen >= 1:
            return text
    raise argparse.ArgumentTypeError(f"unknown architecture {text!r}: use resnet18, preact-resnet18 or wrn-D-K with "
                                     "D = 6n+4 and K >= 1 (e.g. wrn-34-10, wrn-28-10, wrn-10-1)")


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--arch", type=parse_arch, default="resnet18",
                   help="resnet18 (paper) | preact-resnet18 (Rice et al., AWP) | wrn-D-K, e.g. wrn-34-10 (TRADES, MART, "
                        "AWP), wrn-28-10; wrn-10-1 for CPU tests")
    g.add_argument("--width", type=int, default=64, help="ResNets: channels of the first stage (paper: 64; 16 or 8 "
                   "for CPU); a WideResNet's width is its K")
    g.add_argument("--act", default="relu", choices=tuple(ACTIVATIONS), help="every activation (Table 1 rows: silu, mish, gelu)")


def build_model(args, normalize=None, sub_block1=False):
    """The network a checkpoint's args (a dict) describe: architecture, classes and normaliser of its --dataset
    (checkpoints from before --arch / --dataset are CIFAR-10 ResNet-18s). `normalize`: whether the input
    normaliser is inside (default: unless args say no_normalize)."""
    arch, data = args.get("arch", "resnet18"), DATASETS[args.get("dataset") or "cifar10"]
    normalize = not args.get("no_normalize", False) if normalize is None else normalize
    check(args["act"] in ACTIVATIONS, f"unknown --act {args['act']!r}; choose one of {', '.join(ACTIVATIONS)}")
    if arch.startswith("wrn-"):
        _, depth, widen = arch.split("-")
        model = WideResNet(int(depth), int(widen), args["act"], data["classes"], normalize, sub_block1)
    else:
        check(args["width"] >= 1, f"--width must be positive, got {args['width']}")
        kind = PreActResNet18 if arch == "preact-resnet18" else ResNet18
        model = kind(width=args["width"], act=args["act"], num_classes=data["classes"], normalize=normalize)
    if normalize:
        model.normalize = Normalize(data["mean"], data["std"])
    return model


# PGD (Madry et al. 2018; README "Conventions") --------------------------------------------------------------------
def cross_entropy_each(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


@contextlib.contextmanager
def bn_mode(model, mode="eval"):
    """Eval (or train) mode for an attack; the caller's per-module modes come back after it."""
    was = [m.training for m in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t


@contextlib.contextmanager
def frozen_params(model):
    """Parameters temporarily not requiring grad. An attack differentiates w.r.t. its input only: autograd then
    records nothing for the weights (10-13 % faster PGD on CPU), `.backward()`-based attacks (AutoAttack)
    accumulate no weight gradients, and torch.compile traces an input-only backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


# The threat models (README "Conventions"): ‖δ‖∞ ≤ ε (the paper's) or ‖δ‖₂ ≤ ε, each with the ε and PGD step of its
# anchors (the paper / Rice et al. and AWP), which are the defaults of --epsilon and --attack-step and the fixed ε of
# the per-epoch test and early-stopping metrics.
THREATS = {"linf": {"eps": 8 / 255, "step": 0.007}, "l2": {"eps": 128 / 255, "step": 15 / 255}}


def random_start(x, eps, norm="linf"):
    """A random δ inside the ε-ball (before the [0, 1] clamp): uniform in the ℓ∞ box, or, for ℓ2 as in Rice et al.'s
    and AWP's code, a Gaussian direction with a U(0, 1)·ε radius."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    g = torch.randn_like(x)
    radius = eps * torch.rand(len(x), device=x.device, dtype=x.dtype)
    return g.mul_((radius / g.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (x.dim() - 1)))


def project(delta, eps, norm="linf"):
    """δ onto the ε-ball: clamped per coordinate (ℓ∞), or each example's δ rescaled to norm ε where longer (ℓ2)."""
    return delta.clamp_(-eps, eps) if norm == "linf" else delta.flatten(1).renorm(2, 0, eps).view_as(delta)


def ascent_step(delta, grad, eps, alpha, norm="linf"):
    """δ + α·(steepest ascent direction of the norm), projected back onto the ε-ball: the sign of the gradient for
    ℓ∞; for ℓ2 the gradient over its ℓ2 norm (Rice et al.'s and AWP's code). The caller clamps x + δ to [0, 1],
    which keeps δ in either ball (it only shrinks coordinates)."""
    if norm == "linf":
        return project(delta + alpha * grad.sign(), eps, norm)
    return project(delta + alpha * grad / (grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1)) + 1e-10),
                   eps, norm)


def pgd(model, x, y, eps, alpha, steps, restarts=1, loss_fn=cross_entropy_each, start="uniform",
        bn="eval", autocast=False, with_pred=False, norm="linf", max_inputs=None):
    """PGD ascent on the per-example `loss_fn(model(x + δ), y)` in the ℓ∞ or ℓ2 ball of radius ε (`norm`). Returns
    (δ, loss): per example the iterate with the highest loss over all steps and restarts, random start included,
    and that loss (in the attack's BN mode); `with_pred=True` adds the prediction there (saves a forward).
    Restarts are batched by repeating the input, in chunks of max(1, max_inputs // len(x)) restarts (all at once if
    None), so memory does not grow with restarts; every start is drawn before the first chunk, so the chunking
    changes no random number. The step of the summed loss is taken w.r.t. δ only (weights frozen); no host sync."""
    b, ones = x.shape[0], [1] * (x.dim() - 1)
    xr = x.repeat(restarts, *ones)
    if start == "uniform":  # (the name of the paper's ℓ∞ start; for ℓ2 the ball's random start)
        delta = random_start(xr, eps, norm)
    elif start == "normal":  # TRADES: x + 0.001·N(0, I), inside the ε-ball (it is a candidate iterate)
        delta = project(0.001 * torch.randn_like(xr), eps, norm)
    else:
        delta = torch.zeros_like(xr)
    starts = (xr + delta).clamp_(0, 1) - xr  # restart r's start: rows r·b … (r+1)·b − 1
    best_delta = starts.clone()
    best_loss = torch.full((xr.shape[0],), -float("inf"), device=x.device)
    best_pred = torch.zeros(xr.shape[0], dtype=torch.long, device=x.device)
    n = restarts if max_inputs is None else max(1, min(restarts, max_inputs // b))  # restarts per chunk
    with bn_mode(model, bn), frozen_params(model), torch.enable_grad():  # works inside torch.no_grad() too
        for r in range(0, restarts, n):  # restarts r … r+n−1 as one batch
            rows, m = slice(r * b, (r + n) * b), min(n, restarts - r)
            xr, yr = x.repeat(m, *ones), y.repeat(m, *([1] * (y.dim() - 1)))
            delta = starts[rows].requires_grad_(True)
            for t in range(steps + 1):  # the last pass only scores the final iterate
                with torch.set_grad_enabled(t < steps), torch.autocast(x.device.type, torch.bfloat16,
                                                                       enabled=autocast):
                    logits = model(xr + delta)
                    loss = loss_fn(logits, yr).float()
                better = loss.detach() > best_loss[rows]
                best_loss[rows] = torch.where(better, loss.detach(), best_loss[rows])
                best_delta[rows] = torch.where(better.view(-1, *ones), delta.detach(), best_delta[rows])
                if with_pred:
                    best_pred[rows] = torch.where(better, logits.detach().argmax(1), best_pred[rows])
                if t == steps:
                    break
                (grad,) = torch.autograd.grad(loss.sum(), delta)
                with torch.no_grad():
                    delta = ascent_step(delta, grad, eps, alpha, norm)
                    delta = ((xr + delta).clamp_(0, 1) - xr).requires_grad_(True)
    best_loss, which = best_loss.view(restarts, b).max(0)
    index = (which, torch.arange(b, device=x.device))
    best_delta = best_delta.view(restarts, b, *x.shape[1:])[index]
    return (best_delta, best_loss, best_pred.view(restarts, b)[index]) if with_pred else (best_delta, best_loss)


@torch.no_grad()
def clean_metrics(model, x, y, batch_size=500, progress=False):
    """Per-example clean CE and correctness in eval mode (fp32)."""
    losses, correct = [], []
    with bn_mode(model, "eval"):
        for i in progress_loop(range(0, len(y), batch_size), "clean batches", disable=not progress):
            logits = model(x[i:i + batch_size]).float()
            losses.append(F.cross_entropy(logits, y[i:i + batch_size], reduction="none"))
            correct.append(logits.argmax(1) == y[i:i + batch_size])
    return torch.cat(losses), torch.cat(correct)


def robust_metrics(model, x, y, eps, alpha, steps, restarts=1, batch_size=128, progress=False, clean_ok=None,
                   norm="linf"):
    """Per-example robust CE (max over iterates and restarts) and robust correctness (correct on the clean input
    and on the chosen adversarial one), in eval mode and fp32. `clean_ok`: the clean correctness, if known.
    At most `batch_size` inputs go through the network at once: restarts are attacked in chunks (pgd's max_inputs)."""
    losses, correct = [], []
    for i in progress_loop(range(0, len(y), batch_size), f"PGD-{steps}x{restarts}", disable=not progress):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        _, loss, pred = pgd(model, xb, yb, eps, alpha, steps, restarts, with_pred=True, norm=norm,
                            max_inputs=batch_size)
        if clean_ok is None:
            with torch.no_grad(), bn_mode(model, "eval"):
                ok = model(xb).argmax(1) == yb
        else:
            ok = clean_ok[i:i + batch_size]
        losses.append(loss)
        correct.append(ok & (pred == yb))
    return torch.cat(losses), torch.cat(correct)


# The per-layer weight helper: the layers l of the paper's Eq. 4 (AWP and the flatness measures) -------------------
def perturbable_params(model, weights_only=False):
    """{name: parameter} of the 'layers' a weight perturbation acts on: conv/linear weights and biases, each
    tensor its own layer. Normalisation layers and any auxiliary head (a module flagged `auxiliary = True`, with
    everything under it) are excluded; `weights_only` keeps only tensors with dim > 1 (AWP)."""
    out = {}
    for mname, module in model.named_modules():
        parts = mname.split(".")  # the module itself and every module above it
        if any(getattr(model.get_submodule(".".join(parts[:i])), "auxiliary", False) for i in range(1, len(parts) + 1)):
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):  # never a normalisation layer or the normaliser
            for pname, p in module.named_parameters(recurse=False):
                if not (weights_only and p.dim() <= 1):
                    out[f"{mname}.{pname}" if mname else pname] = p
    return out


# Optimiser, learning-rate schedule and the regularisers of Table 1 (paper §4) -------------------------------------
LR_SCHEDULES = ("multistep", "late", "cyclic", "const", "cosine")


def lr_factor(schedule, step, total_steps, cyclic_peak=4.0):
    """Multiplier of the base lr at iteration `step` of `total_steps` (schedules step per batch). multistep: ×0.1
    at epochs 60, 90, 120 of 150; late: ×0.1 at 140, 145 of 150; cyclic: 0 → cyclic_peak × base lr → 0."""
    frac = step / max(total_steps, 1)
    if schedule == "multistep":
        return 0.1 ** sum(frac >= m for m in (0.4, 0.6, 0.8))
    if schedule == "late":
        return 0.1 ** sum(frac >= m for m in (14 / 15, 29 / 30))
    if schedule == "cyclic":
        return cyclic_peak * (1 - abs(2 * frac - 1))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0


def add_optim_args(parser):
    g = parser.add_argument_group("optimiser and schedule")
    g.add_argument("--epochs", type=int, default=150, help="paper: 150 (30 for --lr-schedule cyclic)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch (paper: 128; lr is not rescaled)")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    g.add_argument("--lr", type=fraction, default=0.05, help="base lr (paper: 0.05; its Adam runs used 0.1)")
    g.add_argument("--momentum", type=fraction, default=0.9)
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum, as the paper's released code")
    g.add_argument("--wd", type=fraction, default=5e-4, help="coupled L2, BN scales towards 1 (released code 5e-4; "
                   "the text says 5e-3; Table 1 row: 0.05)")
    g.add_argument("--lr-schedule", default="multistep", choices=LR_SCHEDULES,
                   help="multistep (x0.1 at 60/90/120 of 150) | late (140/145) | cyclic (0 -> 0.2 -> 0) | const | cosine")
    g.add_argument("--cyclic-peak", type=fraction, default=0.2, help="peak lr of --lr-schedule cyclic (paper: 0.2)")
    g.add_argument("--bn-decay", default="auto", choices=("auto", "to-one", "to-zero"),
                   help="what --wd pulls BN scales towards: to-one = the paper's re-parameterised BN (scale 1 + γ'), "
                        "to-zero = standard BN (the TRADES/MART/AWP/Rice et al. code); auto = to-one for resnet18, "
                        "to-zero for preact-resnet18 and wrn-D-K")
    g.add_argument("--cyclic-momentum", type=fraction, default=0.8, help="SGD momentum at the cyclic peak lr, "
                   "--momentum at lr 0 (paper code: PyTorch CyclicLR's 0.8 and 0.9; = --momentum keeps it fixed)")


def make_optimizer(model, args, steps_per_epoch):
    """(optimiser, LambdaLR stepped per batch). Weight decay is coupled L2 (carried by SGD's momentum) towards 0,
    but (--bn-decay) towards 1 for the BN scales γ, as the paper's re-parameterised BN (scale 1 + γ'): a pre-step hook subtracts
    wd from their gradients (wd·γ − wd = wd·(γ − 1)). --lr-schedule cyclic also cycles SGD's momentum inversely to
    the lr, --momentum → --cyclic-momentum at the peak, as CyclicLR in the paper's code (README "Deviations")."""
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                              weight_decay=args.wd)
    total, peak = args.epochs * steps_per_epoch, args.cyclic_peak / args.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(args.lr_schedule, s, total, peak))
    scales = bn_scales(model) if bn_decays_to_one(args) else []
    cycle = args.lr_schedule == "cyclic" and args.optimizer == "sgd"
    check(not cycle or args.cyclic_momentum <= args.momentum, f"--cyclic-momentum must be <= --momentum {args.momentum}")

    def before_step(*_):
        for p in scales:
            if p.grad is not None:
                p.grad.sub_(args.wd)  # + the optimiser's wd·γ: wd·(γ − 1)
        m = args.momentum - (args.momentum - args.cyclic_momentum) * lr_factor("cyclic", sched.last_epoch, total, 1.0)
        for group in opt.param_groups if cycle else ():  # (sched.last_epoch: this step; lr_factor(.., 1) = lr/peak)
            group["momentum"] = m

    opt.register_step_pre_hook(before_step)
    return opt, sched


def bn_decays_to_one(args):
    """--bn-decay: towards 1 for the paper's ResNet-18 (its BN scale is 1 + γ'), towards 0 (standard BN) for the
    architectures whose public code uses standard BN, unless the flag says otherwise."""
    return args.bn_decay == "to-one" or (args.bn_decay == "auto" and args.arch == "resnet18")


def bn_scales(model):
    """The BN scales γ (every affine normalisation layer's weight): what --bn-decay to-one pulls towards 1."""
    return [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine]


def clip_weights(model, w):
    """Weight clipping (Table 1): conv/linear weights and biases to [−w, w]; BN γ to [1−w, 1+w] and β to
    [−w, w] (the paper's re-parameterised BN scale 1 + γ, expressed for standard BN)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                for p in m.parameters(recurse=False):
                    p.clamp_(-w, w)
            elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                m.weight.clamp_(1 - w, 1 + w)
                m.bias.clamp_(-w, w)


def noisy_labels(y, p, num_classes):
    """Label noise: each label is replaced with probability p by a uniformly drawn class (the true one
    included), so the label actually changes with probability p·(K−1)/K."""
    replace = torch.rand(y.shape, device=y.device) < p
    return torch.where(replace, torch.randint_like(y, num_classes), y)


# plumbing: result files and checkpoint I/O (README "Run folder, early stopping, resume") --------------------------
def versions(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": np.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "git_commit": commit, "time": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}


def _atomic(path, write):
    """`write(tmp)` to <name>.tmp, then os.replace: a crash never leaves a torn file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_jsonl(path, rows):
    _atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def save_checkpoint(path, **state):
    _atomic(path, lambda tmp: torch.save(state, tmp))


# ---------------------------------------------------------------------------------------------
# plumbing: what the epoch loop of every train_*.py calls (stateless, DDP-aware)
# ---------------------------------------------------------------------------------------------
def unwrap(model):
    """The plain module under DDP and torch.compile wrappers (what is saved and attacked)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def batch_stats(logits, y):
    """Sums for the training log of one batch, as device tensors (no host sync): CE with the true labels on the
    method's adversarial batch (TRADES' batch maximises the KL instead), the error count and n."""
    logits = logits.detach().float()
    return {"loss": F.cross_entropy(logits, y, reduction="sum"), "err": (logits.argmax(1) != y).sum().float(),
            "n": torch.tensor(float(len(y)), device=y.device)}


def add_stats(sums, stats):
    for k, v in stats.items():
        sums[k] = sums.get(k, 0) + v
    return sums


def train_means(sums, world=1):
    """Epoch means of the summed training statistics: train_<key> = sum / n (sum / n_labelled for *_labelled
    keys), all-reduced over ranks."""
    keys = sorted(sums)
    device = next(v.device for v in sums.values() if torch.is_tensor(v))
    totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in keys])
    if world > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    return {f"train_{k}": v / max(t["n_labelled" if k.endswith("_labelled") else "n"], 1)
            for k, v in t.items() if not k.startswith("n")}


def epoch_metrics(model, x, y, alpha, restarts, prefix, rank=0, world=1, norm="linf"):
    """Clean and PGD-7 metrics (at the norm's fixed ε of THREATS: 8/255 for ℓ∞) of a fixed test slice, sharded over
    ranks with summed counts; the robust loss is also split by clean correctness (Fig. 2)."""
    x, y = x[rank::world], y[rank::world]
    clean_loss, clean_ok = clean_metrics(model, x, y)
    rloss, robust_ok = robust_metrics(model, x, y, THREATS[norm]["eps"], alpha, 7, restarts, clean_ok=clean_ok, norm=norm)
    sums = torch.stack([torch.tensor(float(len(y)), device=x.device), clean_loss.sum(), (~clean_ok).sum(),
                        rloss.sum(), (~robust_ok).sum(), clean_ok.sum(), (rloss * clean_ok).sum()])
    if world > 1:
        dist.all_reduce(sums)
    n, cl, ce, rl, rerr, n_ok, rl_ok = sums.tolist()
    return {f"{prefix}clean_loss": cl / n, f"{prefix}clean_err": ce / n, f"{prefix}rloss": rl / n,
            f"{prefix}rerr": rerr / n, f"{prefix}rloss_correct": rl_ok / max(n_ok, 1),
            f"{prefix}rloss_incorrect": (rl - rl_ok) / max(n - n_ok, 1), f"{prefix}n": int(n)}


def sync_buffers(module, world=1):
    """BN running statistics from rank 0: under DDP each rank's drift apart (they see other images)."""
    for b in module.buffers() if world > 1 else ():
        dist.broadcast(b, 0)


def reestimate_bn(ema, loader, world=1):
    """The EMA model's BN statistics, re-estimated by one clean pass over the (augmented) training set:
    averaged running statistics do not belong to the averaged weights."""
    from torch.optim.swa_utils import update_bn
    update_bn(loader, ema, device=next(ema.parameters()).device)
    sync_buffers(ema, world)


# ---------------------------------------------------------------------------------------------
# plumbing: the run folder and its crash safety (README "Run folder, early stopping, resume")
# Per epoch, in this order: the snapshot ckpt_epoch{E:03d}.pt (snapshot epochs), ckpt_best.pt (a copy of
# the best snapshot), ckpt_last.pt (THE COMMIT POINT: it holds everything, the metrics history too),
# then metrics.jsonl rewritten from that history. Every file goes to <name>.tmp, then os.replace.
# A kill at any moment leaves ckpt_last.pt at the last committed epoch; --resume restores it and
# repairs what a kill after it may have left (torn or stale files, a ckpt_best.pt of a lost epoch).
# ---------------------------------------------------------------------------------------------
NOT_COMPARED = {"resume", "device", "out", "workers"}  # flags that may change on --resume


def snapshot_path(out, epoch):
    return Path(out) / f"ckpt_epoch{epoch:03d}.pt"


def holds_results(out):
    """A folder holds a run once an epoch wrote a checkpoint or a metrics line (args.json alone, or an empty
    folder, is not a run)."""
    metrics = Path(out) / "metrics.jsonl"
    return any(Path(out).glob("ckpt_*.pt")) or (metrics.is_file() and metrics.stat().st_size > 0)


def check_out(args):
    """Before anything is loaded: a folder that holds a run is continued with --resume, never overwritten."""
    check(args.resume or not holds_results(args.out),
          f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    _interrupted[:] = [lambda: interrupted_run(args.out, args.epochs)]


def interrupted_run(out, epochs):
    """What Ctrl-C reports for a training run: the last committed epoch (ckpt_last.pt) and how to go on."""
    metrics = Path(out) / "metrics.jsonl"
    done = sum(map(_is_json, metrics.read_text().splitlines())) if metrics.is_file() else 0
    if done == 0:
        return f"no epoch had finished, so nothing was kept in {out}; run the same command again"
    return f"{out} keeps epoch {done} of {epochs} (ckpt_last.pt); continue with the same command and --resume"


def resume_checkpoint(args, device, rank=0):
    """The checkpoint --resume continues from: ckpt_last.pt, else the newest readable snapshot (with a
    warning); None for a new run (no --resume, or --resume in a folder without results). Flags that
    differ from the saved run are refused."""
    out = Path(args.out)
    if not args.resume:
        return None
    snapshots = sorted(out.glob("ckpt_epoch*.pt"), key=lambda p: p.name, reverse=True)
    for path in [out / "ckpt_last.pt", *snapshots]:
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
        except Exception:  # missing, torn by a disk failure, or not ours
            continue
        if not (isinstance(ckpt, dict) and "history" in ckpt):
            continue
        if path.name != "ckpt_last.pt" and rank == 0:
            warn(f"{out / 'ckpt_last.pt'} is missing or unreadable; resuming from {path.name}")
        saved, now = dict(ckpt["args"], data_dir=absolute_path(ckpt["args"]["data_dir"])), vars(args)
        differ = sorted(k for k in now if k not in NOT_COMPARED and k in saved and saved[k] != now[k])
        check(not differ, "--resume with flags that differ from the saved run: "
              + ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in differ))
        return ckpt
    check(not holds_results(out), f"--resume: {out} holds results but no readable checkpoint of this codebase "
          "(ckpt_last.pt or ckpt_epochNNN.pt); move the folder aside or choose another --out")
    if rank == 0:
        print(f"nothing to resume in {out}: starting a new run")
    return None


def restore(ckpt, args, net, opt, sched, ema, loader, rank=0, world=1, aux=None):
    """Load a checkpoint into the training objects and return (epoch, history, best): the epochs done, the
    per-epoch metrics and the early-stopping choice. Rank 0 repairs the run folder."""
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(max(int(ckpt["epoch"]), 1))  # > 0: the next update averages instead of copying
    if aux is not None:
        aux.load_state_dict(ckpt["aux"])
    states = ckpt["rng"]  # one per rank
    if len(states) != world and rank == 0:
        warn(f"the checkpoint was saved by {len(states)} process(es) and resumes on {world}: the run "
             "continues, but not bit for bit as it would have uninterrupted")
    set_rng_state(states[rank % len(states)], loader)
    if rank == 0:
        repair_run(ckpt, args.out)
        print(f"resumed {args.out} at epoch {ckpt['epoch']}")
    return int(ckpt["epoch"]), list(ckpt["history"]), ckpt["es_best"]


def repair_run(ckpt, out):
    """Make the folder what the committed epoch says: no temporary files, metrics.jsonl = the history (a torn
    line is dropped with a warning), the committed snapshot present, and ckpt_best.pt = the snapshot of the
    best epoch (a kill between the writes may have left one of a lost epoch)."""
    out, epoch, best = Path(out), int(ckpt["epoch"]), ckpt["es_best"]
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    metrics = out / "metrics.jsonl"
    torn = sum(1 for line in (metrics.read_text().splitlines() if metrics.is_file() else [])
               if line.strip() and not _is_json(line))
    if torn:
        warn(f"dropped {torn} torn line(s) of {metrics}; metrics.jsonl is rewritten from the checkpoint")
    write_jsonl(metrics, ckpt["history"])
    if "es_rerr" in ckpt["metrics"] and not snapshot_path(out, epoch).is_file():
        save_checkpoint(snapshot_path(out, epoch), **ckpt)
    best_file = out / "ckpt_best.pt"
    if best is not None and (not best_file.is_file() or
                             torch.load(best_file, map_location="cpu", weights_only=True)["epoch"] != best["epoch"]):
        check(snapshot_path(out, best["epoch"]).is_file(), f"{best_file} must be epoch {best['epoch']}, but its "
              f"snapshot {snapshot_path(out, best['epoch']).name} is gone; restore it or start a new run")
        _atomic(best_file, lambda tmp: shutil.copyfile(snapshot_path(out, best["epoch"]), tmp))
    if not (out / "ckpt_last.pt").is_file():  # resumed from a snapshot: its epoch's commit point, last
        save_checkpoint(out / "ckpt_last.pt", **ckpt)


def _is_json(line):
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def training_state(args, epoch, net, opt, sched, ema, loader, history, best, world=1, aux=None):
    """Everything that determines the rest of the run, as one checkpoint dict (loads with weights_only=True).
    Under DDP every rank's RNG state (attack starts and label noise differ per rank)."""
    rng = [rng_state(loader)]
    if world > 1:
        rng = [None] * world
        dist.all_gather_object(rng, rng_state(loader))
    state = dict(model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch,
                 args=vars(args), rng=rng, es_best=best, metrics=history[-1], history=history,
                 versions=versions(next(net.parameters()).device))
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    if aux is not None:
        state["aux"] = aux.state_dict()
    return state


def save_epoch(state, snapshot, is_best, rank=0):
    """Write one epoch in the commit order above (rank 0; the others wait). args.json comes with the first
    epoch, so a start that fails leaves no run folder."""
    if rank == 0:
        out, epoch = Path(state["args"]["out"]), state["epoch"]
        out.mkdir(parents=True, exist_ok=True)
        if epoch == 1 or not (out / "args.json").is_file():  # a new run replaces a failed start's
            for tmp in out.glob("*.tmp"):  # ... and the half-written files a kill in its writes left
                tmp.unlink()
            write_json(out / "args.json", {**state["args"], "versions": state["versions"]})
        if snapshot:
            save_checkpoint(snapshot_path(out, epoch), **state)
        if is_best:
            _atomic(out / "ckpt_best.pt", lambda tmp: shutil.copyfile(snapshot_path(out, epoch), tmp))
        save_checkpoint(out / "ckpt_last.pt", **state)  # the commit point
        write_jsonl(out / "metrics.jsonl", state["history"])
        shown = ("train_loss", "train_err", "test_clean_err", "test_rerr", "es_rerr", "time_s")
        print(f"epoch {epoch:3d} " + " ".join(f"{k}={v:.4g}" for k, v in state["metrics"].items() if k in shown),
              flush=True)
    if dist.is_initialized():
        dist.barrier()
