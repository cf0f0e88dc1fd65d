"""Classifier accuracy (CA): top-1 accuracy of a fixed classifier on restored images.

The paper reports CA of a pretrained ImageNet classifier on restored images as a measure of how
much class information a restoration keeps. Our datasets are small (e.g. 32x32 gray animal
silhouettes), so the classifier is a small CNN trained once on the clean training split,
deterministically from a seed, and then frozen. Two reference points frame every CA:

* the *ceiling*: accuracy on the clean test images (what a perfect restoration would get);
* the *floor*: accuracy on the corrupted test images (what no restoration gets).

Its penultimate layer (``embedding_dim`` features after the convolutions, the input of the last
linear layer) also serves as a task-specific feature space for Fréchet distance and KID: far
fewer dimensions than Inception's 2048, so a thousand test images estimate its statistics well.

The checkpoint is a plain dict ``{"config", "model", "class_names", "clean_test_accuracy"}``
(state_dict plus the config that built it), loadable with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ibmd_pipeline.engine.config import config_to_dict, parse_config, require


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training of the CA classifier.

    ``channels``: output channels of the conv stages (each conv 3x3 + batch norm + ReLU +
    2x2 max-pool); ``embedding_dim``: width of the penultimate layer (linear + ReLU), whose
    output are the classifier features; ``epochs``/``batch_size``/``lr``/``weight_decay``: AdamW
    with a one-cycle learning rate (15% warm-up to ``lr``, then cosine decay); ``max_shift``:
    random translation (pixels) used as augmentation; ``seed``: makes initialisation, shuffling
    and augmentation reproducible.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    embedding_dim: int = 128
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    seed: int = 0

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(1 <= len(self.channels) <= 5, f"{prefix}channels", "expected 1 to 5 conv stages")
        require(all(c >= 1 for c in self.channels), f"{prefix}channels", "channel counts must be >= 1")
        require(self.embedding_dim >= 1, f"{prefix}embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        require(self.epochs >= 1, f"{prefix}epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"{prefix}lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{prefix}weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.max_shift >= 0, f"{prefix}max_shift", f"must be >= 0, got {self.max_shift}")


# Spatial size the conv features are pooled to before the linear layer; 32x32 inputs with
# three stages arrive at exactly this size, other sizes are averaged down (or up) to it.
_POOLED_SIZE = 4


def min_image_size(config: ClassifierConfig) -> int:
    """The smallest image side the classifier takes: each conv stage halves it (2x2 max-pool)."""
    return 2 ** len(config.channels)


class SmallClassifier(nn.Module):
    """Conv stages (3x3 conv, batch norm, ReLU, 2x2 max-pool), a penultimate linear + ReLU layer
    (the classifier features), then the linear head."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int], embedding_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(_POOLED_SIZE)
        self.embedding = nn.Sequential(nn.Linear(previous * _POOLED_SIZE**2, embedding_dim), nn.ReLU())
        self.head = nn.Linear(embedding_dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, embedding_dim)`` for images in ``[-1, 1]``."""
        return self.embedding(self.pool(self.features(images)).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images in ``[-1, 1]``."""
        return self.head(self.embed(images))


def _check_labelled(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, repeating the border pixels."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    # Replicating the border keeps whatever background colour the data set has.
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: ClassifierConfig | Mapping[str, Any] | None = None,
    progress: bool = False,
    class_names: Sequence[str] | None = None,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train the CA classifier on clean images in ``[-1, 1]`` and return its checkpoint dict.

    Training runs on the CPU with a fixed seed, so the same data and config give the same
    weights. With ``test_images``/``test_labels`` the checkpoint records the clean test accuracy
    (the CA ceiling, in percent); otherwise ``clean_test_accuracy`` is ``None``.
    """
    if not isinstance(config, ClassifierConfig):
        config = parse_config(ClassifierConfig, config, "classifier")
    _check_labelled(images, labels)
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    _check_labelled(images, labels, num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]

    generator = torch.Generator().manual_seed(config.seed)
    # Initialise from the seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = SmallClassifier(images.shape[1], num_classes, config.channels, config.embedding_dim)

    images = images.float()
    labels = labels.long()
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15
    )
    model.train()
    bar = tqdm(total=total_steps, desc="classifier", disable=not progress)
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), config.batch_size):
            index = order[start : start + config.batch_size]
            batch = _random_shift(images[index], config.max_shift, generator)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()

    clean_test_accuracy = None
    if test_images is not None and test_labels is not None:
        clean_test_accuracy = classifier_accuracy(model, test_images, test_labels)
    return {
        "config": config_to_dict(config),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "class_names": names,
        "clean_test_accuracy": clean_test_accuracy,
    }


def load_classifier(checkpoint: Mapping[str, Any]) -> SmallClassifier:
    """Rebuild the frozen classifier (eval mode, CPU) from a :func:`train_classifier` checkpoint."""
    config = parse_config(ClassifierConfig, checkpoint["config"], "classifier")
    state = checkpoint["model"]
    in_channels = state["features.0.weight"].shape[1]
    num_classes = len(checkpoint["class_names"])
    model = SmallClassifier(in_channels, num_classes, config.channels, config.embedding_dim)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval()


@torch.inference_mode()
def _logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: str | torch.device
) -> torch.Tensor:
    if images.shape[0] == 0:
        raise ValueError("no images to classify")
    device = torch.device(device)
    model = model.to(device).eval()
    chunks = [
        model(images[i : i + batch_size].to(device, torch.float32).clamp(-1, 1)).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


@torch.inference_mode()
def features_and_predictions(
    model: SmallClassifier,
    images: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``(N, embedding_dim)`` float32 and predicted classes ``(N,)`` int64,
    on the CPU, of images in ``[-1, 1]``, from one forward pass."""
    if images.shape[0] == 0:
        raise ValueError("no images to classify")
    device = torch.device(device)
    model = model.to(device).eval()
    features, predictions = [], []
    for i in range(0, images.shape[0], batch_size):
        embedded = model.embed(images[i : i + batch_size].to(device, torch.float32).clamp(-1, 1))
        features.append(embedded.float().cpu())
        predictions.append(model.head(embedded).argmax(1).cpu())
    return torch.cat(features), torch.cat(predictions)


def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Predicted class of each image (``int64 (N,)`` on the CPU); images in ``[-1, 1]``."""
    return _logits(model, images, batch_size, device).argmax(1)


def classifier_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy in percent of ``model`` on ``images`` (``[-1, 1]``) against ``labels``."""
    _check_labelled(images, labels)
    if labels.numel() == 0:
        raise ValueError("classifier accuracy of an empty set is undefined")
    logits = _logits(model, images, batch_size, device)
    _check_labelled(images, labels, num_classes=logits.shape[1])
    return 100.0 * (logits.argmax(1) == labels.cpu().long()).double().mean().item()


def accuracy_or_reason(
    model: nn.Module | None,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[float | None, str | None]:
    """``(accuracy in percent, None)``, or ``(None, reason)`` when CA cannot be measured."""
    if model is None:
        return None, "no classifier was trained (the training data has no labels)"
    if labels is None:
        return None, "the evaluation data has no class labels"
    return classifier_accuracy(model, images, labels, batch_size, device), None


def reference_accuracies(
    model: nn.Module | None,
    bundle: Mapping[str, Any],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, float | str | None]:
    """CA ceiling (clean test images) and floor (corrupted test images) of a test bundle.

    Returns ``{"ceiling": float | None, "floor": float | None, "reason": str | None}``; the
    reason says why both are ``None`` (no labels, or no classifier).
    """
    labels = bundle.get("labels")
    ceiling, reason = accuracy_or_reason(model, bundle["clean"], labels, batch_size, device)
    floor, _ = accuracy_or_reason(model, bundle["corrupted"], labels, batch_size, device)
    return {"ceiling": ceiling, "floor": floor, "reason": reason}
