"""Guardrails around the model under test and its result files (README "evaluate.py", "Result files"): two
checkpoints of one name never share a result file, architecture flags that contradict one of our checkpoints are
an error, a state dict of another known layout names that layout, and an unreadable file says why in one line."""
import json
import pickle
import re
import shutil
import warnings

import pytest
import torch

import common
import evaluate
import flatness
import train_at

QUICK = ["--n-eval", "10", "--n-clean", "20", "--steps", "1", "--restarts", "1", "--no-autoattack", "--device", "cpu"]


def ours(path, seed=0, arch="resnet18", width=8):
    """A checkpoint of this codebase (the keys Run.end_epoch writes) of an untrained network."""
    args = vars(train_at.parse_args(["--arch", arch, "--width", str(width), "--device", "cpu"]))
    torch.manual_seed(seed)
    model = common.build_model(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint(path, model=model.state_dict(), optimizer={}, scheduler={}, epoch=seed, args=args,
                           rng=common.rng_state(), es_best=None, metrics={})
    return path


def one_error_line(run_main, module, *argv):
    code, out, err = run_main(module, *argv)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err.strip()


def wrote(stdout):
    (path,) = re.findall(r"^wrote (.+)$", stdout, re.M)
    return evaluate.Path(path)


# ---------------------------------------------------------------------------------------------
# 1. Result files: two models never share one
# ---------------------------------------------------------------------------------------------
def test_two_checkpoints_of_one_name_into_one_out_folder_keep_both_results(tmp_path, tiny_data, run_main):
    """runs/a/ckpt_last.pt and runs/b/ckpt_last.pt measured with --out shared: two files, each naming its run's
    folder and recording its checkpoint's path from there; the same command again skips, a changed one re-measures."""
    a, b = ours(tmp_path / "runs/a/ckpt_last.pt", 0), ours(tmp_path / "runs/b/ckpt_last.pt", 1)
    shared = tmp_path / "shared"
    shared.mkdir()
    flags = [*QUICK, "--data-dir", tiny_data, "--out", shared]
    code, out_a, _ = run_main(evaluate, a, *flags)
    code_b, out_b, _ = run_main(evaluate, b, *flags)
    assert code == code_b == 0 and "measuring again" not in out_b
    file_a, file_b = wrote(out_a), wrote(out_b)
    assert file_a != file_b and sorted(shared.glob("eval_*.json")) == sorted([file_a, file_b])
    assert file_a.name.startswith("eval_a_last_") and file_b.name.startswith("eval_b_last_")
    ra, rb = json.loads(file_a.read_text()), json.loads(file_b.read_text())
    assert (ra["settings"]["checkpoint"], rb["settings"]["checkpoint"]) == ("../runs/a/ckpt_last.pt",
                                                                            "../runs/b/ckpt_last.pt")
    assert (ra["checkpoint_sha256"], rb["checkpoint_sha256"]) == (evaluate.file_sha256(a), evaluate.file_sha256(b))
    assert ra["clean"]["loss"] != rb["clean"]["loss"]  # two networks, each its own numbers
    assert run_main(evaluate, a, *flags)[1] == f"done: {file_a} (same settings; --force re-measures)\n"
    ours(a, 2)  # run a resumed: its ckpt_last.pt changed
    out = run_main(evaluate, a, *flags)[1]
    assert out.startswith("measuring again: ../runs/a/ckpt_last.pt changed") and wrote(out) == file_a
    assert json.loads(file_b.read_text()) == rb  # b's result untouched


def test_result_beside_its_checkpoint_keeps_its_short_name_and_survives_a_move(tmp_path, tiny_data, run_main):
    """--out naming the checkpoint's own folder is the default: eval_last_<hash>.json recording the file name only,
    so a moved run folder finds its result (`done:`)."""
    ckpt = ours(tmp_path / "run/ckpt_last.pt")
    code, out, _ = run_main(evaluate, ckpt, *QUICK, "--data-dir", tiny_data)
    path = wrote(out)
    result = json.loads(path.read_text())
    assert code == 0 and path == ckpt.parent / f"eval_last_{result['settings_hash']}.json"
    assert result["settings"]["checkpoint"] == "ckpt_last.pt"
    assert run_main(evaluate, ckpt, *QUICK, "--data-dir", tiny_data, "--out", ckpt.parent / ".")[1].startswith("done:")
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(ckpt.parent, moved)
    out = run_main(evaluate, moved / "ckpt_last.pt", *QUICK, "--data-dir", tiny_data)[1]
    assert out == f"done: {moved / path.name} (same settings; --force re-measures)\n"


def test_flatness_result_names_follow_the_same_rule(tmp_path):
    """flatness.py names its files by the same functions: beside the checkpoint a short name; two checkpoints of one
    name measured into one folder (as with an --out) two names."""
    info = {"source": "ours", "args": {}}

    def path(checkpoint, out=None):
        args = flatness.parse_args([str(checkpoint), "--mode", "worst"])
        args.data_dir, args.out = "/data", out
        return evaluate.result_path(evaluate.result_folder(args), flatness.flatness_settings(args, info, "worst")[0])

    a, b = tmp_path / "runs/a/ckpt_last.pt", tmp_path / "runs/b/ckpt_last.pt"
    assert path(a).parent == a.parent and re.fullmatch(r"flatness_worst_last_[0-9a-f]{8}\.json", path(a).name)
    assert path(a).name == path(b).name  # beside each checkpoint: the same short name, in two folders
    shared = tmp_path / "shared"
    assert path(a, shared) != path(b, shared) and path(a, shared).parent == shared
    assert path(a, shared).name.startswith("flatness_worst_a_last_")


# ---------------------------------------------------------------------------------------------
# 2. Architecture flags with one of our checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [["--arch", "wrn-10-1"], ["--arch", "preact-resnet18"], ["--arch-width", "16"],
                                  ["--arch-act", "silu"], ["--normalization", "none"]])
def test_a_flag_that_contradicts_our_checkpoint_is_an_error(tmp_path, flag):
    ckpt = ours(tmp_path / "ckpt_last.pt")
    with pytest.raises(common.UsageError) as e:
        evaluate.load_model(evaluate.parse_args([str(ckpt), *flag]), "cpu")
    assert str(e.value) == (f"{ckpt} is a checkpoint of this codebase, trained with --arch resnet18 --width 8 --act "
                            f"relu, the input normaliser inside (its args); drop {' '.join(flag)}: the --arch flags "
                            "and --normalization are for external state dicts")


def test_agreeing_flags_load_and_contradictions_stop_both_tools(tmp_path, run_main):
    ckpt = ours(tmp_path / "ckpt_last.pt", arch="wrn-10-1")
    model, info = evaluate.load_model(evaluate.parse_args(
        [str(ckpt), "--arch", "wrn-10-1", "--arch-width", "1", "--arch-act", "relu", "--normalization", "auto"]), "cpu")
    assert isinstance(model, common.WideResNet) and info["source"] == "ours"
    for module in (evaluate, flatness):
        err = one_error_line(run_main, module, ckpt, "--arch", "resnet18", "--device", "cpu")
        assert "trained with --arch wrn-10-1 --act relu" in err and "drop --arch resnet18" in err


# ---------------------------------------------------------------------------------------------
# 3. A state dict of another known layout names it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,width,expect", [("resnet18", 4, "resnet18"), ("preact-resnet18", 8, "preact-resnet18"),
                                               ("wrn-10-1", 64, "wrn-10-1"), ("wrn-16-2", 64, "wrn-16-2"),
                                               ("wrn-22-3", 64, "wrn-22-3")])
def test_state_dict_arch_reads_depth_and_width_from_the_keys(arch, width, expect):
    for sub_block1 in (False, True):
        model = common.build_model({"arch": arch, "width": width, "act": "relu"}, sub_block1=sub_block1)
        found = evaluate.state_dict_arch(model.state_dict())
        assert found == {"arch": expect, "width": int(expect.split("-")[2]) if expect.startswith("wrn") else width,
                         "classes": 10}
    deeper = {**model.state_dict(), "layer1.2.conv1.weight": torch.zeros(1)}  # a ResNet-34-like stage: not ours
    assert evaluate.state_dict_arch(deeper if arch == "resnet18" else {"linear.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize("saved,flags,message", [
    ({"arch": "preact-resnet18", "width": 8}, [],
     "its keys are a preact-resnet18 of width 8 with 10 classes, the model built is a resnet18 of width 64 with 10 "
     "classes; give --arch preact-resnet18 --arch-width 8 ("),
    ({"arch": "wrn-16-2"}, ["--arch-width", "8"],
     "its keys are a wrn-16-2 with 10 classes, the model built is a resnet18 of width 8 with 10 classes; give --arch "
     "wrn-16-2 ("),
    ({"arch": "resnet18", "width": 8}, ["--arch", "wrn-10-1"],
     "its keys are a resnet18 of width 8 with 10 classes, the model built is a wrn-10-1 with 10 classes; give --arch "
     "resnet18 --arch-width 8 ("),
    ({"arch": "preact-resnet18", "width": 8}, ["--arch", "preact-resnet18"],
     "its keys are a preact-resnet18 of width 8 with 10 classes, the model built is a preact-resnet18 of width 64 "
     "with 10 classes; give --arch preact-resnet18 --arch-width 8 ("),
    ({"arch": "wrn-10-2"}, ["--arch", "wrn-16-2"], "its keys are a wrn-10-2 with 10 classes, the model built is a "
     "wrn-16-2 with 10 classes; give --arch wrn-10-2 ("),
    ({"arch": "resnet18", "width": 8, "dataset": "cifar100"}, ["--arch-width", "8"],
     "shape mismatch linear.bias, linear.weight; try the --dataset it was trained on (its head has 100 classes, the "
     "model's 10)"),
])
def test_a_state_dict_of_another_layout_names_it(tmp_path, saved, flags, message):
    torch.manual_seed(0)
    path = tmp_path / "external.pth"
    model = common.build_model({"act": "relu", "width": 64, **saved}, normalize=False)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(common.UsageError) as e:
        evaluate.load_model(evaluate.parse_args([str(path), *flags]), "cpu")
    assert str(e.value).startswith("checkpoint does not fit the model: " + message), str(e.value)
    assert "--width" not in str(e.value)


def test_layout_mismatch_is_one_line_on_the_command_line(tmp_path, run_main):
    path = tmp_path / "preact.pth"
    torch.save(common.build_model({"arch": "preact-resnet18", "width": 4, "act": "relu"}, normalize=False).state_dict(),
               path)
    err = one_error_line(run_main, evaluate, path, "--arch", "resnet18", "--device", "cpu")
    assert "give --arch preact-resnet18 --arch-width 4 (missing bn1.bias" in err


# ---------------------------------------------------------------------------------------------
# 4. Unreadable files: why, in whole sentences, with the path and what to do
# ---------------------------------------------------------------------------------------------
AGAIN = "copy or download it again, or use another checkpoint of the run (ckpt_best.pt, ckpt_epoch*.pt)"


def damaged_files(folder):
    """{name: (bytes, the message after the path)} of files that are no readable checkpoint."""
    good = folder / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    zipped = good.read_bytes()
    torch.save({"w": torch.arange(1000.0)}, good, _use_new_zipfile_serialization=False)
    legacy = good.read_bytes()
    torch.save(torch.nn.Linear(2, 2), good)
    module = good.read_bytes()
    corrupt = bytearray(zipped)
    corrupt[200:260] = bytes(60)
    import io
    import zipfile
    other_zip = io.BytesIO()
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("notes.txt", "hello")
    not_torch = "is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy format); check the path"
    return {
        "garbage.pt": (bytes(range(101, 256)) * 20, not_torch),
        "text.pt": (b"not a checkpoint\n", not_torch),
        "plain.pkl": (pickle.dumps({"w": [1, 2]}, protocol=4), not_torch),
        "notes.zip": (other_zip.getvalue(), not_torch),
        "empty.pt": (b"", "is empty (an interrupted save, copy or download?); " + AGAIN),
        "truncated.pt": (zipped[:len(zipped) // 2], "is truncated (an interrupted save, copy or download?); " + AGAIN),
        "legacy_truncated.pt": (legacy[:len(legacy) // 2], "is truncated (an interrupted save, copy or download?); "
                                + AGAIN),
        "legacy_cut_short.pt": (legacy[:40], "is truncated (an interrupted save, copy or download?); " + AGAIN),
        "corrupt.pt": (bytes(corrupt), "is corrupt (torch.save's archive is damaged inside: a failed copy or "
                       "download?); " + AGAIN),
        "model.pt": (module, "holds a pickled torch.nn.modules.linear.Linear, not only tensors (a whole model saved "
                     "with torch.save(model)?), which torch.load(weights_only=True) does not execute; save its "
                     "state_dict() and pass that file"),
    }


def test_unreadable_files_say_why(tmp_path):
    for name, (data, message) in damaged_files(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(common.UsageError) as e:
            evaluate.load_checkpoint(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name} {message}", name


def test_garbage_is_one_error_line_and_other_pickle_protocols_warn_nothing(tmp_path, run_main):
    (tmp_path / "garbage.pt").write_bytes(bytes(range(101, 256)) * 20)
    err = one_error_line(run_main, evaluate, tmp_path / "garbage.pt", "--device", "cpu")
    assert err == f"error: {tmp_path / 'garbage.pt'} is not a PyTorch checkpoint (neither torch.save's zip format " \
                  "nor its legacy format); check the path"
    for protocol in (3, 4):  # torch warns about both (a line on stderr): 3 loads, 4 weights_only cannot read
        torch.save({"w": torch.ones(2)}, tmp_path / "p.pt", pickle_protocol=protocol)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if protocol == 3:
                assert torch.equal(evaluate.load_checkpoint(tmp_path / "p.pt")["w"], torch.ones(2))
                continue
            with pytest.raises(common.UsageError) as e:
                evaluate.load_checkpoint(tmp_path / "p.pt")
        assert re.fullmatch(re.escape(f"{tmp_path / 'p.pt'} holds data that torch.load(weights_only=True) refuses (")
                            + r"[^;\n]+" + re.escape("; e.g. saved with pickle_protocol=4); if you trust the file, load "
                                                     "it with weights_only=False and save it again"), str(e.value))


def test_a_file_that_cannot_be_opened_says_so(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpt_last.pt")

    def denied(*args, **kwargs):  # (the suite may run as root, which any file lets read)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(common.UsageError) as e:
        evaluate.load_checkpoint(tmp_path / "ckpt_last.pt")
    assert str(e.value) == f"{tmp_path / 'ckpt_last.pt'} cannot be read (Permission denied)"
