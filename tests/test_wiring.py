"""Wiring of train_at.py, train_trades.py, train_mart.py and train_awp.py: for every flag that changes the
update, a test that fails if its line is disabled or its value ignored.

A. One call of each script's `train_step` (args from the script's own parse_args, optimiser and schedule
   from common.make_optimizer) against the update written out here from the paper's formulas: the
   attack (δ from PGD with the expected norm / ε / step / steps / BN mode; for TRADES PGD on a KL written here),
   what every forward sees (its BN mode and its input: the training forward must see exactly x + δ of
   the attack), the loss (β, label smoothing, label noise reproduced by seeding), AWP's ν and the
   restore, the first optimiser step (SGD: w − lr·(g + wd·(w − c)), momentum buffer g + wd·(w − c), c = 1
   for the BN scales γ and 0 elsewhere; Adam), gradient clipping, weight clipping, the EMA and the schedule.
B. Each script's `main()` in-process on the tiny ImageFolder with a spy around its train_step and a
   scripted common.epoch_metrics: the EMA decay, the schedule and the init clipping of main, the EMA's
   BN statistics re-estimated after the last epoch (what its BN layer saw, averaged by hand), the
   --awp-warmup epochs, the early-stopping rule, its model (the EMA with --ema) and its data (last
   --n-early-stop test images, --es-restarts), the threat model of both (--norm), the per-epoch test data
   (first --n-log) and the logged lr
   (the epoch's first step's), the checkpoints, and --resume.
"""
import copy
import inspect
import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
import evaluate
import train_at
import train_awp
import train_mart
import train_trades
from conftest import TINY

PGD = common.pgd  # the real attack (tests replace common.pgd with a recording spy)
PGD_SIGNATURE = inspect.signature(PGD)
K = common.NUM_CLASSES
SPE = 4  # steps per epoch given to make_optimizer (--epochs 1: 4 steps in all)
MODULES = {"at": train_at, "trades": train_trades, "mart": train_mart, "awp": train_awp}
TRAIN_STEPS = {name: m.train_step for name, m in MODULES.items()}  # the real ones (tests spy on them)


# ------------------------------------------------------------------------------------------------
# The formulas, written out
# ------------------------------------------------------------------------------------------------
def log_softmax_by_hand(z):
    return z - torch.logsumexp(z, 1, keepdim=True)


def ce_by_hand(logits, y, tau=0.0):
    """mean_i −Σ_k t_ik log p_ik with the smoothed target t = (1 − τ)·onehot(y) + τ/K."""
    target = (1 - tau) * F.one_hot(y, K).float() + tau / K
    return -(target * log_softmax_by_hand(logits)).sum(1).mean()


def kl_objective(logits, p_clean):
    """TRADES' attack objective per example: KL(p(x) ‖ p(x')) = Σ_k p_k (log p_k − log p'_k)."""
    return (p_clean * (torch.log(p_clean) - F.log_softmax(logits, 1))).sum(1)


def noisy_by_hand(y, p):
    """Each label replaced with probability p by a uniformly drawn class (the draws of the global RNG)."""
    replace = torch.rand(y.shape) < p
    return torch.where(replace, torch.randint_like(y, K), y)


def hand_loss(method, logits_clean, logits, y, beta, tau):
    if method in ("at", "awp"):  # CE on the adversarial batch
        return ce_by_hand(logits, y, tau)
    # (softmax via torch: MART's log(1.0001 − p'_y') amplifies the rounding of p' near 1 a thousandfold)
    p, log_q = F.softmax(logits_clean, 1), F.log_softmax(logits, 1)
    if method == "trades":  # CE(f(x), y) + β · (1/B) Σ_i KL(p(x_i) ‖ p(x'_i))
        return ce_by_hand(logits_clean, y, tau) + beta * (p * (torch.log(p) - log_q)).sum(1).mean()
    # MART: BCE(p', y) + β · mean_i KL(p_i ‖ p'_i) · (1 − p_i[y_i]), with the reference's guards
    q = F.softmax(logits, 1)
    y_wrong = q.detach().masked_fill(F.one_hot(y, K).bool(), -1.0).argmax(1)  # most probable wrong class
    bce = ce_by_hand(logits, y, tau) - torch.log(1.0001 - q[torch.arange(len(y)), y_wrong] + 1e-12).mean()
    kl = (p * (torch.log(p) - torch.log(q + 1e-12))).sum(1)
    return bce + beta * (kl * (1.0000001 - p[torch.arange(len(y)), y])).mean()


def clip_by_hand(model, c):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.clamp(p, -c, c))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.clamp(m.weight, 1 - c, 1 + c))
                m.bias.copy_(torch.clamp(m.bias, -c, c))


def bn_scales(model):
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def conv_linear_weights(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def hand_step(method, model0, x, y, seed, cfg, delta=None):
    """The expected result of one train_step of `method` from `model0` (not modified), computed from the
    formulas with the values of `cfg` (given literally by each test, never read from args); `delta`: the
    attack's δ, given instead of computed."""
    m = copy.deepcopy(model0).train()
    torch.manual_seed(seed)
    # 1. the attack, at the current weights, in the attack's BN mode
    if cfg["steps"] > 0 and delta is None:
        if method == "trades":  # PGD on the KL to p(x), started at x + 0.001·N(0, I)
            m.train(cfg["bn"] == "train")
            with torch.no_grad():
                p_clean = F.softmax(m(x), 1)
            m.train()
            delta, _ = PGD(m, x, p_clean, cfg["eps"], cfg["alpha"], cfg["steps"], loss_fn=kl_objective,
                           start="normal", bn=cfg["bn"], norm=cfg["norm"])
        else:  # PGD on CE with the true labels, uniform start
            delta, _ = PGD(m, x, y, cfg["eps"], cfg["alpha"], cfg["steps"], bn=cfg["bn"], norm=cfg["norm"])
    x_adv = x if delta is None else x + delta
    params = dict(m.named_parameters())
    # 2. AWP: g = ∇_w CE(f(x'; w), y) in train-mode BN on a throwaway copy;
    #    ν_l = ξ·g_l·‖w_l‖/‖g_l‖, w ← w + ν
    nu, logits_log = {}, None
    xi = cfg.get("xi", 0.0)
    if method == "awp" and xi > 0:
        probe = copy.deepcopy(m)
        names = conv_linear_weights(m)
        logits_w = probe(x_adv)
        g = torch.autograd.grad(ce_by_hand(logits_w, y), [probe.get_parameter(k) for k in names])
        logits_log = logits_w.detach()
        nu = {k: xi * gk * params[k].detach().norm() / gk.norm() for k, gk in zip(names, g)}
        with torch.no_grad():
            for k, v in nu.items():
                params[k].add_(v)
    # 3. the training forward(s), train-mode BN: the clean batch first (TRADES, MART), then x'
    logits_clean = m(x) if method in ("trades", "mart") else None
    logits = m(x_adv)
    if logits_log is None:
        logits_log = logits.detach()
    # 4. the loss, with noisy and smoothed labels
    y_train = noisy_by_hand(y, cfg["noise"]) if cfg.get("noise", 0) > 0 else y
    loss = hand_loss(method, logits_clean, logits, y_train, cfg.get("beta", 0.0), cfg.get("tau", 0.0))
    grads = raw_grads = torch.autograd.grad(loss, list(params.values()))
    if method == "awp" and xi > 0 and cfg.get("grad_clip", 0):
        grads = [g.clamp(-cfg["grad_clip"], cfg["grad_clip"]) for g in grads]
    # 5. the first optimiser step (at w + ν for AWP), then the restore w ← w − ν
    buffers, scales = {}, bn_scales(m)
    with torch.no_grad():
        for (k, p), g in zip(params.items(), grads):
            d = g + cfg["wd"] * (p - 1 if k in scales else p)  # weight decay pulls the BN scales γ to 1
            if cfg.get("optimizer", "sgd") == "sgd":
                buffers[k] = d.clone()  # momentum buffer of the first step
                p.sub_(cfg["lr"] * d)
            else:  # Adam's first step: m̂ = d, v̂ = d², so w − lr·d/(|d| + 1e-8)
                p.sub_(cfg["lr"] * d / (d.abs() + 1e-8))
            if k in nu:
                p.sub_(nu[k])
    # 6. weight clipping
    if cfg.get("clip", 0):
        clip_by_hand(m, cfg["clip"])
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return {"state": state, "delta": delta, "x_adv": x_adv, "logits_log": logits_log, "y_train": y_train,
            "grads": dict(zip(params, grads)), "raw_grads": dict(zip(params, raw_grads)), "buffers": buffers, "nu": nu}


# ------------------------------------------------------------------------------------------------
# A. one train_step against the formulas
# ------------------------------------------------------------------------------------------------
BASE = ["--device", "cpu", "--epochs", "1", "--lr", "0.1", "--wd", "0.01", "--lr-schedule", "cosine"]
BASE_CFG = dict(lr=0.1, wd=0.01, schedule="cosine", steps=0, bn="eval", norm="linf")
ATTACK = ["--epsilon", "4/255", "--attack-step", "1/255", "--attack-steps", "3"]  # none is a default value
ATTACK_CFG = dict(eps=4 / 255, alpha=1 / 255, steps=3, bn="eval")
L2 = ["--norm", "l2", "--attack-steps", "2"]  # ε and step: the ℓ2 defaults (Rice et al., AWP); 2 of their 10 steps
L2_CFG = dict(norm="l2", eps=128 / 255, alpha=15 / 255, steps=2, bn="eval")
NOISE = ["--label-smoothing", "0.2", "--label-noise", "0.5"]
NOISE_CFG = dict(tau=0.2, noise=0.5)
CLIP_EMA = ["--clip", "0.05", "--ema", "0.9"]
CLIP_EMA_CFG = dict(clip=0.05, ema=0.9)

SCENARIOS = {  # name: (method, flags, expected values)
    "at-pgd-eval-bn": ("at", ATTACK, ATTACK_CFG),
    "at-pgd-train-bn": ("at", [*ATTACK, "--attack-bn", "train"], {**ATTACK_CFG, "bn": "train"}),
    "at-no-attack-smoothing-noise": ("at", ["--attack-steps", "0", *NOISE], NOISE_CFG),
    "at-clip-ema": ("at", [*ATTACK, *CLIP_EMA], {**ATTACK_CFG, **CLIP_EMA_CFG}),
    "at-adam-smoothing": ("at", [*ATTACK, "--optimizer", "adam", "--lr", "0.01", "--label-smoothing", "0.3"],
                          {**ATTACK_CFG, "optimizer": "adam", "lr": 0.01, "tau": 0.3}),
    "trades-beta": ("trades", [*ATTACK, "--beta", "3"], {**ATTACK_CFG, "beta": 3.0}),
    "trades-train-bn-smoothing-noise": ("trades", [*ATTACK, "--attack-bn", "train", "--beta", "2", *NOISE],
                                        {**ATTACK_CFG, "bn": "train", "beta": 2.0, **NOISE_CFG}),
    "trades-no-attack-clip-ema": ("trades", ["--attack-steps", "0", "--beta", "3", *CLIP_EMA],
                                  {"beta": 3.0, **CLIP_EMA_CFG}),
    "mart-beta": ("mart", [*ATTACK, "--beta", "3"], {**ATTACK_CFG, "beta": 3.0}),
    "mart-train-bn-smoothing-noise": ("mart", [*ATTACK, "--attack-bn", "train", "--beta", "2", *NOISE],
                                      {**ATTACK_CFG, "bn": "train", "beta": 2.0, **NOISE_CFG}),
    "mart-no-attack-clip-ema": ("mart", ["--attack-steps", "0", "--beta", "3", *CLIP_EMA],
                                {"beta": 3.0, **CLIP_EMA_CFG}),
    # --norm l2: every script's attack in the ℓ2 ball, with the ℓ2 ε and step
    "at-l2": ("at", L2, L2_CFG),
    "trades-l2": ("trades", [*L2, "--beta", "3"], {**L2_CFG, "beta": 3.0}),
    "mart-l2": ("mart", [*L2, "--beta", "3"], {**L2_CFG, "beta": 3.0}),
    "awp-l2": ("awp", L2, {**L2_CFG, "xi": 0.02}),
    # AWP: train_step's own xi (0.02) is used, not args.xi (its default 0.005)
    "awp-xi": ("awp", ATTACK, {**ATTACK_CFG, "xi": 0.02}),
    "awp-grad-clip-train-bn-smoothing-noise": ("awp", [*ATTACK, "--attack-bn", "train", "--grad-clip", "0.01", *NOISE],
                                               {**ATTACK_CFG, "bn": "train", "xi": 0.02, "grad_clip": 0.01,
                                                **NOISE_CFG}),
    # xi = 0 (an --awp-warmup epoch): train_at.py's step, without gradient clipping
    "awp-warmup-step-clip-ema": ("awp", [*ATTACK, "--grad-clip", "0.001", *CLIP_EMA],
                                 {**ATTACK_CFG, "xi": 0.0, **CLIP_EMA_CFG}),
}


def tiny_problem(seed=0):
    """ResNet-18 of width 4 (train mode, BN γ/β not at their init) and a batch of 8 random 8×8 images."""
    torch.manual_seed(seed)
    model = common.ResNet18(width=4).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.9, 1.1)
                m.bias.uniform_(-0.1, 0.1)
    return model, torch.rand(8, 3, 8, 8), torch.randint(0, K, (8,))


def record_forwards(model, with_params=False):
    """Every forward of `model`: BN mode (train/eval) of its BN layers, its input, and optionally the
    parameters it saw."""
    seen = []

    def hook(module, inputs):
        modes = {m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d)}
        assert len(modes) == 1, "mixed BN modes in one forward"
        params = {k: p.detach().clone() for k, p in module.named_parameters()} if with_params else None
        seen.append({"train": modes.pop(), "input": inputs[0].detach().clone(), "params": params})

    return seen, model.register_forward_pre_hook(hook)


def spy_pgd(monkeypatch):
    calls = []

    def spy(*a, **kw):
        out = PGD(*a, **kw)
        bound = PGD_SIGNATURE.bind(*a, **kw)
        bound.apply_defaults()
        calls.append({**bound.arguments, "delta": out[0].detach().clone()})
        return out

    monkeypatch.setattr(common, "pgd", spy)
    return calls


def close(a, b, rel=1e-5, scale=None):
    """max |a − b| within rel of max |b| (or of `scale`): float rounding of a formula written differently."""
    scale = b.abs().max().item() if scale is None else max(scale, b.abs().max().item())
    return (a - b).abs().max().item() <= rel * scale + 1e-7


def assert_states_close(actual, expected, what):
    assert set(actual) == set(expected)
    for k, v in expected.items():
        a = actual[k]
        if v.is_floating_point():
            assert close(a, v), (what, k, (a - v).abs().max().item())
        else:
            assert torch.equal(a, v), (what, k)


@pytest.mark.numerics
@pytest.mark.parametrize("name", SCENARIOS)
def test_train_step_equals_hand_formula(name, monkeypatch):
    method, flags, cfg = SCENARIOS[name]
    cfg = {**BASE_CFG, **cfg}
    module = MODULES[method]
    args = module.parse_args([*BASE, *flags])
    model, x, y = tiny_problem()
    # in float64: the step written twice differs only by rounding, and in float32 AWP's two passes summed it past
    # the tolerance on some CPUs' kernels (ATEN_CPU_CAPABILITY=default)
    model, x = model.double(), x.double()
    seed = 1
    expected = hand_step(method, model, x, y, seed, cfg)
    model0 = copy.deepcopy(model)  # (for TRADES under ℓ2, below)

    opt, sched = common.make_optimizer(model, args, SPE)
    ema, ema_old = None, None
    if cfg.get("ema"):
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True)
        ema.update_parameters(model)  # the first update copies; from the second on it averages
        with torch.no_grad():
            for p in ema.module.parameters():
                p.add_(0.1 * torch.randn_like(p))  # an EMA that is not the weights
        ema_old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, handle = record_forwards(model, with_params=method == "awp")
    pgd_calls = spy_pgd(monkeypatch)
    torch.manual_seed(seed)
    extra = (cfg["xi"],) if method == "awp" else ()
    stats = module.train_step(model, model, opt, sched, ema, x, y, args, *extra)
    handle.remove()

    # ---- the attack: common.pgd with the expected norm, ε, step, steps and BN mode (nothing at --attack-steps 0).
    # TRADES under ℓ2: the script's KL (float32, near 0 at the start) rounds otherwise than the one written here, and
    # an ℓ2 step (g/‖g‖, continuous in g) carries that into δ where an ℓ∞ sign does not; the ℓ∞ scenarios check the
    # KL objective bit for bit, so here the update is expected from the script's δ
    if method == "trades" and cfg["norm"] == "l2":
        expected = hand_step(method, model0, x, y, seed, cfg, delta=pgd_calls[0]["delta"])
    if cfg["steps"] == 0:
        assert pgd_calls == []
    else:
        (call,) = pgd_calls
        assert call["eps"] == pytest.approx(cfg["eps"]) and call["alpha"] == pytest.approx(cfg["alpha"])
        assert (call["steps"], call["bn"], call["restarts"], call["norm"]) == (cfg["steps"], cfg["bn"], 1, cfg["norm"])
        assert call["start"] == ("normal" if method == "trades" else "uniform")
        assert torch.equal(call["delta"], expected["delta"])  # TRADES: δ of the KL objective written here
        flat = expected["delta"].flatten(1)
        size = flat.abs().amax(1) if cfg["norm"] == "linf" else flat.norm(dim=1)  # per example, in the attack's norm
        assert size.max() <= cfg["eps"] + 1e-7 and size.max() > 0

    # ---- what every forward saw: the attack's forwards in its BN mode, then the training forward(s) in
    # train mode on exactly x + δ (TRADES and MART: the clean batch first; AWP: the direction pass at w)
    n_attack = 0 if cfg["steps"] == 0 else cfg["steps"] + 1 + (method == "trades")
    train_inputs = {"at": [expected["x_adv"]], "trades": [x, expected["x_adv"]], "mart": [x, expected["x_adv"]],
                    "awp": [expected["x_adv"]] * (2 if cfg.get("xi", 0) > 0 else 1)}[method]
    assert len(seen) == n_attack + len(train_inputs)
    assert [f["train"] for f in seen[:n_attack]] == [cfg["bn"] == "train"] * n_attack
    for f, inp in zip(seen[n_attack:], train_inputs):
        assert f["train"] and torch.equal(f["input"], inp)
    if cfg["steps"]:
        assert torch.equal(seen[-1]["input"], x + pgd_calls[0]["delta"])

    # ---- AWP: the direction at w, the training forward at w + ν, ‖ν_l‖ = ξ‖w_l‖ (conv/linear weights only)
    if method == "awp":
        names = conv_linear_weights(model)
        last = seen[-1]["params"]
        for k, w in before.items():
            if k not in last:
                continue
            if cfg["xi"] > 0:
                assert torch.equal(seen[-2]["params"][k], w), k
            if k in names and cfg["xi"] > 0:
                assert (last[k] - w).norm() / w.norm() == pytest.approx(cfg["xi"], rel=1e-4), k
                assert close(last[k] - w, expected["nu"][k]), k
            else:
                assert torch.equal(last[k], w), k

    # ---- the update: weights and BN statistics, the momentum buffers, the schedule, the logged statistics
    assert_states_close(dict(model.state_dict()), expected["state"], name)
    if cfg.get("optimizer", "sgd") == "sgd":
        for k, p in model.named_parameters():
            raw = expected["raw_grads"][k].abs().max().item()  # (--grad-clip: the rounding is of the raw gradient)
            assert close(opt.state[p]["momentum_buffer"], expected["buffers"][k], scale=raw), k
    total = args.epochs * SPE
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg["lr"] * common.lr_factor(cfg["schedule"], 1, total))
    torch.testing.assert_close(stats, common.batch_stats(expected["logits_log"], y))

    # ---- the flags' values mattered here (else the scenario could not catch them being ignored)
    if cfg.get("noise"):
        assert (expected["y_train"] != y).any() and (expected["y_train"] == y).any()
    if cfg.get("clip"):
        clipped = [v for k, v in expected["state"].items() if k.endswith("conv1.weight")]
        assert any((v.abs() == cfg["clip"]).any() for v in clipped)
    if cfg.get("grad_clip"):  # it would bind (with ξ = 0 it must not act)
        assert any(g.abs().max() > 10 * cfg["grad_clip"] for g in expected["raw_grads"].values())

    # ---- the EMA: τ·ema + (1 − τ)·w after the step
    if ema is not None:
        tau = cfg["ema"]
        after = dict(ema.module.state_dict())
        for k, v in expected["state"].items():
            if v.is_floating_point():
                assert close(after[k], tau * ema_old[k] + (1 - tau) * v), k
        assert int(ema.n_averaged) == 2


@pytest.mark.parametrize("schedule", common.LR_SCHEDULES)
def test_train_step_steps_the_schedule_once_per_call(schedule):
    """The lr of the i-th step is base · lr_factor(schedule, i, epochs · steps_per_epoch) for every schedule
    (the scheduler is stepped once per batch, inside train_step)."""
    args = train_at.parse_args(["--device", "cpu", "--attack-steps", "0", "--epochs", "2", "--lr", "0.05",
                                "--lr-schedule", schedule, "--cyclic-peak", "0.2"])
    model, x, y = tiny_problem()
    opt, sched = common.make_optimizer(model, args, 2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        train_at.train_step(model, model, opt, sched, None, x, y, args)
    lrs.append(opt.param_groups[0]["lr"])
    peak = 0.2 / 0.05
    assert lrs == pytest.approx([0.05 * common.lr_factor(schedule, i, 4, peak) for i in range(5)], abs=1e-12)


# ------------------------------------------------------------------------------------------------
# B. main(): the epoch loop's wiring, in-process
# ------------------------------------------------------------------------------------------------
ES_RERR = [0.5, 0.3, 0.4, 0.3]  # first minimum at epoch 2 ('<=' would pick 4, '>' would keep 1)
EPOCHS, N_LOG, N_ES, ES_RESTARTS, EMA, CLIP, LR = 4, 30, 20, 3, 0.9, 0.2, 0.05


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def install_spies(monkeypatch, method, es_rerr):
    """A spy around the script's train_step (lr, weights, EMA and xi per call), a scripted
    common.epoch_metrics (its arguments and the weights it was given, per call), and a record of what the
    EMA model's first BN layer sees (its input, BN mode, and the steps taken by then): the EMA model has
    no forward of its own but the BN re-estimation."""
    calls, evals, ema_bn_inputs = [], [], []
    module, real = MODULES[method], TRAIN_STEPS[method]

    def record_ema_bn(bn, inputs):
        ema_bn_inputs.append({"input": inputs[0].detach().clone(), "train": bn.training, "after_steps": len(calls)})

    def step(model, attack_model, opt, sched, ema, x, y, args, *rest):
        if ema is not None and not calls:
            ema.module.bn1.register_forward_pre_hook(record_ema_bn)
        rec = {"lr": opt.param_groups[0]["lr"], "model": model, "attack_model": attack_model, "rest": rest, "ema": ema,
               "w_before": state_of(model), "ema_before": state_of(ema.module) if ema is not None else None}
        out = real(model, attack_model, opt, sched, ema, x, y, args, *rest)
        rec.update(w_after=state_of(model), ema_after=state_of(ema.module) if ema is not None else None)
        calls.append(rec)
        return out

    def epoch_metrics(model, x, y, alpha, restarts, prefix, rank=0, world=1, norm="linf"):
        evals.append({"model": model, "w": state_of(model), "x": x.clone(), "y": y.clone(), "alpha": alpha,
                      "restarts": restarts, "prefix": prefix, "norm": norm, "after_steps": len(calls)})
        n_es = sum(e["prefix"] == "es_" for e in evals)
        rerr = es_rerr[n_es - 1] if prefix == "es_" else 0.6
        return {f"{prefix}clean_loss": 1.0, f"{prefix}clean_err": 0.5, f"{prefix}rloss": 2.0,
                f"{prefix}rerr": rerr, f"{prefix}rloss_correct": 1.5, f"{prefix}rloss_incorrect": 2.5,
                f"{prefix}n": len(y)}

    monkeypatch.setattr(module, "train_step", step)
    monkeypatch.setattr(common, "epoch_metrics", epoch_metrics)
    return calls, evals, ema_bn_inputs


def main_flags(method, tiny_data, out):
    """4 steps of 20 images per epoch (a width-4 network, PGD-1), every flag main wires at a value of its own."""
    flags = [*TINY, "--data-dir", str(tiny_data), "--train-subset", "80", "--batch-size", "20", "--width", "4",
             "--attack-steps", "1", "--epochs", str(EPOCHS), "--es-every", "1", "--eval-every", "2",
             "--n-log", str(N_LOG), "--n-early-stop", str(N_ES), "--es-restarts", str(ES_RESTARTS),
             "--ema", str(EMA), "--clip", str(CLIP), "--lr", str(LR), "--lr-schedule", "cosine", "--out", str(out)]
    if method == "awp":
        flags += ["--xi", "0.01", "--awp-warmup", "1"]
    return flags


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point()]


@pytest.mark.parametrize("method", MODULES)
def test_main_wiring(method, tiny_data, tmp_path, monkeypatch):
    module = MODULES[method]
    out = tmp_path / "run"
    flags = main_flags(method, tiny_data, out)
    calls, evals, ema_bn_inputs = install_spies(monkeypatch, method, ES_RERR)
    module.main(flags)
    args = module.parse_args(flags)
    steps = len(calls)
    assert steps == EPOCHS * SPE  # 80 images, batch 20
    net = calls[0]["model"]
    assert all(c["model"] is net and c["attack_model"] is net for c in calls)

    # ---- the schedule of main: base · lr_factor(cosine, i, epochs · steps per epoch) at step i
    assert [c["lr"] for c in calls] == pytest.approx([LR * common.lr_factor("cosine", i, steps) for i in range(steps)])
    history = read_metrics(out)
    assert [m["lr"] for m in history] == pytest.approx(  # the lr of each epoch's first step
        [LR * common.lr_factor("cosine", SPE * e, steps) for e in range(EPOCHS)], abs=1e-12)

    # ---- --clip at init: the weights the first step starts from are already clipped
    w0 = calls[0]["w_before"]
    conv = [v for k, v in w0.items() if k.endswith("conv1.weight") or k == "linear.weight"]
    assert all(v.abs().max() <= CLIP for v in conv) and any((v.abs() == CLIP).any() for v in conv)
    assert all(((w0[k] - 1).abs().max() <= CLIP + 1e-7) for k in w0 if k.endswith("bn1.weight"))

    # ---- the EMA of main: a copy at the first step, then τ·ema + (1 − τ)·w with τ = --ema
    for k in float_keys(w0):
        assert torch.equal(calls[0]["ema_after"][k], calls[0]["w_after"][k]), k
    for prev, c in zip(calls, calls[1:]):
        for k in float_keys(w0):
            assert torch.equal(c["ema_before"][k], prev["ema_after"][k]), k
            expected = EMA * c["ema_before"][k] + (1 - EMA) * c["w_after"][k]
            assert close(c["ema_after"][k], expected), k
    last = evaluate.load_checkpoint(out / "ckpt_last.pt")
    for k, _ in net.named_parameters():  # (the EMA's BN statistics are re-estimated after the last epoch)
        assert torch.equal(last["ema"][k], calls[-1]["ema_after"][k]), k
        assert torch.equal(last["model"][k], calls[-1]["w_after"][k]), k

    # ---- after the last epoch, the EMA's BN statistics: one train-mode pass over the training batches and
    # the plain average of their batch statistics (mean; unbiased variance), not the averaged buffers
    assert [(f["after_steps"], f["train"], len(f["input"])) for f in ema_bn_inputs] == [(steps, True, 20)] * SPE
    batch_means = torch.stack([f["input"].mean((0, 2, 3)) for f in ema_bn_inputs])
    batch_vars = torch.stack([f["input"].var((0, 2, 3), unbiased=True) for f in ema_bn_inputs])
    assert close(last["ema"]["bn1.running_mean"], batch_means.mean(0))
    assert close(last["ema"]["bn1.running_var"], batch_vars.mean(0))
    assert not close(last["ema"]["bn1.running_mean"], calls[-1]["ema_after"]["bn1.running_mean"])

    # ---- --awp-warmup 1: epoch 1 is plain AT (xi = 0), then xi = --xi
    if method == "awp":
        assert [c["rest"] for c in calls] == [(0.0,)] * SPE + [(0.01,)] * (steps - SPE)
    else:
        assert all(c["rest"] == () for c in calls)

    # ---- test metrics every --eval-every epochs on the first --n-log test images (1 restart), of the trained
    # weights; early stopping every --es-every epochs on the last --n-early-stop with --es-restarts restarts,
    # of the EMA model (--ema): its averaged weights and BN buffers, re-estimated BN statistics in the last epoch
    x_log, y_log = common.eval_split(tiny_data, "log", N_LOG, torch.device("cpu"))
    x_es, y_es = common.eval_split(tiny_data, "early-stop", N_ES, torch.device("cpu"))
    assert [(e["prefix"], e["after_steps"]) for e in evals] == [
        ("es_", 4), ("test_", 8), ("es_", 8), ("es_", 12), ("test_", 16), ("es_", 16)]
    for e in evals:
        x_want, y_want, restarts = (x_es, y_es, ES_RESTARTS) if e["prefix"] == "es_" else (x_log, y_log, 1)
        assert torch.equal(e["x"], x_want) and torch.equal(e["y"], y_want), e["prefix"]
        assert e["restarts"] == restarts and e["alpha"] == pytest.approx(args.attack_step) and e["norm"] == args.norm
        step = calls[e["after_steps"] - 1]
        if e["prefix"] == "test_":
            assert e["model"] is net
            assert all(torch.equal(e["w"][k], step["w_after"][k]) for k in float_keys(e["w"]))
        else:
            assert e["model"] is step["ema"].module
            want = last["ema"] if e["after_steps"] == steps else step["ema_after"]
            assert all(torch.equal(e["w"][k], want[k]) for k in float_keys(e["w"]))
            assert not torch.equal(e["w"]["conv1.weight"], step["w_after"]["conv1.weight"])

    # ---- early stopping: the first minimum of es_rerr; ckpt_best.pt is that epoch's snapshot
    assert [m["es_rerr"] for m in history] == ES_RERR
    assert last["es_best"] == {"epoch": 2, "es_rerr": 0.3}
    best, snap2 = evaluate.load_checkpoint(out / "ckpt_best.pt"), evaluate.load_checkpoint(out / "ckpt_epoch002.pt")
    assert best["epoch"] == 2
    assert all(torch.equal(best["model"][k], v) for k, v in snap2["model"].items())
    assert all(torch.equal(snap2["model"][k], calls[2 * SPE - 1]["w_after"][k]) for k in float_keys(w0))

    # ---- --resume from the epoch-2 snapshot: epochs 3-4 again, bit for bit (schedule, EMA, RNG, best)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(out / "args.json", part / "args.json")
    shutil.copy(out / "ckpt_epoch002.pt", part / "ckpt_epoch002.pt")
    shutil.copy(out / "ckpt_epoch002.pt", part / "ckpt_last.pt")
    (part / "metrics.jsonl").write_text("".join(l + "\n" for l in (out / "metrics.jsonl").read_text().splitlines()[:2]))
    calls2, _, _ = install_spies(monkeypatch, method, ES_RERR[2:])
    module.main([*main_flags(method, tiny_data, part), "--resume"])
    assert len(calls2) == 2 * SPE
    assert [c["lr"] for c in calls2] == pytest.approx([c["lr"] for c in calls[2 * SPE:]])
    assert [c["rest"] for c in calls2] == [c["rest"] for c in calls[2 * SPE:]]
    resumed = evaluate.load_checkpoint(part / "ckpt_last.pt")
    for key in ("model", "ema"):
        for k, v in last[key].items():
            assert torch.equal(resumed[key][k], v), (key, k)
    assert resumed["es_best"] == {"epoch": 2, "es_rerr": 0.3}
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}  # noqa: E731
    assert [untimed(m) for m in read_metrics(part)] == [untimed(m) for m in history]
