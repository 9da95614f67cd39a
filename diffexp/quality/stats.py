"""Sample-quality numbers computed from feature tensors: k-NN precision/recall, class statistics
and the class-balanced Fréchet distance.

Pure functions (no sampling, no I/O) on features and logits of a feature network such as
``diffexp.quality.features.digits``. Fréchet distance, KID and IS-style scores come from torchmetrics,
which takes the same features through an identity ``feature=`` module.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 24  # distances held at once (64 MiB of float32), whatever the set sizes


def _row_chunks(n_rows: int, n_cols: int) -> range:
    return range(0, n_rows, max(1, CHUNK_ELEMENTS // max(1, n_cols)))


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's Euclidean distance to its k-th nearest neighbour in ``features``, itself excluded."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} needs 1 <= k < the number of samples ({len(features)})")
    step = _row_chunks(len(features), len(features)).step
    # Each point is its own nearest neighbour at distance 0: the k-th other point is the (k+1)-th.
    return torch.cat([torch.cdist(features[i:i + step], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), step)])


def inside_any_ball(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Boolean per query: lies within (<=) ``radii[j]`` of some ``centers[j]``."""
    step = _row_chunks(len(queries), len(centers)).step
    return torch.cat([(torch.cdist(queries[i:i + step], centers) <= radii).any(dim=1)
                      for i in range(0, len(queries), step)])


def _as_float(features: torch.Tensor) -> torch.Tensor:
    features = features.flatten(1)
    return features if features.dtype in (torch.float32, torch.float64) else features.float()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of ``fake`` against ``real`` features.

    Each sample gets a ball whose radius is the distance to its k-th nearest neighbour in its own
    set (itself excluded). Precision: the fraction of fake samples inside at least one real ball
    (how much of what is generated looks real). Recall: the fraction of real samples inside at
    least one fake ball (how much of the real data the generator covers). Both in [0, 1].
    Distances are computed in row chunks, so memory stays bounded (10k x 10k works).
    """
    real, fake = _as_float(real), _as_float(fake)
    precision = inside_any_ball(fake, real, knn_radii(real, k)).double().mean()
    recall = inside_any_ball(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def class_shares(logits: torch.Tensor) -> torch.Tensor:
    """The fraction (float64) of samples whose predicted (argmax) class is each of the C classes."""
    return torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double() / len(logits)


def class_stats(logits: torch.Tensor) -> dict[str, float]:
    """How a classifier sees a set of generated samples, from its logits (N x C).

    With p_c the fraction of samples whose predicted (argmax) class is c:

    - ``coverage``: the fraction of the C classes with p_c >= 1 / (2C), at least half their uniform
      share (1: every class well represented; 0.5: half the classes missing or rare);
    - ``balance``: the entropy of (p_c) over log C (1: every class equally often; 0: all one class);
    - ``confidence``: the mean over samples of the largest softmax probability (1/C to 1; low when
      samples look like no class in particular).
    """
    num_classes = logits.shape[1]
    share = class_shares(logits)
    nonzero = share[share > 0]  # 0 log 0 = 0
    return {
        "coverage": float((share >= 0.5 / num_classes).double().mean()),
        "balance": float(-(nonzero * nonzero.log()).sum() / math.log(num_classes)),
        "confidence": float(logits.float().softmax(1).amax(1).mean()),
    }


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of samples that the classifier assigns to the class they were asked for (``labels``)."""
    return float((logits.argmax(1) == labels.to(logits.device)).double().mean())


def class_mix_distance(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> float:
    """Total variation distance between the predicted-class shares of generated and real samples:
    half the L1 distance of the two share vectors, 0 (the same class mix) to 1 (no class in common).
    n samples drawn independently from the real mix of C equal classes give about 0.4 * sqrt((C - 1) / n)
    by chance (0.027 for 2,000 digits)."""
    return float((class_shares(fake_logits) - class_shares(real_logits)).abs().sum() / 2)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64; the trace of the root
    is the sum of the square roots of the eigenvalues of sigma1 sigma2 (as torchmetrics computes it)."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace)


def weighted_mean_cov(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of weighted samples, the covariance with the reliability-weights
    correction, so equal weights give ``torch.cov``'s unbiased (N - 1) estimate."""
    x, w = features.flatten(1).double(), weights.double() / weights.double().sum()
    mean = w @ x
    centered = x - mean
    return mean, (centered * w[:, None]).T @ centered / (1 - w.square().sum())


def class_balanced_fd(real: torch.Tensor, fake: torch.Tensor, real_logits: torch.Tensor,
                      fake_logits: torch.Tensor) -> float:
    """Fréchet distance of the generated features reweighted to the real class mix, against the real ones.

    Each generated sample of predicted class c weighs share_real(c) / share_fake(c), so every class
    counts as much as it does among the real samples. What is left is the quality within the classes:
    the chance class counts of a finite sample (multinomial noise), which dominate a classifier-feature
    FD's spread over sampling seeds, no longer move it, and neither does a systematic tilt of the class
    mix (``class_mix_distance`` measures that). A class that was never generated cannot be weighted
    in; its absence still shows in the distance. Equal shares give the plain Fréchet distance.
    """
    real_share, fake_share = class_shares(real_logits), class_shares(fake_logits)
    classes = fake_logits.argmax(1)
    weights = real_share[classes] / fake_share[classes]
    if not weights.sum() > 0:  # no generated sample is of a class the real samples have
        weights = torch.ones(len(fake), dtype=torch.float64)
    real = real.flatten(1).double()
    return frechet_distance(*weighted_mean_cov(fake, weights), real.mean(0), torch.cov(real.T))
