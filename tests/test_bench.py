"""bench.py: every row runs and reports finite ratios; the AT step it times is train_at.py's own;
its floor does the passes it claims; bad flags get one error line."""
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
    row with PGD-2 × 3 and a WRN-10-1."""
    monkeypatch.setattr(bench, "MEMORY_WRN", "wrn-10-1")
    monkeypatch.setitem(bench.ROW_FNS, "attack_memory", functools.partial(bench.row_attack_memory, restarts=3, steps=2))
    args = bench.parse_args(["--device", "cpu", "--width", "8", "--repeats", "1", "--steps", "1", "--wrn", "wrn-10-1"])
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
