"""A MobileNetV2 written out by hand, scaled for 28x28 grey digits, and its training.

The structure is MobileNetV2's (Sandler et al., 2018): a 3x3 stride-2 stem
convolution, inverted residual blocks (1x1 expand Conv+BN+ReLU6, 3x3 depthwise
Conv+BN+ReLU6, 1x1 linear projection Conv+BN, residual add when the stride is 1
and the channels match), a final 1x1 Conv+BN+ReLU6, global average pooling and
a Linear classifier: 20 quantizable layers. The number of blocks is smaller and
the widths (32 to 384 channels) are about half of the paper's, so that it trains
in a minute or two of 2-core CPU (12 epochs took 75 s) and reaches about 98.6%
test top-1.  (At half this width, ONNX Runtime's per-operator overhead on 28x28
inputs hid most of what int8 kernels gain.)  Module names follow torchvision's
(``features.N.conv.M``, ``classifier.1``).

Training is deterministic: the same seed and thread count give bit-identical weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mnist_data import MnistSplit, load_mnist

__all__ = [
    "BLOCK_SETTINGS",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "accuracy",
    "train",
    "train_or_load",
]

log = logging.getLogger(__name__)

#: (expand ratio t, output channels c, repeats n, first stride s), as in the paper's table 2.
BLOCK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 32, 1, 1),
    (6, 48, 2, 2),
    (6, 64, 2, 1),
    (6, 128, 1, 2),
)

#: Bump when the architecture or the training recipe changes: it names the cache file.
RECIPE_VERSION = 5
EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 0.01
SEED = 0


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); add the input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for ``[N, 1, 28, 28]`` input; returns class logits ``[N, num_classes]``."""

    def __init__(
        self,
        num_classes: int = 10,
        stem_channels: int = 32,
        last_channels: int = 384,
        settings: Sequence[tuple[int, int, int, int]] = BLOCK_SETTINGS,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(1, stem_channels, stride=2)]
        cin = stem_channels
        for t, c, n, s in settings:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU(cin, last_channels, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels each way (pads with the background value)."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    size = x.shape[-1]
    rows = (dy[:, None] + torch.arange(size))[:, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 100) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``."""
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def train(data: MnistSplit, epochs: int = EPOCHS, seed: int = SEED) -> MobileNetV2:
    """Train a fresh :class:`MobileNetV2` with SGD + one-cycle LR and random shifts."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # channels_last convolutions train ~1.8x faster on CPU; the result is returned contiguous.
    model = MobileNetV2().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    steps_per_epoch = -(-len(data.train_x) // BATCH_SIZE)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LEARNING_RATE, momentum=0.9, nesterov=True, weight_decay=4e-5
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE * 10, total_steps=epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data.train_x), generator=generator)
        total = 0.0
        for i in range(0, len(order), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            x = _random_shift(data.train_x[idx], generator)
            loss = F.cross_entropy(model(x), data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        log.info(
            "epoch %d/%d  train loss %.4f  test top-1 %.4f  (%.0f s)",
            epoch + 1,
            epochs,
            total / len(order),
            accuracy(model, data.test_x, data.test_y),
            time.perf_counter() - start,
        )
    return model.to(memory_format=torch.contiguous_format).eval()


def train_or_load(cache_dir: str | os.PathLike[str], data: MnistSplit | None = None) -> MobileNetV2:
    """The trained model, from ``cache_dir`` if it was cached there, else trained and cached."""
    path = Path(cache_dir) / f"mobilenet_v2_mnist_v{RECIPE_VERSION}_seed{SEED}.pt"
    if path.exists():
        model = MobileNetV2()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("loaded trained weights from %s", path)
        return model.eval()
    log.info("training MobileNetV2 on MNIST (%d epochs); weights will be cached in %s", EPOCHS, path)
    model = train(data if data is not None else load_mnist())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return model
