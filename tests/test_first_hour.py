"""What a new user meets first (README "Quick start"): the pixel-unit flags refuse `8`, a wrong --data-dir creates
nothing, --help gives each script's whole description, progress lines in a log file, Ctrl-C as one line with
exit code 130, and the CPU pipeline of scripts/quickstart_cpu.sh."""
import re
import signal
import subprocess
import sys

import pytest
import torch

import common
import evaluate
import flatness
import plots
import train_at
import train_awp
import train_mart
import train_misc
import train_trades
from conftest import ROOT, TINY
from test_checkpoint_data import NO_NETWORK

SCRIPTS = [train_at, train_trades, train_mart, train_awp, train_misc, evaluate, flatness]
NEEDS = {evaluate: ["ckpt.pt"], flatness: ["ckpt.pt"], train_misc: ["--method", "rotation"]}  # required arguments


# ---------------------------------------------------------------------------------------------
# Pixel units: every script refuses --epsilon 8 the same way and suggests 8/255
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("flag", ["--epsilon", "--attack-step"])
def test_pixel_flags_refuse_the_0_255_scale(module, flag, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args([*NEEDS.get(module, []), flag, "8"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: argument {flag}: 8 is not in [0, 1]") and "pass 8/255" in err, err
    assert getattr(module.parse_args([*NEEDS.get(module, []), flag, "8/255"]), flag[2:].replace("-", "_")) == 8 / 255


def test_pixels_type():
    assert common.pixels("0.007") == 0.007 and common.pixels("0") == 0 and common.pixels("1") == 1
    for bad in ("-0.1", "1.5", "255/255.5x"):
        with pytest.raises(Exception):
            common.pixels(bad)


# ---------------------------------------------------------------------------------------------
# --data-dir: a mistyped path creates nothing
# ---------------------------------------------------------------------------------------------
def test_a_wrong_data_dir_creates_nothing(tmp_path, monkeypatch):
    import torchvision.datasets as tv

    class Download:  # what torchvision does without a network: make the root, then fail
        def __init__(self, root, train=True, download=False):
            common.Path(root).mkdir(parents=True, exist_ok=True)
            raise RuntimeError("Error downloading cifar-10-python.tar.gz")
    monkeypatch.setattr(tv, "CIFAR10", Download)
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(common.UsageError, match="could not find or download CIFAR-10"):
        common.load_images(tmp_path / "typo" / "nested" / "cifar10", train=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(common.UsageError):
        common.load_images(tmp_path / "exists", train=True)
    assert [p.name for p in tmp_path.iterdir()] == ["exists"]  # a folder the user had is kept


# ---------------------------------------------------------------------------------------------
# --help: the first paragraph of each script's docstring, whole
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [*SCRIPTS, plots], ids=lambda m: m.__name__)
def test_help_gives_the_whole_description(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
    assert paragraph in shown and paragraph.endswith((".", ":", ")")), paragraph


# ---------------------------------------------------------------------------------------------
# Progress in a log file: a line per PROGRESS_EVERY seconds naming every open loop
# ---------------------------------------------------------------------------------------------
def test_progress_lines_name_each_open_loop(monkeypatch, capsys):
    monkeypatch.setattr(common, "PROGRESS_EVERY", 0)  # a line at every step
    seen = [(i, j) for i in common.progress_loop(range(2), "outer") for j in common.progress_loop([7, 8, 9], "inner")]
    assert seen == [(i, j) for i in range(2) for j in (7, 8, 9)]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 + 2, lines  # every inner step, and the outer one after each pass
    assert re.fullmatch(r"outer: 0/2 \(0 %\), 0:00:00 elapsed \| inner: 1/3 \(33 %\), 0:00:00 elapsed, ~0:00:00 left",
                        lines[0]), lines[0]
    assert lines[3].startswith("outer: 1/2 (50 %)") and " | " not in lines[3]
    assert common._open_loops == []
    monkeypatch.setattr(common, "PROGRESS_EVERY", 3600)
    list(common.progress_loop(range(5), "quiet"))
    assert capsys.readouterr().err == ""  # nothing before the interval has passed
    list(common.progress_loop(range(5), "off", disable=True))


def test_training_and_measures_report_progress(tiny_data, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(common, "PROGRESS_EVERY", 0)
    code, _, err = run_main(train_at, "--data-dir", tiny_data, *TINY, "--epochs", "1", "--out", tmp_path / "at")
    assert code == 0 and re.search(r"^epoch 1: 4/4 \(100 %\), .* elapsed", err, re.M), err
    code, _, err = run_main(evaluate, tmp_path / "at" / "ckpt_last.pt", "--n-eval", "20", "--n-clean", "20",
                            "--no-autoattack", "--restarts", "1", "--steps", "2", "--batch-size", "10")
    assert code == 0 and re.search(r"^PGD-2x1: 2/2 \(100 %\)", err, re.M), err
    code, _, err = run_main(flatness, tmp_path / "at" / "ckpt_last.pt", "--n-eval", "20", "--samples", "2",
                            "--restarts", "1", "--passes", "2", "--steps", "2", "--ref-restarts", "1",
                            "--batch-size", "10", "--joint-batch-size", "10")
    assert code == 0, err
    assert re.search(r"^average-case ξ=0.5 draws: 1/2 \(50 %\)", err, re.M), err
    assert re.search(r"^worst-case ξ=0.00075 restarts: 0/1 \(0 %\), .* \| joint ascent passes: 1/2", err, re.M), err


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line saying what was kept and how to go on, exit code 130
# ---------------------------------------------------------------------------------------------
def test_ctrl_c_in_training_says_what_was_kept(tiny_data, tmp_path, run_main, monkeypatch):
    steps = {"n": 0}
    real_step = train_at.train_step

    def step(*args):
        steps["n"] += 1
        if steps["n"] == 6:  # in epoch 2 (4 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args)
    monkeypatch.setattr(train_at, "train_step", step)
    out = tmp_path / "at"
    code, _, err = run_main(train_at, "--data-dir", tiny_data, *TINY, "--epochs", "3", "--out", out)
    assert code == 130 and err.strip().splitlines() == [
        f"interrupted: {out} keeps epoch 1 of 3 (ckpt_last.pt); continue with the same command and --resume"], err
    assert torch.load(out / "ckpt_last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_at, "train_step", real_step)
    code, _, err = run_main(train_at, "--data-dir", tiny_data, *TINY, "--epochs", "3", "--out", out, "--resume")
    assert code == 0 and torch.load(out / "ckpt_last.pt", weights_only=True)["epoch"] == 3, err

    steps["n"] = 0
    monkeypatch.setattr(train_at, "train_step", step)
    monkeypatch.setattr(common, "PROGRESS_EVERY", 1e9)
    code, _, err = run_main(train_at, "--data-dir", tiny_data, *TINY, "--epochs", "1", "--batch-size", "25",
                            "--out", tmp_path / "early")
    assert code == 130 and "no epoch had finished, so nothing was kept" in err and not (tmp_path / "early").exists()


def test_ctrl_c_in_a_measure_is_one_line(run_main, monkeypatch):
    def interrupted(argv=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "main", interrupted)
    code, _, err = run_main(evaluate)
    assert code == 130 and err.strip() == ("interrupted: result files already written are kept; the same command "
                                           "measures only what is missing")


def test_sigint_to_a_training_process(tiny_data, tmp_path):
    """The shell contract in a real process: SIGINT during training, exit code 130, no traceback."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_at.py"), "--data-dir", str(tiny_data), *TINY,
                             "--epochs", "50", "--out", str(tmp_path / "at")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**common.os.environ, "PYTHONUNBUFFERED": "1",
                                                                   "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().startswith("epoch   1 ")  # an epoch is committed
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted: " in err and "--resume" in err, err


# ---------------------------------------------------------------------------------------------
# The README's code blocks run as shown; scripts/quickstart_cpu.sh is the pipeline the README shows
# ---------------------------------------------------------------------------------------------
README = (ROOT / "README.md").read_text()
MODULES = {f"{m.__name__}.py": m for m in [*SCRIPTS, plots]}


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands(block):
    """The block's command lines, continuation lines joined and comments dropped."""
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_command_line_of_the_readme_parses():
    """Each `python <script>.py ...` line of the README's bash blocks is accepted by that script's own parser: no
    flag the scripts do not have, no value they refuse."""
    import shlex
    checked = 0
    for block in readme_blocks("bash"):
        for line in commands(block):
            words = shlex.split(line)
            if len(words) >= 2 and words[0] == "python" and words[1] in MODULES:
                MODULES[words[1]].parse_args(words[2:])
                checked += 1
    assert checked >= 20, checked


def test_the_readme_quick_start_is_what_the_script_runs():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart_cpu.sh"), "../shared/data/cifar10-jpeg"],
                          cwd=ROOT, capture_output=True, text=True, env={**common.os.environ, "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    ran = [line.replace(f"{ROOT}/", "") for line in proc.stdout.splitlines()]
    shown = next(commands(b) for b in readme_blocks("bash") if "--out runs_quick/at" in b)
    assert ran == shown and len(ran) == 7


def test_the_quick_start_pipeline_on_a_tiny_tree(tiny_data, tmp_path):
    """scripts/quickstart_cpu.sh end to end (tiny sizes from the environment): both runs trained, evaluated and
    measured, then plots.py draws from them with AT as the baseline; then the README's Python API block on the
    run it made."""
    env = {**common.os.environ, "OMP_NUM_THREADS": "1", "WIDTH": "8", "SUBSET": "100", "EPOCHS": "2", "N_LOG": "20",
           "N_ES": "20", "N_EVAL": "20", "N_CLEAN": "40", "BATCH": "50", "EVAL_FLAGS": "--no-autoattack"}
    out = tmp_path / "runs_quick"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart_cpu.sh"), str(tiny_data), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("at", "awp"):
        names = sorted(p.name.rsplit("_", 1)[0] for p in (out / run).glob("*_last_*.json"))
        assert names == ["eval_last", "flatness_average_last", "flatness_worst_last"], names
    assert (out / "figures" / "table1.md").is_file() and (out / "figures" / "fig2_robust_overfitting.png").is_file()
    assert "baseline: at (" in proc.stdout and "quickstart_cpu.sh: done in" in proc.stderr

    (block,) = readme_blocks("python")
    code = block.replace("runs_quick/at/ckpt_last.pt", str(out / "at" / "ckpt_last.pt")).replace(
        "../shared/data/cifar10-jpeg", str(tiny_data)).replace('"eval", 100,', '"eval", 20,')
    assert str(tiny_data) in code and '"eval", 20,' in code
    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env={**env, "ROBUST_FLATNESS_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    values = [float(v) for v in printed.stdout.split()]
    assert len(values) == 3 and values[0] > 0, printed.stdout
