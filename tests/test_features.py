"""The packaged digits feature network and the quality functions on its features.

Real network, real data (scikit-learn's digits as the harness renders them), the real retrain
command; the quality functions against plain brute-force references and cases with known answers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import run_main
from safetensors import safe_open
from safetensors.torch import load_file
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance
from torchvision.transforms.v2.functional import gaussian_blur

from diffexp.quality import stats as quality
from diffexp.quality.features.digits import NUM_FEATURES, WEIGHTS, digits_features, digits_split, load_digits_net
from diffexp.quality.stats import class_accuracy, class_balanced_fd, class_mix_distance, class_stats, precision_recall


@pytest.fixture(scope="module")
def net():
    return load_digits_net()


@pytest.fixture(scope="module")
def split():
    return digits_split()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


class Given(torch.nn.Module):
    """Identity 'feature extractor': torchmetrics receives features we computed ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


# --- the network ------------------------------------------------------------------------------


def test_packaged_network_classifies_held_out_digits(net, split):
    features, logits = digits_features(net, split["test_images"])
    assert len(split["test_labels"]) == 500 and len(split["train_labels"]) == 1297
    per_class = torch.bincount(torch.cat([split["train_labels"], split["test_labels"]]))
    assert (torch.bincount(split["test_labels"]) - per_class * 500 / 1797).abs().max() <= 1  # stratified
    assert accuracy(logits, split["test_labels"]) >= 0.97
    assert features.shape == (500, NUM_FEATURES) and features.dtype == torch.float32
    assert WEIGHTS.stat().st_size < 2_000_000


def test_features_are_standardized_on_training_digits(net, split):
    features, _ = digits_features(net, split["train_images"])
    assert features.mean(0).abs().max() < 1e-4
    assert torch.allclose(features.var(0), torch.ones(NUM_FEATURES), atol=0.01)


@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_any_resolution_gives_the_same_shapes(net, size):
    held_out = digits_split(size)
    assert held_out["test_images"].shape[-2:] == (size, size)
    features, logits = net(held_out["test_images"])
    assert features.shape == (500, NUM_FEATURES) and logits.shape == (500, 10)
    assert accuracy(logits, held_out["test_labels"]) >= 0.97


def test_rgb_and_numpy_samples_give_the_grayscale_answer(net, split):
    gray = split["test_images"][:64]
    features, logits = net(gray)
    rgb_features, rgb_logits = net(gray.expand(-1, 3, -1, -1))
    assert torch.allclose(features, rgb_features, atol=1e-5) and torch.allclose(logits, rgb_logits, atol=1e-5)
    npz_like = gray.permute(0, 2, 3, 1).numpy()  # N x H x W x C, as generate() and sample .npz give them
    assert torch.equal(digits_features(net, npz_like)[0], features)
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        net(gray[:, :, :, :, None])


def test_retraining_reproduces_the_packaged_weights(tmp_path, split):
    out = tmp_path / "digits.safetensors"
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:  # the command's main, in this process; the packaged weights were written by a process of their own
        proc = run_main("quality.features.train_digits", "--out", str(out), check=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert "held-out accuracy" in proc.stdout
    with safe_open(str(WEIGHTS), "pt") as f:
        packaged_on = f.metadata()
    retrained, packaged = load_file(str(out)), load_file(str(WEIGHTS))
    assert retrained.keys() == packaged.keys()
    if (packaged_on["torch"], packaged_on["cpu_capability"]) == (torch.__version__, torch.backends.cpu.get_cpu_capability()):
        assert all(torch.equal(retrained[k], packaged[k]) for k in packaged)
    else:  # another torch build or CPU kernels round differently, and training amplifies that
        _, logits = digits_features(load_digits_net(path=out), split["test_images"])
        assert accuracy(logits, split["test_labels"]) >= 0.97


# --- torchmetrics on the digits features --------------------------------------------------------


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    fd = FrechetInceptionDistance(feature=Given(real.shape[1]))
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return float(fd.compute())


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (images + torch.randn(images.shape, generator=g) * sigma).round().clamp(0, 255).to(torch.uint8)


def test_frechet_distance_grows_with_noise_and_blur(net, split):
    real, _ = digits_features(net, split["train_images"])
    held_out = split["test_images"]
    assert abs(frechet_distance(real, real)) < 1e-6
    clean = frechet_distance(real, digits_features(net, held_out)[0])  # finite-sample distance of real to real
    noise = [frechet_distance(real, digits_features(net, noisy(held_out, s))[0]) for s in (32, 64, 96)]
    blur = [frechet_distance(real, digits_features(net, gaussian_blur(held_out, [7, 7], [s, s]))[0])
            for s in (0.5, 1.0, 1.5)]
    assert clean < 0.5 * noise[0] and clean < 0.5 * blur[0]
    assert noise == sorted(noise) and blur == sorted(blur)
    assert noise[-1] > 20 * clean and blur[-1] > 20 * clean


def test_kid_and_classifier_score_on_digits_features(net, split):
    real, _ = digits_features(net, split["train_images"])
    held_out, held_out_logits = digits_features(net, split["test_images"])
    kid = KernelInceptionDistance(feature=Given(NUM_FEATURES), subset_size=250, reset_real_features=False)
    kid.update(real, real=True)
    kid.update(held_out, real=False)
    clean_mean, clean_std = kid.compute()
    kid.reset()  # keeps the real features
    kid.update(digits_features(net, noisy(split["test_images"], 96))[0], real=False)
    noisy_mean, _ = kid.compute()
    assert abs(clean_mean) < 3 * clean_std + 0.01 and noisy_mean > 0.2
    score = InceptionScore(feature=Given(10), splits=2)  # eval/cs_digits_<n>: IS on the digits logits
    score.update(held_out_logits)
    assert score.compute()[0] > 8  # of at most 10: confident and balanced


# --- precision / recall -------------------------------------------------------------------------


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radius = np.sort(distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radius = np.sort(distances(fake, fake), axis=1)[:, k]
    fake_to_real = distances(fake, real)
    precision = np.mean([any(fake_to_real[i, j] <= real_radius[j] for j in range(len(real))) for i in range(len(fake))])
    recall = np.mean([any(fake_to_real[i, j] <= fake_radius[i] for i in range(len(fake))) for j in range(len(real))])
    return float(precision), float(recall)


@pytest.mark.parametrize("seed", range(4))
def test_precision_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(loc=0.5, scale=1.3, size=(30, 5))
    for k in (1, 3, 5):
        expected = brute_force_precision_recall(real, fake, k)
        assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_chunking_changes_nothing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g) * 1.2
    whole = precision_recall(real, fake)
    monkeypatch.setattr(quality, "CHUNK_ELEMENTS", 1000)  # a few rows per chunk
    assert precision_recall(real, fake) == whole


def test_precision_recall_obvious_cases():
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(10) * 2 * math.pi / 10
    modes = 30 * torch.stack([angles.cos(), angles.sin()], 1)  # 10 well separated modes in the plane
    real = (modes[:, None] + torch.randn(10, 100, 2, generator=g)).reshape(-1, 2)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 1000) == (0.0, 0.0)
    half = (modes[:5, None] + torch.randn(5, 100, 2, generator=g)).reshape(-1, 2)
    precision, recall = precision_recall(real, half)
    assert precision > 0.9 and 0.4 < recall <= 0.5


# --- class statistics ---------------------------------------------------------------------------


def confident(classes: list[int]) -> torch.Tensor:
    """Logits that predict ``classes`` with softmax probability ~1."""
    return 50.0 * torch.nn.functional.one_hot(torch.tensor(classes), 10).float()


def test_class_stats_known_answers():
    balanced = class_stats(confident(list(range(10)) * 10))
    assert balanced == pytest.approx({"coverage": 1.0, "balance": 1.0, "confidence": 1.0})
    one_class = class_stats(confident([3] * 100))
    assert one_class == pytest.approx({"coverage": 0.1, "balance": 0.0, "confidence": 1.0})
    five = class_stats(confident(list(range(5)) * 20))
    assert five["coverage"] == 0.5 and five["balance"] == pytest.approx(math.log(5) / math.log(10))
    # 200 samples: a class needs 10 (half of its uniform 20) to count as covered.
    edge = class_stats(confident([0] * 10 + [1] * 9 + [2] * 181))
    assert edge["coverage"] == 0.2
    # Softmax of (log 3, 0, ..., 0): the top class has 3 / (3 + 9).
    assert class_stats(torch.tensor([[math.log(3)] + [0.0] * 9] * 4))["confidence"] == pytest.approx(0.25)


def test_class_accuracy_known_answers():
    logits = confident([1, 2, 3, 4])
    assert class_accuracy(logits, torch.tensor([1, 2, 3, 4])) == 1.0
    assert class_accuracy(logits, torch.tensor([1, 2, 3, 5])) == 0.75
    assert class_accuracy(logits, torch.tensor([0, 0, 0, 0])) == 0.0


def test_class_mix_distance_known_answers():
    assert class_mix_distance(confident(list(range(10)) * 3), confident(list(range(10)))) == 0.0
    assert class_mix_distance(confident([3] * 10), confident([4] * 10)) == 1.0
    # shares (0.5, 0.5) against (0.25, 0.75): half of |0.25| + |-0.25|
    assert class_mix_distance(confident([0, 1]), confident([0, 1, 1, 1])) == pytest.approx(0.25)


# --- the class-balanced Fréchet distance --------------------------------------------------------


def clustered(counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of three far-apart Gaussian classes (``counts[c]`` samples of class c) and logits naming them."""
    g = torch.Generator().manual_seed(seed)
    centers = 6 * torch.eye(3, 16)
    features = torch.cat([centers[c] + torch.randn(n, 16, generator=g) for c, n in enumerate(counts)])
    return features.double(), confident([c for c, n in enumerate(counts) for _ in range(n)])


def test_class_balanced_fd_removes_the_class_mix_and_keeps_the_rest():
    real, real_logits = clustered([800, 800, 800], seed=0)
    same_mix, same_logits = clustered([400, 400, 400], seed=1)
    # Equal shares: every weight is 1, and it is the plain distance, as torchmetrics computes it.
    plain_same = frechet_distance(real, same_mix)
    assert class_balanced_fd(real, same_mix, real_logits, same_logits) == pytest.approx(plain_same, rel=1e-6)
    # Twice as many of class 0: the plain distance grows many times over, the balanced one hardly
    # moves (the extra samples are new draws, so it is not exactly equal).
    tilted, tilted_logits = clustered([800, 400, 400], seed=1)
    assert frechet_distance(real, tilted) > 5 * plain_same
    assert class_balanced_fd(real, tilted, real_logits, tilted_logits) == pytest.approx(plain_same, rel=0.1)
    # Worse samples within the classes show as before.
    blurred = tilted.clone()
    blurred[:, 3:] *= 1.5
    assert class_balanced_fd(real, blurred, real_logits, tilted_logits) > 5 * plain_same


def test_class_balanced_fd_on_digits(net, split):
    real, real_logits = digits_features(net, split["train_images"])
    held_out, held_out_logits = digits_features(net, split["test_images"])
    assert abs(class_balanced_fd(real, real, real_logits, real_logits)) < 1e-6
    clean = class_balanced_fd(real, held_out, real_logits, held_out_logits)
    assert clean == pytest.approx(frechet_distance(real, held_out), rel=0.1)  # a stratified split: nearly equal shares
    # Held-out digits without their 0s, 1s and 2s: reweighting cannot bring missing classes back,
    # so the balanced distance grows as the plain one does (19.2 and 19.3 here, from 0.54 and 0.58).
    rest = held_out_logits.argmax(1) > 2
    plain_rest = frechet_distance(real, held_out[rest])
    balanced_rest = class_balanced_fd(real, held_out[rest], real_logits, held_out_logits[rest])
    assert plain_rest > 5 * clean and balanced_rest > 5 * clean
    noisy_features, noisy_logits = digits_features(net, noisy(split["test_images"], 64))
    assert class_balanced_fd(real, noisy_features, real_logits, noisy_logits) > 5 * clean
