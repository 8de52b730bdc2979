"""The architectures (README "Architectures"): PreAct ResNet-18 and WideResNets compute exactly the function of
the public reference code from the same state dict, the per-layer weight helper sees each one's conv/linear
layers only, and every training script trains them and records the architecture."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluate
from conftest import TINY


# ---- the reference layer structures, written out as the public code builds them (Rice et al.'s and AWP's
# PreAct ResNet-18; the TRADES/MART/AWP/RobustBench WideResNet), to save state dicts from
class RefPreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class RefPreActResNet18(nn.Module):
    def __init__(self, width=64, num_classes=10):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, 1)
        self.layer2 = self._make_layer(2 * width, 2)
        self.layer3 = self._make_layer(4 * width, 2)
        self.layer4 = self._make_layer(8 * width, 2)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(RefPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))


class RefWideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):  # the reference's two branches, kept as they are
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(x)))
        else:
            out = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefWideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                  stride if i == 0 else 1) for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class RefWideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes=10, sub_block1=True):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        if sub_block1:
            self.sub_block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RefNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RefNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.nChannels))


def randomise_bn(model, seed=0):
    """Non-trivial BN affine parameters and running statistics, so that a swapped BN would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


CASES = [("preact-resnet18", lambda: RefPreActResNet18(width=8), {"width": 8}, False),
         ("wrn-10-2", lambda: RefWideResNet(10, 2), {}, True),
         ("wrn-16-1", lambda: RefWideResNet(16, 1, sub_block1=False), {}, False)]


@pytest.mark.numerics
@pytest.mark.parametrize("arch,reference,extra,sub_block1", CASES, ids=[c[0] for c in CASES])
def test_public_state_dicts_give_identical_logits(arch, reference, extra, sub_block1):
    torch.manual_seed(0)
    ref = randomise_bn(reference()).eval()
    ours = common.build_model({"arch": arch, "act": "relu", "width": 64, **extra}, normalize=False,
                              sub_block1=sub_block1).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the key layouts are the public ones
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        ours.train(), ref.train()
        assert torch.allclose(ours(x), ref(x), atol=1e-6)  # train-mode BN too


def test_external_wrn_checkpoint_loads_through_evaluate(tmp_path):
    """A TRADES-style WRN state dict (with its unused sub_block1, saved under DataParallel's `module.`) loads with
    `--arch wrn-10-2` and computes the reference's logits."""
    torch.manual_seed(1)
    ref = randomise_bn(RefWideResNet(10, 2)).eval()
    path = tmp_path / "model-wideres-epoch76.pt"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    args = evaluate.parse_args([str(path), "--arch", "wrn-10-2", "--no-autoattack"])
    model, info = evaluate.load_model(args, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert info["args"]["arch"] == "wrn-10-2" and info["normalize"] is False


def test_perturbable_layers_of_each_architecture():
    """The per-layer helper (paper Eq. 4) sees every conv/linear tensor and nothing else: no BN, not the
    unused sub_block1."""
    for arch, n_convs in (("preact-resnet18", 20), ("wrn-10-1", 9)):  # 17 + 3 shortcut / 7 + 2 shortcut convs
        model = common.build_model({"arch": arch, "act": "relu", "width": 4}, sub_block1=arch.startswith("wrn"))
        names = list(common.perturbable_params(model))
        convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("sub_block1")]
        assert len(convs) == n_convs
        assert len(names) == n_convs + 2  # + the linear weight and bias
        assert not [n for n in names if "bn" in n or n.startswith("sub_block1")]
        assert list(common.perturbable_params(model, weights_only=True)) == [n for n in names if not n.endswith("bias")]


def test_arch_flag_is_checked(capsys):
    import train_at
    for bad in ("wrn-11-2", "wrn-34", "resnet50", "wrn-34-0"):
        with pytest.raises(Exception, match="unknown architecture"):
            common.parse_arch(bad)
    with pytest.raises(SystemExit) as e:
        train_at.parse_args(["--arch", "wrn-12-2"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "6n+4" in err


@pytest.mark.parametrize("arch", ["preact-resnet18", "wrn-10-1"])
def test_training_records_the_architecture(arch, tiny_data, tmp_path):
    """One epoch of AT on the architecture; the checkpoint's args rebuild it (evaluate.py needs no model flags)."""
    import train_at
    out = tmp_path / "run"
    train_at.main([*TINY, "--arch", arch, "--width", "4", "--data-dir", str(tiny_data), "--epochs", "1",
                   "--train-subset", "100", "--attack-steps", "1", "--out", str(out)])
    assert json.loads((out / "args.json").read_text())["arch"] == arch
    model, ckpt = evaluate.model_from_checkpoint(out / "ckpt_last.pt", torch.device("cpu"))
    assert type(model) is type(common.build_model({"arch": arch, "act": "relu", "width": 4}))
    assert ckpt["args"]["arch"] == arch


def test_external_preact_checkpoint_with_cifar10_normalisation(tmp_path):
    """Rice et al.'s code normalises outside the network: `--normalization dataset` puts the CIFAR-10 mean/std in
    front, so the loaded model on [0, 1] inputs equals the reference on normalised ones; without it the keys
    have no normaliser and the model is the bare network. A normaliser in the keys refuses a second one."""
    torch.manual_seed(2)
    ref = randomise_bn(RefPreActResNet18(width=8)).eval()
    path = tmp_path / "preact.pth"
    torch.save(ref.state_dict(), path)
    flags = [str(path), "--arch", "preact-resnet18", "--arch-width", "8", "--no-autoattack"]
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(common.CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(common.CIFAR_STD).view(1, 3, 1, 1)
    model, info = evaluate.load_model(evaluate.parse_args(flags + ["--normalization", "dataset"]), torch.device("cpu"))
    bare, bare_info = evaluate.load_model(evaluate.parse_args(flags), torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - mean) / std), atol=1e-5)
        assert torch.equal(bare(x), ref(x))
    assert info["args"]["normalization"] == "dataset" and bare_info["args"]["normalization"] == "none"
    ours = common.build_model({"arch": "preact-resnet18", "width": 8, "act": "relu"})
    torch.save(ours.state_dict(), path)
    with pytest.raises(common.UsageError, match="carries its own input normaliser"):
        evaluate.load_model(evaluate.parse_args(flags + ["--normalization", "dataset"]), torch.device("cpu"))


@pytest.mark.parametrize("arch", ["resnet18", "preact-resnet18", "wrn-10-2"])
def test_rescaling_keeps_the_function_and_the_hessian_runs_on_each_architecture(arch):
    """§3.2's ×α check and the Hessian work on every architecture: the BN-compensated rescaling (every conv whose
    only consumer is a BN) finds pairs and leaves the logits unchanged up to BN's eps; the power iteration
    runs on the conv/linear weights (a WRN's unused sub_block1 is not among them) and gives a finite λ."""
    import flatness
    torch.manual_seed(3)
    model = randomise_bn(common.build_model({"arch": arch, "act": "relu", "width": 4},
                                            sub_block1=arch.startswith("wrn"))).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    scaled, pairs = flatness.rescale(model, 2.0, bn_eps=True)
    assert len(pairs) >= {"resnet18": 17, "preact-resnet18": 8, "wrn-10-2": 3}[arch]
    diff, top = flatness.logit_change(model, scaled, x)
    assert diff <= 1e-5 * top
    assert not [c for c, _ in pairs if c.startswith("sub_block1")]  # never called, so never traced
    lam, iters, _, _ = flatness.hessian_top_eigenvalue(model, x, y, iters=3)
    assert iters == 3 and torch.isfinite(torch.tensor(lam))


def test_a_rescaling_that_changes_the_function_is_refused(tiny_data, tmp_path):
    """flatness.py --scale checks the rescaled logits: where BN's eps dominates a tiny running variance the
    ×α rescaling is no longer function-preserving, and the measurement is refused with the reason."""
    import flatness
    torch.manual_seed(4)
    model = randomise_bn(common.build_model({"arch": "wrn-10-1", "act": "relu", "width": 4}, normalize=False))
    with torch.no_grad():
        model.block1.layer[0].bn2.running_var.fill_(1e-7)  # ≪ eps = 1e-5
    torch.save(model.state_dict(), tmp_path / "wrn.pt")
    with pytest.raises(common.UsageError, match="--scale 4 changed the logits by .* more than --scale-tol"):
        flatness.main([str(tmp_path / "wrn.pt"), "--arch", "wrn-10-1", "--normalization", "none", "--mode", "average",
                       "--scale", "4", "--n-eval", "10", "--samples", "1", "--steps", "1", "--ref-restarts", "1",
                       "--data-dir", str(tiny_data), "--device", "cpu"])
    assert not list(tmp_path.glob("flatness_*.json"))
