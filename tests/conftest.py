"""Shared fixtures: a tiny generated CIFAR-like ImageFolder tree and a helper to run scripts."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `pytest` as well as `python -m pytest` imports common, train_at, ...
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
torch.set_num_threads(1)  # tiny workloads: threads cost more than they give on 2 cores


def make_imagefolder(root, n_train=20, n_test=20, seed=0):
    """train/<class>/*.png and test/<class>/*.png with 32×32 images whose colour depends on the
    class (so a tiny network can learn them in a few steps)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            d = Path(root) / split / name
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256], np.float64)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return Path(root)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 10-class ImageFolder: 20 train and 20 test images per class (200 + 200)."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """The decoded-image cache in the session's temporary folder, set before any fixture of any scope loads data
    (a function-scoped setenv came after module-scoped fixtures, which then wrote into ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBUST_FLATNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "numerics: compares implementations of an attack, a measure or a method's "
                            "loss; .ci/run also runs these under ATEN_CPU_CAPABILITY=avx2 and default, whose kernels "
                            "round differently")


# The suite writes only into its temporary folders: what it finds new at the end, in the user's cache or in the
# repository (ignored files included), fails the run.
WATCHED = (Path.home() / ".cache" / "robust_flatness", ROOT)


def written_paths():
    """Every file under WATCHED but the bytecode caches pytest and Python write themselves."""
    return {p for root in WATCHED if root.is_dir() for p in root.rglob("*")
            if p.is_file() and not {"__pycache__", ".pytest_cache", ".git"} & set(p.relative_to(root).parts)}


def pytest_sessionstart(session):
    session.config._paths_before = written_paths()


def pytest_sessionfinish(session, exitstatus):
    new = sorted(written_paths() - session.config._paths_before)
    if new:
        print(f"\nERROR: the suite wrote {len(new)} file(s) outside its temporary folders: "
              + ", ".join(map(str, new[:10])), file=sys.stderr)
        session.exitstatus = 1


# Flags that make a training run take seconds on a CPU with the tiny tree above.
TINY = ["--width", "8", "--batch-size", "50", "--n-log", "40", "--n-early-stop", "40",
        "--es-restarts", "1", "--device", "cpu"]


def run_script(script, *args, check=True, timeout=600, env=None):
    """Run `python <script> args...` from the repository root; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_script's contract in this process (saves the ~2 s start of a child): `run_main(module, *args)` runs
    the script's command line (sys.argv and common.run_cli, as its `__main__`) and returns (exit code, stdout,
    stderr). One subprocess test per command line stays, for what only a fresh process shows."""
    import common

    def run(module, *args):
        monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, args)])
        try:
            common.run_cli(module.main)
            code = 0
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:  # run_cli must turn it into exit code 130; escaping, it would stop pytest
            code = "KeyboardInterrupt escaped run_cli"
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


DDP_WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import common, {module}

# record what rank 1 ends with (the scripts write files on rank 0 only)
save = common.save_epoch
def record(state, *args, **kwargs):
    save(state, *args, **kwargs)
    if int(os.environ["RANK"]) == 1:
        torch.save(state["model"], os.environ["RANK1_STATE"])
common.save_epoch = record
common.run_cli({module}.main)
"""


def run_ddp(script, tmp_path, *args):
    """`torchrun --standalone --nproc_per_node=2 script args...` on CPU (gloo). Returns the
    CompletedProcess and the state dict rank 1 ended with (to compare with rank 0's checkpoint)."""
    wrapper = tmp_path / f"ddp_{script}"
    wrapper.write_text(DDP_WRAPPER.format(root=str(ROOT), module=Path(script).stem))
    rank1 = tmp_path / "rank1.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
         *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK1_STATE": str(rank1)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, torch.load(rank1, weights_only=True)


def separable_data(n, seed, size=8):
    """One random colour per class plus noise (size×size images in [0, 1]): a tiny network separates it in a
    few dozen steps."""
    y = torch.arange(n) % 10
    colours = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(99))
    x = colours[y] + 0.15 * torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0, 1), y


def fit(model, x, y, steps, batch_size, lr=3e-3):
    """A few Adam steps on random mini-batches of (x, y) (seed the global RNG first); returns the
    model in eval mode with no gradients left behind."""
    import torch.nn.functional as F
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()
