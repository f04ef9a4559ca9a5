"""FcaNet's multi-spectral channel attention against references written from the paper's equations.

The references are numpy float64: the DCT basis from explicit cosine loops, the squeeze also from
scipy's orthonormal DCT-II, the adaptive pooling from its bin definition, and the whole module as
per-channel sums followed by the SE MLP. Nothing here calls the module's own helpers to build the
expected values, except where a test says it checks one helper against another formula.
"""

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18, resnet50

from emca.layers.fcanet import (
    FREQUENCY_SELECTIONS,
    MultiSpectralAttention,
    adaptive_pool_matrix,
    dct_basis,
    fca_dct_size,
    frequency_pairs,
)

# The authors' get_freq_indices (cfzd/FcaNet, model/layer.py) in their own layout: parallel lists
# of x (row, H) and y (column, W) indices on the 7 x 7 grid. Our module keeps (u, v) pairs; these
# catch a slip in that transcription.
AUTHORS_INDICES = {
    "top": (
        [0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1],
        [0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3],
    ),
    "low": (
        [0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4],
        [0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3],
    ),
    "bot": (
        [6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5, 6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6],
        [6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1, 4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3],
    ),
}


@contextmanager
def default_dtype(dtype):
    """Build a module whose weights AND fixed DCT basis are created in `dtype` (the basis follows
    torch's default dtype, as nn.Linear's weights do), so float64 checks are exact to ~1e-12."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------- references
def cosine_basis_loops(size: int, u: int, v: int) -> np.ndarray:
    """The 2-D DCT-II basis function, orthonormal, one element at a time."""

    def norm(k):
        return math.sqrt(1.0 / size) if k == 0 else math.sqrt(2.0 / size)

    basis = np.zeros((size, size))
    for h in range(size):
        for w in range(size):
            basis[h, w] = (
                norm(u)
                * norm(v)
                * math.cos(math.pi * u * (2 * h + 1) / (2 * size))
                * math.cos(math.pi * v * (2 * w + 1) / (2 * size))
            )
    return basis


def adaptive_average_pool(x: np.ndarray, d: int) -> np.ndarray:
    """Adaptive average pooling by its definition: bin i spans [floor(i H/d), ceil((i+1) H/d))."""
    height, width = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (d, d))
    for i in range(d):
        h0, h1 = (i * height) // d, -(-((i + 1) * height) // d)
        for j in range(d):
            w0, w1 = (j * width) // d, -(-((j + 1) * width) // d)
            out[..., i, j] = x[..., h0:h1, w0:w1].mean(axis=(-2, -1))
    return out


def authors_frequencies(selection: str, dct_size: int) -> list[tuple[int, int]]:
    """The (row, column) frequencies on the dct_size grid, from the authors' lists."""
    xs, ys = AUTHORS_INDICES[selection[:3]]
    count, scale = int(selection[3:]), dct_size // 7
    return [(x * scale, y * scale) for x, y in zip(xs[:count], ys[:count], strict=True)]


def reference_spectrum(y: np.ndarray, selection: str, dct_size: int) -> np.ndarray:
    """(B, C): channel c's coefficient of the basis function of its group c // (C / n)."""
    if y.shape[-2:] != (dct_size, dct_size):
        y = adaptive_average_pool(y, dct_size)
    frequencies = authors_frequencies(selection, dct_size)
    per_group = y.shape[1] // len(frequencies)
    spectrum = np.zeros(y.shape[:2])
    for c in range(y.shape[1]):
        u, v = frequencies[c // per_group]
        spectrum[:, c] = (y[:, c] * cosine_basis_loops(dct_size, u, v)).sum(axis=(-2, -1))
    return spectrum


def reference_fca(y: np.ndarray, w1: np.ndarray, w2: np.ndarray, selection: str, dct_size: int) -> np.ndarray:
    """The paper's s = sigmoid(W2 relu(W1 Freq)), then y * s."""
    freq = reference_spectrum(y, selection, dct_size)
    hidden = np.maximum(np.einsum("kc,bc->bk", w1, freq), 0.0)
    logits = np.einsum("ck,bk->bc", w2, hidden)
    return y * (1.0 / (1.0 + np.exp(-logits)))[:, :, None, None]


def fc_weights(module: MultiSpectralAttention) -> tuple[np.ndarray, np.ndarray]:
    return module.fc[0].weight.detach().double().numpy(), module.fc[2].weight.detach().double().numpy()


# ----------------------------------------------------------------------------- frequency tables
@pytest.mark.parametrize("ranking", ["top", "low", "bot"])
def test_frequency_tables_transcribe_the_authors_lists(ranking):
    xs, ys = AUTHORS_INDICES[ranking]
    for count in (1, 2, 4, 8, 16, 32):
        assert frequency_pairs(f"{ranking}{count}") == tuple(zip(xs[:count], ys[:count], strict=True))
    assert len(set(frequency_pairs(f"{ranking}32"))) == 32


def test_bot_is_the_top_ranking_read_from_its_worst_end():
    # 49 components, 32 listed from each end: the last 15 of 'bot32' are the last 15 of 'top32'
    # reversed, and together the two lists name every component of the 7 x 7 grid once.
    top, bot = frequency_pairs("top32"), frequency_pairs("bot32")
    assert bot[17:] == tuple(reversed(top[17:]))
    full_ranking = top + tuple(reversed(bot[:17]))
    assert sorted(full_ranking) == [(u, v) for u in range(7) for v in range(7)]


def test_selection_names_and_sizes_are_checked():
    assert len(FREQUENCY_SELECTIONS) == 18 and "top16" in FREQUENCY_SELECTIONS
    with pytest.raises(ValueError, match="unknown frequency selection"):
        MultiSpectralAttention(64, dct_size=7, frequencies="top3")
    with pytest.raises(ValueError, match="equal groups"):
        MultiSpectralAttention(24, dct_size=7, frequencies="top16")
    with pytest.raises(ValueError, match="dct_size"):
        MultiSpectralAttention(64, dct_size=6)
    with pytest.raises(ValueError, match="dct_size"):
        MultiSpectralAttention(64, dct_size=7.0)
    with pytest.raises(ValueError, match="pass dct_size"):
        MultiSpectralAttention(64)  # 64 output channels: no Bottleneck stage has them


# ----------------------------------------------------------------------------- DCT size per stage
@pytest.mark.parametrize("build, expansion", [(resnet50, 4), (resnet18, 1)], ids=["r50", "r18"])
def test_dct_size_is_the_blocks_map_size_at_224_px(build, expansion):
    # The authors' c2wh (planes 64/128/256/512 -> 56/28/14/7) is the block output's spatial size at
    # 224 px; our rule, from the output channels, must give exactly that size for every block.
    model = build().eval()
    seen = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            last_bn = block.bn3 if expansion == 4 else block.bn2
            last_bn.register_forward_hook(lambda m, i, out: seen.append((out.shape[1], out.shape[-1])))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert len(seen) == sum(len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4))
    for channels, size in seen:
        assert fca_dct_size(channels, expansion) == size
    assert sorted({c for c, _ in seen}) == [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    with pytest.raises(ValueError):
        fca_dct_size(96)


# ----------------------------------------------------------------------------- the DCT basis
@pytest.mark.parametrize("size", [7, 9, 14])
def test_dct_basis_matches_explicit_cosine_loops(size):
    pairs = [(u, v) for u in range(7) for v in range(7)]
    ours = dct_basis(size, pairs).numpy()
    for k, (u, v) in enumerate(pairs):
        np.testing.assert_allclose(ours[k], cosine_basis_loops(size, u, v), rtol=0, atol=1e-13)


def test_module_basis_is_the_authors_frequencies_scaled_to_the_grid():
    with default_dtype(torch.float64):
        module = MultiSpectralAttention(64, dct_size=14, frequencies="top16")
    assert module.basis.shape == (16, 14, 14) and module.basis.dtype == torch.float64
    for k, (u, v) in enumerate(authors_frequencies("top16", 14)):
        assert u % 2 == 0 and v % 2 == 0  # 7 x 7 indices doubled on the 14 x 14 grid
        np.testing.assert_allclose(module.basis[k].numpy(), cosine_basis_loops(14, u, v), rtol=0, atol=1e-13)


def test_dct_basis_is_orthonormal():
    basis = dct_basis(7, [(u, v) for u in range(7) for v in range(7)]).reshape(49, 49)
    np.testing.assert_allclose((basis @ basis.T).numpy(), np.eye(49), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [7, 14])
def test_zero_frequency_is_a_scaled_global_average_pool(size):
    # Orthonormal (0, 0) basis = 1 / size everywhere: the coefficient is size * mean (the paper's
    # un-normalised equations give size^2 * mean; the authors' code is orthonormal).
    with default_dtype(torch.float64):
        module = MultiSpectralAttention(8, dct_size=size, frequencies="top1")
    y = torch.randn(3, 8, size, size, dtype=torch.float64)
    torch.testing.assert_close(module.spectrum(y), size * y.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)


def test_spectrum_is_each_channels_orthonormal_dct2():
    import scipy.fft as scipy_fft  # installed with grad-cam (scikit-learn); a reference, not a dependency of emca
    with default_dtype(torch.float64):
        module = MultiSpectralAttention(32, dct_size=7, frequencies="bot16")
    y = torch.randn(2, 32, 7, 7, dtype=torch.float64)
    coefficients = scipy_fft.dctn(y.numpy(), type=2, norm="ortho", axes=(-2, -1))  # (B, C, u, v)
    expected = np.stack(
        [coefficients[:, c, u, v] for c, (u, v) in enumerate(np.repeat(authors_frequencies("bot16", 7), 2, axis=0))],
        axis=1,
    )
    np.testing.assert_allclose(module.spectrum(y).numpy(), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the whole module
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "channels, selection, dct_size, input_hw",
    [
        (32, "top16", 7, (7, 7)),  # the DCT on the whole map (ImageNet at 224 px)
        (32, "top16", 7, (14, 14)),  # pooled 2 x 2 first
        (64, "bot32", 7, (9, 11)),  # pooled with overlapping bins, not square
        (16, "low4", 14, (14, 14)),  # doubled frequencies
        (16, "top8", 14, (10, 10)),  # pooled UP: bins of one or two pixels
    ],
)
def test_module_matches_the_reference(mode, channels, selection, dct_size, input_hw):
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        module = MultiSpectralAttention(channels, dct_size=dct_size, reduction=4, frequencies=selection)
    module.train(mode == "train")
    y = torch.randn(2, channels, *input_hw, dtype=torch.float64)
    out = module(y)
    expected = reference_fca(y.numpy(), *fc_weights(module), selection, dct_size)
    assert out.shape == y.shape and out.dtype == y.dtype
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_train_and_eval_give_the_same_output():
    # No BatchNorm or dropout inside: the mode must not change anything.
    module = MultiSpectralAttention(32, dct_size=7, reduction=4)
    y = torch.randn(2, 32, 7, 7)
    out_train = module.train()(y)
    out_eval = module.eval()(y)
    torch.testing.assert_close(out_train, out_eval, rtol=0, atol=0)


def test_channels_last_input_gives_the_same_output():
    module = MultiSpectralAttention(32, dct_size=7, reduction=4)
    y = torch.randn(2, 32, 7, 7)
    torch.testing.assert_close(module(y.to(memory_format=torch.channels_last)), module(y), rtol=1e-6, atol=1e-6)


def test_hand_computed_tiny_case():
    # 2 channels, top2: channel 0 gets (0, 0), channel 1 gets (0, 1) (constant down the rows,
    # one half-cosine along the columns). W1 = [[1, 1]], W2 = [[0.1], [-0.1]].
    with default_dtype(torch.float64):
        module = MultiSpectralAttention(2, dct_size=7, reduction=2, frequencies="top2")
    with torch.no_grad():
        module.fc[0].weight.copy_(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
        module.fc[2].weight.copy_(torch.tensor([[0.1], [-0.1]], dtype=torch.float64))
    column_wave = torch.cos(math.pi * (torch.arange(7, dtype=torch.float64) + 0.5) / 7)
    y = torch.zeros(1, 2, 7, 7, dtype=torch.float64)
    y[0, 0] = 1.0  # (0, 0) coefficient: 7 * mean = 7
    y[0, 1] = 3.0 + column_wave[None, :]  # the constant has no (0, 1) part; the wave: 7 * sqrt(2/7) / sqrt(7) * 7/2
    s = (7.0, 7.0 / math.sqrt(2.0))
    torch.testing.assert_close(module.spectrum(y), torch.tensor([s], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    logit = 0.1 * (s[0] + s[1])  # relu(7 + 4.9497...) = 11.9497..., times +-0.1
    gates = (1 / (1 + math.exp(-logit)), 1 / (1 + math.exp(logit)))  # 0.76761..., 0.23238...
    torch.testing.assert_close(module(y)[0, 0], gates[0] * y[0, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module(y)[0, 1], gates[1] * y[0, 1], rtol=1e-12, atol=1e-12)
    # The same wave down the rows instead is orthogonal to (0, 1): channel 1's coefficient is 0.
    y[0, 1] = 3.0 + column_wave[:, None]
    assert abs(module.spectrum(y)[0, 1].item()) < 1e-12


# ----------------------------------------------------------------------------- dtypes, gradients, counts
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_output_keeps_the_input_dtype_under_bfloat16_autocast(input_dtype):
    torch.manual_seed(0)
    module = MultiSpectralAttention(32, dct_size=7, reduction=4)
    y = torch.randn(2, 32, 14, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(y.to(input_dtype))
    assert out.dtype == input_dtype and out.shape == y.shape
    torch.testing.assert_close(out.float(), module(y), rtol=0.05, atol=0.05)


def test_gradients_reach_every_parameter_and_the_input():
    torch.manual_seed(0)
    module = MultiSpectralAttention(32, dct_size=7, reduction=4)
    y = torch.randn(2, 32, 9, 9, requires_grad=True)
    module(y).square().sum().backward()
    assert {name for name, _ in module.named_parameters()} == {"fc.0.weight", "fc.2.weight"}
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not module.basis.requires_grad


@pytest.mark.parametrize("channels, reduction", [(256, 16), (2048, 16), (64, 8), (16, 32)])
def test_parameter_count_and_state_dict(channels, reduction):
    module = MultiSpectralAttention(channels, dct_size=7, reduction=reduction)
    hidden = max(channels // reduction, 1)
    assert sum(p.numel() for p in module.parameters()) == 2 * channels * hidden
    # The basis is derived from the options: a non-persistent buffer, out of the state_dict, but it
    # still follows the module's dtype.
    assert set(module.state_dict()) == {"fc.0.weight", "fc.2.weight"}
    assert module.double().basis.dtype == torch.float64


def test_resnet50_parameter_count_matches_the_published_28_07M():
    # FcaNet-50: one module in every Bottleneck, on bn3's output (model/fcanet.py), default options.
    model = resnet50()
    plain = sum(p.numel() for p in model.parameters())
    assert plain == 25_557_032
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    added = sum(
        sum(p.numel() for p in MultiSpectralAttention(b.bn3.num_features).parameters()) for b in blocks
    )
    assert added == sum(b.bn3.num_features**2 // 8 for b in blocks) == 2_514_944
    assert plain + added == 28_071_976 and round((plain + added) / 1e6, 2) == 28.07


# ----------------------------------------------------------------------------- the pooling folded into the basis
def pooled_spectrum(module: MultiSpectralAttention, y: torch.Tensor) -> torch.Tensor:
    """The module's former squeeze, kept as the reference: F.adaptive_avg_pool2d to the DCT grid,
    then one (C/n x d^2) @ (d^2 x 1) product per group with the basis buffer."""
    d = module.dct_size
    if y.shape[-2:] != (d, d):
        y = F.adaptive_avg_pool2d(y, (d, d))
    b, c = y.shape[:2]
    n = module.basis.shape[0]
    groups = y.reshape(b, n, c // n, d * d)
    return (groups @ module.basis.to(y.dtype).reshape(n, d * d, 1)).reshape(b, c)


def pooled_forward(module: MultiSpectralAttention, y: torch.Tensor) -> torch.Tensor:
    return y * module.gate(module.fc(pooled_spectrum(module, y)))[:, :, None, None].to(y.dtype)


@pytest.mark.parametrize("size_in", [1, 2, 5, 7, 9, 11, 14, 16, 28, 57])
@pytest.mark.parametrize("size_out", [7, 14, 56])
def test_adaptive_pool_matrix_is_pytorchs_adaptive_average_pooling(size_in, size_out):
    x = torch.randn(3, 4, size_in, dtype=torch.float64)
    pool = adaptive_pool_matrix(size_in, size_out)
    assert pool.shape == (size_out, size_in) and pool.dtype == torch.float64
    torch.testing.assert_close(x @ pool.T, F.adaptive_avg_pool1d(x, size_out), rtol=1e-14, atol=1e-14)
    # Separable: the 2-D pooling of an H x W map is A_h X A_w^T, also against the bin definition.
    width = size_in + 3
    image = torch.randn(2, 3, size_in, width, dtype=torch.float64)
    separable = pool @ image @ adaptive_pool_matrix(width, size_out).T
    torch.testing.assert_close(separable, F.adaptive_avg_pool2d(image, size_out), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(separable.numpy(), adaptive_average_pool(image.numpy(), size_out), rtol=0, atol=1e-13)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dct_size, selection", [(7, "top16"), (14, "bot8")])
@pytest.mark.parametrize(
    "input_hw",
    [(2, 2), (5, 7), (9, 11), (16, 16), (7, 7), (14, 14), (28, 28), (1, 3)],
    ids=lambda hw: f"{hw[0]}x{hw[1]}",
)
def test_resampled_basis_equals_adaptive_pooling_then_the_dct(mode, dct_size, selection, input_hw):
    # Smaller, larger, non-divisible and non-square maps against the DCT grid: outputs, spectra and
    # the gradients of the input and of both FCs (autograd through each formulation) agree to float64.
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        module = MultiSpectralAttention(32, dct_size=dct_size, reduction=4, frequencies=selection)
    module.train(mode == "train")
    y = torch.randn(3, 32, *input_hw, dtype=torch.float64)
    upstream = torch.randn_like(y)
    results = []
    for forward in (module, lambda x: pooled_forward(module, x)):
        module.zero_grad(set_to_none=True)
        x = y.clone().requires_grad_(True)
        out = forward(x)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, module.fc[0].weight.grad, module.fc[2].weight.grad))
    for ours, reference, name in zip(*results, ("output", "input grad", "fc.0 grad", "fc.2 grad"), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-11, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(module.spectrum(y), pooled_spectrum(module, y), rtol=1e-12, atol=1e-12)
    if input_hw == (dct_size, dct_size):
        assert not module._resampled  # the basis itself: nothing resampled, nothing cached


def test_resampled_basis_in_float32_matches_the_pooled_path_to_rounding():
    # The filters are made in float64 and cast once; a float32 module agrees with the pooled path.
    torch.manual_seed(0)
    module = MultiSpectralAttention(256, dct_size=56)
    y = torch.randn(2, 256, 28, 28)
    torch.testing.assert_close(module.spectrum(y), pooled_spectrum(module, y), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module(y), pooled_forward(module, y), rtol=1e-5, atol=1e-6)


def test_resampled_basis_is_cached_per_size_and_follows_the_module():
    torch.manual_seed(0)
    module = MultiSpectralAttention(32, dct_size=14, reduction=4)
    y = torch.randn(2, 32, 9, 11)
    module(y)
    filters = module._resampled[(9, 11, torch.float32, torch.device("cpu"))][1]
    assert filters.shape == (16, 9, 11) and filters.dtype == torch.float32 and not filters.requires_grad
    module(y)
    assert module._resampled[(9, 11, torch.float32, torch.device("cpu"))][1] is filters  # reused, not rebuilt
    module(torch.randn(2, 32, 5, 5))
    assert len(module._resampled) == 2
    # Out of the state_dict and of the buffers; a state_dict round trip into a fresh module is exact.
    assert set(module.state_dict()) == {"fc.0.weight", "fc.2.weight"}
    assert {name for name, _ in module.named_buffers()} == {"basis"}
    fresh = MultiSpectralAttention(32, dct_size=14, reduction=4)
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(fresh(y), module(y), rtol=0, atol=0)
    # .double() replaces the basis: the filters are rebuilt from it, in float64.
    module.double()
    torch.testing.assert_close(module(y.double()), pooled_forward(module, y.double()), rtol=1e-12, atol=1e-12)
    assert module._resampled[(9, 11, torch.float64, torch.device("cpu"))][1].dtype == torch.float64
    # A bfloat16 map (no autocast) is squeezed with bfloat16 filters, as it was with the bfloat16 basis.
    module.float()
    spectrum = module.spectrum(y.bfloat16())
    assert spectrum.dtype == torch.bfloat16
    assert module._resampled[(9, 11, torch.bfloat16, torch.device("cpu"))][1].dtype == torch.bfloat16
    torch.testing.assert_close(spectrum.float(), pooled_spectrum(module, y), rtol=0.05, atol=0.05)


def test_filters_made_under_inference_mode_still_train():
    # Inference tensors cannot be saved for backward: filters first built in an inference_mode
    # evaluation must still serve a training step afterwards.
    torch.manual_seed(0)
    module = MultiSpectralAttention(32, dct_size=7, reduction=4)
    y = torch.randn(2, 32, 5, 5)
    with torch.inference_mode():
        module(y)
    assert not module._resampled[(5, 5, torch.float32, torch.device("cpu"))][1].is_inference()
    x = y.clone().requires_grad_(True)
    module(x).square().sum().backward()
    assert x.grad is not None and module.fc[0].weight.grad is not None


def test_resampled_basis_compiles_as_one_graph():
    torch.manual_seed(0)
    module = MultiSpectralAttention(32, dct_size=14, reduction=4)
    y = torch.randn(2, 32, 9, 11)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    try:
        torch.testing.assert_close(compiled(y), pooled_forward(module, y), rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
