"""--dataset cifar10|cifar100|svhn (README "Data"): each set's classes, normaliser, augmentation and AutoAugment
policy; the checkpoint records the set, so evaluate.py and flatness.py need no flag; torchvision's array layouts
and the ImageFolder trees give the same (uint8 N×3×32×32, labels)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
import train_misc
from conftest import TINY, run_script


def make_tree(root, classes, n_train, n_test, seed=0):
    """train/<c>/*.png and test/<c>/*.png, 32×32, a colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = Path(root) / split / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 37) % 256, (c * 91) % 256, (255 - c * 13) % 256], np.float64)
            for i in range(n):
                Image.fromarray(np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    d / f"{i}.png")
    return Path(root)


@pytest.fixture(scope="module")
def cifar100_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("c100"), 100, n_train=2, n_test=1)


def test_cifar100_run_has_100_classes_its_normaliser_and_needs_no_flag_to_evaluate(cifar100_tree, tmp_path):
    import train_at
    out = tmp_path / "run"
    train_at.main([*TINY, "--dataset", "cifar100", "--width", "4", "--data-dir", str(cifar100_tree),
                   "--batch-size", "100", "--epochs", "1", "--attack-steps", "1", "--label-noise", "0.5",
                   "--n-log", "100", "--n-early-stop", "50", "--out", str(out)])
    assert json.loads((out / "args.json").read_text())["dataset"] == "cifar100"
    model, _ = evaluate.model_from_checkpoint(out / "ckpt_last.pt", torch.device("cpu"))
    assert model.linear.out_features == 100
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(common.DATASETS["cifar100"]["mean"]))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(common.DATASETS["cifar100"]["std"]))
    evaluate.main([str(out / "ckpt_last.pt"), "--no-autoattack", "--n-eval", "20", "--n-clean", "100",
                   "--steps", "1", "--restarts", "1", "--device", "cpu"])  # no --dataset: the checkpoint's
    (result,) = out.glob("eval_last_*.json")
    result = json.loads(result.read_text())
    assert result["clean"]["n"] == 100 and result["settings"]["dataset"] == "cifar100"


def test_a_tree_with_other_classes_than_the_dataset_is_refused(cifar100_tree, tmp_path):
    proc = run_script("train_at.py", *TINY, "--data-dir", cifar100_tree, "--epochs", "1", "--out", tmp_path / "r",
                      check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "100 class folders, but --dataset cifar10 has 10 classes" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_label_noise_draws_from_every_class_of_the_logits():
    torch.manual_seed(0)
    y = torch.zeros(20000, dtype=torch.long)
    noisy = common.noisy_labels(y, 1.0, 100)
    assert noisy.max() == 99 and len(noisy.unique()) == 100


def test_svhn_trains_unaugmented_and_cifar_with_crop_and_flip():
    """SVHN: no crop, no flip (a flipped digit is another digit); CIFAR: every batch differs from the raw images."""
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(40) % 10
    for dataset in ("svhn", "cifar10"):
        loader = common.DeviceLoader(x, y, 40, torch.device("cpu"), seed=0,
                                     augment=common.DATASETS[dataset]["augment"])
        xb, _ = next(iter(loader))
        raw = x.float().div(255)
        same = [any(torch.equal(img, r) for r in raw) for img in xb]  # each batch image is a raw image
        assert all(same) if dataset == "svhn" else not all(same), dataset


def test_torchvision_layouts(monkeypatch, tmp_path):
    """SVHN arrives channels-first with `labels`, CIFAR-100 channels-last with `targets`: both come out
    uint8 N×3×32×32 with int64 labels, and the dataset class is the one --dataset names."""
    import torchvision.datasets as tv
    chw = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8).numpy()
    seen = []

    class FakeSVHN:
        def __init__(self, root, split, download):
            seen.append(("svhn", split))
            self.data, self.labels = chw, np.arange(5) % 10

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            seen.append(("cifar100", train))
            self.data, self.targets = chw.transpose(0, 2, 3, 1), list(range(5))

    monkeypatch.setattr(tv, "SVHN", FakeSVHN)
    monkeypatch.setattr(tv, "CIFAR100", FakeCIFAR100)
    for dataset in ("svhn", "cifar100"):
        x, y = common.load_images(tmp_path, train=False, dataset=dataset)
        assert x.dtype == torch.uint8 and x.shape == (5, 3, 32, 32) and torch.equal(x, torch.from_numpy(chw))
        assert y.dtype == torch.int64
    assert seen == [("svhn", "test"), ("cifar100", False)]


def test_autoaugment_policy_and_fill_follow_the_dataset():
    import torchvision.transforms as T
    x, y = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)
    svhn = train_misc.AutoAugmentLoader(x, y, 1, torch.device("cpu"), 0, workers=0, dataset="svhn").transform.transforms
    cifar = train_misc.AutoAugmentLoader(x, y, 1, torch.device("cpu"), 0, workers=0).transform.transforms
    assert [type(t).__name__ for t in svhn] == ["AutoAugment", "ConvertImageDtype", "Cutout"]
    assert svhn[0].policy == T.AutoAugmentPolicy.SVHN and list(svhn[0].fill) == [112, 113, 121]
    assert cifar[2].policy == T.AutoAugmentPolicy.CIFAR10 and list(cifar[2].fill) == [125, 123, 114]
