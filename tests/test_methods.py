"""TRADES, MART and AT-AWP (train_trades.py, train_mart.py, train_awp.py; paper Table 1): the losses against
hand computations, the AWP step against a manual update, and each script end to end (incl. resume
and a 2-process DDP run on CPU)."""
import copy
import importlib
import json
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import train_awp
import train_mart
import train_trades
from conftest import TINY, run_script, run_ddp

# A fixed tiny batch: B = 4 examples, K = 3 classes. Under the adversarial logits the true class is the
# most probable one for examples 0, 2, 3 and not for 1 (both branches of MART's y').
LOGITS_CLEAN = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -0.3], [-1.0, 3.0, 0.0], [0.3, 0.0, 1.0]])
LOGITS_ADV = torch.tensor([[1.0, 0.2, 0.4], [1.5, -0.5, 0.9], [-0.2, 0.1, 2.5], [0.0, 2.0, 0.5]])
Y = torch.tensor([0, 2, 2, 1])


def softmax_by_hand(z):
    e = torch.exp(z)
    return e / e.sum(1, keepdim=True)


def kl_by_hand(p, q):
    """Σ_k p_k (log p_k − log q_k) per example."""
    return (p * (torch.log(p) - torch.log(q))).sum(1)


class TinyNet(nn.Module):
    """conv (with bias) → BN → ReLU → pool → linear (with bias): every kind of parameter AWP must
    treat differently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 10)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


PERTURBED = ("conv.weight", "linear.weight")


def tiny_batch():
    torch.manual_seed(0)
    net = TinyNet().train()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 10, (8,))
    return net, x, y


# ------------------------------------------------------------------------------------------------
# TRADES
# ------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_trades_loss_equals_hand_computation():
    beta, B, K = 6.0, 4, 3
    lc, la = LOGITS_CLEAN.clone().requires_grad_(True), LOGITS_ADV.clone().requires_grad_(True)
    loss = train_trades.trades_loss(lc, la, Y, beta)

    hc, ha = LOGITS_CLEAN.clone().requires_grad_(True), LOGITS_ADV.clone().requires_grad_(True)
    p, q = softmax_by_hand(hc), softmax_by_hand(ha)
    ce = -torch.log(p[torch.arange(B), Y]).sum() / B
    kl_sum = kl_by_hand(p, q).sum()
    expected = ce + beta * kl_sum / B
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)

    # the KL term is sum/B ('batchmean'); the default 'mean' would be K times smaller
    log_q = F.log_softmax(LOGITS_ADV, 1)
    p_clean = F.softmax(LOGITS_CLEAN, 1)
    with warnings.catch_warnings():  # torch warns about exactly this pitfall
        warnings.simplefilter("ignore")
        mean_kl = F.kl_div(log_q, p_clean, reduction="mean")
    assert torch.allclose(mean_kl * K, kl_sum.detach() / B, rtol=1e-6)
    assert not torch.allclose(loss, ce + beta * mean_kl, rtol=1e-2)

    # the clean branch is not detached: gradients w.r.t. both logits equal the hand formula's
    grads = torch.autograd.grad(loss, (lc, la))
    expected_grads = torch.autograd.grad(expected, (hc, ha))
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-6)
    kl_term = train_trades.trades_loss(lc, la, Y, beta) - F.cross_entropy(lc, Y)
    assert torch.autograd.grad(kl_term, lc)[0].abs().max() > 1e-3  # the KL term moves the clean logits too


def test_trades_label_smoothing_changes_the_ce_term_only():
    tau, beta, B, K = 0.3, 2.0, 4, 3
    loss = train_trades.trades_loss(LOGITS_CLEAN, LOGITS_ADV, Y, beta, label_smoothing=tau)
    p, q = softmax_by_hand(LOGITS_CLEAN), softmax_by_hand(LOGITS_ADV)
    target = (1 - tau) * F.one_hot(Y, K) + tau / K
    ce = -(target * torch.log(p)).sum() / B
    assert torch.allclose(loss, ce + beta * kl_by_hand(p, q).sum() / B, atol=1e-6)


def test_trades_attack_objective_and_ball():
    per_example = train_trades.kl_each(LOGITS_ADV, softmax_by_hand(LOGITS_CLEAN))
    assert torch.allclose(per_example, kl_by_hand(softmax_by_hand(LOGITS_CLEAN), softmax_by_hand(LOGITS_ADV)),
                          atol=1e-6)

    net, x, _ = tiny_batch()
    args = train_trades.parse_args([])
    x_adv = train_trades.adversarial_batch(net, x, None, args)  # the labels are not used
    assert net.training and all(m.training for m in net.modules())  # the caller's mode is restored
    assert (x_adv - x).abs().max() <= args.epsilon + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        net.eval()
        p_clean = F.softmax(net(x), 1)
        kl_adv = train_trades.kl_each(net(x_adv), p_clean)
        kl_start = train_trades.kl_each(net((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), p_clean)
    assert kl_adv.mean() > 10 * kl_start.mean()


# ------------------------------------------------------------------------------------------------
# MART
# ------------------------------------------------------------------------------------------------
def mart_by_hand(logits_clean, logits_adv, y, beta):
    B, K = logits_clean.shape
    p, q = softmax_by_hand(logits_clean), softmax_by_hand(logits_adv)
    total_bce, total_kl = 0.0, 0.0
    for i in range(B):
        wrong = [k for k in range(K) if k != int(y[i])]
        y_wrong = max(wrong, key=lambda k: float(q[i, k].detach()))  # most probable wrong class under p'
        total_bce = total_bce - torch.log(q[i, y[i]]) - torch.log(1.0001 - q[i, y_wrong] + 1e-12)
        kl = (p[i] * (torch.log(p[i]) - torch.log(q[i] + 1e-12))).sum()
        total_kl = total_kl + kl * (1.0000001 - p[i, y[i]])
    return total_bce / B + beta * total_kl / B


@pytest.mark.numerics
def test_mart_loss_equals_hand_computation():
    assert (LOGITS_ADV.argmax(1) == Y).tolist() == [True, False, True, True]  # both y' branches
    beta = 6.0
    lc, la = LOGITS_CLEAN.clone().requires_grad_(True), LOGITS_ADV.clone().requires_grad_(True)
    loss = train_mart.mart_loss(lc, la, Y, beta)
    hc, ha = LOGITS_CLEAN.clone().requires_grad_(True), LOGITS_ADV.clone().requires_grad_(True)
    expected = mart_by_hand(hc, ha, Y, beta)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    # nothing is detached (p, p' and the weight 1 − p_y all carry gradients, as in the reference)
    for g, e in zip(torch.autograd.grad(loss, (lc, la)), torch.autograd.grad(expected, (hc, ha))):
        assert torch.allclose(g, e, atol=1e-5)
    # β scales exactly the KL term; batch size 1 works (the reference's squeeze() does not)
    kl_term = (loss - train_mart.mart_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 0.0)) / beta
    assert torch.allclose(train_mart.mart_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 1.0),
                          train_mart.mart_loss(LOGITS_CLEAN, LOGITS_ADV, Y, 0.0) + kl_term, atol=1e-6)
    one = train_mart.mart_loss(LOGITS_CLEAN[1:2], LOGITS_ADV[1:2], Y[1:2], beta)
    assert torch.allclose(one, mart_by_hand(LOGITS_CLEAN[1:2], LOGITS_ADV[1:2], Y[1:2], beta), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# AWP
# ------------------------------------------------------------------------------------------------
def sgd_constant_lr(net, lr, momentum=0.0, wd=0.0):
    """Plain SGD and a schedule that keeps its lr (train_step steps the schedule once per call)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@pytest.mark.numerics
@pytest.mark.parametrize("grad_clip,wd", [(0.0, 0.0), (0.02, 0.0), (0.0, 0.1)])
def test_awp_step_equals_manual_update(grad_clip, wd):
    """SGD without momentum: every parameter ends at p − lr·∇L(w + ξd) (clipped with --grad-clip),
    where only the conv/linear weights were perturbed, by ν_l = ξ·g_l‖w_l‖/‖g_l‖ with g = ∇_w CE at w;
    weight decay acts at w + ν (the restore follows the step, as Wu et al.); BN running statistics
    are updated once, by the forward at w + ν."""
    xi, lr = 0.01, 0.5
    net, x, y = tiny_batch()
    ref = copy.deepcopy(net)
    args = train_awp.parse_args(["--xi", str(xi), "--grad-clip", str(grad_clip), "--attack-steps", "0"])
    opt, sched = sgd_constant_lr(net, lr, wd=wd)
    logged = train_awp.train_step(net, net, opt, sched, None, x, y, args, xi)  # --attack-steps 0: x' = x

    probe = copy.deepcopy(ref)  # direction: train-mode CE gradient at w (on a throwaway copy)
    logits_w = probe(x)
    g = torch.autograd.grad(F.cross_entropy(logits_w, y), [probe.get_parameter(k) for k in PERTURBED])
    torch.testing.assert_close(logged, common.batch_stats(logits_w, y))  # the logged train statistics are at w, as AT's
    shifted = copy.deepcopy(ref)
    with torch.no_grad():
        for k, gk in zip(PERTURBED, g):
            w = shifted.get_parameter(k)
            w += xi * gk * w.norm() / gk.norm()
    names = [k for k, _ in shifted.named_parameters()]
    grads = torch.autograd.grad(F.cross_entropy(shifted(x), y), list(shifted.parameters()))
    for k, gk in zip(names, grads):
        if grad_clip:
            gk = gk.clamp(-grad_clip, grad_clip)
        expected = ref.get_parameter(k) - lr * (gk + wd * shifted.get_parameter(k))
        assert torch.allclose(net.get_parameter(k), expected, rtol=0, atol=1e-6), k
        if k != "conv.bias":  # (BN right after the conv cancels its bias: zero gradient)
            assert (net.get_parameter(k) - ref.get_parameter(k)).abs().max() > 1e-4, k  # the step did something
    # the perturbation mattered: the update differs from the AT update at w
    at_model = copy.deepcopy(ref)
    at_grad = torch.autograd.grad(F.cross_entropy(at_model(x), y), at_model.conv.weight)[0]
    assert (net.conv.weight - (ref.conv.weight - lr * at_grad)).abs().max() > 1e-5
    assert torch.allclose(net.bn.running_mean, shifted.bn.running_mean, atol=1e-6)
    assert torch.allclose(net.bn.running_var, shifted.bn.running_var, atol=1e-6)
    assert int(net.bn.num_batches_tracked) == 1  # the direction pass did not touch the running statistics


def test_awp_xi_zero_is_the_at_step():
    """ξ = 0 (also the --awp-warmup epochs) is train_at.py's step: no gradient clipping either."""
    net, x, y = tiny_batch()
    at = copy.deepcopy(net)
    args = train_awp.parse_args(["--xi", "0", "--grad-clip", "0.001", "--attack-steps", "0"])
    opt, sched = sgd_constant_lr(net, 0.1, momentum=0.9, wd=5e-4)
    at_opt = torch.optim.SGD(at.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        train_awp.train_step(net, net, opt, sched, None, x, y, args, 0.0)
        loss = F.cross_entropy(at(x), y)  # train_at.py's step
        at_opt.zero_grad(set_to_none=True)
        loss.backward()
        at_opt.step()
    for (k, a), b in zip(net.state_dict().items(), at.state_dict().values()):
        assert torch.equal(a, b), k


def test_awp_amp_leaves_the_direction_and_the_update_in_fp32():
    """--amp autocasts the training attack only: bf16 rounding (2^-8) is of the order of ξ."""
    net, x, y = tiny_batch()
    args = train_awp.parse_args(["--xi", "0.01", "--amp", "--attack-steps", "1"])
    autocast = []
    net.register_forward_pre_hook(lambda m, inp: autocast.append(torch.is_autocast_enabled("cpu")))
    train_awp.train_step(net, net, *sgd_constant_lr(net, 0.1), None, x, y, args, 0.01)
    assert autocast == [True, True, False, False]  # PGD-1 (2 forwards), then the direction and the update


def test_awp_perturbs_only_conv_linear_weights_and_restores_with_the_same_vector():
    xi = 0.01
    net, x, y = tiny_batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weights = common.perturbable_params(net, weights_only=True)
    assert sorted(weights) == sorted(PERTURBED)  # no biases, no BN
    nu, _ = train_awp.weight_perturbation(net, weights, x, y, xi)
    assert sorted(nu) == sorted(PERTURBED)
    for k, v in nu.items():
        assert torch.allclose(v.norm(), xi * weights[k].detach().norm(), rtol=1e-5)  # ‖ν_l‖ = ξ‖w_l‖
    for k, v in net.state_dict().items():  # computing ν changed nothing, BN running statistics included
        assert torch.equal(v, before[k]), k

    seen = []  # the parameters each forward sees (the direction pass, then the training forward)
    net.register_forward_pre_hook(lambda m, inp: seen.append({k: p.detach().clone() for k, p in m.named_parameters()}))
    args = train_awp.parse_args(["--xi", str(xi), "--attack-steps", "0"])
    opt, sched = sgd_constant_lr(net, 0.0)  # the step changes nothing: only perturb + restore
    train_awp.train_step(net, net, opt, sched, None, x, y, args, xi)
    assert len(seen) == 2
    for k in seen[0]:
        assert torch.equal(seen[0][k], before[k]), k  # direction at the unperturbed weights
        if k in PERTURBED:
            rel = (seen[1][k] - before[k]).norm() / before[k].norm()
            assert abs(rel - xi) < 1e-4, (k, rel)  # the training forward ran at w + ν
        else:
            assert torch.equal(seen[1][k], before[k]), k  # biases and BN γ/β never perturbed
    for k, p in net.named_parameters():  # restored with the same ν: only float rounding remains,
        assert (p - before[k]).abs().max() < 1e-7, k  # a recomputed ν would leave ~ξ·|w| ≈ 1e-3


# ------------------------------------------------------------------------------------------------
# End to end on the tiny ImageFolder
# ------------------------------------------------------------------------------------------------
METRIC_KEYS = {"epoch", "lr", "train_loss", "train_err", "train_time_s", "test_clean_loss", "test_clean_err",
               "test_rloss", "test_rerr", "test_rloss_correct", "test_rloss_incorrect", "test_n", "es_rerr",
               "es_rloss", "time_s"}
RUN_FILES = {"args.json", "metrics.jsonl", "ckpt_last.pt", "ckpt_epoch001.pt", "ckpt_best.pt"}


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script,flags", [("train_trades.py", ["--beta", "9"]), ("train_mart.py", ["--beta", "3"])])
def test_script_end_to_end(tiny_data, tmp_path, script, flags, run_main):
    """TRADES from the command line in a child process, MART in this one (the same contract)."""
    out, args = tmp_path / "run", ["--data-dir", tiny_data, *TINY, *flags, "--epochs", "1", "--out", tmp_path / "run"]
    if script == "train_trades.py":
        run_script(script, *args)
    else:
        assert run_main(importlib.import_module(script[:-3]), *args)[0] == 0
    assert {p.name for p in out.iterdir()} == RUN_FILES
    (m,) = read_metrics(out)
    assert METRIC_KEYS <= set(m) and m["epoch"] == 1 and m["test_n"] == 40
    assert all(0 <= m[k] <= 1 for k in ("train_err", "test_clean_err", "test_rerr", "es_rerr"))
    assert 0 < m["train_loss"] < 50 and m["test_rloss"] >= m["test_clean_loss"] - 1e-6
    saved = json.loads((out / "args.json").read_text())
    assert saved["method"] == script[len("train_"):-3] and saved["beta"] == float(flags[1]) and "versions" in saved
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert ckpt["args"]["beta"] == float(flags[1]) and ckpt["epoch"] == 1


@pytest.mark.parametrize("script,flag", [("train_trades.py", "--beta"), ("train_mart.py", "--beta"),
                                         ("train_awp.py", "--xi")])
def test_bad_flag_is_one_line(tmp_path, script, flag, run_main):
    code, _, err = run_main(importlib.import_module(script[:-3]), flag, "-1", "--out", tmp_path / "x")
    assert code == 1 and err.strip().count("\n") == 0 and flag in err and not (tmp_path / "x").exists()


def test_awp_resume_equals_uninterrupted(tiny_data, tmp_path):
    """2 epochs in one go == epoch 1, a crash, and --resume for epoch 2. The crashed run's folder is
    rebuilt from the uninterrupted run's epoch-1 snapshot (the same state ckpt_last.pt held then).
    --awp-warmup 1: epoch 1 is plain AT, epoch 2 (the resumed one) is AWP."""
    flags = ["--data-dir", tiny_data, *TINY, "--xi", "0.01", "--awp-warmup", "1", "--epochs", "2", "--es-every", "1"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    import train_awp
    flags = [str(f) for f in flags]
    train_awp.main([*flags, "--out", str(full)])  # in-process: both runs seed everything themselves
    crashed.mkdir()
    shutil.copy(full / "args.json", crashed / "args.json")
    shutil.copy(full / "ckpt_epoch001.pt", crashed / "ckpt_last.pt")
    (crashed / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    train_awp.main([*flags, "--out", str(crashed), "--resume"])

    a, b = read_metrics(full), read_metrics(crashed)
    assert [m["epoch"] for m in b] == [1, 2]
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}  # noqa: E731
    assert untimed(a[1]) == untimed(b[1])
    sa = torch.load(full / "ckpt_last.pt", weights_only=True)["model"]
    sb = torch.load(crashed / "ckpt_last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_awp_ddp_two_processes(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo), 1 epoch: one set of files, and rank 1 ends with
    weights bit-identical to rank 0's checkpoint. The ranks see different data, so a rank-local ν
    would make the replicas drift (DDP never re-broadcasts parameters); ν comes from the
    rank-averaged gradient."""
    out = tmp_path / "ddp"
    proc, other = run_ddp("train_awp.py", tmp_path, "--data-dir", tiny_data, *TINY, "--xi", 0.01, "--epochs", 1,
                          "--out", out)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    (m,) = read_metrics(out)
    assert METRIC_KEYS <= set(m) and m["test_n"] == 40  # the sharded evaluation counts every image once
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=True)["model"]
    differ = [k for k in ckpt if not torch.equal(ckpt[k], other[k])]
    assert not differ, f"ranks ended with different {differ[:5]}"
