"""Retrain DigitsNet's packaged weights: ``python -m diffexp.quality.features.train_digits [--out PATH]``.

Reproducible: one CPU thread, deterministic kernels, every random draw from one seeded generator,
so the same torch build on the same kind of CPU writes bit-identical weights. Training sees the
digits as diffusion samples may look: rendered at 8 to 32 px (the network resizes back to 16),
slightly moved, scaled, rotated, blurred, noisy and dimmed, and quantized to uint8. A last pass
standardizes the features on the clean training digits (see ``standardize_features``).
Prints the held-out accuracy and writes a safetensors file (default: the packaged one).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from diffexp.quality.features.digits import INPUT_SIZE, WEIGHTS, DigitsNet, digits_features, digits_split

SEED = 0
EPOCHS = 30
BATCH_SIZE = 64
LR = 3e-3
SIZES = (8, 10, 12, 14, 16, 20, 24, 28, 32)  # resolutions the training batches are rendered at


def augment(images_u8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A randomly distorted copy of a uint8 N x 1 x 16 x 16 batch, as uint8 N x 1 x s x s (one s per batch)."""
    n = len(images_u8)
    u = lambda lo, hi: torch.rand(n, generator=g) * (hi - lo) + lo  # noqa: E731
    angle, scale = u(-12, 12) * math.pi / 180, u(0.85, 1.15)
    shift = torch.stack([u(-0.18, 0.18), u(-0.18, 0.18)], 1)  # +-1.5 px of 16 (grid units are half-widths)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = images_u8.float()
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                      padding_mode="zeros", align_corners=False)  # zeros = the digits' black background
    size = SIZES[int(torch.randint(len(SIZES), (1,), generator=g))]
    if size != INPUT_SIZE:
        mode = ("bilinear", "bicubic")[int(torch.randint(2, (1,), generator=g))]
        x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    blur = float(torch.rand(1, generator=g)) * 0.8 * size / INPUT_SIZE  # sigma up to 0.8 px at 16 px
    if blur > 0.2 * size / INPUT_SIZE:
        x = gaussian_blur(x, blur)
    x = x * u(0.75, 1.1)[:, None, None, None]  # samples are often a little dim or overshoot
    x = x + torch.randn(x.shape, generator=g) * u(0, 12)[:, None, None, None]
    return x.round().clamp(0, 255).to(torch.uint8)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N x 1 x H x W with standard deviation ``sigma`` px (zero padding)."""
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(radius, 0))


def accuracy(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``net`` classifies as ``labels``."""
    _, logits = digits_features(net, images)
    return float((logits.argmax(1) == labels).float().mean())


def train(split: dict[str, torch.Tensor]) -> DigitsNet:
    """DigitsNet trained on ``split``'s training part; deterministic given the torch build and CPU."""
    torch.manual_seed(SEED)  # the weight initialization
    g = torch.Generator().manual_seed(SEED)  # everything else
    images, labels = split["train_images"], split["train_labels"]
    net = DigitsNet()
    steps_per_epoch = len(images) // BATCH_SIZE
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(images), generator=g)
        for step in range(steps_per_epoch):
            idx = perm[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            _, logits = net(augment(images[idx], g))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    standardize_features(net, images)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def standardize_features(net: DigitsNet, images_u8: torch.Tensor) -> None:
    """Set the feature BatchNorm's statistics to exactly those of ``images_u8`` (one full-batch pass).

    During training its running statistics track recent augmented batches; after this, the features
    of the clean training digits have mean 0 and variance 1 per dimension.
    """
    norm = net.embed[-1]
    norm.reset_running_stats()
    norm.momentum = None  # cumulative average: after one batch, that batch's statistics
    net.train()
    net(images_u8)
    norm.momentum = 0.1  # back to the default, so the saved module is an ordinary BatchNorm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(WEIGHTS), help="safetensors file to write (default: the packaged weights)")
    args = parser.parse_args(argv)
    # Determinism: one thread fixes the order of every floating-point reduction.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    split = digits_split()
    start = time.perf_counter()
    net = train(split)
    seconds = time.perf_counter() - start
    acc = accuracy(net, split["test_images"], split["test_labels"])
    from safetensors.torch import save_file

    # Metadata holds only what is deterministic, so a retrain on the same setup writes the same bytes.
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out,
              metadata={"held_out_accuracy": f"{acc:.4f}", "torch": torch.__version__,
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "seed": str(SEED)})
    print(f"trained in {seconds:.1f} s; held-out accuracy {acc:.4f} ({len(split['test_labels'])} images); "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
