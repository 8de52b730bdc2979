"""Memory that does not grow with restarts (common.pgd's max_inputs; README 'Conventions'): at most max_inputs
attack inputs go through the network at once, the chunked attack is the unchunked one (the same random starts,
drawn at once, and the same iterates), robust_metrics bounds the inputs by its batch size, and a CUDA
out-of-memory error is one line that names --batch-size."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

EPS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1)}  # (ε, α) per norm
N = 6  # images per batch


class SmallNet(nn.Module):
    """Normalize → conv → BN → ReLU → pool → linear on 8×8 images (fast, with the layers PGD meets in practice)."""

    def __init__(self):
        super().__init__()
        self.normalize = common.Normalize()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.linear(F.max_pool2d(F.relu(self.bn(self.conv(self.normalize(x)))), 2).flatten(1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(N) % 10
    return model, x, y


def forward_sizes(model):
    sizes = []
    return sizes, model.register_forward_pre_hook(lambda m, i: sizes.append(len(i[0])))


@pytest.mark.parametrize("restarts,max_inputs,chunks", [(5, None, [5]), (5, 100, [5]), (5, 2 * N + 1, [2, 2, 1]),
                                                        (5, N, [1] * 5), (5, 1, [1] * 5), (1, 1, [1])])
def test_at_most_max_inputs_go_through_the_network(net, restarts, max_inputs, chunks):
    """Restarts run in chunks of max(1, max_inputs // len(x)) restarts: every forward sees chunk × len(x) inputs."""
    model, x, y = net
    sizes, handle = forward_sizes(model)
    common.pgd(model, x, y, *EPS["linf"], 3, restarts=restarts, max_inputs=max_inputs)
    handle.remove()
    assert sizes == [c * N for c in chunks for _ in range(3 + 1)]


@pytest.mark.numerics
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("start", ["uniform", "normal", "zero"])
def test_chunked_attack_is_the_unchunked_one(net, norm, start):
    """The same seed: every restart's start is drawn before the first chunk, so the inputs of the first forward of
    the chunks, put together, are bit for bit the unchunked attack's (for either norm and start; drawn chunk by
    chunk, the ℓ2 start would differ: its radii follow all the Gaussian directions). The iterates then agree in
    float64 (sign steps included: no rounding difference there can flip a sign), and so do the best iterate, its
    loss (kept in fp32) and prediction, for chunks of one and of two restarts (an uneven last chunk)."""
    model, x, y = net
    model, x = model.double(), x.double()
    eps, alpha = EPS[norm]
    runs = {}
    for max_inputs in (None, N, 2 * N):
        inputs = []
        handle = model.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach().clone()))
        torch.manual_seed(7)
        result = common.pgd(model, x, y, eps, alpha, 4, restarts=5, start=start, norm=norm, with_pred=True,
                            max_inputs=max_inputs)
        handle.remove()
        runs[max_inputs] = (inputs, result, torch.rand(3))  # (and the generator's state after it)
    (inputs, (delta, loss, pred), after) = runs[None]
    for max_inputs in (N, 2 * N):
        chunk_inputs, (c_delta, c_loss, c_pred), c_after = runs[max_inputs]
        assert len(chunk_inputs) == 5 * {N: 5, 2 * N: 3}[max_inputs]  # 5 forwards (4 steps + the last) per chunk
        assert torch.equal(torch.cat(chunk_inputs[::5]), inputs[0]), "the chunks start from other random starts"
        assert torch.equal(c_after, after)
        chunked = [torch.cat(chunk_inputs[t::5]) for t in range(5)]  # iterate t of every restart
        torch.testing.assert_close(torch.stack(chunked), torch.stack(inputs), atol=1e-12, rtol=0)
        torch.testing.assert_close(c_delta, delta, atol=1e-12, rtol=0)
        torch.testing.assert_close(c_loss, loss)
        assert torch.equal(c_pred, pred)
    if start != "zero":
        assert (torch.stack(inputs)[1:] - torch.stack(inputs)[:-1]).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_chunks_keep_the_best_restart(net, norm):
    """Chunked (one restart at a time), the result is the per-example maximum over the restarts: the 5-restart loss
    equals the maximum of the losses of the same 5 starts run as a batch of 5·N images with one restart."""
    model, x, y = net
    eps, alpha = EPS[norm]
    torch.manual_seed(3)
    delta, loss = common.pgd(model, x, y, eps, alpha, 4, restarts=5, norm=norm, max_inputs=N)
    torch.manual_seed(3)
    _, flat = common.pgd(model, x.repeat(5, 1, 1, 1), y.repeat(5), eps, alpha, 4, norm=norm)
    flat = flat.view(5, N)
    torch.testing.assert_close(loss, flat.max(0).values, atol=1e-5, rtol=1e-5)
    assert (flat.argmax(0) > 0).any(), "the first restart is always the best: weak test data"
    with torch.no_grad():
        torch.testing.assert_close(loss, F.cross_entropy(model(x + delta), y, reduction="none"), atol=1e-5, rtol=1e-5)


def test_robust_metrics_bounds_the_attack_inputs_by_its_batch_size(net):
    """evaluate.py's and flatness.py's --batch-size: no forward of robust_metrics sees more than batch_size inputs,
    whatever the restarts (10 images, batches of 4, 4 and 2, 3 restarts: chunks of one restart, and of two for the
    last batch); the numbers are those of the unchunked attack."""
    model, x, y = net
    x, y = torch.cat([x, x[:4]]), torch.cat([y, y[:4]])
    sizes, handle = forward_sizes(model)
    torch.manual_seed(0)
    loss, ok = common.robust_metrics(model, x, y, *EPS["linf"], 3, restarts=3, batch_size=4)
    handle.remove()
    assert sizes == 2 * ([4] * 3 * 4 + [4]) + [4] * 4 + [2] * 4 + [2]  # 4 passes per chunk, then the clean forward
    torch.manual_seed(0)
    losses = [common.pgd(model, x[i:i + 4], y[i:i + 4], *EPS["linf"], 3, restarts=3)[1] for i in range(0, 10, 4)]
    torch.testing.assert_close(loss, torch.cat(losses))


@pytest.mark.parametrize("error", sorted({torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError",
                                                                                 torch.cuda.OutOfMemoryError)}, key=str))
def test_out_of_gpu_memory_is_one_line_that_names_batch_size(run_main, error):
    """A CUDA out-of-memory error anywhere in a script: one `error:` line with the first line of torch's message and
    what to lower, exit code 1, no traceback."""
    def main():
        raise error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.6 GiB\n"
                    "second line of the message")
    code, out, err = run_main(types.SimpleNamespace(__name__="evaluate", main=main))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and out == "", err
    assert lines[0].startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ")
    assert "lower --batch-size" in lines[0] and "second line" not in lines[0]
