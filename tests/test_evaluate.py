"""evaluate.py: PGD restarts and the correct/incorrect split (invariants), the AutoAttack adapter
(paper version = standard's parameters without Square; the upstream git API), end-to-end runs
on checkpoints of ours and on external state dicts, and one-line errors."""
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import evaluate  # noqa: E402

EPS = 8 / 255
# evaluate.py flags that keep a run to seconds on a CPU (PGD shortened; AutoAttack is the real one)
FAST = ["--n-eval", "40", "--n-clean", "100", "--steps", "3", "--restarts", "2", "--device", "cpu"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCHEMA = {
    "top": {"settings", "settings_hash", "non_default", "checkpoint_sha256", "epoch", "versions", "source",
            "model_args", "clean", "pgd", "autoattack"},
    # README "Result files": which model, then how it was measured
    "settings": {"tool", "mode", "checkpoint", "use_ema", "source", "arch", "data_dir", "dataset", "n_eval", "n_clean", "train",
                 "norm", "epsilon", "attack_step", "steps", "restarts", "batch_size", "seed", "estimator", "autoattack",
                 "aa_attacks"},
    "clean": {"loss", "err", "n"},
    "pgd": {"rloss", "rerr", "rloss_correct", "rloss_incorrect", "n_correct", "n_incorrect", "n"},
    "autoattack": {"rerr", "rerr_any", "n", "max_linf", "max_l2"},
}


def tiny_model(seed=0):
    """An untrained width-8 ResNet-18: a few test images are classified correctly and APGD-CE
    breaks all of them, so AutoAttack finishes in seconds on a CPU."""
    torch.manual_seed(seed)
    return common.ResNet18(width=8).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of ours with the keys Run.end_epoch writes (and EMA weights)."""
    import train_at
    model, ema = tiny_model(0), tiny_model(1)
    args = vars(train_at.parse_args(["--width", "8", "--device", "cpu", "--ema", "0.9975"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path_factory.mktemp("run") / "ckpt_last.pt"
    common.save_checkpoint(path, model=model.state_dict(), optimizer=opt.state_dict(), scheduler={}, epoch=3,
                           args=args, rng=common.rng_state(), es_best=None, metrics={}, ema=ema.state_dict())
    return path


@pytest.fixture(scope="module")
def subset(tiny_data):
    return common.eval_split(tiny_data, "eval", 40, "cpu")


def wrote(stdout):
    """The result file named by the `wrote PATH` line."""
    (path,) = re.findall(r"^wrote (.+)$", stdout, re.M)
    return Path(path)


def check_schema(result, autoattack=True):
    assert SCHEMA["top"] <= set(result)
    assert set(result["settings"]) == SCHEMA["settings"]
    assert result["settings_hash"] == evaluate.settings_hash(result["settings"])
    assert SCHEMA["clean"] <= set(result["clean"])
    for part in [result] + ([result["train"]] if "train" in result else []):
        assert SCHEMA["pgd"] <= set(part["pgd"])
        if autoattack:
            assert SCHEMA["autoattack"] <= set(part["autoattack"])
        else:
            assert part["autoattack"] is None


def check_invariants(part, eps=EPS):
    p, aa = part["pgd"], part["autoattack"]
    assert p["n_correct"] + p["n_incorrect"] == p["n"]
    assert p["rerr"] >= p["clean_err"] - 1e-9            # RErr counts clean errors too
    if aa is not None:
        assert aa["rerr"] >= p["clean_err"] - 1e-9
        assert aa["rerr_any"] >= max(aa["rerr"], p["rerr"]) - 1e-9  # the union of both attacks
        assert aa["max_linf"] <= eps + 1e-6


# ---------------------------------------------------------------------------------------------
# PGD invariants (function calls)
# ---------------------------------------------------------------------------------------------
def test_more_restarts_never_lower_the_loss(subset):
    """pgd draws all restarts' starts in one uniform_ call, so with the same seed restart 1 of
    R = 10 is the run of R = 1 (same start, same steps); the per-example max over restarts can only
    be higher. RErr of either is at least the clean error."""
    model = tiny_model(2)
    x, y = subset[0][:8], subset[1][:8]
    torch.manual_seed(5)
    _, loss_1 = common.pgd(model, x, y, EPS, 0.007, 3, restarts=1)
    torch.manual_seed(5)
    _, loss_4 = common.pgd(model, x, y, EPS, 0.007, 3, restarts=10)
    assert (loss_4 >= loss_1 - 1e-5).all()
    assert loss_4.mean() > loss_1.mean()  # the extra restarts found something for some example


def test_pgd_split_recombines_and_is_reproducible(subset):
    x, y = subset[0][:20], subset[1][:20]
    args = common.threat_defaults(evaluate.parse_args(["x.pt", "--steps", "2", "--restarts", "2", "--seed", "7"]))
    model = tiny_model(0)
    section, clean_ok, robust_ok, _ = evaluate.pgd_metrics(model, x, y, args)
    n_c, n_i = section["n_correct"], section["n_incorrect"]
    assert n_c + n_i == section["n"] == len(y) and n_c == int(clean_ok.sum())
    assert 0 < n_c < len(y)  # both groups present, so the weighted mean is a real check
    total = (section["rloss_correct"] * n_c + section["rloss_incorrect"] * n_i) / section["n"]
    assert total == pytest.approx(section["rloss"], rel=1e-5)
    assert not (robust_ok & ~clean_ok).any()  # robust-correct implies clean-correct
    assert section["rerr"] >= section["clean_err"]
    again, _, _, _ = evaluate.pgd_metrics(model, x, y, args)  # --seed makes it reproducible
    assert again["rloss"] == section["rloss"] and again["rerr"] == section["rerr"]


# ---------------------------------------------------------------------------------------------
# AutoAttack adapter
# ---------------------------------------------------------------------------------------------
def test_paper_version_has_the_standard_parameters_without_square():
    model = tiny_model(0)
    std, _, package = evaluate.make_autoattack(model, EPS, "standard", "cpu", 0)
    paper, _, _ = evaluate.make_autoattack(model, EPS, "paper", "cpu", 0)
    assert package == "pyautoattack"
    assert list(std.attacks_to_run) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(paper.attacks_to_run) == ["apgd-ce", "apgd-t", "fab-t"]
    for attack in ("apgd", "apgd_targeted", "fab"):  # every setting of the three attacks agrees
        settings = [{k: v for k, v in vars(getattr(aa, attack)).items() if not callable(v) and k != "logger"}
                    for aa in (paper, std)]
        assert settings[0] == settings[1], attack
    assert paper.apgd.n_restarts == 1 and paper.apgd_targeted.n_target_classes == 9
    assert paper.fab.n_restarts == 1 and paper.fab.n_target_classes == 9 and paper.apgd.n_iter == 100


def test_adapter_accepts_the_upstream_api(monkeypatch, subset):
    """Without pyautoattack, the adapter uses the git package's API: attacks_to_run=, verbose=,
    run_standard_evaluation(x, y, bs=) returning x_adv alone."""
    from pyautoattack import AutoAttack as PyAA
    calls = {}

    class UpstreamAutoAttack:
        def __init__(self, model, norm="Linf", eps=.3, seed=None, verbose=True, attacks_to_run=[],
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            calls["init"] = dict(verbose=verbose, attacks_to_run=attacks_to_run, version=version)
            self._aa = PyAA(model, norm=norm, eps=eps, seed=seed, version=version, device=device,
                            attacks=attacks_to_run or None)
            self.apgd, self.apgd_targeted, self.fab = self._aa.apgd, self._aa.apgd_targeted, self._aa.fab
            self.attacks_to_run = self._aa.attacks_to_run

        def run_standard_evaluation(self, x, y, bs=250, return_labels=False, state_path=None):
            calls["bs"] = bs
            return self._aa.run_standard_evaluation(x, y, batch_size=bs)[0]

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=UpstreamAutoAttack))
    model = tiny_model(0)
    aa, run, package = evaluate.make_autoattack(model, EPS, "paper", "cpu", 0, verbose=False)
    assert package == "autoattack"
    assert calls["init"] == dict(verbose=False, attacks_to_run=["apgd-ce", "apgd-t", "fab-t"], version="custom")
    assert aa.fab.n_restarts == 1 and aa.apgd.n_restarts == 1
    x, y = subset
    wrong = model(x).argmax(1) != y  # misclassified clean: AutoAttack leaves them as they are
    x_adv = run(x[wrong][:3], y[wrong][:3], 2)
    assert calls["bs"] == 2 and torch.equal(x_adv, x[wrong][:3])


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_end_to_end_standard_autoattack(checkpoint, tiny_data):
    proc = run_script("evaluate.py", checkpoint, *FAST, "--data-dir", tiny_data, env=ONE_THREAD)
    path = wrote(proc.stdout)
    result = json.loads(path.read_text())
    check_schema(result)
    check_invariants(result)
    assert path.parent == checkpoint.parent and path.name == f"eval_last_{result['settings_hash']}.json"
    assert "AutoAttack-standard" in proc.stdout
    assert result["source"] == "ours" and result["epoch"] == 3 and result["model_args"]["width"] == 8
    assert result["clean"]["n"] == 100 and result["pgd"]["n"] == 40 and result["autoattack"]["n"] == 40
    s = result["settings"]
    assert (s["tool"], s["mode"], s["checkpoint"], s["use_ema"], s["data_dir"]) == \
        ("evaluate.py", "eval", "ckpt_last.pt", False, str(tiny_data))
    assert (s["n_eval"], s["n_clean"], s["steps"], s["restarts"], s["attack_step"], s["epsilon"]) == \
        (40, 100, 3, 2, 0.007, EPS)
    assert s["autoattack"] == "standard" and s["aa_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result["non_default"] == ["n_clean", "n_eval", "restarts", "steps"]  # against the paper's protocol
    assert result["checkpoint_sha256"] == evaluate.file_sha256(checkpoint)
    assert result["versions"]["autoattack"].startswith("pyautoattack")
    assert 0 < result["autoattack"]["max_linf"]  # APGD-CE broke the few correct examples


def test_end_to_end_paper_version_train_and_ema(checkpoint, tiny_data, capsys):
    evaluate.main([str(checkpoint), *FAST, "--data-dir", str(tiny_data), "--aa-version", "paper", "--train",
                   "--use-ema"])
    result = json.loads(wrote(capsys.readouterr().out).read_text())
    check_schema(result)
    assert result["settings"]["use_ema"] is True and result["settings"]["train"] is True
    assert result["settings"]["autoattack"] == "paper"
    assert result["settings"]["aa_attacks"] == ["apgd-ce", "apgd-t", "fab-t"]
    assert "train" not in result["non_default"]  # --train adds train images; the protocol is the paper's
    for part in (result, result["train"]):
        check_invariants(part)
        assert part["autoattack"]["n"] == 40
    # the EMA weights (another network, tiny_model(1)) were evaluated, not the model's
    x, y = common.eval_split(tiny_data, "eval", 100, "cpu")
    ema_loss, _ = common.clean_metrics(tiny_model(1), x, y)
    model_loss, _ = common.clean_metrics(tiny_model(0), x, y)
    assert result["clean"]["loss"] == pytest.approx(ema_loss.mean().item(), rel=1e-5)
    assert abs(result["clean"]["loss"] - model_loss.mean().item()) > 1e-3


@pytest.mark.parametrize("wrapped", [False, True])
def test_external_state_dict(tmp_path, tiny_data, wrapped, capsys):
    """kuangliu layout (conv1, bn1, layer1.0.conv1, ..., shortcut.0/1, linear), no normaliser,
    DataParallel 'module.' prefix; raw and as {'state_dict': ...}."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in common.ResNet18(width=8, normalize=False).state_dict().items()}
    assert "module.layer2.0.shortcut.0.weight" in state and "module.linear.weight" in state
    path = tmp_path / "external.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    evaluate.main([str(path), "--arch-width", "8", "--no-autoattack", "--n-eval", "20", "--n-clean", "40",
                   "--steps", "2", "--restarts", "1", "--device", "cpu", "--data-dir", str(tiny_data)])
    path = wrote(capsys.readouterr().out)
    assert path.name.startswith("eval_external_")
    result = json.loads(path.read_text())
    check_schema(result, autoattack=False)
    check_invariants(result)
    assert result["source"] == "external" and result["epoch"] is None
    assert result["model_args"] == result["settings"]["arch"] == {"arch": "resnet18", "width": 8, "act": "relu",
                                                                  "normalization": "none", "dataset": "cifar10"}


# ---------------------------------------------------------------------------------------------
# Result files: named by their settings; the same settings skip, --force replaces
# ---------------------------------------------------------------------------------------------
def test_other_settings_land_beside_same_settings_skip_force_replaces(checkpoint, tiny_data, tmp_path, capsys):
    """README "Result files": a quick measurement with other settings never replaces one (two files); the same
    settings again print one `done:` line and write nothing; --force measures again into the same file; a
    checkpoint that changed since (a resumed run's ckpt_last.pt) is measured again."""
    ckpt = tmp_path / "ckpt_last.pt"
    shutil.copy(checkpoint, ckpt)
    quick = [str(ckpt), "--n-eval", "10", "--n-clean", "20", "--steps", "1", "--restarts", "1", "--no-autoattack",
             "--device", "cpu", "--data-dir", str(tiny_data)]

    def run(*flags):
        evaluate.main(quick + list(flags))
        return capsys.readouterr().out

    first = wrote(run("--restarts", "2"))
    quick_file = wrote(run())
    assert quick_file != first and sorted(tmp_path.glob("eval_*.json")) == sorted([first, quick_file])
    assert json.loads(first.read_text())["settings"]["restarts"] == 2   # the first one is still there
    assert json.loads(quick_file.read_text())["settings"]["restarts"] == 1
    stamp = quick_file.stat().st_mtime_ns

    assert run() == f"done: {quick_file} (same settings; --force re-measures)\n"
    assert quick_file.stat().st_mtime_ns == stamp

    assert wrote(run("--force")) == quick_file
    assert quick_file.stat().st_mtime_ns != stamp and len(list(tmp_path.glob("eval_*.json"))) == 2

    state = evaluate.load_checkpoint(ckpt)
    common.save_checkpoint(ckpt, **{**state, "epoch": 4})  # training went on
    out = run()
    assert out.startswith("measuring again: ckpt_last.pt changed") and wrote(out) == quick_file
    assert json.loads(quick_file.read_text())["epoch"] == 4


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 1
# ---------------------------------------------------------------------------------------------
def test_text_file_is_one_error_line(tmp_path, tiny_data):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint\n")
    proc = run_script("evaluate.py", bad, "--data-dir", tiny_data, "--device", "cpu", check=False, env=ONE_THREAD)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert "notes.pt is not a PyTorch checkpoint" in proc.stderr and proc.stderr.strip().endswith("check the path")


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: evaluate.main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error:") and "\n" not in err
    return err


def test_usage_errors(tmp_path, tiny_data, checkpoint, capsys):
    base = ["--data-dir", str(tiny_data), "--device", "cpu"]
    assert "does not exist" in error_line(capsys, [str(tmp_path / "missing.pt"), *base])
    torch.manual_seed(0)
    width16 = common.ResNet18(width=16, normalize=False).state_dict()
    torch.save(width16, tmp_path / "w16.pt")
    msg = error_line(capsys, [str(tmp_path / "w16.pt"), "--arch-width", "8", *base])
    assert "shape mismatch" in msg
    assert "larger than the test set" in error_line(capsys, [str(checkpoint), "--n-eval", "201", *base])
    assert "--epsilon" in error_line(capsys, [str(checkpoint), "--epsilon=-8/255", *base])
    assert "--use-ema needs a checkpoint" in error_line(capsys, [str(tmp_path / "w16.pt"), "--use-ema", *base])
