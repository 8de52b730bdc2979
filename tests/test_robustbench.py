"""RobustBench checkpoints on disk (README "evaluate.py", "Public robust models"): the entries of
evaluate.ROBUSTBENCH_TABLE load from RobustBench's layout <model-dir>/cifar10/Linf/<name>.pt without the robustbench
package and compute the reference structure's logits (tiny generated checkpoints; the table is swapped for tiny
architectures), those of evaluate.ROBUSTBENCH_L2_TABLE from cifar10/L2/<name>.pt with --norm l2, the tables'
architectures have the public key layout, other entries go through the package where it imports, and every failure
is one error line: a missing file, the package missing or not importing."""
import json
import sys

import pytest
import torch

import common
import evaluate
import flatness
from conftest import run_script
from test_models import RefPreActResNet18, RefWideResNet, randomise_bn

CPU = torch.device("cpu")
TINY_TABLE = {"Tiny2099Unlabeled": ("wrn-10-2", True, None),          # as Carmon2019Unlabeled: sub_block1, [0, 1]
              "Tiny2099Overfitting": ("wrn-10-1", False, evaluate.RB_CIFAR_STATS)}  # as Rice2020Overfitting


TINY_L2_TABLE = {"Tiny2099Overfitting": ("preact-resnet18", False, evaluate.RB_CIFAR_STATS)}  # as the L2 Rice et al.


@pytest.fixture
def tiny_table(monkeypatch):
    monkeypatch.setattr(evaluate, "ROBUSTBENCH_TABLE", TINY_TABLE)
    monkeypatch.setattr(evaluate, "ROBUSTBENCH_L2_TABLE", TINY_L2_TABLE)


def place(model_dir, name, state, norm="linf"):
    """A checkpoint file where RobustBench keeps it."""
    path = evaluate.robustbench_file(model_dir, name, norm)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load(name, model_dir, *flags):
    return evaluate.load_model(evaluate.parse_args(["--robustbench", name, "--model-dir", str(model_dir), *flags]), CPU)


def test_table_entries_load_without_the_package_with_the_reference_logits(tiny_table, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # the package is never needed for these
    torch.manual_seed(0)
    x = torch.rand(5, 3, 32, 32)
    # Carmon et al.'s format: under 'state_dict', DataParallel's module. prefix, the unused sub_block1
    ref = randomise_bn(RefWideResNet(10, 2, sub_block1=True)).eval()
    path = place(tmp_path, "Tiny2099Unlabeled", {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}})
    model, info = load("Tiny2099Unlabeled", tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert (info["source"], info["loader"], info["file"], info["args"]["arch"]) == \
        ("robustbench", "table", str(path), "wrn-10-2")
    assert not model.training

    # a class with its own mean/std in front: from the table where the file has no mu/sigma (Rice et al.)...
    ref = randomise_bn(RefWideResNet(10, 1, sub_block1=False), seed=1).eval()
    place(tmp_path, "Tiny2099Overfitting", ref.state_dict())
    model, info = load("Tiny2099Overfitting", tmp_path)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in evaluate.RB_CIFAR_STATS)
    with torch.no_grad():
        assert torch.equal(model(x), ref((x - mean) / std))
    assert info["args"]["normalization"] == {"mean": list(evaluate.RB_CIFAR_STATS[0]),
                                             "std": list(evaluate.RB_CIFAR_STATS[1])}
    # ... and the file's own where it saved them
    own = torch.full((1, 3, 1, 1), 0.5)
    place(tmp_path, "Tiny2099Overfitting", {**ref.state_dict(), "mu": own, "sigma": own})
    model, _ = load("Tiny2099Overfitting", tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), ref((x - own) / own))


def test_a_file_that_does_not_fit_the_table_is_refused(tiny_table, tmp_path):
    """Strict loading: a file without the sub_block1 the table says the class has names the missing keys."""
    place(tmp_path, "Tiny2099Unlabeled", RefWideResNet(10, 2, sub_block1=False).state_dict())
    with pytest.raises(common.UsageError, match="does not fit the model: missing sub_block1"):
        load("Tiny2099Unlabeled", tmp_path)
    place(tmp_path, "Tiny2099Unlabeled", {"state_dict": {"conv1.weight": "not a tensor"}})
    with pytest.raises(common.UsageError, match="not a state dict of tensors"):
        load("Tiny2099Unlabeled", tmp_path)


def test_an_l2_entry_loads_from_the_l2_folder_with_norm_l2(tiny_table, tmp_path, monkeypatch):
    """--norm l2 reads RobustBench's L2 zoo: <model-dir>/cifar10/L2/<name>.pt (Rice et al.'s L2 PreAct ResNet-18
    in our layout, normalised outside), never the Linf file of the same name."""
    monkeypatch.setitem(sys.modules, "robustbench", None)
    torch.manual_seed(0)
    x = torch.rand(5, 3, 32, 32)
    ref = randomise_bn(RefPreActResNet18(width=64), seed=2).eval()  # (the table's ResNets are built at width 64)
    path = place(tmp_path, "Tiny2099Overfitting", {"state_dict": ref.state_dict()}, norm="l2")
    assert path.parts[-3:] == ("cifar10", "L2", "Tiny2099Overfitting.pt")
    model, info = load("Tiny2099Overfitting", tmp_path, "--norm", "l2")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in evaluate.RB_CIFAR_STATS)
    with torch.no_grad():
        assert torch.equal(model(x), ref((x - mean) / std))
    assert (info["file"], info["args"]["arch"]) == (str(path), "preact-resnet18")
    with pytest.raises(common.UsageError, match=r"no file .*cifar10/L2/Tiny2099Overfitting.pt; .*\(CIFAR-10, L2\)"):
        load("Tiny2099Overfitting", tmp_path / "elsewhere", "--norm", "l2")
    with pytest.raises(common.UsageError, match=r"no file .*cifar10/Linf/Tiny2099Overfitting.pt"):
        load("Tiny2099Overfitting", tmp_path)  # without --norm: the Linf zoo's file, not the L2 one beside it


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_table_has_the_public_key_layouts_and_the_readme_lists_it(norm):
    """Every entry is an architecture of ours whose state dict has the keys and shapes of the public WideResNet
    (with or without sub_block1), ResNet-18 or PreAct ResNet-18 it names; the README lists exactly these entries
    and their count."""
    table = evaluate.robustbench_table(norm)
    for name, (arch, sub_block1, stats) in table.items():
        assert common.parse_arch(arch) == arch, name
        with torch.device("meta"):
            ours = common.build_model({"arch": arch, "width": 64, "act": "relu"}, normalize=stats is not None,
                                      sub_block1=sub_block1)
            if arch.startswith("wrn-"):
                _, depth, widen = arch.split("-")
                ref = RefWideResNet(int(depth), int(widen), sub_block1=sub_block1).state_dict()
            elif arch == "preact-resnet18":  # RobustBench's PreActResNet(PreActBlockV2, bn_before_fc=True): Rice et al.'s
                ref = RefPreActResNet18(width=64).state_dict()
            else:  # RobustBench's ResNet18(): the common CIFAR layout at width 64, which ours is
                ref = common.ResNet18(width=64, normalize=False).state_dict()
        mine = {k: v.shape for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
        assert mine == {k: v.shape for k, v in ref.items()}, name
        assert stats is None or all(len(v) == 3 for v in stats)
    readme = (evaluate.Path(evaluate.__file__).parent / "README.md").read_text()
    section = readme[readme.index("### Public robust models"):]
    section = section[:section.index("\n## ")]
    zoo = section[:section.index("CIFAR-10 L2")] if norm == "linf" else section[section.index("CIFAR-10 L2"):]
    listed = {n for n in table if f"`{n}`" in zoo}
    assert listed == set(table) and f"{len(table)} entries" in zoo


@pytest.mark.parametrize("script", ["evaluate.py", "flatness.py"])
def test_a_missing_file_is_one_line_naming_the_path_and_the_zoo(script, tmp_path):
    proc = run_script(script, "--robustbench", "Carmon2019Unlabeled", "--model-dir", tmp_path, "--device", "cpu",
                      check=False)
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert str(tmp_path / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt") in proc.stderr
    assert proc.stderr.startswith("error: ") and "RobustBench model zoo" in proc.stderr


def fake_package(root, utils_source):
    """A stand-in robustbench package (robustbench/utils.py with `utils_source`) on sys.path."""
    (root / "robustbench").mkdir()
    (root / "robustbench" / "__init__.py").write_text("")
    (root / "robustbench" / "utils.py").write_text(utils_source)
    return root


@pytest.fixture
def no_robustbench(monkeypatch):
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        del sys.modules[name]


def test_other_entries_without_a_working_package_are_one_clear_error(tmp_path, monkeypatch, no_robustbench):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # not installed
    with pytest.raises(common.UsageError) as e:
        load("Gowal2020Uncovering_70_16", tmp_path)
    text = str(e.value)
    assert "\n" not in text and "pip install robustbench" in text
    assert f"{len(evaluate.ROBUSTBENCH_TABLE)} Linf entries load without it" in text and "Carmon2019Unlabeled" in text
    monkeypatch.delitem(sys.modules, "robustbench")
    # installed but not importable: robustbench 1.1.1 on setuptools >= 81 (no pkg_resources)
    broken = tmp_path / "broken"
    broken.mkdir()
    fake_package(broken, "raise ModuleNotFoundError(\"No module named 'pkg_resources'\", name='pkg_resources')\n")
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(common.UsageError) as e:
        load("Gowal2020Uncovering_70_16", tmp_path)
    text = str(e.value)
    assert "\n" not in text and "installed but does not import" in text and "pkg_resources" in text
    assert "setuptools<81" in text and "Carmon2019Unlabeled" in text


UTILS = '''
import torch
def load_model(model_name, model_dir, dataset, threat_model):
    assert (dataset, threat_model) == ("cifar10", "Linf")
    if model_name == "Offline2020":
        raise OSError("Connection refused")
    if model_name != "Fake2020Model":
        raise KeyError(model_name)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).train()
'''


def test_other_entries_go_through_a_working_package(tmp_path, monkeypatch, no_robustbench, tiny_table):
    (tmp_path / "pkg").mkdir()
    monkeypatch.syspath_prepend(str(fake_package(tmp_path / "pkg", UTILS)))
    model, info = load("Fake2020Model", tmp_path)
    assert isinstance(model, torch.nn.Sequential) and not model.training
    assert (info["source"], info["loader"], info["args"], info["file"]) == ("robustbench", "robustbench", None, None)
    with pytest.raises(common.UsageError, match="no such CIFAR-10 Linf model"):
        load("Nobody2020", tmp_path)
    with pytest.raises(common.UsageError, match="robustbench could not load it .OSError: Connection refused.; place"):
        load("Offline2020", tmp_path)
    # a table entry never goes through the package (its file is read by us)
    ref = RefWideResNet(10, 2, sub_block1=True).eval()
    place(tmp_path, "Tiny2099Unlabeled", ref.state_dict())
    assert load("Tiny2099Unlabeled", tmp_path)[1]["loader"] == "table"


def test_one_command_measures_robustness_and_flatness(tiny_table, tmp_path, tiny_data, capsys):
    """evaluate.py and flatness.py --robustbench NAME --model-dir DIR: the results land in DIR, named by the entry,
    recording the file's SHA-256; the same command again skips."""
    ref = randomise_bn(RefWideResNet(10, 2, sub_block1=True)).eval()
    path = place(tmp_path, "Tiny2099Unlabeled", {"state_dict": ref.state_dict()})
    source = ["--robustbench", "Tiny2099Unlabeled", "--model-dir", str(tmp_path), "--device", "cpu",
              "--data-dir", str(tiny_data), "--n-eval", "10"]
    evaluate.main(source + ["--n-clean", "20", "--steps", "2", "--restarts", "1", "--no-autoattack"])
    flatness.main(source + ["--mode", "both", "--steps", "2", "--ref-restarts", "1", "--samples", "1",
                            "--restarts", "1", "--passes", "1"])
    capsys.readouterr()
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [f.split("_")[:-1] for f in files] == [["eval", "Tiny2099Unlabeled"],
                                                  ["flatness", "average", "Tiny2099Unlabeled"],
                                                  ["flatness", "worst", "Tiny2099Unlabeled"]]
    for f in files:
        r = json.loads((tmp_path / f).read_text())
        assert r["settings"]["checkpoint"] == "robustbench:Tiny2099Unlabeled" and r["source"] == "robustbench"
        assert r["checkpoint_sha256"] == evaluate.file_sha256(path) and r["model_args"]["arch"] == "wrn-10-2"
    evaluate.main(source + ["--n-clean", "20", "--steps", "2", "--restarts", "1", "--no-autoattack"])
    assert capsys.readouterr().out.startswith("done: ")
