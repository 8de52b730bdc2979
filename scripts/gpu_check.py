"""The GPU check: what a session lent a GPU runs in one call, about 10 minutes with no internet and no data set, to
measure what docs/speed.md, the README and the train_*.py headers still lack on a GPU and to check that every script
runs there. It writes one markdown report (docs/gpu_check.md says where each number goes).

Measured, each step in its own process with its own timeout (a failure stops nothing else):
  bench.py on cuda: fp32; --amp --channels-last; --amp --channels-last --compile (each run's JSON kept, ratios
    side by side); seconds per CIFAR-10 epoch of PGD-7 AT for ResNet-18 and WRN-34-10 (train_at.py on a generated
    set, the epochs after the first timed, extrapolated to 50,000 images); a few steps of every training script
    (train_misc.py with each --method) with --amp and with --compile; evaluate.py with AutoAttack and
    flatness.py --mode both on 500 images of a checkpoint trained here; DDP with NCCL on two processes when
    there are two GPUs.

Usage:  bash scripts/gpu_check.sh REPORT_DIR              # GPU: at most 7.5 min (--budget 450 s) + start-up
        bash scripts/gpu_check.sh --dry-run REPORT_DIR    # every step at tiny sizes on the CPU: ~35 s on 2 cores
Not yet run on a GPU: the sizes below are estimates for an H100; the budget stops what does not fit, and the report
says which steps it cut.
Everything is written under REPORT_DIR (default runs/gpu_check): gpu_check_report.md (also printed),
gpu_check.json, logs/<step>.log, bench/*.json, runs/<step>/, data/, and the caches (decoded images, Inductor,
Triton, temporary files). --export DIR copies the report and the results into DIR as at most 8 files (a device
call's $OUT).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("rotation", "unlabeled", "entropy-sgd", "pgd-tau", "autoaugment")  # train_misc.py --method
EPOCH_IMAGES = 50000  # a CIFAR-10 training epoch

## Sizes. GPU: what fits the ~8 minutes of one call on an H100; dry run: the smallest that runs every step on a CPU.
SIZES = {
    "gpu": dict(
        train_per_class=1024, test_per_class=100, unlabeled=1280,  # 10,240 train + 1,000 test images
        smoke=["--width", "16", "--batch-size", "64", "--train-subset", "256", "--epochs", "1", "--n-log", "64",
               "--n-early-stop", "64", "--es-restarts", "1"],  # 4 steps
        ckpt=["--width", "16", "--batch-size", "128", "--epochs", "2", "--n-log", "500", "--n-early-stop", "500",
              "--es-restarts", "1"],  # ResNet-18 of width 16, 160 steps
        evaluate=["--n-eval", "500", "--n-clean", "1000"],  # PGD-20 × 10 and AutoAttack (standard): the defaults
        flatness=["--n-eval", "500"],  # the paper's draws, restarts and passes: the defaults
        bench=["--wrn", "wrn-34-10"],
        bench_rows={"fp32": None, "amp_cl": "all but data", "compile": "at_step,floor"},  # the data row is the
        # same in every run; compile changes the AT rows only (bench.py compiles no flatness or memory row)
        # (arch flags, --train-subset, --epochs): every epoch after the first is timed
        epoch={"resnet18": (["--arch", "resnet18", "--width", "64"], 10240, 4),  # 240 timed steps
               "wrn": (["--arch", "wrn-34-10"], 5120, 3)},  # 80 timed steps
        epoch_batch=128,
        ddp=["--width", "16", "--batch-size", "128", "--train-subset", "1280", "--epochs", "1", "--n-log", "128",
             "--n-early-stop", "128", "--es-restarts", "1"],
        budget=450, jobs=4),
    "dry": dict(
        train_per_class=10, test_per_class=10, unlabeled=20,
        smoke=["--width", "8", "--batch-size", "10", "--train-subset", "20", "--epochs", "1", "--n-log", "10",
               "--n-early-stop", "10", "--es-restarts", "1"],
        ckpt=["--width", "8", "--batch-size", "10", "--train-subset", "20", "--epochs", "1", "--n-log", "10",
              "--n-early-stop", "10", "--es-restarts", "1"],
        evaluate=["--n-eval", "10", "--n-clean", "100", "--restarts", "1", "--steps", "2"],
        flatness=["--n-eval", "10", "--samples", "1", "--restarts", "1", "--passes", "1", "--ref-restarts", "1",
                  "--steps", "2"],
        bench=["--width", "8", "--wrn", "wrn-10-1", "--batch-size", "4", "--repeats", "1", "--steps", "1"],
        bench_rows={"fp32": "floor", "amp_cl": "floor", "compile": "floor"},
        epoch={"resnet18": (["--arch", "resnet18", "--width", "8"], 20, 2),
               "wrn": (["--arch", "wrn-10-1"], 20, 2)},  # the WRN of CPU tests stands in for WRN-34-10
        epoch_batch=10,
        ddp=["--width", "8", "--batch-size", "10", "--train-subset", "20", "--epochs", "1", "--n-log", "10",
             "--n-early-stop", "10", "--es-restarts", "1"],
        budget=240, jobs=2),
}
BENCH_RUNS = {"fp32": [], "amp_cl": ["--amp", "--channels-last"], "compile": ["--amp", "--channels-last", "--compile"]}
BENCH_NAMES = {"fp32": "fp32", "amp_cl": "bf16 + channels_last", "compile": "bf16 + channels_last + compile"}
EPOCH_VARIANTS = {"fp32": [], "bf16_cl": ["--amp", "--channels-last"],
                  "bf16_cl_compile": ["--amp", "--channels-last", "--compile"]}
TIMEOUTS = {"machine": 60, "data": 120, "smoke": 150, "smoke_compile": 300, "ckpt": 120, "evaluate": 240,
            "flatness": 180, "bench": 240, "bench_compile": 300, "epoch": 150, "epoch_compile": 240, "epoch_wrn": 200,
            "ddp": 180}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", nargs="?", default="runs/gpu_check", help="report folder; every step writes under it")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (no --compile, "
                   "DDP with gloo): checks the commands, measures nothing")
    p.add_argument("--budget", type=float, default=None, help="seconds after which no step starts and running ones "
                   "are stopped (default: 450 on a GPU, 240 in a dry run)")
    p.add_argument("--jobs", type=int, default=None, help="smoke runs at a time (default: 4 on a GPU, 2 in a dry run); "
                   "the timed steps always run alone")
    p.add_argument("--only", default="", help="comma-separated groups to run (machine and data always run): "
                   "smoke, checkpoint, bench, epoch, compile, ddp")
    p.add_argument("--exec", action="store_true", help="start every step as a fresh `python script.py` instead of "
                   "forking this process, which has imported torch and the scripts (saves ~3 s a step)")
    p.add_argument("--list", action="store_true", help="print the planned steps (on a GPU machine: as if it had one "
                   "GPU) and exit; runs nothing, writes nothing")
    p.add_argument("--export", default=None, help="also copy the report and the results into this folder "
                   "(at most 8 files: a device call's $OUT)")
    args = p.parse_args(argv)
    size = SIZES["dry" if args.dry_run else "gpu"]
    args.budget = size["budget"] if args.budget is None else args.budget
    args.jobs = max(1, size["jobs"] if args.jobs is None else args.jobs)
    args.only = {g for g in args.only.split(",") if g}
    return args


# ------------------------------------------------------------------------------------------------------------------
# The plan: every step, in the order that puts what matters most first (a step the budget cuts is reported)
# ------------------------------------------------------------------------------------------------------------------
def step(name, group, cmd, timeout, parallel=False, needs=(), skip=None, fn=None):
    """cmd: [script, args...] run as `python script args` (forked or exec'd), or ["-m", module, ...] always exec'd;
    fn: a function of this file called in a forked child instead."""
    return {"name": name, "group": group, "cmd": [str(c) for c in cmd], "timeout": timeout, "parallel": parallel,
            "needs": list(needs), "skip": skip, "fn": fn}


def plan(args, out, machine):
    dry, size = args.dry_run, SIZES["dry" if args.dry_run else "gpu"]
    gpus = 0 if dry else machine.get("gpu_count", 0)
    device = ["--device", "cpu" if dry else "cuda"]
    data, runs = out / "data", out / "runs"
    no_compile = "dry run: --compile is not run on the CPU (it compiles for minutes there)" if dry else None
    no_gpu = None if dry or gpus else "no GPU visible to torch: run with --dry-run on a CPU"
    steps = [step("data", "data", [ROOT / "scripts/make_fake_cifar.py", data, "--train-per-class",
                                   size["train_per_class"], "--test-per-class", size["test_per_class"],
                                   "--unlabeled", size["unlabeled"]], TIMEOUTS["data"])]

    def train(script, name, extra, flags, timeout, group, parallel=True, skip=None):
        run_dir = runs / name
        return step(name, group, [ROOT / script, "--data-dir", data, *device, *flags, *extra, "--out", run_dir],
                    timeout, parallel, needs=["data"], skip=skip or no_gpu)

    scripts = [("train_at.py", "at", []), ("train_trades.py", "trades", []), ("train_mart.py", "mart", []),
               ("train_awp.py", "awp", [])]
    scripts += [("train_misc.py", m, ["--method", m] + (["--unlabeled-data", data / "unlabeled.npz"]
                                                        if m == "unlabeled" else [])) for m in METHODS]
    # 1. every training script runs a few steps with --amp
    steps += [train(s, f"smoke_amp_{n}", ["--amp", *x], size["smoke"], TIMEOUTS["smoke"], "smoke") for s, n, x in scripts]
    # 2. a checkpoint, then AutoAttack and both flatness measures on 500 of its test images
    ckpt = runs / "ckpt" / "ckpt_last.pt"
    steps.append(train("train_at.py", "ckpt", [], size["ckpt"], TIMEOUTS["ckpt"], "checkpoint", parallel=False))
    steps.append(step("evaluate", "checkpoint", [ROOT / "evaluate.py", ckpt, *device, *size["evaluate"], "--out",
                                                 runs / "ckpt"], TIMEOUTS["evaluate"], needs=["ckpt"], skip=no_gpu))
    steps.append(step("flatness", "checkpoint", [ROOT / "flatness.py", ckpt, "--mode", "both", *device,
                                                 *size["flatness"]], TIMEOUTS["flatness"], needs=["ckpt"], skip=no_gpu))

    # 3. DDP on two processes: NCCL on two GPUs; gloo on the CPU in a dry run (it checks the command)
    ddp_skip = None if dry or gpus >= 2 else (f"{gpus} GPU{'s' if gpus != 1 else ''}: DDP with NCCL needs two "
                                             "(torchrun --nproc_per_node=2); not run")
    steps.append(step("ddp", "ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     ROOT / "train_at.py", "--data-dir", data, *device, *size["ddp"],
                                     "--out", runs / "ddp"], TIMEOUTS["ddp"], needs=["data"], skip=ddp_skip))
    # 4. bench.py: fp32, bf16 + channels_last (then + compile under 6.)
    def bench(run, skip=None):
        rows = size["bench_rows"][run]
        if rows == "all but data":
            import bench as b
            rows = ",".join(r for r in b.ROWS if r != "data")
        cmd = [ROOT / "bench.py", *device, *size["bench"], *BENCH_RUNS[run], *(["--rows", rows] if rows else []),
               "--out", out / "bench" / f"bench_{run}.json"]
        group = "compile" if run == "compile" else "bench"
        return step(f"bench_{run}", group, cmd, TIMEOUTS["bench_compile" if run == "compile" else "bench"],
                    skip=skip or no_gpu)
    steps += [bench("fp32"), bench("amp_cl")]

    # 5. seconds per epoch: train_at.py, the epochs after the first timed (metrics.jsonl's train_time_s)
    def epoch(arch, variant, group="epoch", skip=None):
        flags, subset, epochs = size["epoch"][arch]
        b = size["epoch_batch"]
        timing = ["--train-subset", subset, "--batch-size", b, "--epochs", epochs, "--eval-every", epochs,
                  "--es-every", epochs, "--n-log", b, "--n-early-stop", b, "--es-restarts", "1"]
        timeout = TIMEOUTS["epoch_compile" if "compile" in variant else "epoch_wrn" if arch != "resnet18" else "epoch"]
        return train("train_at.py", f"epoch_{arch}_{variant}", EPOCH_VARIANTS[variant], flags + timing, timeout,
                     group, parallel=False, skip=skip)
    steps += [epoch("resnet18", "fp32"), epoch("resnet18", "bf16_cl"), epoch("wrn", "bf16_cl")]
    # 6. compiled timings: the epoch first (it fills Inductor's cache, which bench.py's compiled rows hit)
    steps += [epoch("resnet18", "bf16_cl_compile", "compile", skip=no_compile), bench("compile", skip=no_compile)]
    # 7. every training script with --compile: the first alone (it fills the cache the others hit)
    steps += [train(s, f"smoke_compile_{n}", ["--compile", *x], size["smoke"], TIMEOUTS["smoke_compile"], "compile",
                    parallel=i > 0, skip=no_compile) for i, (s, n, x) in enumerate(scripts)]
    # 8. last, as the most expensive: WRN-34-10 in fp32
    steps.append(epoch("wrn", "fp32"))
    for s in steps:
        s["parallel"] = s["parallel"] or dry  # a dry run times nothing: any two steps may run side by side
        if args.only and s["group"] not in args.only | {"data"} and not s["skip"]:
            s["skip"] = f"not in --only {','.join(sorted(args.only))}"
    return steps


# ------------------------------------------------------------------------------------------------------------------
# The runner: fork (or exec) each step into its own process group, log to logs/<step>.log, kill at its timeout
# ------------------------------------------------------------------------------------------------------------------
def launch(s, log, use_exec):
    """Start step `s` in a child process (its own session, so a timeout kills all it started); returns the pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # the log, also where sys.stdout was not fd 1 (pytest)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        print("$ " + command_line(s), flush=True)
        if s["fn"] is not None:
            s["fn"](*s["cmd"])
        elif use_exec or s["cmd"][0] == "-m":
            os.execv(sys.executable, [sys.executable, *s["cmd"]])
        else:  # `python script args` without a new interpreter: torch and the scripts are imported already
            sys.argv = list(s["cmd"])
            sys.path[0] = str(Path(s["cmd"][0]).parent)
            runpy.run_path(s["cmd"][0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def kill(pid):
    """SIGTERM to the step's process group, SIGKILL to what is left 5 s later; reaps the step's process."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end, reaped = time.monotonic() + 5, False
    while not reaped and time.monotonic() < end:
        reaped = os.waitpid(pid, os.WNOHANG)[0] != 0
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if not reaped:
        os.waitpid(pid, 0)


def run_steps(steps, logs, deadline, jobs=1, use_exec=False, on_done=None):
    """Run `steps` in order (consecutive parallel ones up to `jobs` at a time); fill each step's status ('ok',
    'FAILED', 'TIMEOUT', 'skipped', 'not run'), rc, seconds and log. Nothing stops the steps after a failure."""
    logs.mkdir(parents=True, exist_ok=True)
    status = {}
    running = {}  # pid → (step, start, kill time, cut by the budget)
    queue = list(steps)

    def finish(s, st, rc=None, seconds=None, why=None):
        s.update(status=st, rc=rc, seconds=seconds, why=why)
        status[s["name"]] = st
        if on_done:
            on_done(s)

    try:
        while queue or running:
            while queue and (not running or (queue[0]["parallel"] and all(r[0]["parallel"] for r in running.values())
                                             and len(running) < jobs)):
                if any(n not in status for n in queue[0]["needs"]):
                    break  # a step it needs is still running
                s = queue.pop(0)
                unmet = [n for n in s["needs"] if status.get(n) != "ok"]
                left = deadline - time.monotonic()
                if s["skip"]:
                    finish(s, "skipped", why=s["skip"])
                elif unmet:
                    finish(s, "skipped", why=f"needs {', '.join(unmet)}, which did not succeed")
                elif left < 5:
                    finish(s, "not run", why="the time budget (--budget) was spent")
                else:
                    s["log"], now = str(logs / f"{s['name']}.log"), time.monotonic()
                    running[launch(s, s["log"], use_exec)] = (s, now, now + min(s["timeout"], left), left < s["timeout"])
            time.sleep(0.05)
            for pid, (s, t0, t_kill, budget_cut) in list(running.items()):
                done, wstatus = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(wstatus)
                    del running[pid]
                    finish(s, "ok" if rc == 0 else "FAILED", rc, time.monotonic() - t0)
                elif time.monotonic() > t_kill:
                    kill(pid)
                    del running[pid]
                    why = "stopped at the time budget (--budget)" if budget_cut else f"its timeout of {s['timeout']} s"
                    finish(s, "TIMEOUT", None, time.monotonic() - t0, why)
    except BaseException:  # Ctrl-C: the steps run in their own sessions, so they would outlive this process
        for pid in running:
            kill(pid)
        raise
    return steps


def command_line(s, out=None):
    """The step as a command to paste from the repository root (with R=<report folder> when `out` is given)."""
    if s["fn"] is not None:
        return f"{s['fn'].__name__}({', '.join(s['cmd'])})"
    words = [c.replace(str(ROOT) + "/", "") for c in s["cmd"]]
    if out is not None:
        words = [w.replace(str(out), "$R") for w in words]
    return " ".join(["python", *[w if w.startswith("$R") and shlex.quote(w[2:]) == w[2:] else shlex.quote(w)
                                 for w in words]])


# ------------------------------------------------------------------------------------------------------------------
# The machine (in a child: this process never touches CUDA, so that its forks can)
# ------------------------------------------------------------------------------------------------------------------
def machine_info(path):
    import importlib.metadata
    import torch
    import torchvision

    def sh(*cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
            return p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    cuda = torch.cuda.is_available()
    gpus = [{"name": torch.cuda.get_device_name(i), "capability": "sm_%d%d" % torch.cuda.get_device_capability(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())] if cuda else []
    code = hashlib.sha256()
    for f in sorted([*ROOT.glob("*.py"), *ROOT.glob("scripts/*")]):
        if f.is_file():
            code.update(f.name.encode() + f.read_bytes())
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": version("numpy"), "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "gpu_count": len(gpus), "gpus": gpus,
            "bf16": torch.cuda.is_bf16_supported() if cuda else None, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "nvidia_smi": sh("nvidia-smi"),
            "nvidia_smi_query": sh("nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                                   "--format=csv,noheader"),
            "git_commit": sh("git", "rev-parse", "HEAD"), "git_modified_files": None if dirty is None else len(dirty.splitlines()),
            "code_sha256": code.hexdigest()[:16],
            "autoattack": next((f"{n} {version(n)}" for n in ("pyautoattack", "autoattack") if version(n)), None)}
    Path(path).write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1))


def autoattack_from_wheel(out):
    """The device image has no pyautoattack: install a wheel carried in .whl/ (docs/gpu_check.md) into out/site."""
    import importlib.util
    if importlib.util.find_spec("pyautoattack") or importlib.util.find_spec("autoattack"):
        return None
    wheels = sorted((ROOT / ".whl").glob("pyautoattack-*.whl"))
    if not wheels:
        return "pyautoattack is not installed and .whl/ holds no wheel of it: evaluate.py's AutoAttack will fail"
    site = out / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), str(wheels[-1])], capture_output=True, text=True)
    if p.returncode != 0:
        return f"installing {wheels[-1].name} failed: {p.stderr.strip()[-300:]}"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return f"pyautoattack installed from .whl/{wheels[-1].name} into {site}"


# ------------------------------------------------------------------------------------------------------------------
# Results: read what the steps wrote
# ------------------------------------------------------------------------------------------------------------------
def read_json(path):
    """The JSON in `path`; None for a missing or unreadable file, or for path None."""
    try:
        return json.loads(Path(path).read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def flag(s, name):
    return s["cmd"][s["cmd"].index(name) + 1]


def epoch_result(s, batch):
    """s per step and the extrapolated s per 50,000-image epoch from a train_at.py run's metrics.jsonl: the epochs
    after the first (cuDNN autotuning, compilation) are timed; an epoch is --train-subset // batch steps."""
    try:
        lines = (Path(flag(s, "--out")) / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return None
    steps_per_epoch = int(flag(s, "--train-subset")) // batch
    timed = [r["train_time_s"] for r in rows[1:]]
    if not timed:
        return None
    per_step = sum(timed) / (len(timed) * steps_per_epoch)
    return {"timed_steps": len(timed) * steps_per_epoch, "timed_s": sum(timed), "s_per_step": per_step,
            "images_per_s": batch / per_step, "epoch_s": per_step / batch * EPOCH_IMAGES,
            "first_epoch_s": rows[0]["train_time_s"], "batch": batch}


def results(steps, out, batch):
    """bench.py's rows per run, the epoch times, evaluate.py's and flatness.py's JSON."""
    res = {"bench": {}, "epoch": {}, "eval": None, "flatness": {}, "epoch_batch": batch}
    for run in BENCH_RUNS:
        j = read_json(out / "bench" / f"bench_{run}.json")
        if j:
            res["bench"][run] = {k: v for k, v in j.items() if isinstance(v, dict) and k not in ("params", "versions")}
    for s in steps:
        if s["name"].startswith("epoch_") and s.get("status") == "ok":
            res["epoch"][s["name"]] = epoch_result(s, batch)
    ckpt_dir = out / "runs" / "ckpt"
    res["eval"] = read_json(max(ckpt_dir.glob("eval_*.json"), default=None))
    for kind in ("average", "worst"):
        res["flatness"][kind] = read_json(max(ckpt_dir.glob(f"flatness_{kind}_*.json"), default=None))
    return res


# ------------------------------------------------------------------------------------------------------------------
# The report: one section per topic
# ------------------------------------------------------------------------------------------------------------------
def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"
    return str(x)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def cell(s):
    """A step's outcome in a table cell."""
    if s is None:
        return "–"
    if s["status"] == "ok":
        return f"ok, {s['seconds']:.1f} s"
    if s["status"] in ("FAILED", "TIMEOUT"):
        return f"**{s['status']}**" + (f" after {s['seconds']:.0f} s" if s.get("seconds") else "")
    return s["status"]


def tail(path, n=20):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def machine_section(machine):
    m = machine.get
    gpus = ", ".join(f"{g['name']} ({g['capability']}, {g['memory_gib']} GiB)" for g in m("gpus", [])) or "none"
    commit = m("git_commit") or "unknown (no .git here: take it from the session that ran this)"
    modified = f", {m('git_modified_files')} tracked files modified" if m("git_modified_files") else ""
    L = ["## Machine", ""] + table(["", ""], [
        ["GPUs", f"{m('gpu_count', 0)}: {gpus}"],
        ["nvidia-smi", fmt(m("nvidia_smi_query")).replace("\n", "; ")],
        ["torch", f"{m('torch')} (CUDA {m('cuda_runtime')}, cuDNN {m('cudnn')}, bf16 {m('bf16')}); "
                  f"torchvision {m('torchvision')}; numpy {m('numpy')}"],
        ["Python, CPUs", f"{m('python')}, {m('cpus')} × {m('cpu')}"],
        ["code", f"git commit {commit}{modified}; sha256 of *.py and scripts/* {m('code_sha256')}"],
        ["AutoAttack", m("autoattack") or "not installed"]])
    return L + (["", "```", m("nvidia_smi"), "```"] if m("nvidia_smi") else [])


def steps_section(steps, out):
    def what(s):
        if s["status"] in ("skipped", "not run"):
            return s["why"]
        return (f"{s['why']}: " if s.get("why") else "") + f"`{command_line(s, out)}`"
    return ["## Steps", ""] + table(
        ["step", "status", "seconds", "command (R = the report folder) or why not run"],
        [[s["name"], s["status"] if s["status"] in ("ok", "skipped") else f"**{s['status']}**",
          "–" if s.get("seconds") is None else f"{s['seconds']:.1f}", what(s)] for s in steps])


BENCH_QUANTITY = {"at_step": "ours_s", "floor": "ours_s", "wrn_floor": "ours_s", "avg_flatness": "sample_s",
                  "worst_flatness": "pass_s", "data": "ours_img_s", "attack_memory": "peak_mb_x1"}  # compared across runs


def bench_targets():
    """bench.TARGETS: row → (its ratio's key, its target), {} if bench.py does not import."""
    try:
        import bench
        return dict(bench.TARGETS)
    except Exception:
        return {}


def bench_section(runs):
    """bench.py's runs side by side: each row's own ratio per run, then the row's time (or images/s, memory) per
    run with the ratio to fp32 (> 1: better than fp32)."""
    L = ["## bench.py", "", "Each run's JSON is kept (`bench/bench_<run>.json`). The first table gives each row's ratio "
         "of two code paths timed side by side in that run (docs/speed.md); the second compares the runs.", ""]
    names = [r for r in BENCH_RUNS if r in runs]
    if not names:
        return L + ["No bench.py run finished."]
    rows = list(dict.fromkeys(row for r in names for row in runs[r]))
    targets = bench_targets()

    def key(row, preferred, fallback):
        first = next(runs[r][row] for r in names if row in runs[r])
        return preferred if preferred in first else next((k for k in first if fallback(k)), None)
    ratio = {row: key(row, targets.get(row, (None,))[0], lambda k: k in ("speedup", "efficiency", "ratio")) for row in rows}
    quantity = {row: key(row, BENCH_QUANTITY.get(row), lambda k: k.endswith("_s")) for row in rows}
    L += table(["row", "ratio", "target"] + [BENCH_NAMES[r] for r in names],
               [[row, ratio[row] or "–", fmt(targets.get(row, (None, None))[1])]
                + [fmt(runs[r].get(row, {}).get(ratio[row])) for r in names] for row in rows])
    L += ["", "Across runs (× = fp32's value / this run's, inverted for images/s: > 1 is better than fp32):", ""]
    base = runs.get("fp32", {})

    def value(r, row):
        v = fmt(runs[r].get(row, {}).get(quantity[row]))
        both = r != "fp32" and row in base and row in runs[r]
        return v + (f" ({versus(base[row], runs[r][row], quantity[row])})" if both else "")
    L += table(["row", "quantity"] + [BENCH_NAMES[r] for r in names],
               [[row, quantity[row] or "–"] + [value(r, row) for r in names] for row in rows])
    return L


def versus(base, other, key):
    a, b = base.get(key), other.get(key)
    if not a or not b:
        return "–"
    return f"{(b / a if key.endswith('img_s') else a / b):.2f}×"


def epoch_section(steps, res):
    L = ["## Seconds per CIFAR-10 epoch of PGD-7 AT", "",
         f"train_at.py on the generated set at batch {res['epoch_batch']}: the epochs after the first are timed (the "
         "first holds cuDNN autotuning and compilation), and the time per step is **extrapolated** to 50,000 images: "
         "not a full epoch.", ""]
    rows = []
    for s in steps:
        if s["name"].startswith("epoch_"):
            e = res["epoch"].get(s["name"])
            arch = flag(s, "--arch") + (f" (width {flag(s, '--width')})" if "--width" in s["cmd"] else "")
            variant = next(v for v in sorted(EPOCH_VARIANTS, key=len, reverse=True) if s["name"].endswith("_" + v))
            rows.append([arch, variant, fmt(e["timed_steps"]) if e else cell(s), fmt(e and e["s_per_step"]),
                         fmt(e and e["images_per_s"], 4), f"**{fmt(e['epoch_s'])}**" if e else "–",
                         fmt(e and e["first_epoch_s"])])
    return L + table(["architecture", "variant", "timed steps", "s / step", "images / s",
                      "s / 50k-image epoch (extrapolated)", "first epoch s"], rows)


def smoke_section(steps):
    by = {s["name"]: s for s in steps}
    names = [s["name"][len("smoke_amp_"):] for s in steps if s["name"].startswith("smoke_amp_")]
    return ["## Training scripts: a few steps with --amp and with --compile", ""] + table(
        ["script", "--amp", "--compile"],
        [[f"train_misc.py --method {n}" if n in METHODS else f"train_{n}.py", cell(by.get(f"smoke_amp_{n}")),
          cell(by.get(f"smoke_compile_{n}"))] for n in names])


def checkpoint_section(steps, res, out):
    by = {s["name"]: s for s in steps}
    ev, fa, fw = res["eval"] or {}, res["flatness"].get("average") or {}, res["flatness"].get("worst") or {}
    pgd, aa, clean = ev.get("pgd", {}), ev.get("autoattack") or {}, ev.get("clean", {})
    ck = by.get("ckpt")
    L = ["## evaluate.py (AutoAttack) and flatness.py --mode both", "",
         f"Checkpoint: `{command_line(ck, out) if ck else '–'}` ({cell(ck)}). Wall seconds include loading; the "
         "measures' own times come from their JSON. AutoAttack's time grows with the points that survive APGD-CE "
         "(on a CIFAR-10 AT model about half do).", ""]
    return L + table(["step", "wall", "measured", "result"], [
        ["evaluate.py", cell(by.get("evaluate")),
         f"PGD {fmt(pgd.get('time_s'))} s, AutoAttack {fmt(aa.get('time_s'))} s",
         f"n={fmt(pgd.get('n'))}: clean err {fmt(clean.get('err'))}, PGD RErr {fmt(pgd.get('rerr'))}, "
         f"AutoAttack RErr {fmt(aa.get('rerr'))}"],
        ["flatness.py", cell(by.get("flatness")),
         f"average {fmt(fa.get('time_s'))} s, worst {fmt(fw.get('time_s'))} s",
         f"n={fmt(fa.get('n'))}: average-case {fmt(fa.get('value'))}, worst-case {fmt(fw.get('value'))} "
         f"(reference RLoss {fmt(fa.get('reference'))})"]])


def ddp_section(steps, out, dry):
    d = next((s for s in steps if s["name"] == "ddp"), None)
    L = ["## DDP (torchrun --nproc_per_node=2)", ""]
    if d and d["status"] == "skipped":
        return L + [f"Skipped: {d['why']}."]
    if d:
        return L + [f"{'gloo on the CPU (dry run)' if dry else 'NCCL on 2 GPUs'}: {cell(d)}; `{command_line(d, out)}`."]
    return L


def failures_section(steps, out):
    L = ["## Failures", ""]
    for s in steps:
        if s["status"] in ("FAILED", "TIMEOUT"):
            L += [f"### {s['name']}: {s['status']}" + (f" (exit code {s['rc']})" if s.get("rc") is not None else "")
                  + (f", {s['why']}" if s.get("why") else ""), "", f"`{command_line(s, out)}`", "",
                  "```", tail(s["log"]), "```", ""]
    return L if len(L) > 2 else L + ["None.", ""]


def report(args, out, machine, steps, res, elapsed, notes):
    counts = {k: sum(s["status"] == k for s in steps) for k in ("ok", "FAILED", "TIMEOUT", "skipped", "not run")}
    bad = [s["name"] for s in steps if s["status"] in ("FAILED", "TIMEOUT")]
    card = machine["gpus"][0]["name"] if machine.get("gpus") else "CPU"
    how = ("start as fresh processes" if args.exec else
           "are forked from a process that imported torch and the scripts, so their times leave out Python start-up")
    L = [f"# GPU check: {card}, {datetime.date.today().isoformat()}", ""]
    if args.dry_run:
        L += ["**Dry run** on the CPU at tiny sizes: every step's command runs, the numbers mean nothing.", ""]
    L += [f"Total {elapsed:.0f} s (budget {args.budget:.0f} s). Steps: {counts['ok']} ok, {counts['FAILED']} failed, "
          f"{counts['TIMEOUT']} timed out, {counts['skipped']} skipped, {counts['not run']} not run (budget)."
          + (f" **Failed: {', '.join(bad)}** (their output under Failures)." if bad else ""),
          f"Every file of this check is under `{out}` (R below); steps {how}.", *[f"Note: {n}" for n in notes if n], ""]
    for section in (machine_section(machine), steps_section(steps, out), bench_section(res["bench"]),
                    epoch_section(steps, res), smoke_section(steps), checkpoint_section(steps, res, out),
                    ddp_section(steps, out, args.dry_run), failures_section(steps, out)):
        L += section + [""]
    L += ["Where these numbers go: docs/gpu_check.md."]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------------------------
def export(out, dest):
    """Copy the report, the summary JSON, the bench JSONs and a tarball of the logs and result files into `dest`
    (at most 8 files, none in a subfolder: what a device call's $OUT brings back)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in [out / "gpu_check_report.md", out / "gpu_check.json", *sorted((out / "bench").glob("bench_*.json"))]:
        if f.is_file():
            shutil.copy(f, dest / f.name)
    with tarfile.open(dest / "gpu_check_files.tar.gz", "w:gz") as tar:
        for f in [*sorted((out / "logs").glob("*.log")), out / "machine.json",
                  *sorted((out / "runs").glob("*/*.json*"))]:
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(out)))


def main(argv=None):
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget
    out = Path(args.out).resolve()
    if args.list:
        sys.path.insert(0, str(ROOT))
        for s in plan(args, out, {"gpu_count": 1}):
            print(f"{s['name']:32s} {s['group']:10s} {s['timeout']:4d} s  " + (f"skipped: {s['skip']}" if s["skip"]
                                                                              else command_line(s, out)))
        return 0
    if out.is_dir() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty; the check writes into a new or empty folder (a run folder that exists "
                 "makes the training scripts refuse)")
    out.mkdir(parents=True, exist_ok=True)
    ## every cache and temporary file of the steps goes under out/
    cache = out / "cache"
    for var, sub in (("ROBUST_FLATNESS_CACHE", "images"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                     ("TRITON_CACHE_DIR", "triton/cache"), ("TRITON_HOME", "triton"), ("CUDA_CACHE_PATH", "nv"),
                     ("XDG_CACHE_HOME", "xdg"), ("MPLCONFIGDIR", "mpl"), ("TMPDIR", "tmp")):
        os.environ[var] = str(cache / sub)
        (cache / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", PIP_NO_CACHE_DIR="1")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a dry run is the CPU's, also on a GPU machine
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny workloads: threads cost more than they give
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() in an import: no CUDA in this process
    sys.dont_write_bytecode = True
    (out / "bench").mkdir()  # bench.py writes its JSON into an existing folder
    notes = [autoattack_from_wheel(out)]

    print(f"gpu_check: {'dry run on the CPU' if args.dry_run else 'GPU'}; everything under {out}; budget {args.budget:.0f} s",
          flush=True)
    ## import once what the forked steps share; importing initialises no CUDA, and this process never does
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401
    if not args.exec:
        for mod in ("torchvision", "torchvision.datasets", "torchvision.transforms", "common", "train_at",
                    "train_trades", "train_mart", "train_awp", "train_misc", "evaluate", "flatness", "bench",
                    "pyautoattack"):
            try:
                __import__(mod)
            except Exception as e:  # the step that needs it fails and says why
                print(f"gpu_check: importing {mod} failed: {e}", file=sys.stderr)
        if torch.cuda.is_initialized():  # a fork would inherit a CUDA context it cannot use
            args.exec = True
            notes.append("an import initialised CUDA, so every step started as a fresh process (--exec)")
    ## the machine first, in a child: the plan depends on the number of GPUs
    m = step("machine", "machine", [out / "machine.json"], TIMEOUTS["machine"], fn=machine_info)
    run_steps([m], out / "logs", deadline)
    machine = read_json(out / "machine.json") or {}

    def progress(s):
        print(f"[{time.monotonic() - t_start:5.0f} s] {s['name']:32s} {s['status']}"
              + (f" in {s['seconds']:.1f} s" if s.get("seconds") is not None else "")
              + (f" ({s['why']})" if s.get("why") else ""), flush=True)
    progress(m)
    steps = [m] + run_steps(plan(args, out, machine), out / "logs", deadline, args.jobs, args.exec, progress)
    res = results(steps, out, SIZES["dry" if args.dry_run else "gpu"]["epoch_batch"])
    elapsed = time.monotonic() - t_start
    text = report(args, out, machine, steps, res, elapsed, notes)
    (out / "gpu_check_report.md").write_text(text)
    summary = {"mode": "dry-run" if args.dry_run else "gpu", "budget_s": args.budget, "elapsed_s": elapsed,
               "machine": machine, "notes": [n for n in notes if n],
               "steps": [{k: v for k, v in s.items() if k != "fn"} for s in steps], "results": res}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.export:
        export(out, Path(args.export))
    print("\n" + text)
    print(f"gpu_check: report {out / 'gpu_check_report.md'}" + (f", exported to {args.export}" if args.export else ""))
    return 0 if all(s["status"] in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
