"""DigitsNet: a small CNN classifier of scikit-learn's digits whose penultimate layer is a feature space.

It plays the part Inception plays for FID/KID/IS, for the default dataset (``dataset=digits``):
weights ship in the package (``digits.safetensors``), so the metric works offline, and a forward
pass costs microseconds per image on a CPU. ``python -m diffexp.quality.features.train_digits`` retrains
the weights reproducibly on ``digits_split()``'s training part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NAME = "digits"  # the name metrics on these features carry: eval/fd_digits_2k, never eval/fid_2k
INPUT_SIZE = 16  # digits carry 8x8 information; 16 px is also the harness's digits resolution
NUM_FEATURES = 128
NUM_CLASSES = 10
WEIGHTS = Path(__file__).with_name("digits.safetensors")
SPLIT_SEED, NUM_HELD_OUT = 0, 500


class DigitsNet(nn.Module):
    """10-class digit classifier; ``forward`` returns ``(features N x 128, logits N x 10)``, float32.

    Features are the penultimate layer, standardized: over the (clean) training digits each of the
    128 dimensions has mean 0 and variance 1. Logits are a linear map of the features.

    Input: images N x C x H x W with values in [0, 255] (uint8, as samples and datasets are, or
    float), at any resolution: they are resized to 16 x 16 (bilinear, antialiased, so downscaling
    large images does not alias). C = 1 is grayscale; C = 3 (RGB) is turned to gray by the channel
    mean. Digits are expected light on dark, as in scikit-learn's digits and MNIST.
    """

    num_features = NUM_FEATURES  # read by torchmetrics when this module is its ``feature=``

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 x 4
        )
        # SiLU rather than ReLU: a ReLU layer left a third of its 128 units dead (always 0). The
        # BatchNorm (no affine) is fixed after training to the clean training digits' statistics,
        # so every feature has mean 0 and variance 1 there: FD, KID's cubic kernel and k-NN
        # distances weigh all dimensions alike, on a scale that does not depend on the training run.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, NUM_FEATURES), nn.SiLU(),
                                   nn.BatchNorm1d(NUM_FEATURES, affine=False))
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.conv(normalize(images)))
        return features, self.head(features)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """N x {1,3} x H x W images in [0, 255] -> N x 1 x 16 x 16 float in [-1, 1] (what the convolutions see)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"DigitsNet expects N x 1 x H x W or N x 3 x H x W images, got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


def load_digits_net(device: str | torch.device = "cpu", path: str | Path = WEIGHTS) -> DigitsNet:
    """The trained DigitsNet (the packaged weights unless ``path``) on ``device``, in eval mode, frozen."""
    from safetensors.torch import load_file

    net = DigitsNet()
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval().requires_grad_(False)


def digits_split(size: int = INPUT_SIZE) -> dict[str, torch.Tensor]:
    """The fixed train / held-out split of scikit-learn's 1,797 digits, as the harness renders them.

    Returns ``{"train_images", "train_labels", "test_images", "test_labels"}``: uint8 N x 1 x size x size
    images made by ``diffexp.data.datasets`` (``load_digits`` then ``preprocess``: Pillow bicubic from 8 x 8, the
    pixels a ``dataset=digits dataset.resolution=size`` run trains on) and int64 labels. The split is
    stratified by class, 1,297 train / 500 held-out, and the same on every call and machine.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    from diffexp.data.datasets import load_digits, preprocess_dataset

    images = preprocess_dataset(load_digits(), size, channels=1)
    labels = torch.from_numpy(sklearn_digits().target).long()  # same order as diffexp.data.datasets.load_digits
    # sklearn draws the split from numpy's legacy RandomState, whose stream numpy keeps frozen.
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=NUM_HELD_OUT,
                                   random_state=SPLIT_SEED, stratify=labels.numpy())
    train, test = torch.from_numpy(train).sort().values, torch.from_numpy(test).sort().values
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test]}


@torch.inference_mode()
def digits_features(net: DigitsNet, images: torch.Tensor | np.ndarray,
                    batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of any number of images, in batches on the network's device, returned on the CPU.

    ``images``: a uint8 N x C x H x W tensor, or a N x H x W x C numpy array (what ``generate`` returns
    and sample ``.npz`` files hold).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    device = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat([f for f, _ in out]).cpu(), torch.cat([lg for _, lg in out]).cpu()
