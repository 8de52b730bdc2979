"""train_at.py end to end on the tiny generated ImageFolder: the run folder
under every Table 1 flag, the one-line errors, and DDP under torchrun on CPU (gloo)."""
import json
import math

import pytest
import torch
import torch.nn as nn

import common
import evaluate
import train_at
from conftest import TINY, run_ddp, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the CPU is shared: one thread per process is fastest
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
METRIC_KEYS = {"epoch", "lr", "train_loss", "train_err", "test_clean_loss", "test_clean_err", "test_rloss",
               "test_rerr", "test_rloss_correct", "test_rloss_incorrect", "es_rerr", "es_rloss", "time_s"}
CKPT_KEYS = {"model", "optimizer", "scheduler", "epoch", "args", "rng", "es_best", "metrics"}

# Each combination covers several flags; 1 epoch = 4 steps of 50 images. `lr` is the logged lr of the
# epoch's first step, i.e. at the start of each schedule.
COMBOS = {
    "multistep-clip-attackbn": (["--lr-schedule", "multistep", "--clip", "0.02", "--attack-bn", "train"], 0.05),
    "late-silu-smoothing-std": (["--lr-schedule", "late", "--act", "silu", "--label-smoothing", "0.3",
                                 "--attack-steps", "0"], 0.05),
    "cyclic-mish-noise": (["--lr-schedule", "cyclic", "--act", "mish", "--label-noise", "0.4"], 0.0),
    "cosine-gelu-ema": (["--lr-schedule", "cosine", "--act", "gelu", "--ema", "0.9"], 0.05),
    "const-adam": (["--lr-schedule", "const", "--optimizer", "adam", "--lr", "1e-3"], 1e-3),
}


def flag(flags, name, default=None):
    return flags[flags.index(name) + 1] if name in flags else default


@pytest.mark.parametrize("name", COMBOS)
def test_run_folder(tiny_data, tmp_path, name, run_main):
    """The first combination from the command line in a child process, the others in this one."""
    flags, final_lr = COMBOS[name]
    out = tmp_path / "run"
    args = [*TINY, "--data-dir", tiny_data, "--epochs", 1, "--out", out, *flags]
    if name == next(iter(COMBOS)):
        run_script("train_at.py", *args, env=ONE_THREAD)
    else:
        assert run_main(train_at, *args)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "args.json", "ckpt_best.pt", "ckpt_epoch001.pt", "ckpt_last.pt", "metrics.jsonl"]

    saved = json.loads((out / "args.json").read_text())
    expected = vars(train_at.parse_args([*TINY, "--data-dir", str(tiny_data), "--epochs", "1", "--out", str(out),
                                         *flags]))
    assert {k: v for k, v in saved.items() if k != "versions"} == expected
    assert {"python", "torch", "torchvision", "numpy", "device", "git_commit", "argv"} <= set(saved["versions"])
    assert saved["versions"]["torch"] == torch.__version__

    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    m = lines[0]
    assert METRIC_KEYS <= set(m) and m["epoch"] == 1 and m["test_n"] == 40
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    assert m["lr"] == pytest.approx(final_lr, abs=1e-12)
    for k in ("train_err", "test_clean_err", "test_rerr", "es_rerr"):
        assert 0 <= m[k] <= 1
    assert m["test_rerr"] >= m["test_clean_err"]  # robust error counts clean mistakes too
    assert m["test_rloss"] > m["test_clean_loss"]

    ckpt = evaluate.load_checkpoint(out / "ckpt_last.pt")  # weights_only=True
    assert CKPT_KEYS <= set(ckpt) and ckpt["epoch"] == 1 and ckpt["metrics"] == m
    assert ckpt["es_best"] == {"epoch": 1, "es_rerr": m["es_rerr"]}
    for other in ("ckpt_epoch001.pt", "ckpt_best.pt"):
        c = evaluate.load_checkpoint(out / other)
        assert all(torch.equal(c["model"][k], v) for k, v in ckpt["model"].items())
    model, _ = evaluate.model_from_checkpoint(out / "ckpt_last.pt", torch.device("cpu"))
    x, y = common.eval_split(tiny_data, "log", 40, torch.device("cpu"))  # the logged test metrics are of these weights
    loss, ok = common.clean_metrics(model, x, y)
    assert m["test_clean_loss"] == pytest.approx(loss.mean().item(), rel=1e-5)
    assert m["test_clean_err"] == pytest.approx(1 - ok.float().mean().item())
    act = common.ACTIVATIONS[flag(flags, "--act", "relu")]
    assert isinstance(model.act, act) and isinstance(model.layer4[1].act, act)
    assert model.conv1.out_channels == 8

    opt_state = ckpt["optimizer"]["state"][0]
    assert ("exp_avg" in opt_state) == (flag(flags, "--optimizer") == "adam")
    if "--clip" in flags:
        w = float(flag(flags, "--clip"))
        for mname, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                assert mod.weight.abs().max() <= w, mname
            elif isinstance(mod, nn.BatchNorm2d):
                assert (mod.weight - 1).abs().max() <= w + 1e-7 and mod.bias.abs().max() <= w, mname
    if "--ema" in flags:
        assert set(ckpt["ema"]) == set(ckpt["model"])
        assert not torch.equal(ckpt["ema"]["conv1.weight"], ckpt["model"]["conv1.weight"])
        ema, _ = evaluate.model_from_checkpoint(out / "ckpt_last.pt", torch.device("cpu"), use_ema=True)
        assert torch.equal(ema.conv1.weight, ckpt["ema"]["conv1.weight"])
    else:
        assert "ema" not in ckpt


@pytest.mark.numerics
def test_epoch_metrics_against_hand_computation():
    """common.epoch_metrics: means of common.clean_metrics / robust_metrics (same seed), with RLoss
    split by clean correctness (Fig. 2) computed by hand."""
    torch.manual_seed(0)
    model = common.ResNet18(width=4).eval()
    x = torch.rand(24, 3, 8, 8)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(24) % 2 == 0, pred, (pred + 1) % 10)  # half clean-correct, half not
    args = train_at.parse_args(["--attack-step", "2/255"])
    torch.manual_seed(1)
    got = common.epoch_metrics(model, x, y, args.attack_step, 2, "t_")
    torch.manual_seed(1)
    closs, cok = common.clean_metrics(model, x, y)
    rloss, rok = common.robust_metrics(model, x, y, 8 / 255, 2 / 255, 7, 2)
    expected = {"t_clean_loss": closs.mean(), "t_clean_err": 1 - cok.float().mean(), "t_rloss": rloss.mean(),
                "t_rerr": 1 - rok.float().mean(), "t_rloss_correct": rloss[cok].mean(),
                "t_rloss_incorrect": rloss[~cok].mean(), "t_n": 24}
    assert cok.sum() == 12 and set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(float(v), rel=1e-5), k
    assert got["t_rloss_correct"] < got["t_rloss_incorrect"]


def error_line(proc):
    """Exit code 1, exactly one line on stderr, starting with 'error:', and no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_errors(tiny_data, tmp_path):
    base = [*TINY, "--data-dir", tiny_data, "--epochs", 1]
    env = {**ONE_THREAD, **NO_NETWORK}  # a missing --data-dir must not download CIFAR-10 here

    line = error_line(run_script("train_at.py", *TINY, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "a",
                                 check=False, env=env))
    assert "could not find or download CIFAR-10" in line and "nowhere" in line

    base_in = [str(f) for f in base]  # the same contract in-process: UsageError is what run_cli prints
    with pytest.raises(SystemExit):  # common.pixels: one `error: argument --epsilon: ...` line, exit code 1
        train_at.main([*base_in, "--epsilon", "-1", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        train_at.main([*base_in, "--act", "swish", "--out", str(tmp_path / "c")])  # argparse's choices

    # argparse's own errors follow the same contract (one line, exit code 1), not usage + exit 2
    line = error_line(run_script("train_at.py", *base, "--epsilon", "8/x", "--out", tmp_path / "d", check=False, env=env))
    assert "--epsilon" in line and "8/x" in line

    # an existing run: a ckpt_last.pt saved with the flags of `base` (--resume takes a checkpoint with a
    # metrics history, and compares the flags before it uses anything else of it)
    out = tmp_path / "existing"
    out.mkdir()
    saved = vars(train_at.parse_args([*map(str, base), "--out", str(out)]))
    common.save_checkpoint(out / "ckpt_last.pt", args=saved, epoch=1, history=[{"epoch": 1}])
    with pytest.raises(common.UsageError, match="already holds a run.*--resume"):
        train_at.main([*base_in, "--out", str(out)])
    with pytest.raises(common.UsageError, match=r"--lr 0.05 \(now 0.1\)"):
        train_at.main([*base_in, "--lr", "0.1", "--out", str(out), "--resume"])


def test_ddp_two_cpu_ranks(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 on gloo: one set of files, and rank 1's final weights and BN
    statistics are bit-identical to rank 0's checkpoint (synchronised gradients, broadcast buffers)."""
    out = tmp_path / "run"
    proc, other = run_ddp("train_at.py", tmp_path, *TINY, "--data-dir", tiny_data, "--epochs", 1, "--ema", 0.9,
                          "--out", out)
    assert proc.stdout.count("epoch   1 ") == 1, proc.stdout  # only rank 0 prints
    assert sorted(p.name for p in out.iterdir()) == [
        "args.json", "ckpt_best.pt", "ckpt_epoch001.pt", "ckpt_last.pt", "metrics.jsonl"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    ckpt = evaluate.load_checkpoint(out / "ckpt_last.pt")
    assert set(other) == set(ckpt["model"])
    differ = [k for k in other if not torch.equal(other[k], ckpt["model"][k])]
    assert not differ, f"ranks ended with different {differ[:5]}"
    first = evaluate.load_checkpoint(out / "ckpt_epoch001.pt")
    assert "ema" in first and json.loads((out / "args.json").read_text())["versions"]["argv"]


def test_ddp_resume_equals_uninterrupted_run(tiny_data, tmp_path, run_main):
    """Under DDP the attack starts and the label noise differ per rank, so the checkpoint holds every
    rank's RNG: 3 epochs straight == the epoch-1 snapshot + `--resume` for epochs 2-3, bit for bit. With
    --ema, epoch 2's early stopping checks the EMA model with its averaged BN buffers, which every rank
    averages from its own statistics: they must be rank 0's on every rank, as the checkpoint's are."""
    import shutil
    flags = [*TINY, "--data-dir", tiny_data, "--epochs", 3, "--es-every", 1, "--label-noise", 0.3, "--seed", 3,
             "--ema", 0.9, "--train-subset", 100, "--attack-steps", 2, "--n-log", 20, "--n-early-stop", 20]
    full, part = tmp_path / "full", tmp_path / "part"
    run_ddp("train_at.py", tmp_path, *flags, "--out", full)
    part.mkdir()
    shutil.copy(full / "ckpt_epoch001.pt", part / "ckpt_last.pt")
    for name in ("metrics.jsonl", "args.json"):
        shutil.copy(full / name, part / name)
    proc, _ = run_ddp("train_at.py", tmp_path, *flags, "--out", part, "--resume")
    assert "resumed" in proc.stdout and "warning" not in proc.stderr

    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}
    a, b = ([strip(json.loads(l)) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, part))
    assert a == b
    ca, cb = evaluate.load_checkpoint(full / "ckpt_last.pt"), evaluate.load_checkpoint(part / "ckpt_last.pt")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert len(ca["rng"]) == 2 and not torch.equal(ca["rng"][0]["torch"], ca["rng"][1]["torch"])

    # resuming on another number of processes works, and says that it is not the same run
    single = tmp_path / "single"
    shutil.copytree(part, single)
    shutil.copy(full / "ckpt_epoch001.pt", single / "ckpt_last.pt")
    code, _, err = run_main(train_at, *flags, "--out", single, "--resume")
    assert code == 0 and "saved by 2 process(es) and resumes on 1" in err
    assert evaluate.load_checkpoint(single / "ckpt_last.pt")["epoch"] == 3


def test_a_cuda_device_turns_tf32_off(monkeypatch):
    """Every number is fp32 (README "Conventions"): on a GPU, cuDNN convolutions and matmuls must not use TF32
    (PyTorch's default for cuDNN). Checked without a GPU by pretending one is there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert common.resolve_device("auto").type == "cuda"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
