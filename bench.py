"""Speed benchmark: this codebase's hot paths against reference-style code and against the compute floor.

Every figure is a ratio of two timings measured side by side in this process, after warm-up, as the
median of --repeats repeats (shared machines are noisy: ratios are what to compare, not seconds); row 6 is a
ratio of two peak memories.

Rows
  1. AT step (PGD-7 + update) of train_at.py's code path vs a step written the way the common public
     AT scripts do it: attack with loss.backward() through the whole graph, train-mode BN during the
     attack, and a torchvision DataLoader with CPU transforms.             target ≥ 1.3× (CPU), ≥ 3× (GPU)
  2. The same AT step vs a bare loop of the same passes (7 input-gradient passes + 1 training pass on
     one batch, no bookkeeping): efficiency = floor time / step time.        target ≥ 0.9
  3. Flatness, on one batch of the measures' own mini-batch size (128): one average-case sample vs
     one bare PGD-20 run; worst-case joint passes (ν and δ) vs forward + full backward each.
                                                                             target ≥ 0.9 each
  3c. Adaptive worst-case sharpness (--mode adaptive-worst), on the same batch: steps of flatness.adaptive_ascent
     (ν and δ jointly: step, momentum, best-iterate tracking) vs forward + gradient w.r.t. ν and δ each, per step.
                                                                             target ≥ 0.9
  3d. Hessian trace (--mode hessian-trace), on the same batch: a Hutchinson probe of flatness.hessian_trace_probes
     (Rademacher draw, H·v, vᵀHv) vs the bare double backward it needs.      target ≥ 0.9
  2w. Row 2 for a WideResNet (--wrn; wrn-16-4 by default, small enough for a CPU; wrn-34-10 on a GPU), the
     architecture of the TRADES/MART/AWP papers: the same step vs its bare passes.  target ≥ 0.9
  4. Data: the device-resident loader's images/s vs a DataLoader with the same augmentation.
  5. Peak memory per row (each row runs in its own process: ru_maxrss on CPU,
     torch.cuda.max_memory_allocated on GPU).
  6. Attack memory: the peak memory of evaluate.py's PGD-20 on one --batch-size batch with 1 and with 10 restarts
     (restarts in chunks of at most --batch-size inputs), side by side: ×10 / ×1  target ≤ 1.2; and the memory
     per image of an attack's pass (bytes saved for backward, and the peak) for ResNet-18 and WRN-34-10.
With --epoch-time (GPU): seconds per CIFAR-10-sized epoch (50,000 images, batch 128) of PGD-7 AT for
fp32 eager, bf16 + channels_last, and + torch.compile, for ResNet-18 and for the --wrn WideResNet.

Usage:  python bench.py --device cpu            # ~12 min on 2 cores (width 64, batch 16; row 6 ~6 min of it),
                                                # + rows 3c, 3d: 17 min on 2 cores shared with a training job
                                                # (55 ascent steps and 12 probes; idle, est. 3-4 min)
        python bench.py --device cuda --amp --channels-last [--compile] --epoch-time
Writes bench.json (every timing, the machine, versions and parameters) and prints a table.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

import common
import train_at

ROWS = ("at_step", "floor", "wrn_floor", "avg_flatness", "worst_flatness", "adaptive_step", "hutchinson", "data",
        "attack_memory")
MEMORY_WRN = "wrn-34-10"  # the WideResNet whose activation memory row 6 reports (TRADES, MART, AWP)


def parse_args(argv=None):
    p = common.ArgumentParser(description="speed ratios against reference-style code and the compute floor")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (paper: 64)")
    p.add_argument("--wrn", type=common.parse_arch, default="wrn-16-4",
                   help="the WideResNet of row 2w and of --epoch-time (wrn-34-10: TRADES, MART, AWP)")
    p.add_argument("--batch-size", type=int, default=0, help="0 = 16 on CPU, 128 on GPU")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in our AT step (GPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--epoch-time", action="store_true", help="GPU: seconds per 50k-image PGD-7 AT epoch")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    p.add_argument("--only", choices=ROWS, help=argparse.SUPPRESS)  # internal: one row per process
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    common.check(args.width >= 1 and args.batch_size >= 0, "--width must be >= 1 and --batch-size >= 0")
    common.check(args.repeats >= 1 and args.steps >= 1, "--repeats and --steps must be >= 1")
    common.check(args.wrn.startswith("wrn-"), f"--wrn takes a WideResNet (wrn-D-K), got {args.wrn}")
    args.rows = [r for r in args.rows.split(",") if r]
    common.check(args.rows and set(args.rows) <= set(ROWS), f"--rows takes some of {','.join(ROWS)}")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(fns, device, repeats, steps, warmups=None):
    """Median seconds per call of each variant, after one warm-up call each (of `warmups`' cheaper
    stand-ins where given), with the variants' repeats interleaved so that machine noise hits them
    alike."""
    for fn in (warmups or fns).values():
        fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def at_args(args, arch="resnet18"):
    """train_at.py's flags at their defaults, with this benchmark's architecture and speed options."""
    return train_at.parse_args(["--arch", arch, "--width", str(args.width)] + (["--amp"] if args.amp else []))


def synthetic_cifar(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


# ------------------------------------------------------------------------------------------------
# Row 1 and 2: the AT step, reference-style step, and the bare floor
# ------------------------------------------------------------------------------------------------
def our_at_step(net, opt, sched, loader_iter, args_at, sums):
    """One iteration of train_at.py's training loop: next device batch, train_at.train_step (PGD-7,
    update, schedule), the device-side epoch statistics."""
    x, y = next(loader_iter)
    common.add_stats(sums, train_at.train_step(net, net, opt, sched, None, x, y, args_at))


def reference_at_step(net, opt, loader_iter, device, eps=8 / 255, alpha=0.007, steps=7):
    """How the common public AT scripts write it: CPU DataLoader batch, train-mode attack, loss.backward()."""
    x, y = next(loader_iter)
    x, y = x.to(device), y.to(device)
    net.train()
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    delta.data = (x + delta).clamp(0, 1) - x
    delta.requires_grad = True
    for _ in range(steps):
        loss = F.cross_entropy(net(x + delta), y)
        loss.backward()
        grad = delta.grad.detach()
        delta.data = (delta + alpha * grad.sign()).clamp(-eps, eps)
        delta.data = (x + delta).clamp(0, 1) - x
        delta.grad.zero_()
    x_adv = (x + delta).detach()
    loss = F.cross_entropy(net(x_adv), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def floor_step(net, opt, x, y, steps=7):
    """The passes an AT step cannot avoid: `steps` forward + input-gradient passes (weights frozen) and one
    forward + full backward + optimiser step, on one resident batch, with no bookkeeping."""
    delta = torch.zeros_like(x, requires_grad=True)
    net.eval().requires_grad_(False)
    for _ in range(steps):
        (g,) = torch.autograd.grad(F.cross_entropy(net(x + delta), y, reduction="sum"), delta)
    net.train().requires_grad_(True)
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def cpu_transform_loader(x_uint8, y, batch_size, workers):
    from torchvision import transforms as T
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ConvertImageDtype(torch.float32)])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(x_uint8[i]), y[i]
    return torch.utils.data.DataLoader(DS(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)


def endless(loader):
    while True:
        yield from loader


def make_net(args, device, arch="resnet18"):
    torch.manual_seed(0)
    net = common.build_model({"arch": arch, "width": args.width, "act": "relu"}).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


class OurTraining:
    """train_at.py's setup for the timed step (its flags at their defaults: SGD with momentum, per-batch
    schedule) with this benchmark's --amp / --channels-last / --compile, on the device loader."""

    def __init__(self, args, device, x_u8, y, b, arch="resnet18"):
        self.args_at = at_args(args, arch)
        self.net = make_net(args, device, arch)
        self.fwd = torch.compile(self.net) if args.compile else self.net
        self.loader = common.DeviceLoader(x_u8, y, b, device, seed=0)
        self.opt, self.sched = common.make_optimizer(self.net, self.args_at, len(self.loader))
        self.batches, self.sums = endless(self.loader), {}

    def step(self):
        our_at_step(self.fwd, self.opt, self.sched, self.batches, self.args_at, self.sums)


def row_at_step(args, device, b):
    x_u8, y = synthetic_cifar(max(50 * b, 2000))
    ours = OurTraining(args, device, x_u8, y, b)
    theirs = make_net(args, device)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    it_t = endless(cpu_transform_loader(x_u8, y, b, workers=2))
    t = side_by_side({"ours": ours.step, "reference": lambda: reference_at_step(theirs, opt_t, it_t, device)},
                     device, args.repeats, args.steps)
    return {"ours_s": t["ours"], "reference_s": t["reference"], "speedup": t["reference"] / t["ours"]}


def row_floor(args, device, b, arch="resnet18"):
    x_u8, y = synthetic_cifar(max(50 * b, 2000))
    ours = OurTraining(args, device, x_u8, y, b, arch)
    xb, yb = next(ours.batches)
    t = side_by_side({"ours": ours.step, "floor": lambda: floor_step(ours.fwd, ours.opt, xb, yb)},
                     device, args.repeats, args.steps)
    return {"ours_s": t["ours"], "floor_s": t["floor"], "efficiency": t["floor"] / t["ours"]}


def row_wrn_floor(args, device, b):
    return {**row_floor(args, device, b, args.wrn), "arch": args.wrn}


# ------------------------------------------------------------------------------------------------
# Row 3: flatness vs bare passes
# ------------------------------------------------------------------------------------------------
def bare_pgd(net, x, y, steps=20, eps=8 / 255, alpha=0.007):
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        (g,) = torch.autograd.grad(F.cross_entropy(net(x + delta), y, reduction="sum"), delta)
        with torch.no_grad():
            delta = (delta + alpha * g.sign()).clamp_(-eps, eps)
        delta.requires_grad_(True)
    with torch.no_grad():
        return F.cross_entropy(net(x + delta), y)


def row_avg_flatness(args, device, b):
    """One average-case sample (draw ν, PGD-20 on f(·; w + ν), its mean CE and error) vs a bare
    PGD-20 run on the unperturbed model and the same batch. The batch is the measure's own
    mini-batch (128, flatness.py --batch-size), whatever --batch-size says: flatness.py draws ν once
    per sample and attacks the whole subset (1000 images, 8 such batches) with it, so one batch of
    128 still charges the draw (11M Gaussians) and the clean forward for RErr 8× more than a real
    sample does; a batch of 16 would charge the draw 64× more."""
    import flatness
    b = 128
    x_u8, y = synthetic_cifar(b)
    x, y = x_u8.to(device).float() / 255, y.to(device)
    net = make_net(args, device).eval().requires_grad_(False)  # the bare PGD at its fastest: input gradients only
    t = side_by_side({"sample": lambda: flatness.average_case_draws(net, x, y, xi=0.5, samples=1, batch_size=b),
                      "bare_pgd20": lambda: bare_pgd(net, x, y)}, device, args.repeats, 1,
                     warmups={"sample": lambda: flatness.average_case_draws(net, x, y, xi=0.5, samples=1, steps=1),
                              "bare_pgd20": lambda: bare_pgd(net, x, y, steps=1)})
    return {"sample_s": t["sample"], "bare_pgd20_s": t["bare_pgd20"], "efficiency": t["bare_pgd20"] / t["sample"]}


def row_worst_flatness(args, device, b, passes=4):
    """Worst-case passes on one mini-batch (joint_ascent: from its random start ν, `passes` joint
    steps on ν and δ, then the final evaluation) vs the passes they cannot avoid: `passes` ×
    (forward + full backward) + 1 forward. Reported per pass; a restart of the measure has 20, so
    charging the start and the final evaluation to 4 overstates their share. The batch is the
    measure's own mini-batch (128, flatness.py --joint-batch-size), whatever --batch-size says: the
    per-batch update of ν over all 11M weights is part of the measure's cost at that size."""
    import flatness
    b = 128
    x_u8, y = synthetic_cifar(b)
    x, y = x_u8.to(device).float() / 255, y.to(device)
    net = make_net(args, device).eval()

    def bare(passes):
        for _ in range(passes):
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y, reduction="sum").backward()
        with torch.no_grad():
            net(x)

    def joint(passes):
        flatness.joint_ascent(net, x, y, xi=0.00075, passes=passes, batch_size=b)

    t = side_by_side({"joint": lambda: joint(passes), "bare": lambda: bare(passes)}, device, args.repeats, 1,
                     warmups={"joint": lambda: joint(1), "bare": lambda: bare(1)})
    return {"pass_s": t["joint"] / passes, "bare_pass_s": t["bare"] / passes, "efficiency": t["bare"] / t["joint"]}


# ------------------------------------------------------------------------------------------------
# Rows 3c and 3d: the field's other measures (adaptive worst-case sharpness, the Hessian trace) vs bare passes
# ------------------------------------------------------------------------------------------------
def measure_batch(args, device, b=128):
    """One mini-batch of the measures' own size (128: flatness.py --sharpness-batch and --batch-size) and the
    network of the flatness rows, in eval mode (the measures' BN mode)."""
    x_u8, y = synthetic_cifar(b)
    return x_u8.to(device).float() / 255, y.to(device), make_net(args, device).eval()


def bare_adaptive_passes(net, weights, nu, x, delta, y, steps, forwards):
    """The passes `steps` steps of the adaptive ascent cannot avoid: `steps` × (forward of f(x + δ; w + ν), CE,
    torch.autograd.grad w.r.t. ν and δ), then `forwards` − `steps` forwards without gradients (the ascent scores its
    last iterate, and takes one more forward per step halving, at the best iterate); no step, no bookkeeping, and
    w + ν one addition (flatness.plus's ×s counts as the measure's). Returns the last gradients (for the tests)."""
    for i in range(forwards):
        grad = i < steps
        params = {k: v.detach().requires_grad_(grad) for k, v in nu.items()}
        d = delta.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            ce = F.cross_entropy(functional_call(net, {k: w + params[k] for k, w in weights.items()}, (x + d,)), y)
        if grad:
            grads = torch.autograd.grad(ce, list(params.values()) + [d])
    return grads


def row_adaptive_step(args, device, b, steps=5):
    """Steps of the adaptive worst-case ascent, timed as flatness.adaptive_ascent itself (--mode adaptive-worst's
    estimator at its defaults: ℓ∞, ρ = 0.002, the input attack from a given δ, here a uniform start in the ε-ball)
    running `steps` steps on one mini-batch of 128: per step a forward of f(x + δ; w + ν), autograd.grad w.r.t. ν and
    δ, flatness.adaptive_step on ν, the PGD step on δ and the best-iterate tracking (torch.where), plus per call its
    set-up, the last iterate's forward and one forward per step halving (a reload of the best iterate). Against
    bare_adaptive_passes with the same forwards (counted on the untimed first call by a forward hook: the ascent is
    deterministic). Reported per step (both times / `steps`); the measure takes 20 steps per batch (twice, with
    ρ and ρ = 0), so charging the set-up and the last forward to 5 overstates their share."""
    import flatness
    b = 128
    x, y, net = measure_batch(args, device, b)
    torch.manual_seed(0)
    delta = (x + common.random_start(x, 8 / 255)).clamp_(0, 1) - x
    with torch.no_grad():
        logits = net(x + delta)
        init_loss, init_err = F.cross_entropy(logits, y), (logits.argmax(1) != y).float().mean()
    rho = flatness.ADAPTIVE_RHO[("adaptive-worst", "linf")]
    weights = flatness.frozen_weights(net)
    nu = {k: torch.zeros_like(w) for k, w in weights.items()}

    def ascent():
        flatness.adaptive_ascent(net, x, y, init_loss, init_err, rho, "linf", steps, delta=delta)

    calls = []
    hook = net.register_forward_hook(lambda *_: calls.append(1))
    ascent()  # the count, and ours' warm-up
    hook.remove()
    forwards = len(calls)
    t = side_by_side({"ours": ascent, "bare": lambda: bare_adaptive_passes(net, weights, nu, x, delta, y, steps,
                                                                           forwards)},
                     device, args.repeats, 1,
                     warmups={"bare": lambda: bare_adaptive_passes(net, weights, nu, x, delta, y, 1, 1)})
    return {"step_s": t["ours"] / steps, "bare_step_s": t["bare"] / steps, "efficiency": t["bare"] / t["ours"],
            "steps": steps, "forwards": forwards}


def bare_hessian_vector_products(net, weights, x, y, v, probes, batch_size=128):
    """The passes `probes` Hutchinson probes cannot avoid, with one fixed v: per probe and batch, forward, CE,
    torch.autograd.grad w.r.t. the weights with create_graph=True, the dot with v, torch.autograd.grad of it.
    Returns the last batch's H·v (for the tests)."""
    params = list(weights.values())
    for _ in range(probes):
        for i in range(0, len(y), batch_size):
            ce = F.cross_entropy(net(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum") / len(y)
            grads = torch.autograd.grad(ce, params, create_graph=True)
            dot = sum((g * v[k]).sum() for k, g in zip(weights, grads))
            hv = torch.autograd.grad(dot, params)
    return hv


def row_hutchinson(args, device, b, probes=1):
    """Hutchinson probes of the Hessian trace, timed as flatness.hessian_trace_probes itself (--mode hessian-trace's
    estimator: per probe a Rademacher draw of v over the conv/linear weights, flatness.hessian_vector_product over
    the batches, the vᵀHv reduction) with `probes` probes on one mini-batch of 128, vs bare_hessian_vector_products
    on the same network, weights (common.perturbable_params(weights_only=True)) and images. Reported per probe
    (both times / `probes`). The measure's 500 images (flatness.py --n-hessian) are 4 batches: one batch charges
    the draw and the reduction 4× more than a real probe does."""
    import flatness
    b = 128
    x, y, net = measure_batch(args, device, b)
    weights = common.perturbable_params(net, weights_only=True)
    g = torch.Generator(device=device).manual_seed(0)
    v = {k: torch.randint(0, 2, w.shape, device=device, generator=g).to(w.dtype).mul_(2).sub_(1)
         for k, w in weights.items()}
    t = side_by_side({"ours": lambda: flatness.hessian_trace_probes(net, x, y, probes, b),
                      "bare": lambda: bare_hessian_vector_products(net, weights, x, y, v, probes, b)},
                     device, args.repeats, 1,
                     warmups={"ours": lambda: flatness.hessian_trace_probes(net, x, y, 1, b),
                              "bare": lambda: bare_hessian_vector_products(net, weights, x, y, v, 1, b)})
    return {"probe_s": t["ours"] / probes, "bare_probe_s": t["bare"] / probes, "efficiency": t["bare"] / t["ours"],
            "probes": probes}


# ------------------------------------------------------------------------------------------------
# Row 4: data
# ------------------------------------------------------------------------------------------------
def row_data(args, device, b):
    b = 128
    x_u8, y = synthetic_cifar(12800)
    ours = common.DeviceLoader(x_u8, y, b, device, seed=0)
    theirs = cpu_transform_loader(x_u8, y, b, workers=2)

    def epoch(loader):
        def run():
            for xb, _ in loader:
                xb = xb.to(device)
            sync(device)
        return run
    t = side_by_side({"ours": epoch(ours), "dataloader": epoch(theirs)}, device, max(args.repeats // 2, 2), 1)
    n = len(y) // b * b
    return {"ours_img_s": n / t["ours"], "dataloader_img_s": n / t["dataloader"],
            "speedup": t["dataloader"] / t["ours"]}


# ------------------------------------------------------------------------------------------------
# Row 6: attack memory
# ------------------------------------------------------------------------------------------------
def peak_bytes(fn, device):
    """Peak bytes of tensors allocated while fn() runs, above what was allocated before it. GPU: the caching
    allocator's own count (torch.cuda.max_memory_allocated, reset first). CPU: every allocation and free of the
    CPU allocator as torch's profiler records it (profile_memory; its raw '[memory]' records, read before the
    slow per-op event tree is built), summed in time order. Unlike the process's peak RSS, it neither keeps the
    peak of an earlier call nor counts what malloc keeps after a free."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()  # (< 0 for a free)
        peak = max(peak, live)
    return peak


def saved_bytes(net, x):
    """Bytes autograd saves for the backward of one input-gradient pass of `net` on x (each storage once: a ReLU's
    output that the next conv saves too is one tensor), counted with saved_tensors_hooks: device independent."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(net(x), torch.zeros(len(x), dtype=torch.long, device=x.device), reduction="sum")
    torch.autograd.grad(loss, x)
    return sum(storages.values())


def saved_bytes_per_image(arch, width, device):
    """Bytes saved for backward per image by an attack's input-gradient pass of `arch` (eval mode, weights
    frozen): the difference between a batch of 2 and of 1, so that the weights (which a conv saves for its input
    gradient) cancel. A WRN-34-10 fits a CPU at that size."""
    torch.manual_seed(0)
    net = common.build_model({"arch": arch, "width": width, "act": "relu"}).to(device).eval()
    x = torch.rand(2, 3, 32, 32, device=device)
    with common.frozen_params(net):
        return saved_bytes(net, x) - saved_bytes(net, x[:1])


def row_attack_memory(args, device, b, restarts=10, steps=20):
    """Peak memory (peak_bytes) of evaluate.py's attack, PGD-20 with 1 and with `restarts` restarts, on one batch of
    --batch-size images, with common.robust_metrics's bound: at most --batch-size inputs at once. Then the memory
    per image, what docs/speed.md's table of the largest --batch-size per GPU is computed from: the ×1 peak over
    the batch, the same for MEMORY_WRN with PGD-1 on 4 images (a step's peak hardly depends on the number of
    steps: ResNet-18, 16 images, PGD-1 82.25 MiB, PGD-20 82.63; a WRN-34-10 PGD-20 is long on a CPU), and the
    bytes saved for backward (saved_bytes_per_image) of both. (cuDNN autotuning off: its trial workspaces are
    not the attack's.)"""
    torch.backends.cudnn.benchmark = False
    x_u8, y = synthetic_cifar(b)
    x, y = x_u8.to(device).float() / 255, y.to(device)
    net = make_net(args, device).eval()

    def attack(r, n=steps):
        return lambda: common.pgd(net, x, y, 8 / 255, 0.007, n, restarts=r, max_inputs=b)
    attack(restarts, 1)()  # warm-up
    peaks = {r: peak_bytes(attack(r), device) for r in (1, restarts)}
    wrn, x4, y4 = make_net(args, device, MEMORY_WRN).eval(), x[:4], y[:4]
    common.pgd(wrn, x4, y4, 8 / 255, 0.007, 1)  # warm-up
    wrn_peak = peak_bytes(lambda: common.pgd(wrn, x4, y4, 8 / 255, 0.007, 1), device)
    return {"peak_mb_x1": peaks[1] / 2**20, f"peak_mb_x{restarts}": peaks[restarts] / 2**20,
            "ratio": peaks[restarts] / peaks[1], "peak_mb_per_image": peaks[1] / b / 2**20,
            "wrn_peak_mb_per_image": wrn_peak / len(y4) / 2**20,
            "resnet18_saved_mb_per_image": saved_bytes_per_image("resnet18", args.width, device) / 2**20,
            "wrn_saved_mb_per_image": saved_bytes_per_image(MEMORY_WRN, args.width, device) / 2**20}


EPOCH_VARIANTS = (("fp32_eager", False, False, False), ("bf16_channels_last", True, True, False),
                  ("bf16_channels_last_compile", True, True, True))  # (name, --amp, --channels-last, --compile)


def epoch_times(args, device, images=50000, variants=EPOCH_VARIANTS, warmup=20, arch="resnet18"):
    """Seconds per epoch of `images` synthetic images (a CIFAR-10 epoch by default) of train_at.py's
    PGD-7 AT step at batch 128, per (precision, memory format, compile) variant."""
    x_u8, y = synthetic_cifar(images)
    out = {}
    for name, amp, channels_last, compile_ in variants:
        a = argparse.Namespace(**{**vars(args), "amp": amp, "channels_last": channels_last, "compile": compile_})
        ours = OurTraining(a, device, x_u8, y, 128, arch)
        for _ in range(warmup):  # (and compilation)
            ours.step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(len(ours.loader)):
            ours.step()
        sync(device)
        out[name] = time.perf_counter() - t0
    return out


ROW_FNS = {"at_step": row_at_step, "floor": row_floor, "wrn_floor": row_wrn_floor, "avg_flatness": row_avg_flatness,
           "worst_flatness": row_worst_flatness, "adaptive_step": row_adaptive_step, "hutchinson": row_hutchinson,
           "data": row_data, "attack_memory": row_attack_memory}
TARGETS = {"at_step": ("speedup", "≥ 1.3"), "floor": ("efficiency", "≥ 0.9"), "wrn_floor": ("efficiency", "≥ 0.9"),
           "avg_flatness": ("efficiency", "≥ 0.9"), "worst_flatness": ("efficiency", "≥ 0.9"),
           "adaptive_step": ("efficiency", "≥ 0.9"), "hutchinson": ("efficiency", "≥ 0.9"),
           "data": ("speedup", None), "attack_memory": ("ratio", "≤ 1.2")}


def main():
    args = parse_args()
    device = common.resolve_device(args.device)
    common.check(not args.epoch_time or device.type == "cuda",
                 "--epoch-time times full CIFAR-10 epochs on a GPU; use it with --device cuda")
    b = args.batch_size or (128 if device.type == "cuda" else 16)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.only:  # child process: one row, JSON on stdout
        result = ROW_FNS[args.only](args, device, b)
        result["peak_mem_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for row in args.rows:
        cmd = [sys.executable, __file__, "--only", row, "--device", str(device), "--width", str(args.width),
               "--wrn", args.wrn,
               "--batch-size", str(b), "--repeats", str(args.repeats), "--steps", str(args.steps)]
        cmd += [f for f, on in (("--amp", args.amp), ("--channels-last", args.channels_last),
                                ("--compile", args.compile)) if on]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"row {row} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        results[row] = json.loads(line[-1][len("RESULT "):])
        key, target = TARGETS[row]
        r = results[row]
        print(f"{row:15s} {key} {r[key]:6.2f}" + (f"  (target {target})" if target else "")
              + f"  peak {r['peak_mem_mb']:.0f} MB  " + " ".join(f"{k}={v:.4g}" for k, v in r.items()
                                                               if k not in (key, "peak_mem_mb", "arch")), flush=True)
    if args.epoch_time:
        results["epoch_s"] = epoch_times(args, device)
        print("seconds per 50k-image PGD-7 AT epoch (batch 128), ResNet-18:", results["epoch_s"])
        results["epoch_s_wrn"] = epoch_times(args, device, arch=args.wrn)
        print(f"... {args.wrn}:", results["epoch_s_wrn"])
    results["params"] = {**vars(args), "batch_size": b}
    results["versions"] = common.versions(device)
    common.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.run_cli(main)
