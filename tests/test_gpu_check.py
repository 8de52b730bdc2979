"""scripts/gpu_check.sh: its dry run runs every step on the CPU and reports them, writes only under its folder; the
step runner records failures and timeouts and goes on."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)

SMOKE = ["at", "trades", "mart", "awp", *gc.METHODS]
RAN = {"machine", "data", "ckpt", "evaluate", "flatness", "ddp", "bench_fp32", "bench_amp_cl", "epoch_resnet18_fp32",
       "epoch_resnet18_bf16_cl", "epoch_wrn_bf16_cl", "epoch_wrn_fp32", *[f"smoke_amp_{n}" for n in SMOKE]}
COMPILE = {"bench_compile", "epoch_resnet18_bf16_cl_compile", *[f"smoke_compile_{n}" for n in SMOKE]}


def repo_files():
    return {p for p in ROOT.rglob("*") if p.is_file() and not {".git", "__pycache__", ".pytest_cache"} & set(p.parts)}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run (~35 s on 2 cores), from an empty working directory, with TMPDIR and the image cache pointing
    at empty folders outside its report folder: what lands there or in the repository was written outside it."""
    base = tmp_path_factory.mktemp("gpu_check")
    cwd, outer_tmp, outer_cache, out, export = (base / n for n in ("cwd", "tmp", "cache", "out", "export"))
    for d in (cwd, outer_tmp, outer_cache):
        d.mkdir()
    before = repo_files()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out), "--export", str(export)],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(outer_tmp),
                               "ROBUST_FLATNESS_CACHE": str(outer_cache)})
    print(f"dry run: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    return {"out": out, "export": export, "proc": proc, "report": (out / "gpu_check_report.md").read_text(),
            "summary": summary, "steps": {s["name"]: s for s in summary["steps"]},
            "stray": [*cwd.iterdir(), *outer_tmp.iterdir(), *outer_cache.iterdir(), *(repo_files() - before)]}


def test_dry_run_runs_every_step_and_skips_only_compile(dry):
    status = {n: s["status"] for n, s in dry["steps"].items()}
    assert {n for n, st in status.items() if st == "ok"} == RAN
    assert {n for n, st in status.items() if st == "skipped"} == COMPILE
    assert all("dry run" in dry["steps"][n]["why"] for n in COMPILE)
    for n in RAN - {"machine"}:  # every step logged its command and its output
        log = Path(dry["steps"][n]["log"]).read_text()
        assert log.startswith("$ python ") and len(log.splitlines()) > 1, n


def test_report_has_every_section_and_is_printed(dry):
    report = dry["report"]
    for section in ("## Machine", "## Steps", "## bench.py", "## Seconds per CIFAR-10 epoch of PGD-7 AT",
                    "## Training scripts: a few steps with --amp and with --compile",
                    "## evaluate.py (AutoAttack) and flatness.py --mode both", "## DDP (torchrun --nproc_per_node=2)",
                    "## Failures"):
        assert f"\n{section}\n" in report, section
    assert report.split("## Failures\n", 1)[1].startswith("\nNone.")
    assert "**Dry run**" in report and "21 ok, 0 failed, 0 timed out, 11 skipped" in report
    assert report in dry["proc"].stdout
    import torch
    assert torch.__version__ in report and dry["summary"]["machine"]["torch"] == torch.__version__


def args_of(out, run):
    return json.loads((out / "runs" / run / "args.json").read_text())


def test_smoke_runs_train_each_script_with_amp(dry):
    out = dry["out"]
    for n in SMOKE:
        args = args_of(out, f"smoke_amp_{n}")
        assert args["amp"] is True and not args["compile"], n
        assert args["method"] == n, n
        assert len((out / "runs" / f"smoke_amp_{n}" / "metrics.jsonl").read_text().splitlines()) == 1
    table = dry["report"].split("## Training scripts", 1)[1].split("\n## ", 1)[0]
    assert table.count("| ok, ") == len(SMOKE) and table.count("| skipped |") == len(SMOKE)
    assert "| train_misc.py --method entropy-sgd | ok, " in table


def test_epoch_times_are_the_later_epochs_extrapolated_to_50k_images(dry):
    out, res = dry["out"], dry["summary"]["results"]["epoch"]
    variants = {"fp32": (False, False), "bf16_cl": (True, True)}
    for name in ("epoch_resnet18_fp32", "epoch_resnet18_bf16_cl", "epoch_wrn_bf16_cl", "epoch_wrn_fp32"):
        args = args_of(out, name)
        assert (args["amp"], args["channels_last"]) == variants[name.split("_", 2)[2]], name
        assert args["arch"] == ("resnet18" if "resnet18" in name else "wrn-10-1")
        rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        batch, steps_per_epoch = args["batch_size"], args["train_subset"] // args["batch_size"]
        per_step = sum(r["train_time_s"] for r in rows[1:]) / ((len(rows) - 1) * steps_per_epoch)
        e = res[name]
        assert len(rows) == 2 and e["timed_steps"] == steps_per_epoch == 2
        assert e["s_per_step"] == pytest.approx(per_step) and e["first_epoch_s"] == rows[0]["train_time_s"]
        assert e["epoch_s"] == pytest.approx(per_step / batch * 50000)
        assert f"**{gc.fmt(e['epoch_s'])}**" in dry["report"]


def test_bench_runs_keep_their_json_and_the_report_compares_them(dry):
    out, report = dry["out"], dry["report"]
    fp32, amp = (json.loads((out / "bench" / f"bench_{r}.json").read_text()) for r in ("fp32", "amp_cl"))
    assert fp32["params"]["amp"] is False and amp["params"]["amp"] is True and amp["params"]["channels_last"] is True
    target = gc.fmt(gc.bench_targets()["floor"][1])
    assert (f"| floor | efficiency | {target} | {gc.fmt(fp32['floor']['efficiency'])} | "
            f"{gc.fmt(amp['floor']['efficiency'])} |") in report
    speed = fp32["floor"]["ours_s"] / amp["floor"]["ours_s"]
    assert f"| floor | ours_s | {gc.fmt(fp32['floor']['ours_s'])} | {gc.fmt(amp['floor']['ours_s'])} ({speed:.2f}×) |" in report


def test_evaluate_and_flatness_results_are_reported(dry):
    ev, fl = dry["summary"]["results"]["eval"], dry["summary"]["results"]["flatness"]
    assert ev["settings"]["autoattack"] == "standard" and ev["autoattack"]["n"] == 10
    assert fl["average"]["n"] == fl["worst"]["n"] == 10
    assert (f"AutoAttack RErr {gc.fmt(ev['autoattack']['rerr'])}" in dry["report"]
            and f"worst-case {gc.fmt(fl['worst']['value'])}" in dry["report"])


def test_ddp_ran_on_two_gloo_processes(dry):
    log = Path(dry["steps"]["ddp"]["log"]).read_text()
    assert "torch.distributed.run" in log and "--nproc_per_node=2" in log
    assert (dry["out"] / "runs" / "ddp" / "ckpt_last.pt").is_file()
    assert "gloo on the CPU (dry run): ok" in dry["report"]


def test_writes_only_under_its_folder_and_exports_at_most_8_files(dry):
    assert dry["stray"] == []
    files = list(dry["export"].iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files)
    assert {"gpu_check_report.md", "gpu_check.json", "bench_fp32.json", "gpu_check_files.tar.gz"} <= {f.name for f in files}
    with tarfile.open(dry["export"] / "gpu_check_files.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/evaluate.log" in names and "runs/epoch_wrn_fp32/metrics.jsonl" in names


# ---- the runner, on steps that fail, hang, depend on a failed step or must overlap
def say_and_exit(code):
    print("line one\nthe last words")
    sys.exit(int(code))


def sleep(seconds):
    time.sleep(float(seconds))


def wait_for(mine, other):
    """Succeeds only if the other step runs at the same time."""
    Path(mine).touch()
    end = time.monotonic() + 10
    while not Path(other).exists():
        assert time.monotonic() < end, "the other step did not start"
        time.sleep(0.05)


def test_runner_records_failures_and_timeouts_and_goes_on(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    steps = [gc.step("fails", "g", ["3"], 30, fn=say_and_exit),
             gc.step("hangs", "g", ["60"], 1, fn=sleep),
             gc.step("after_failure", "g", ["0"], 30, needs=["fails"], fn=say_and_exit),
             gc.step("a", "g", [a, b], 30, parallel=True, fn=wait_for),
             gc.step("b", "g", [b, a], 30, parallel=True, fn=wait_for),
             gc.step("ok", "g", ["0"], 30, needs=["b"], fn=say_and_exit)]
    t0 = time.monotonic()
    gc.run_steps(steps, tmp_path / "logs", time.monotonic() + 120, jobs=2)
    got = {s["name"]: (s["status"], s["rc"]) for s in steps}
    assert got == {"fails": ("FAILED", 3), "hangs": ("TIMEOUT", None), "after_failure": ("skipped", None),
                   "a": ("ok", 0), "b": ("ok", 0), "ok": ("ok", 0)}
    assert time.monotonic() - t0 < 30 and steps[1]["seconds"] < 10  # the hanging step was killed at its timeout
    assert "the last words" in gc.tail(steps[0]["log"])
    args = gc.parse_args(["--dry-run", str(tmp_path)])
    report = gc.report(args, tmp_path, {}, steps, {"bench": {}, "epoch": {}, "eval": None, "flatness": {},
                                                    "epoch_batch": 10}, 1.0, [])
    failures = report.split("## Failures\n", 1)[1]
    assert "### fails: FAILED (exit code 3)" in failures and "the last words" in failures
    assert "### hangs: TIMEOUT, its timeout of 1 s" in failures and "**Failed: fails, hangs**" in report


def test_runner_starts_nothing_once_the_budget_is_spent(tmp_path):
    steps = [gc.step("late", "g", ["0"], 30, fn=say_and_exit)]
    gc.run_steps(steps, tmp_path / "logs", time.monotonic() + 1)
    assert steps[0]["status"] == "not run" and not (tmp_path / "logs" / "late.log").exists()


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="is not empty"):
        gc.main(["--dry-run", str(tmp_path)])
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]


def test_gpu_plan_parses_in_each_script_and_writes_under_its_folder(tmp_path):
    """The GPU commands, which no CPU test runs: each parses with its script's own parser, runs on cuda at the sizes
    the report states, and names no path outside the report folder and the repository."""
    import importlib
    args = gc.parse_args([str(tmp_path)])
    one, two = (gc.plan(args, tmp_path, {"gpu_count": n}) for n in (1, 2))
    assert "1 GPU: DDP with NCCL needs two" in {s["name"]: s for s in one}["ddp"]["skip"]
    steps = {s["name"]: s for s in two}
    assert all(not s["skip"] for s in two) and set(steps) == RAN - {"machine"} | COMPILE
    parsed = {}
    for name, s in steps.items():
        cmd = s["cmd"]
        script, argv = (cmd[4], cmd[5:]) if cmd[0] == "-m" else (cmd[0], cmd[1:])
        assert all(not a.startswith("/") or a.startswith((str(tmp_path), str(ROOT))) for a in cmd), name
        if name != "data":
            parsed[name] = importlib.import_module(Path(script).stem).parse_args(argv)
            assert parsed[name].device == "cuda", name
    assert steps["ddp"]["cmd"][:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for n in SMOKE:
        assert parsed[f"smoke_amp_{n}"].amp and not parsed[f"smoke_amp_{n}"].compile
        assert parsed[f"smoke_compile_{n}"].compile and not parsed[f"smoke_compile_{n}"].amp
        assert parsed[f"smoke_amp_{n}"].method == parsed[f"smoke_compile_{n}"].method == n
    ev, fl = parsed["evaluate"], parsed["flatness"]
    assert ev.n_eval == fl.n_eval == 500 and not ev.no_autoattack and ev.aa_version == "standard"
    assert (ev.restarts, ev.steps, fl.mode, fl.samples, fl.restarts, fl.passes) == (10, 20, "both", 10, 10, 20)
    for run, flags in (("fp32", (False, False, False)), ("amp_cl", (True, True, False)), ("compile", (True, True, True))):
        b = parsed[f"bench_{run}"]
        assert (b.amp, b.channels_last, b.compile, b.wrn, b.width) == (*flags, "wrn-34-10", 64)
    assert set(parsed["bench_fp32"].rows) == set(importlib.import_module("bench").ROWS)
    for name, (arch, amp, compiled) in {"epoch_resnet18_fp32": ("resnet18", False, False),
                                        "epoch_resnet18_bf16_cl": ("resnet18", True, False),
                                        "epoch_resnet18_bf16_cl_compile": ("resnet18", True, True),
                                        "epoch_wrn_bf16_cl": ("wrn-34-10", True, False),
                                        "epoch_wrn_fp32": ("wrn-34-10", False, False)}.items():
        e = parsed[name]
        assert (e.arch, e.amp, e.channels_last, e.compile, e.batch_size, e.attack_steps) == (arch, amp, amp, compiled, 128, 7)
        assert e.width == 64 or arch != "resnet18"
        assert e.epochs >= 3 and (e.epochs - 1) * (e.train_subset // 128) >= 80  # the timed steps


def fake_wheel(path):
    import zipfile
    info = "pyautoattack-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pyautoattack/__init__.py", "")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: pyautoattack\nVersion: 0.0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_autoattack_comes_from_a_carried_wheel_into_the_report_folder(tmp_path, monkeypatch):
    """The device image has no pyautoattack: a wheel in .whl/ is installed under REPORT_DIR/site and put on the path
    of the steps; without one the report says that AutoAttack will fail."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("pyautoattack", "autoattack")
                        else real(name, *a))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(gc, "ROOT", tmp_path / "repo")
    (tmp_path / "repo" / ".whl").mkdir(parents=True)
    assert "will fail" in gc.autoattack_from_wheel(tmp_path / "out")
    fake_wheel(tmp_path / "repo" / ".whl" / "pyautoattack-0.0.1-py3-none-any.whl")
    assert "installed" in gc.autoattack_from_wheel(tmp_path / "out")
    site = tmp_path / "out" / "site"
    assert (site / "pyautoattack" / "__init__.py").is_file()
    assert os.environ["PYTHONPATH"] == f"{site}{os.pathsep}/elsewhere" and sys.path[0] == str(site)
