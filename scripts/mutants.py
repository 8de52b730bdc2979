"""Mutation check of the training wiring: each entry breaks one line of a method (drops the attack,
ignores a flag, flips a comparison) in a scratch copy of the repository and runs the tests that must
then fail. A mutant that leaves them green is a test gap.

Usage:   python scripts/mutants.py                 # every mutant (about 10 minutes on 2 CPU cores)
         python scripts/mutants.py --only ema      # the mutants whose name contains 'ema'
         python scripts/mutants.py --list          # the table, nothing run
Exit code 1 if a mutant survives or no longer applies (its line changed: update the table).
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, exact original text, mutated text, tests that must fail)
MUTANTS = [
    # ---- train_at.py
    ("at-clean-inputs", "train_at.py", "x_adv = adversarial_batch(attack_model, x, y, args)", "x_adv = x",
     "tests/test_wiring.py"),
    ("at-ema-inverted", "train_at.py", "get_ema_multi_avg_fn(args.ema)", "get_ema_multi_avg_fn(1 - args.ema)",
     "tests/test_wiring.py"),
    ("at-es-keeps-worst", "train_at.py", 'es["es_rerr"] < best["es_rerr"]', 'es["es_rerr"] > best["es_rerr"]',
     "tests/test_wiring.py"),
    ("at-es-keeps-last-minimum", "train_at.py", 'es["es_rerr"] < best["es_rerr"]', 'es["es_rerr"] <= best["es_rerr"]',
     "tests/test_wiring.py"),
    # ---- bench.py: row 1 must time the training loop's own step
    ("bench-own-step", "bench.py",
     "common.add_stats(sums, train_at.train_step(net, net, opt, sched, None, x, y, args_at))",
     "common.add_stats(sums, {'n': torch.tensor(float(len(y)))})", "tests/test_bench.py"),
]


def copy_repo(dst):
    """Tracked and untracked-but-not-ignored files of the working tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="run the mutants whose name contains this")
    p.add_argument("--list", action="store_true", help="print the table and exit")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if args.only in m[0]]
    if args.list:
        for name, file, old, new, tests in chosen:
            print(f"{name:32s} {file:16s} {old!r} -> {new!r}  [{tests}]")
        return
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_repo(work)
        for name, file, old, new, tests in chosen:
            path = work / file
            original = path.read_text()
            if original.count(old) != 1:
                print(f"STALE     {name}: {old!r} occurs {original.count(old)} times in {file}")
                failed.append(name)
                continue
            path.write_text(original.replace(old, new))
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                   *tests.split()], cwd=work, capture_output=True, text=True)
            path.write_text(original)
            killed = proc.returncode == 1  # 1: tests failed (2-5: interrupted, usage error, nothing collected)
            print(f"{'killed' if killed else 'SURVIVED':9s} {name} ({time.time() - t0:.0f} s)", flush=True)
            if not killed:
                failed.append(name)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} mutants killed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
