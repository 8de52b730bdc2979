"""A run folder that survives any crash (README "Run folder, early stopping, resume"): a kill at any
moment, then `--resume`, gives the metrics.jsonl and final weights of the uninterrupted run (bit for bit
on CPU), every snapshot, a ckpt_best.pt of the epoch metrics.jsonl calls best, and no temporary file.

The crash sweep covers every write of the reference run (36 crash states in 3 epochs) without re-running
the training up to each crash: a kill leaves on disk exactly what was there when it struck, so the
reference run copies its folder before each write (and, for a write of file contents, once more with
half of its bytes written), and each copy is then resumed in-process. To stay within ~20 s it is
resumed up to its next committed epoch, where the folder must be the reference's at that epoch (from
there on the run is the reference's), and a repaired folder byte-identical to one resumed before is
not trained on again (the rest of the run is a function of the folder). The other tests resume to the
end; two real `kill -9`s in subprocesses check that nothing but the files on disk is involved.
"""
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

import common
import train_at
from conftest import ROOT, TINY, run_script

NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
# 3 epochs of 1 step, a snapshot every epoch, EMA (early stopping checks the EMA model); lr 0.3 and seed 19
# make es_rerr 1.0, 0.9, 0.9: the best epoch is 2, neither the first nor the last, and epoch 3 ties it (the
# first minimum counts)
FLAGS = [*TINY, "--train-subset", "50", "--attack-steps", "1", "--n-log", "10", "--eval-every", "3",
         "--ema", "0.5", "--lr", "0.3", "--seed", "19", "--es-every", "1", "--epochs", "3"]
EPOCHS = 3


class Crash(BaseException):
    """What a kill is to the code under test: nothing catches it (it is no Exception)."""


def flags(data, out, *extra):
    return [*FLAGS, "--data-dir", str(data), "--out", str(out), *map(str, extra)]


def strip(rows):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


def read_metrics(folder):
    return [json.loads(l) for l in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def load(path):
    # weights_only=False only for speed (these are files of our own run; --resume itself loads
    # with weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=False)


def same(a, b):
    """Nested equality with tensors compared bit for bit."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def first_minimum(rows):
    """The early-stopping choice metrics.jsonl implies: the first epoch with the lowest es_rerr."""
    es = [(r["es_rerr"], r["epoch"]) for r in rows if "es_rerr" in r]
    return min(es)[1]


def files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def newest_state(folder):
    """(epoch, file, checkpoint) a resume must continue from: ckpt_last.pt, else the newest readable
    snapshot; (None, None, None) if there is none."""
    folder = Path(folder)
    for p in [folder / "ckpt_last.pt", *sorted(folder.glob("ckpt_epoch*.pt"), reverse=True)]:
        try:
            ckpt = load(p)
        except Exception:
            continue
        return ckpt["epoch"], p.name, ckpt
    return None, None, None


def assert_folder_is_consistent(folder, ckpt):
    """What the folder must be right after a resume repaired it (before training on): a kill now
    must lose nothing, so this is checked independently of the epochs that follow."""
    folder, epoch = Path(folder), ckpt["epoch"]
    assert not list(folder.glob("*.tmp")), files(folder)
    assert read_metrics(folder) == ckpt["history"]
    assert load(folder / "ckpt_last.pt")["epoch"] == epoch
    assert common.snapshot_path(folder, epoch).is_file()
    best = ckpt["es_best"]["epoch"]
    assert best == first_minimum(ckpt["history"])
    assert (folder / "ckpt_best.pt").read_bytes() == common.snapshot_path(folder, best).read_bytes(), \
        f"ckpt_best.pt is not the snapshot of epoch {best}"


def assert_same_as_reference(folder, ref, epoch=EPOCHS):
    """The folder is what the uninterrupted run's was when epoch `epoch` was done: the same files (every
    snapshot, no temporary one), metrics apart from timings, a bit-identical ckpt_last.pt (weights,
    optimiser, schedule, EMA, RNGs), the snapshots' weights, and ckpt_best.pt = the first minimum."""
    folder, there = Path(folder), ref.boundary[epoch]
    assert files(folder) == files(there)
    rows = read_metrics(folder)
    assert strip(rows) == strip(read_metrics(there))
    got, want = load(folder / "ckpt_last.pt"), ref.last[epoch]
    for key in ("model", "optimizer", "scheduler", "ema", "rng", "es_best", "epoch"):
        assert same(got[key], want[key]), key
    assert strip(got["history"]) == strip(want["history"])
    for e in range(1, epoch + 1):
        mine, theirs = common.snapshot_path(folder, e), common.snapshot_path(there, e)
        if mine.read_bytes() != theirs.read_bytes():  # rewritten by the resumed run: the same weights
            snap = load(mine)
            assert snap["epoch"] == e and same(snap["model"], load(theirs)["model"]), mine.name
    best = first_minimum(rows)
    assert got["es_best"]["epoch"] == best
    assert (folder / "ckpt_best.pt").read_bytes() == common.snapshot_path(folder, best).read_bytes(), \
        f"ckpt_best.pt is not the snapshot of epoch {best}"


class Recorder:
    """Wraps every write into the run folder (torch.save, os.replace, shutil.copyfile, Path.write_text)
    and, before it runs, copies the folder as a kill would leave it; writes of file contents also leave
    a copy with half of the bytes written (a torn <name>.tmp)."""

    def __init__(self, out, states):
        self.out, self.states, self.events, self.saved, self.epoch = Path(out), Path(states), [], {}, 1
        self.boundary = {}  # epoch -> the folder as that epoch's writes left it

    def ours(self, path):
        return Path(path).parent == self.out

    def snap(self, what, name, torn=None):
        label = f"{len(self.saved):02d}-e{self.epoch}-{what}-{name}"
        d = self.states / label
        d.mkdir(parents=True)
        if self.out.is_dir():
            for f in self.out.iterdir():
                (d / f.name).write_bytes(f.read_bytes())
        if torn is not None:
            (d / name).write_bytes(torn[: len(torn) // 2])
        self.saved[label] = (self.epoch, d)

    def patch(self, mp):
        real_save, real_replace, real_copy = torch.save, os.replace, shutil.copyfile
        real_write = pathlib.Path.write_text

        def save(obj, f, *a, **k):
            if isinstance(f, (str, Path)) and self.ours(f):
                self.events.append((self.epoch, "save", Path(f).name))
                self.snap("before-save", Path(f).name)
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                self.snap("torn-save", Path(f).name, buf.getvalue())
            return real_save(obj, f, *a, **k)

        def replace(src, dst, *a, **k):
            if self.ours(dst):
                self.events.append((self.epoch, "replace", Path(dst).name))
                self.snap("before-replace", Path(dst).name)
            return real_replace(src, dst, *a, **k)

        def copyfile(src, dst, *a, **k):
            if self.ours(dst):
                self.events.append((self.epoch, "copy", Path(dst).name))
                self.snap("before-copy", Path(dst).name)
                self.snap("torn-copy", Path(dst).name, Path(src).read_bytes())
            return real_copy(src, dst, *a, **k)

        def write_text(path, data, *a, **k):
            if self.ours(path):
                self.events.append((self.epoch, "write", path.name))
                self.snap("before-write", path.name)
                self.snap("torn-write", path.name, data.encode())
            return real_write(path, data, *a, **k)

        real_save_epoch = common.save_epoch

        def save_epoch(state, *a, **k):
            self.epoch = state["epoch"]
            real_save_epoch(state, *a, **k)
            self.boundary[self.epoch] = self.states / f"boundary{self.epoch}"
            shutil.copytree(self.out, self.boundary[self.epoch])
            self.epoch = state["epoch"] + 1

        mp.setattr(torch, "save", save)
        mp.setattr(os, "replace", replace)
        mp.setattr(shutil, "copyfile", copyfile)
        mp.setattr(pathlib.Path, "write_text", write_text)
        mp.setattr(common, "save_epoch", save_epoch)


class Reference:
    pass


@pytest.fixture(scope="module")
def ref(tiny_data, tmp_path_factory):
    """The uninterrupted run, with the folder as a kill would leave it at each of its writes."""
    base = tmp_path_factory.mktemp("reference")
    r = Reference()
    r.data, r.out = tiny_data, base / "run"
    rec = Recorder(r.out, base / "states")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBUST_FLATNESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        rec.patch(mp)
        train_at.main(flags(tiny_data, r.out))
    r.events, r.states, r.boundary = rec.events, rec.saved, rec.boundary
    r.resumed = set()  # fingerprints of repaired folders resumed so far (see the crash sweep)
    r.metrics = read_metrics(r.out)
    r.last = {e: load(d / "ckpt_last.pt") for e, d in r.boundary.items()}
    r.states["final"] = (EPOCHS + 1, r.boundary[EPOCHS])
    return r


def test_reference_run(ref):
    """The flags give what the sweep needs (a best epoch that is neither first nor last, tied later),
    and the writes of each epoch come in the commit order: snapshot, ckpt_best.pt, ckpt_last.pt, metrics."""
    es = [m["es_rerr"] for m in ref.metrics]
    assert len(es) == EPOCHS and es[1] < es[0] and es[2] == es[1], f"pick other flags: es_rerr {es}"
    assert first_minimum(ref.metrics) == 2 == ref.last[EPOCHS]["es_best"]["epoch"]
    assert files(ref.out) == ["args.json", "ckpt_best.pt", "ckpt_epoch001.pt", "ckpt_epoch002.pt",
                              "ckpt_epoch003.pt", "ckpt_last.pt", "metrics.jsonl"]
    assert load(ref.out / "ckpt_best.pt")["epoch"] == 2
    for epoch in range(1, EPOCHS + 1):
        committed = [name for e, kind, name in ref.events if e == epoch and kind == "replace"]
        expected = ["args.json"] * (epoch == 1) + [f"ckpt_epoch{epoch:03d}.pt"] + ["ckpt_best.pt"] * (epoch <= 2) \
            + ["ckpt_last.pt", "metrics.jsonl"]
        assert committed == expected, epoch


def train(ref, folder, *extra, stop_after=None):
    """train_at.main in-process with the reference flags (+ extra), stopped by a Crash right after
    epoch `stop_after` committed (None: to the end)."""
    real_save_epoch = common.save_epoch

    def save_epoch(state, *a, **k):
        real_save_epoch(state, *a, **k)
        if state["epoch"] == stop_after:
            raise Crash

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "save_epoch", save_epoch)
        try:
            train_at.main(flags(ref.data, folder, *extra))
        except Crash:
            pass


class Seen(BaseException):
    """Stops a resume whose repaired folder was resumed before (the rest is a function of the folder)."""


def fingerprint(folder):
    return tuple(sorted((p.name, hashlib.sha1(p.read_bytes()).hexdigest()) for p in Path(folder).iterdir()))


@pytest.mark.parametrize("epoch", range(1, EPOCHS + 1))
def test_crash_at_every_write_then_resume(ref, tmp_path, monkeypatch, capsys, epoch):
    """For each write of this epoch of the reference run: the folder as a kill just before it (or
    half-way through it) left it, then `--resume`. Right after the resume repaired the folder it is
    consistent on its own (a second kill then loses nothing); once the resumed run committed its next
    epoch the folder is the reference's at that epoch, ckpt_last.pt bit-identical (RNG states included),
    so the rest of the run is the reference's and is not run (a crash in the last epoch runs to the
    end). A repaired folder byte-identical to one resumed before is not trained on again."""
    real_restore = common.restore
    repaired = []

    def restore(ckpt, args, *a, **k):
        result = real_restore(ckpt, args, *a, **k)
        assert_folder_is_consistent(args.out, ckpt)
        repaired.append(ckpt["epoch"])
        key = fingerprint(args.out)
        if key in ref.resumed:
            raise Seen
        ref.resumed.add(key)
        return result

    monkeypatch.setattr(common, "restore", restore)
    states = [(label, d) for label, (e, d) in ref.states.items() if e == epoch or (label == "final" and epoch == EPOCHS)]
    assert len(states) >= 10
    for i, (label, state) in enumerate(states):
        work = tmp_path / f"{i:02d}"
        shutil.copytree(state, work)
        committed, source, ckpt = newest_state(work)
        if committed is not None:  # the commit point's promise: what it refers to was written before it
            assert common.snapshot_path(work, committed).is_file(), label
            assert common.snapshot_path(work, ckpt["es_best"]["epoch"]).is_file(), label
        target = min((committed or 0) + 1, EPOCHS)
        repaired.clear()
        capsys.readouterr()
        try:
            try:
                train(ref, work, "--resume", stop_after=target)
                seen = False
            except Seen:
                seen = True
            out, err = capsys.readouterr()
            assert repaired == ([] if committed is None else [committed])
            assert ("resuming from" in err) == (source not in (None, "ckpt_last.pt")), err
            assert ("nothing to resume" in out) == (committed is None)
            assert "torn" not in err, err  # metrics.jsonl is replaced whole: never torn by a kill
            if not seen:
                assert_same_as_reference(work, ref, target)
        except AssertionError as e:
            raise AssertionError(f"crash state {label}: {e}") from e
        shutil.rmtree(work)


# ---------------------------------------------------------------------------------------------
# Real kills
# ---------------------------------------------------------------------------------------------
KILLER = """
import os, shutil, signal, sys
sys.path.insert(0, {root!r})
import common, train_at

def die():
    os.kill(os.getpid(), signal.SIGKILL)

at = os.environ["KILL_AT"]
if at == "epoch 2, inside train_step":  # 1 step per epoch: the 2nd call, after the optimiser step
    step, calls = train_at.train_step, []
    def train_step(*args, **kwargs):
        stats = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            die()
        return stats
    train_at.train_step = train_step
elif at == "half-way through writing ckpt_best.pt":
    copyfile = shutil.copyfile
    def torn_copy(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "ckpt_best.pt.tmp":
            data = open(src, "rb").read()
            with open(dst, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        return copyfile(src, dst, *args, **kwargs)
    shutil.copyfile = torn_copy
common.run_cli(train_at.main)
"""


def test_kill_9_mid_epoch_then_inside_a_checkpoint_write(ref, tmp_path, capsys):
    """SIGKILL inside epoch 2's training step; `--resume`, SIGKILLed again half-way through writing
    ckpt_best.pt (epoch 2 is the best); `--resume` once more: the uninterrupted run's folder."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT)))
    out = tmp_path / "run"
    args = flags(ref.data, out)

    proc = run_script(killer, *args, check=False, env={"KILL_AT": "epoch 2, inside train_step"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert files(out) == ["args.json", "ckpt_best.pt", "ckpt_epoch001.pt", "ckpt_last.pt", "metrics.jsonl"]
    assert [m["epoch"] for m in read_metrics(out)] == [1]

    proc = run_script(killer, *args, "--resume", check=False, env={"KILL_AT": "half-way through writing ckpt_best.pt"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "resumed" in proc.stdout and "epoch   2" not in proc.stdout  # killed before epoch 2 committed
    assert files(out) == ["args.json", "ckpt_best.pt", "ckpt_best.pt.tmp", "ckpt_epoch001.pt", "ckpt_epoch002.pt",
                          "ckpt_last.pt", "metrics.jsonl"]
    assert 0 < (out / "ckpt_best.pt.tmp").stat().st_size < (out / "ckpt_epoch002.pt").stat().st_size

    train(ref, out, "--resume")
    assert "resumed" in capsys.readouterr().out
    assert_same_as_reference(out, ref)


# ---------------------------------------------------------------------------------------------
# --resume without ckpt_last.pt, without any checkpoint, without a run
# ---------------------------------------------------------------------------------------------
def test_resume_without_ckpt_last_uses_the_newest_snapshot(ref, tmp_path, capsys):
    """ckpt_last.pt gone (and the epoch-3 snapshot): resumes from ckpt_epoch002.pt with a warning and
    finishes as the uninterrupted run. In a finished run, --resume has nothing to train but puts a
    missing ckpt_last.pt, or the snapshot of the committed epoch, back."""
    out = tmp_path / "run"
    shutil.copytree(ref.boundary[EPOCHS], out)
    (out / "ckpt_last.pt").unlink()
    (out / "ckpt_epoch003.pt").unlink()
    train(ref, out, "--resume")
    captured = capsys.readouterr()
    assert "resuming from ckpt_epoch002.pt" in captured.err and "resumed" in captured.out
    assert_same_as_reference(out, ref)

    (out / "ckpt_last.pt").unlink()
    train(ref, out, "--resume")
    assert "resuming from ckpt_epoch003.pt" in capsys.readouterr().err
    assert_same_as_reference(out, ref)

    (out / "ckpt_epoch003.pt").unlink()  # the committed epoch's snapshot, deleted by hand: put back
    train(ref, out, "--resume")
    assert_same_as_reference(out, ref)


def run_cli(monkeypatch, argv):
    """train_at.py's command line in-process (common.run_cli): its exit code."""
    monkeypatch.setattr(sys, "argv", ["train_at.py", *argv])
    try:
        common.run_cli(train_at.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code


def contents(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


@pytest.mark.parametrize("how", ["deleted", "unreadable"])
def test_resume_refuses_a_run_without_a_checkpoint(ref, tmp_path, monkeypatch, capsys, how):
    """metrics.jsonl but no readable checkpoint: one error line, exit code 1, the folder untouched
    (never a new run over results)."""
    out = tmp_path / "run"
    shutil.copytree(ref.boundary[2], out)
    for ckpt in out.glob("ckpt_*.pt"):
        if how == "deleted":
            ckpt.unlink()
        else:
            ckpt.write_bytes(ckpt.read_bytes()[:1000])  # torn by a disk failure
    before = contents(out)
    capsys.readouterr()
    assert run_cli(monkeypatch, flags(ref.data, out, "--resume")) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume") and "no readable checkpoint" in lines[0], lines
    assert "epoch" not in captured.out
    assert contents(out) == before


def test_resume_without_a_run_starts_one(ref, tmp_path, capsys):
    """--resume in a folder that does not exist, or is empty: a new run (the reference's, checked
    after its first epoch)."""
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        train(ref, out, "--resume", stop_after=1)
        assert "nothing to resume" in capsys.readouterr().out
        assert_same_as_reference(out, ref, 1)


def test_torn_metrics_line_is_dropped_with_a_warning(ref, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(ref.boundary[2], out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.0, "train_lo')  # a write cut off (e.g. a full disk)
    train(ref, out, "--resume")
    err = capsys.readouterr().err
    assert "warning" in err and "torn" in err and "metrics.jsonl" in err, err
    assert_same_as_reference(out, ref)
    # a finished run resumed: no epoch is left to train, so the folder is what the repair alone made
    done = tmp_path / "done"
    shutil.copytree(ref.boundary[EPOCHS], done)
    with open(done / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "lr"')
    train(ref, done, "--resume")
    assert "torn" in capsys.readouterr().err
    assert (done / "metrics.jsonl").read_bytes() == (ref.boundary[EPOCHS] / "metrics.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------
# A start that fails, a crashed start, an existing run
# ---------------------------------------------------------------------------------------------
def test_a_failed_start_leaves_no_folder(ref, tmp_path, monkeypatch, capsys):
    """Bad data, or a crash inside epoch 1: no folder. Then the same --out without --resume is a new
    run; once it holds results, a run without --resume is refused with the folder untouched."""
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)  # a missing --data-dir must not download CIFAR-10 here
    out = tmp_path / "run"
    argv = flags(ref.data, out)
    argv[argv.index("--data-dir") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(common.UsageError, match="could not find or download CIFAR-10"):
        train_at.main(argv)
    assert not out.exists()

    step = train_at.train_step

    class Kill(BaseException):
        pass

    def killed_in_epoch_1(*a, **k):
        step(*a, **k)
        raise Kill

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_at, "train_step", killed_in_epoch_1)
        with pytest.raises(Kill):
            train(ref, out)
    assert not out.exists()

    train(ref, out, stop_after=1)
    assert_same_as_reference(out, ref, 1)
    before = contents(out)
    capsys.readouterr()
    assert run_cli(monkeypatch, flags(ref.data, out)) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--resume" in lines[0], lines
    assert contents(out) == before


def test_a_new_run_clears_a_crashed_start(ref, tmp_path):
    """A kill inside epoch 1's writes leaves a folder that is not a run (args.json, a torn snapshot
    .tmp); a new run there with other flags (no snapshot in epoch 1) leaves no trace of it."""
    label = next(l for l in ref.states if "torn-save-ckpt_epoch001" in l)
    out = tmp_path / "run"
    shutil.copytree(ref.states[label][1], out)
    assert not common.holds_results(out) and (out / "args.json").is_file()
    train(ref, out, "--es-every", 2, stop_after=1)
    assert files(out) == ["args.json", "ckpt_last.pt", "metrics.jsonl"]
    assert json.loads((out / "args.json").read_text())["es_every"] == 2
