"""bench.py: every row runs and reports finite ratios; the AT step, the adaptive ascent and the Hutchinson probes
it times are the code's own, reported per step or probe; its floors do the passes they claim; bad flags get one error
line."""
import argparse
import functools
import json
import math
import sys

import pytest
import torch

import bench
import common
import train_at
from conftest import run_script


def test_every_row_reports_a_finite_ratio(monkeypatch):
    """Each row's function, in this process (the command line runs each in a child process of its own); the memory
    row with PGD-2 × 3 and a WRN-10-1, the adaptive ascent with 3 steps, one Hutchinson probe."""
    monkeypatch.setattr(bench, "MEMORY_WRN", "wrn-10-1")
    monkeypatch.setitem(bench.ROW_FNS, "attack_memory", functools.partial(bench.row_attack_memory, restarts=3, steps=2))
    monkeypatch.setitem(bench.ROW_FNS, "adaptive_step", functools.partial(bench.row_adaptive_step, steps=3))
    monkeypatch.setitem(bench.ROW_FNS, "hutchinson", functools.partial(bench.row_hutchinson, probes=1))
    args = bench.parse_args(["--device", "cpu", "--width", "8", "--repeats", "1", "--steps", "1", "--wrn", "wrn-10-1"])
    assert set(bench.ROWS) == set(bench.ROW_FNS) == set(bench.TARGETS)  # the command line runs and prints each row
    for row in bench.ROWS:
        key, _ = bench.TARGETS[row]
        result = bench.ROW_FNS[row](args, torch.device("cpu"), 4)
        assert math.isfinite(result[key]) and result[key] > 0, (row, result)


def test_bench_writes_the_rows_it_ran(tmp_path):
    """The command line: one child process per row, the printed table and bench.json (two rows, for time)."""
    out = tmp_path / "bench.json"
    rows = ["floor", "wrn_floor"]
    proc = run_script("bench.py", "--device", "cpu", "--width", "8", "--batch-size", "4", "--repeats", "1",
                      "--steps", "1", "--wrn", "wrn-10-1", "--rows", ",".join(rows), "--out", out, timeout=900)
    result = json.loads(out.read_text())
    assert not set(bench.ROWS) - set(rows) & set(result)
    for row in rows:
        key, _ = bench.TARGETS[row]
        assert math.isfinite(result[row][key]) and result[row][key] > 0, (row, result[row])
        assert result[row]["peak_mem_mb"] > 0
        assert row in proc.stdout  # the printed table
    assert result["params"]["width"] == 8 and result["params"]["batch_size"] == 4
    assert result["wrn_floor"]["arch"] == "wrn-10-1" and result["params"]["wrn"] == "wrn-10-1"
    assert result["versions"]["torch"] == torch.__version__


def test_timed_step_is_the_training_loops_step(monkeypatch):
    """Row 1 times train_at.train_step itself (the function train_at.main's loop calls), with the
    bench's batch and optimiser, and keeps its log sums: a copy of the step in bench.py fails this."""
    calls = []

    def spy(*args):
        calls.append(args)
        return {"n": torch.tensor(float(len(args[6])))}
    monkeypatch.setattr(train_at, "train_step", spy)
    args = train_at.parse_args(["--width", "8", "--device", "cpu"])
    net = common.ResNet18(width=8)
    opt, sched = common.make_optimizer(net, args, steps_per_epoch=10)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    sums = {}
    bench.our_at_step(net, opt, sched, iter([(x, y)]), args, sums)
    assert len(calls) == 1 and sums["n"].item() == 6
    model, attack_model, opt_, sched_, ema, x_, y_, args_ = calls[0]
    assert model is net and attack_model is net and opt_ is opt and sched_ is sched and ema is None
    assert x_ is x and y_ is y and args_ is args


def test_floor_step_takes_input_gradients_and_one_update():
    """The floor does 7 input-gradient passes (no weight gradients) and one training update."""
    torch.manual_seed(0)
    net = common.ResNet18(width=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    bench.floor_step(net, opt, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert len(calls) == 8
    assert not torch.equal(before["conv1.weight"], net.conv1.weight)


def fake_side_by_side(times, log):
    """A side_by_side that runs each warm-up and each variant once, logging for each the grad mode of every forward of
    the network (through `log`, which a forward hook fills), and returns the given seconds."""
    def run(fns, device, repeats, steps, warmups=None):
        for fn in (warmups or {}).values():
            fn()
        for k, fn in fns.items():
            log.clear()
            fn()
            times[k + "_forwards"] = list(log)
        return {k: times[k] for k in fns}
    return run


def hooked_make_net(log):
    """bench.make_net with a forward hook that logs torch.is_grad_enabled() for every forward of the network."""
    make_net = bench.make_net

    def make(*a, **k):
        net = make_net(*a, **k)
        net.register_forward_hook(lambda m, i, o: log.append(torch.is_grad_enabled()))
        return net
    return make


def test_adaptive_step_row_times_the_ascent_per_step(monkeypatch):
    """Row 3c times flatness.adaptive_ascent itself (3 steps, --mode adaptive-worst's ρ and norm, from the given δ, on
    the eval-mode network), counts its forwards (here one more than the ascent's own: the spy adds one, as a step
    halving would) and gives the bare side as many: 3 with gradients, the rest without; both times per step."""
    calls, log, times = [], [], {"ours": 6.0, "bare": 5.4}
    import flatness
    ascent = flatness.adaptive_ascent

    def spy(model, x, y, init_loss, init_err, rho, norm, steps, **kw):
        calls.append((model.training, len(x), rho, norm, steps, kw["delta"].abs().max().item()))
        with torch.no_grad():
            model(x)
        return ascent(model, x, y, init_loss, init_err, rho, norm, steps, **kw)
    monkeypatch.setattr(flatness, "adaptive_ascent", spy)
    monkeypatch.setattr(bench, "make_net", hooked_make_net(log))
    monkeypatch.setattr(bench, "side_by_side", fake_side_by_side(times, log))
    args = bench.parse_args(["--device", "cpu", "--width", "4", "--repeats", "1"])
    row = bench.row_adaptive_step(args, torch.device("cpu"), 4, steps=3)
    assert len(calls) == 2 and all(c[:5] == (False, 128, 0.002, "linf", 3) for c in calls), calls
    assert 0 < calls[0][5] <= 8 / 255 + 1e-6
    ours, bare = times["ours_forwards"], times["bare_forwards"]
    assert len(ours) >= 3 + 1 + 1 and row["forwards"] == len(ours) == len(bare)
    assert bare == [True] * 3 + [False] * (len(ours) - 3)
    assert row["step_s"] == pytest.approx(6.0 / 3) and row["bare_step_s"] == pytest.approx(5.4 / 3)
    assert row["efficiency"] == pytest.approx(0.9) and row["steps"] == 3


def test_adaptive_floor_takes_the_gradient_in_weights_and_inputs():
    """The adaptive floor's gradient pass is w.r.t. ν (every conv/linear tensor) and δ, at w + ν and x + δ: it equals
    the gradient of the CE of a model whose weights are w + ν (float64)."""
    import flatness
    torch.manual_seed(0)
    net = common.ResNet18(width=4).double().eval()
    x, y = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2])
    weights = flatness.frozen_weights(net)
    nu = {k: 0.01 * torch.randn_like(w) for k, w in weights.items()}
    delta = 0.03 * torch.rand_like(x)
    grads = bench.bare_adaptive_passes(net, weights, nu, x, delta, y, steps=2, forwards=3)
    with torch.no_grad():
        for k, p in common.perturbable_params(net).items():
            p.add_(nu[k])
    xd = (x + delta).requires_grad_(True)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(net(xd), y),
                                   list(common.perturbable_params(net).values()) + [xd])
    assert len(grads) == len(weights) + 1
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_hutchinson_row_times_the_probes_per_probe(monkeypatch):
    """Row 3d times flatness.hessian_trace_probes itself (2 probes, on the eval-mode network and one batch of 128),
    against 2 bare double-backward passes (one forward each), both per probe."""
    import flatness
    calls, log, times = [], [], {"ours": 4.0, "bare": 3.8}
    probes = flatness.hessian_trace_probes

    def spy(model, x, y, n, batch_size, **kw):
        calls.append((model.training, len(x), n, batch_size))
        return probes(model, x, y, n, batch_size, **kw)
    monkeypatch.setattr(flatness, "hessian_trace_probes", spy)
    monkeypatch.setattr(bench, "make_net", hooked_make_net(log))
    monkeypatch.setattr(bench, "side_by_side", fake_side_by_side(times, log))
    args = bench.parse_args(["--device", "cpu", "--width", "4", "--repeats", "1"])
    row = bench.row_hutchinson(args, torch.device("cpu"), 4, probes=2)
    assert calls[-1] == (False, 128, 2, 128), calls
    assert times["ours_forwards"] == times["bare_forwards"] == [True, True]
    assert row["probe_s"] == pytest.approx(2.0) and row["bare_probe_s"] == pytest.approx(1.9)
    assert row["efficiency"] == pytest.approx(0.95) and row["probes"] == 2


def test_hutchinson_floor_is_the_hessian_vector_product():
    """The Hutchinson floor does the double backward of flatness.hessian_vector_product: the same H·v (one batch; in
    float32, the measure's logits being float32 whatever the model's dtype), so it is not a cheaper single backward."""
    import flatness
    torch.manual_seed(0)
    net = common.ResNet18(width=4).eval()
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    weights = common.perturbable_params(net, weights_only=True)
    v = {k: torch.randint(0, 2, w.shape).float().mul_(2).sub_(1) for k, w in weights.items()}
    hv = bench.bare_hessian_vector_products(net, weights, x, y, v, probes=1)
    expected = flatness.hessian_vector_product(net, {k: w.detach() for k, w in weights.items()}, x, y, v)
    assert len(hv) == len(weights)
    for h, k in zip(hv, weights):
        torch.testing.assert_close(h, expected[k])
    assert any(h.abs().max() > 0 for h in hv)


def test_epoch_times_runs_the_eager_variants_on_cpu():
    """The GPU epoch timing's loop, on CPU with a tiny network and a one-batch 'epoch' (compile left out:
    it takes minutes to build on a CPU)."""
    args = argparse.Namespace(width=8)
    times = bench.epoch_times(args, torch.device("cpu"), images=128, variants=bench.EPOCH_VARIANTS[:2], warmup=1)
    assert set(times) == {"fp32_eager", "bf16_channels_last"}
    assert all(t > 0 for t in times.values())
    wrn = bench.epoch_times(args, torch.device("cpu"), images=64, variants=bench.EPOCH_VARIANTS[:1], warmup=1,
                            arch="wrn-10-1")
    assert set(wrn) == {"fp32_eager"} and wrn["fp32_eager"] > 0


def test_bad_flags_get_one_error_line(tmp_path, monkeypatch, capsys):
    """The contract (one `error:` line, exit code 1, nothing written) from the command line once, then in-process."""
    proc = run_script("bench.py", "--width", "0", "--out", tmp_path / "b.json", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
    for flags in (["--repeats", "0"], ["--device", "cpu", "--epoch-time"],
                  ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--steps", "0"]):
        monkeypatch.setattr(sys, "argv", ["bench.py", *flags, "--out", str(tmp_path / "b.json")])
        with pytest.raises(SystemExit) as e:
            common.run_cli(bench.main)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith("error:"), (flags, lines)
    assert not (tmp_path / "b.json").exists()


def test_wrn_flag_takes_a_wideresnet(capsys):
    with pytest.raises(common.UsageError, match="--wrn takes a WideResNet"):
        bench.parse_args(["--wrn", "resnet18"])
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--wrn", "wrn-11-2"])
    assert e.value.code == 1 and "6n+4" in capsys.readouterr().err
    with pytest.raises(common.UsageError, match="--rows takes some of"):
        bench.parse_args(["--rows", "floor,nope"])


def test_peak_bytes_is_the_peak_of_live_tensors():
    """The CPU measure of row 6: 40 MB, then 20 MB more, the 40 MB freed, 8 MB: a peak of 60 MB, whatever was
    allocated before (a 100 MB tensor alive throughout) or freed after."""
    before = torch.ones(25_000_000)

    def fn():
        a = torch.ones(10_000_000)
        b = torch.ones(5_000_000)
        del a
        c = torch.ones(2_000_000)
        return b.sum() + c.sum()
    peak = bench.peak_bytes(fn, torch.device("cpu"))
    assert 60_000_000 <= peak <= 60_000_000 + 4096, peak
    assert before.sum() > 0


def test_saved_bytes_counts_each_saved_storage_once():
    """A network that is one ReLU on 3072 inputs, under CE: autograd saves the ReLU's output (3072 fp32), the
    log-softmax output (3072 fp32; nll_loss saves the same tensor again: counted once) and the int64 target, per
    image: 24,584 bytes, batch-2 minus batch-1 (constants such as nll_loss's total weight cancel)."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU())
    x = torch.rand(2, 3, 32, 32)
    assert bench.saved_bytes(net, x) - bench.saved_bytes(net, x[:1]) == 2 * 3072 * 4 + 8
    per_image = bench.saved_bytes_per_image("resnet18", 8, torch.device("cpu"))
    assert per_image > 3 * 32 * 32 * 4 * 8  # several 8-channel 32×32 maps per image
    torch.manual_seed(0)
    net = common.build_model({"arch": "resnet18", "width": 8, "act": "relu"}).eval()
    x = torch.rand(4, 3, 32, 32)
    with common.frozen_params(net):
        assert per_image == (bench.saved_bytes(net, x) - bench.saved_bytes(net, x[:2])) / 2  # the weights cancel


def test_attack_memory_does_not_grow_with_restarts(monkeypatch):
    """Row 6 at a tiny size (width 8, 4 images, PGD-2): 6 restarts in chunks of --batch-size inputs take little
    more memory than 1 (the per-restart starts and best iterates only); the same 6 restarts in one batch of 24
    inputs take several times as much (the measure sees the growth it guards against)."""
    monkeypatch.setattr(bench, "MEMORY_WRN", "wrn-10-1")
    args = bench.parse_args(["--device", "cpu", "--width", "8"])
    row = bench.row_attack_memory(args, torch.device("cpu"), 4, restarts=6, steps=2)
    assert row["ratio"] < 1.5, row
    net = bench.make_net(args, torch.device("cpu")).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    one, six = (bench.peak_bytes(lambda: common.pgd(net, x, y, 8 / 255, 0.007, 2, restarts=r), torch.device("cpu"))
                for r in (1, 6))
    assert six > 4 * one
    assert row["peak_mb_x1"] * 2**20 == pytest.approx(one, rel=0.1)
