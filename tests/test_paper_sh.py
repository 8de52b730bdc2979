"""scripts/paper.sh and scripts/slurm_array.sh: the plan of the whole paper (DRY_RUN=1 prints every
command), the figure inputs it holds (Table 1, Fig. 4, Fig. 6, Fig. 7), flags routed to the right
tool, the cluster path (LAUNCHER, LIST_ROWS, one SLURM array task per row) and, with a stand-in
python, skip / resume / failure handling. Bash only: nothing is trained."""
import importlib
import shlex
import stat
import subprocess

import pytest
from conftest import ROOT

PAPER = ROOT / "scripts" / "paper.sh"
ARRAY = ROOT / "scripts" / "slurm_array.sh"
TABLE1 = {  # row → (script, flags, epochs): Table 1 with the paper's best values
    "at": ("train_at.py", [], 150),
    "unlabeled": ("train_misc.py", ["--method", "unlabeled", "--unlabeled-fraction", "0.7"], 150),
    "cyclic": ("train_at.py", ["--lr-schedule", "cyclic", "--cyclic-peak", "0.2"], 30),
    "autoaugment": ("train_misc.py", ["--method", "autoaugment"], 150),
    "awp": ("train_awp.py", ["--xi", "0.005"], 150),
    "label_noise": ("train_at.py", ["--label-noise", "0.4"], 150),
    "clip": ("train_at.py", ["--clip", "0.005"], 150),
    "trades": ("train_trades.py", ["--beta", "9"], 150),
    "rotation": ("train_misc.py", ["--method", "rotation", "--rot-weight", "4", "--batch-size", "64"], 75),
    "wd": ("train_at.py", ["--wd", "0.05"], 150),
    "entropy_sgd": ("train_misc.py", ["--method", "entropy-sgd", "--L", "2"], 75),
    "mish": ("train_at.py", ["--act", "mish"], 150),
    "late": ("train_at.py", ["--lr-schedule", "late"], 150),
    "silu": ("train_at.py", ["--act", "silu"], 150),
    "ema": ("train_at.py", ["--ema", "0.9975"], 150),
    "eps9": ("train_at.py", ["--epsilon", "9/255"], 150),
    "mart": ("train_mart.py", ["--beta", "6"], 150),
    "gelu": ("train_at.py", ["--act", "gelu"], 150),
    "label_smoothing": ("train_at.py", ["--label-smoothing", "0.3"], 150),
}
SWEEPS = ["ln0.1", "ln0.2", "ln0.3", "ln0.5", "rot1", "rot2", "rot8", "trades1", "trades3", "trades6",
          "wd0.0001", "wd0.001", "wd0.005", "wd0.01", "awp0.001", "awp0.0025", "awp0.01"]
LAUNCHER = "srun --gres=gpu:1 --time=12:00:00"


def sh(tmp_path, script=PAPER, args=(), **env):
    """Run a script with a minimal environment, RUNS/FIGURES in tmp_path and a present UNLABELED
    file (so the +Unlabeled row is planned)."""
    unlabeled = tmp_path / "ti_500K.pickle"
    unlabeled.write_bytes(b"")
    base = {"PATH": "/usr/bin:/bin", "PYTHON": "python", "RUNS": str(tmp_path / "runs"),
            "FIGURES": str(tmp_path / "figures"), "UNLABELED": str(unlabeled)}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **{k: str(v) for k, v in env.items()}})


def plan(tmp_path, **env):
    """DRY_RUN=1 output as {row: [argv, ...]} (the final plots.py under the key None)."""
    proc = sh(tmp_path, DRY_RUN=1, **env)
    assert proc.returncode == 0, proc.stderr
    rows, cur = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("=== row "):
            cur = line.split()[2]
            rows[cur] = []
        elif line.startswith("python plots.py"):
            rows.setdefault(None, []).append(shlex.split(line))
        else:
            rows[cur].append(shlex.split(line))
    return rows


def commands(cmds, script):
    return [c for c in cmds if script in c[:6]]


def has(cmd, *flags):
    """cmd holds the flags as one contiguous run of words."""
    n = len(flags)
    return any(tuple(cmd[i:i + n]) == flags for i in range(len(cmd) - n + 1))


def test_dry_run_plans_every_table1_row_and_writes_nothing(tmp_path):
    rows = plan(tmp_path)
    assert set(TABLE1) <= set(rows)
    for name, (script, flags, epochs) in TABLE1.items():
        train = commands(rows[name], script)
        assert len(train) == 1, (name, rows[name])
        cmd = train[0]
        assert cmd[0] == "python" and cmd[1] == script
        assert has(cmd, "--epochs", str(epochs)) and has(cmd, "--out", str(tmp_path / "runs" / name)), cmd
        for flag, value in zip(flags[::2], flags[1::2]):
            assert has(cmd, flag, value), (name, flag, cmd)
        # Table 1: the last and the early-stopped checkpoint, each evaluated and measured
        for ckpt in ("ckpt_last.pt", "ckpt_best.pt"):
            path = str(tmp_path / "runs" / name / ckpt)
            assert any(path in c and "--train" in c for c in commands(rows[name], "evaluate.py")), (name, ckpt)
            assert any(path in c and has(c, "--mode", "both") for c in commands(rows[name], "flatness.py"))
            others = [c for c in commands(rows[name], "flatness.py") if path in c and has(c, "--mode", "all")]
            assert sorted("--loss" in c and c[c.index("--loss") + 1] or "robust" for c in others) == ["clean", "robust"]
        assert any(has(c, "--subset", "train-eval") for c in commands(rows[name], "flatness.py"))  # Fig. 9
    assert all("--use-ema" in c for c in rows["ema"][1:])  # weight averaging is the averaged model
    assert rows[None] == [["python", "plots.py", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ti_500K.pickle"]  # no runs/, logs/, figures/


def test_fig4_landscapes_top_and_bottom(tmp_path):
    rows = plan(tmp_path)

    def landscapes(name):
        return [c for c in commands(rows[name], "flatness.py")
                if has(c, "--mode", "landscape") and str(tmp_path / "runs" / name / "ckpt_last.pt") in c]
    at = landscapes("at")
    assert any("--scale" not in c for c in at)
    assert any(has(c, "--scale", "2") for c in at) and any(has(c, "--scale", "0.5") for c in at)
    assert has(commands(rows["adam"], "train_at.py")[0], "--optimizer", "adam", "--lr", "0.1")
    assert has(commands(rows["batch8"], "train_at.py")[0], "--batch-size", "8")
    for name in ("adam", "batch8", "awp", "entropy_sgd", "trades"):
        assert landscapes(name), name


def test_fig6_over_training_and_hessian(tmp_path):
    rows = plan(tmp_path)

    def over_training(name, mode):
        return [c for c in commands(rows[name], "flatness.py")
                if has(c, "--epochs", str(tmp_path / "runs" / name)) and has(c, "--mode", mode)]
    assert over_training("at", "both") and over_training("at", "hessian")
    for name in ("rotation", "awp", "unlabeled"):
        assert over_training(name, "both"), name
    hessian = [c for c in commands(rows["at"], "flatness.py") if has(c, "--mode", "hessian") and "--epochs" not in c]
    assert sorted(c[c.index("--scale") + 1] if "--scale" in c else "1" for c in hessian) == ["0.5", "1", "2"]


def test_rotation_rows_use_the_paper_batch(tmp_path):
    """A rotation step sees 2B images: --batch-size 64 is the paper's 64 + 64, 75 epochs its steps."""
    rows = plan(tmp_path, SWEEPS=1)
    for name in ("rotation", "rot1", "rot2", "rot8"):
        cmd = commands(rows[name], "train_misc.py")[0]
        assert has(cmd, "--batch-size", "64") and has(cmd, "--epochs", "75"), cmd


def test_sweeps_add_the_fig7_rows(tmp_path):
    assert not set(SWEEPS) & set(plan(tmp_path))
    rows = plan(tmp_path, SWEEPS=1)
    for name in SWEEPS:
        assert len([c for c in rows[name] if c[1].startswith("train_")]) == 1, name
        assert commands(rows[name], "evaluate.py") and commands(rows[name], "flatness.py"), name


def test_eval_flags_reach_evaluate_only_and_flat_flags_flatness_only(tmp_path):
    rows = plan(tmp_path, EVAL_FLAGS="--aa-version paper", FLAT_FLAGS="--n-landscape 50")
    cmds = [c for name, cs in rows.items() if name for c in cs]
    ev, fl = commands(cmds, "evaluate.py"), commands(cmds, "flatness.py")
    assert ev and fl
    assert all(has(c, "--aa-version", "paper") and "--n-landscape" not in c for c in ev)
    assert all(has(c, "--n-landscape", "50") and "--aa-version" not in c for c in fl)
    assert not any("--aa-version" in c or "--n-landscape" in c for c in cmds if c[1].startswith("train_"))


def test_launcher_prefixes_every_command_of_every_row(tmp_path):
    rows = plan(tmp_path, LAUNCHER=LAUNCHER, PLOTS=0)
    assert None not in rows  # PLOTS=0: no plots.py
    prefix = shlex.split(LAUNCHER)
    for name, cmds in rows.items():
        assert cmds and all(c[:len(prefix)] == prefix and c[len(prefix)] == "python" for c in cmds), (name, cmds)
    assert plan(tmp_path, LAUNCHER=LAUNCHER)[None][0][0] == "python"  # plots.py runs where the script runs


def test_list_rows_and_each_slurm_array_task_runs_its_row(tmp_path):
    listed = sh(tmp_path, LIST_ROWS=1, SWEEPS=1)
    assert listed.returncode == 0 and listed.stderr == ""
    names = listed.stdout.split()
    assert names == list(TABLE1) + ["adam", "batch8"] + SWEEPS
    for i in (0, 2, 20, len(names) - 1):
        proc = sh(tmp_path, ARRAY, SLURM_ARRAY_TASK_ID=i, SWEEPS=1, DRY_RUN=1)
        assert proc.returncode == 0, proc.stderr
        assert [ln for ln in proc.stdout.splitlines() if ln.startswith("=== row")] == [f"=== row {names[i]}"]
        assert "plots.py" not in proc.stdout
    beyond = sh(tmp_path, ARRAY, SLURM_ARRAY_TASK_ID=len(names), SWEEPS=1, DRY_RUN=1)
    assert beyond.returncode == 1 and beyond.stdout == "" and len(beyond.stderr.splitlines()) == 1
    plots = sh(tmp_path, ARRAY, args=["plots"], DRY_RUN=1)
    assert plots.returncode == 0 and plots.stdout.splitlines() == [
        f"python plots.py {tmp_path / 'runs'} --out {tmp_path / 'figures'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ti_500K.pickle"]


def test_an_unknown_row_exits_1_with_one_line_before_running_anything(tmp_path):
    proc = sh(tmp_path, ROWS="at nope", DRY_RUN=1)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "'nope'" in proc.stderr
    bad = sh(tmp_path, PLOTS="yes", DRY_RUN=1)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1


def test_every_planned_command_parses_with_its_scripts_argparse(tmp_path):
    rows = plan(tmp_path, SWEEPS=1)
    cmds = [c for name, cs in rows.items() if name for c in cs]
    assert len(cmds) > 150
    for _, script, *argv in cmds:
        module = importlib.import_module(script[:-3])
        module.parse_args(argv)


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in for python that logs its argv and fails when FAIL is among its arguments."""
    path = tmp_path / "fakepy"
    path.write_text('#!/bin/bash\necho "$*" >> "$CALLS"\n[ -n "${LAUNCHED:-}" ] && echo "$*" >> "$CALLS.launched"\n'
                    'for a in "$@"; do [ "$a" = "${FAIL:-}" ] && exit 3; done\nexit 0\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_a_real_run_skips_finished_training_resumes_and_reports_failed_rows(tmp_path, fake_python):
    runs = tmp_path / "runs"
    (runs / "at").mkdir(parents=True)
    (runs / "at" / "ckpt_epoch150.pt").write_bytes(b"")  # finished
    (runs / "wd").mkdir()
    (runs / "wd" / "ckpt_last.pt").write_bytes(b"")       # interrupted
    calls = tmp_path / "calls.txt"
    proc = sh(tmp_path, ROWS="at wd mart", PYTHON=fake_python, CALLS=calls, FAIL="train_mart.py",
              LAUNCHER="env LAUNCHED=1")
    assert proc.returncode == 1
    assert f"done: {runs / 'at' / 'ckpt_epoch150.pt'}" in proc.stdout
    assert "failed rows: mart" in proc.stderr
    lines = calls.read_text().splitlines()
    assert not any(ln.startswith("train_at.py --epochs 150") for ln in lines)   # at: not trained again
    assert any(ln.startswith("evaluate.py " + str(runs / "at")) for ln in lines)  # ... but measured
    assert [ln for ln in lines if "--wd 0.05" in ln][0].endswith("--resume")
    assert not any(str(runs / "mart") in ln for ln in lines if not ln.startswith("train_mart.py"))
    assert lines[-1] == f"plots.py {runs} --out {tmp_path / 'figures'}"
    assert all(f"+ env LAUNCHED=1 {fake_python} " in ln for ln in proc.stdout.splitlines()
               if ln.startswith("+ ") and "plots.py" not in ln)
    launched = (tmp_path / "calls.txt.launched").read_text().splitlines()
    assert launched == lines[:-1]  # every command but plots.py ran under LAUNCHER


def test_jobs_run_rows_in_the_background_with_a_log_each(tmp_path, fake_python):
    calls = tmp_path / "calls.txt"
    proc = sh(tmp_path, ROWS="clip late mart", JOBS=2, PYTHON=fake_python, CALLS=calls, FAIL="train_mart.py")
    assert proc.returncode == 1 and "row mart failed" in proc.stderr and "failed rows: mart" in proc.stderr
    logs = tmp_path / "runs" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["clip.log", "late.log", "mart.log"]
    assert "train_at.py --clip 0.005" in (logs / "clip.log").read_text()
    assert calls.read_text().splitlines()[-1].startswith("plots.py")
    ok = sh(tmp_path, ROWS="clip late", JOBS=2, PYTHON=fake_python, CALLS=calls, PLOTS=0)
    assert ok.returncode == 0, ok.stderr


def test_robustbench_rows_measure_public_models_for_fig1(tmp_path):
    """ROBUSTBENCH="A B" (with MODEL_DIR) adds one row per RobustBench model after the default rows: evaluate.py and
    flatness.py --mode both (average and worst case) with --robustbench NAME --model-dir MODEL_DIR, and plots.py
    draws them from there (--robustbench-dir). A scheduler task given one row (ROWS) runs only that row."""
    models = tmp_path / "my models"
    names = ["Carmon2019Unlabeled", "Jia2022LAS-AT_34_10"]
    rows = plan(tmp_path, ROBUSTBENCH=" ".join(names), MODEL_DIR=models, EVAL_FLAGS="--no-autoattack")
    assert list(rows)[-3:] == [f"robustbench:{n}" for n in names] + [None]
    for n in names:
        cmds = rows[f"robustbench:{n}"]
        assert len(cmds) == 2
        ev, fl = commands(cmds, "evaluate.py"), commands(cmds, "flatness.py")
        assert len(ev) == len(fl) == 1
        for c in ev + fl:
            assert has(c, "--robustbench", n) and has(c, "--model-dir", str(models))
            module = importlib.import_module(c[1][:-3])
            assert module.parse_args(c[2:]).robustbench == n  # the flags parse
        assert has(fl[0], "--mode", "both") and has(ev[0], "--no-autoattack")
    assert rows[None] == [["python", "plots.py", str(tmp_path / "runs"), "--out", str(tmp_path / "figures"),
                           "--robustbench-dir", str(models)]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ti_500K.pickle"]  # a dry run writes nothing

    listed = sh(tmp_path, LIST_ROWS=1, ROBUSTBENCH=" ".join(names)).stdout.split()
    assert listed == list(TABLE1) + ["adam", "batch8"] + [f"robustbench:{n}" for n in names]
    task = sh(tmp_path, ARRAY, SLURM_ARRAY_TASK_ID=len(listed) - 1, ROBUSTBENCH=" ".join(names), DRY_RUN=1)
    assert [ln for ln in task.stdout.splitlines() if ln.startswith("=== row")] == [f"=== row robustbench:{names[1]}"]
    given = plan(tmp_path, ROWS="clip", ROBUSTBENCH=" ".join(names))
    assert list(given) == ["clip", None]  # one given row: only that one
    one = plan(tmp_path, ROWS="robustbench:Standard")
    assert list(one) == ["robustbench:Standard", None] and one[None][0][-2:] == ["--robustbench-dir", "models"]
