"""Checkpoints and data (README "Run folder, early stopping, resume", "Data"): weights_only round trips, exact resume,
clear errors for bad files, the class-interleaved order, the balanced subset, the on-device
crop/flip and the loader's epoch coverage."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
import train_at
from conftest import CLASSES, TINY

NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = common.ResNet18(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 3, 8, 8)).sum().backward()
    opt.step()  # momentum buffers exist
    x, y = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10)
    loader = common.DeviceLoader(x, y, 5, torch.device("cpu"), seed=3)
    next(iter(loader))  # advance the loader's generator
    args = {"width": 4, "act": "relu", "lr": 0.1, "out": "runs/x", "resume": False, "epsilon": 8 / 255}
    common.save_checkpoint(tmp_path / "c.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                           epoch=3, args=args, rng=common.rng_state(loader), es_best={"epoch": 3, "es_rerr": 0.5})
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"
    draws = (torch.rand(5), torch.randint(0, 100, (5,), generator=loader.generator))

    torch.manual_seed(123)  # disturb every RNG
    loader.generator.manual_seed(123)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)  # plain torch, the strict loader
    assert ckpt["epoch"] == 3 and ckpt["args"] == args and ckpt["es_best"]["es_rerr"] == 0.5
    ckpt = evaluate.load_checkpoint(tmp_path / "c.pt")
    state = model.state_dict()
    assert all(torch.equal(ckpt["model"][k], state[k]) for k in state)
    fresh = common.ResNet18(width=4)
    evaluate.load_weights(fresh, ckpt["model"])
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    common.set_rng_state(ckpt["rng"], loader)
    assert torch.equal(torch.rand(5), draws[0])
    assert torch.equal(torch.randint(0, 100, (5,), generator=loader.generator), draws[1])


def test_python_rng_restored(tmp_path):
    import random
    random.seed(5)
    random.random()
    common.save_checkpoint(tmp_path / "c.pt", rng=common.rng_state())
    expected = [random.random() for _ in range(3)]
    random.seed(9)
    common.set_rng_state(evaluate.load_checkpoint(tmp_path / "c.pt")["rng"])
    assert [random.random() for _ in range(3)] == expected


def test_bad_checkpoint_files_give_usage_errors(tmp_path):
    with pytest.raises(common.UsageError, match="does not exist"):
        evaluate.load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(common.UsageError, match="corrupt.pt is not a PyTorch checkpoint .*; check the path$"):
        evaluate.load_checkpoint(corrupt)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(common.UsageError, match="not a checkpoint dict"):
        evaluate.load_checkpoint(tmp_path / "list.pt")


def test_load_weights_mismatch_names_keys():
    wide, narrow = common.ResNet18(width=8), common.ResNet18(width=4)
    with pytest.raises(common.UsageError, match=r"its keys are a resnet18 of width 8 with 10 classes, the model built is "
                       r"a resnet18 of width 4 with 10 classes; give --arch resnet18 --arch-width 8 \(shape mismatch "
                       r"bn1\.bias, .* \(\+\d+ more\)\)$"):
        evaluate.load_weights(narrow, wide.state_dict())
    state = {k: v for k, v in narrow.state_dict().items() if k != "linear.bias"}
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(common.UsageError, match=r"missing linear\.bias; unexpected head\.weight; otherwise its keys are the model's"):
        evaluate.load_weights(narrow, state)
    # wrapper prefixes (DDP, torch.compile) are stripped
    evaluate.load_weights(narrow, {f"module._orig_mod.{k}": v for k, v in common.ResNet18(width=4).state_dict().items()})


def _metrics(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_resume_equals_uninterrupted_run(tiny_data, tmp_path, monkeypatch, capsys):
    """2 epochs straight vs. the epoch-1 checkpoint + `--resume` for epoch 2 (train_at.py's command line,
    in-process): the same metrics apart from timings and bit-identical weights on CPU. Label noise and the
    EMA make the check cover the global torch RNG and the averaged model too."""
    flags = [str(f) for f in [*TINY, "--data-dir", tiny_data, "--epochs", 2, "--es-every", 1, "--label-noise", 0.2,
                              "--ema", 0.9, "--seed", 7]]

    def train(out, *extra):
        monkeypatch.setattr(sys, "argv", ["train_at.py", *flags, "--out", str(out), *extra])
        common.run_cli(train_at.main)
        return capsys.readouterr().out

    full = tmp_path / "full"
    train(full)
    # a run 'interrupted' after epoch 1: its ckpt_last.pt is what epoch 1 wrote (= the snapshot),
    # and its metrics.jsonl already holds the line of the lost epoch 2, which resume must drop
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "ckpt_epoch001.pt", part / "ckpt_last.pt")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    shutil.copy(full / "args.json", part / "args.json")
    assert "resumed" in train(part, "--resume")

    a, b = _metrics(full / "metrics.jsonl"), _metrics(part / "metrics.jsonl")
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b] == [1, 2]
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s")}
    assert [strip(m) for m in a] == [strip(m) for m in b]
    ca, cb = evaluate.load_checkpoint(full / "ckpt_last.pt"), evaluate.load_checkpoint(part / "ckpt_last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    first = evaluate.load_checkpoint(full / "ckpt_epoch001.pt")
    assert not torch.equal(first["model"]["conv1.weight"], ca["model"]["conv1.weight"]), "epoch 2 trained nothing"
    assert ca["epoch"] == cb["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def test_class_interleaved_order():
    labels = torch.tensor([0] * 3 + [1] * 3 + [2] * 3)
    order = common.class_interleaved_order(labels)
    assert labels[order].tolist() == [0, 1, 2] * 3
    assert order.tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]  # image i of each class, in folder order
    uneven = torch.tensor([0, 0, 0, 1, 2, 2])
    order = common.class_interleaved_order(uneven)
    assert uneven[order].tolist() == [0, 1, 2, 0, 2, 0] and sorted(order.tolist()) == list(range(6))


def test_balanced_subset():
    labels = torch.arange(200) % 10
    idx = common.balanced_subset(labels, 50)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert idx.tolist() == list(range(50))  # interleaved labels: the first five of every class
    for bad in (55, 0, 210):
        with pytest.raises(common.UsageError, match="--train-subset"):
            common.balanced_subset(labels, bad)


def test_load_cifar10_imagefolder(tiny_data):
    x, y = common.load_images(tiny_data, train=True)
    assert x.dtype == torch.uint8 and x.shape == (200, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == list(range(10)) * 20
    for i in (0, 1, 13):  # image i // 10 of class i % 10
        png = tiny_data / "train" / CLASSES[i % 10] / f"{i // 10:04d}.png"
        assert torch.equal(x[i], torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1))
    xt, yt = common.load_images(tiny_data, train=False)
    assert xt.shape == (200, 3, 32, 32) and not torch.equal(xt, x)
    x2, y2 = common.load_images(tiny_data, train=True)  # second call: from the .npz cache
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_eval_splits(tiny_data):
    x, y = common.eval_split(tiny_data, "early-stop", 30, torch.device("cpu"))
    xt, yt = common.load_images(tiny_data, train=False)
    assert torch.equal(y, yt[-30:]) and torch.equal(x, xt[-30:].float() / 255)
    x, y = common.eval_split(tiny_data, "train-eval", 20, torch.device("cpu"))
    assert y.tolist() == list(range(10)) * 2 and x.dtype == torch.float32 and x.max() <= 1
    with pytest.raises(common.UsageError):
        common.eval_split(tiny_data, "eval", 201, torch.device("cpu"))


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    for k, v in NO_NETWORK.items():  # never download CIFAR-10 in a test
        monkeypatch.setenv(k, v)
    with pytest.raises(common.UsageError, match=r"could not find or download CIFAR-10 in .*nowhere.*--data-dir"):
        common.load_images(tmp_path / "nowhere", train=True)


def test_augment_crop_flip_is_a_padded_crop_and_flip():
    """Every output is one of the 9·9·2 = 162 candidates (4-px zero-padded crop, flipped or not)
    of its own input, and the draws cover offsets and both flips."""
    n = 200
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = common.augment_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == (n, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    back = (out * 255).round().to(torch.uint8)
    torch.testing.assert_close(back.float() / 255, out, atol=1e-6, rtol=0)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for i in range(n):
        crops = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)          # 3×9×9×32×32
        crops = crops.permute(1, 2, 0, 3, 4).reshape(81, 3, 32, 32)  # (dy, dx) row-major
        candidates = torch.cat([crops, crops.flip(-1)])              # 162, unflipped first
        match = (candidates == back[i]).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(match) == 1, f"output {i} is not a crop/flip of its input"
        found.append(match[0])
    found = torch.tensor(found)
    flipped = found >= 81
    assert 0.35 < flipped.float().mean() < 0.65
    dy, dx = (found % 81) // 9, found % 9
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert ((dy == 4) & (dx == 4) & ~flipped).float().mean() < 0.05  # mostly not the identity


def test_augment_crop_flip_is_seeded():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = common.augment_crop_flip(x, torch.Generator().manual_seed(1))
    b = common.augment_crop_flip(x, torch.Generator().manual_seed(1))
    c = common.augment_crop_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def id_images(n):
    """Image i is the constant i: the centre pixel of any 4-px crop still says which image it is."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()


def ids_of(batch):
    return (batch[:, 0, 16, 16] * 255).round().long()


@pytest.mark.parametrize("batch_size", [50, 64])
def test_device_loader_visits_every_image_once_per_epoch(batch_size):
    n = 200
    x, y = id_images(n), torch.arange(n) % 10
    loader = common.DeviceLoader(x, y, batch_size, torch.device("cpu"), seed=0)
    assert len(loader) == -(-n // batch_size)  # the last batch may be smaller
    orders = []
    for epoch in range(2):
        ids, labels = [], []
        for xb, yb in loader:
            assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
            ids.append(ids_of(xb))
            labels.append(yb)
        ids, labels = torch.cat(ids), torch.cat(labels)
        assert sorted(ids.tolist()) == list(range(n))
        assert torch.equal(labels, ids % 10), "labels must travel with their images"
        orders.append(ids)
    assert not torch.equal(orders[0], orders[1]), "each epoch must reshuffle"


def test_device_loader_ranks_split_the_batch():
    """Under DDP every rank draws the same permutation and takes every world-th image of each
    batch: the ranks' images are disjoint and together cover the epoch."""
    n, world = 200, 2
    x, y = id_images(n), torch.arange(n) % 10
    loaders = [common.DeviceLoader(x, y, 50, torch.device("cpu"), seed=0, rank=r, world=world) for r in range(world)]
    per_rank = []
    for loader in loaders:
        assert len(loader) == 4
        batches = [ids_of(xb) for xb, _ in loader]
        assert all(len(b) == 25 for b in batches)
        per_rank.append(torch.cat(batches).tolist())
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def test_device_loader_ranks_draw_their_own_augmentations():
    """The ranks' crops and flips are the world-th slices of one global draw: 64 copies of one
    image come out differently on the two ranks, and rank r's batch equals slice r of a
    single-process loader's batch (so the generators stay in step across ranks)."""
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x, y = image.expand(64, -1, -1, -1).contiguous(), torch.zeros(64, dtype=torch.long)
    single = next(iter(common.DeviceLoader(x, y, 64, torch.device("cpu"), seed=1)))[0]
    ranks = [next(iter(common.DeviceLoader(x, y, 64, torch.device("cpu"), seed=1, rank=r, world=2)))[0]
             for r in range(2)]
    assert not torch.equal(ranks[0], ranks[1])
    assert torch.equal(ranks[0], single[0::2]) and torch.equal(ranks[1], single[1::2])


def test_our_checkpoints_need_no_data_flag_and_resume_resolves_paths(tiny_data, tmp_path, monkeypatch):
    """--data-dir is stored absolute; evaluate.py and flatness.py, run elsewhere without --data-dir, read
    the run's data from the checkpoint; --resume takes another spelling of the same folder."""
    import flatness
    import train_at
    monkeypatch.chdir(tiny_data.parent)
    out = tmp_path / "run"
    flags = [*TINY, "--train-subset", "20", "--batch-size", "20", "--epochs", "1", "--attack-steps", "1",
             "--n-log", "10", "--n-early-stop", "10", "--out", str(out)]
    train_at.main([*flags, "--data-dir", tiny_data.name])  # relative to the working directory
    stored = json.loads((out / "args.json").read_text())["data_dir"]
    assert stored == str(tiny_data.resolve())
    assert evaluate.load_checkpoint(out / "ckpt_last.pt")["args"]["data_dir"] == stored

    monkeypatch.chdir(tmp_path)  # where no ./data and no tiny tree exist
    evaluate.main([str(out / "ckpt_last.pt"), "--no-autoattack", "--n-eval", "10", "--n-clean", "20", "--steps", "1",
                   "--restarts", "1", "--device", "cpu"])
    (evaluated,) = out.glob("eval_last_*.json")
    result = json.loads(evaluated.read_text())
    assert result["settings"]["data_dir"] == stored and result["clean"]["n"] == 20
    flatness.main([str(out / "ckpt_last.pt"), "--mode", "average", "--n-eval", "10", "--samples", "1", "--steps", "1",
                   "--ref-restarts", "1", "--device", "cpu"])
    (measured,) = out.glob("flatness_average*.json")
    assert json.loads(measured.read_text())["settings"]["data_dir"] == stored

    other_spelling = f"{tiny_data.parent}/./{tiny_data.name}/"
    train_at.main([*flags, "--data-dir", other_spelling, "--resume"])  # nothing left to train: no refusal
    other_data = tmp_path / "other_tree"  # another folder holding the same images is other data
    shutil.copytree(tiny_data, other_data)
    with pytest.raises(common.UsageError, match="differ from the saved run: --data-dir"):
        train_at.main([*flags, "--data-dir", str(other_data), "--resume"])
