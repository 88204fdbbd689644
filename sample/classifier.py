"""A small CNN that names the class of an image, trained once per prepared folder and cached beside it.

lit-eval scores class-conditional samples with it ("does the image show the class that was asked
for?"). It is trained on the folder's train split, its accuracy on the test split is recorded with
it, and it is cached as DATA/classifier/classifier.pt together with the sha256 of the folder's
manifest.json: a re-prepared folder (new manifest) or different training settings retrain it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from common.files import atomic_file, file_sha256
from data_prep import Manifest, eval_batches, load_manifest, manifest_path, to_chw, train_batches
from sample.errors import SampleFailure
from sample.grids import decode

CACHE_FOLDER = "classifier"
CACHE_NAME = "classifier.pt"
FORMAT_VERSION = 1  # bump when the network or its training changes: old caches are then retrained


@dataclass
class ClassifierSettings:
    """How the classifier is trained; a cache made with other settings is retrained."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


@dataclass
class ClassifierInfo:
    """What the cache records next to the weights."""

    format_version: int
    manifest_sha256: str
    settings: dict
    channels: int
    height: int
    width: int
    n_classes: int
    test_accuracy: float
    test_images: int
    per_class_test_accuracy: list = field(default_factory=list)
    train_seconds: float = 0.0


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks and a linear layer; global pooling makes it fit any image size."""

    def __init__(self, channels: int, n_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classify = nn.Linear(2 * width, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B, C, H, W] in [0, 1] -> class logits [B, n_classes]."""
        return self.classify(self.features(images))


def sequences_to_tensor(seqs, manifest: Manifest) -> torch.Tensor:
    """Byte sequences [B, L] -> float images [B, C, H, W] in [0, 1] (decoded as the data is displayed)."""
    return to_chw(decode(seqs, manifest.image_info()))


@torch.no_grad()
def predict(net: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class [B] of float images [B, C, H, W]."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(device)).argmax(dim=-1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def test_accuracy(net: SmallCNN, data_dir, manifest: Manifest, progress: bool) -> tuple[float, int, list]:
    """(accuracy, images, per-class accuracy) of net over the whole test split of data_dir."""
    n_classes = len(manifest.class_names)
    seen, correct = torch.zeros(2, n_classes, dtype=torch.long)  # per class: test images, classified right
    batches = eval_batches(data_dir, 256, split="test")
    for batch in tqdm(batches, desc="classifier test", unit="batch", disable=not progress, leave=False):
        predicted = predict(net, sequences_to_tensor(batch.seqs, manifest))
        seen += torch.bincount(batch.labels, minlength=n_classes)
        correct += torch.bincount(batch.labels[predicted == batch.labels], minlength=n_classes)
    total = int(seen.sum())
    if total == 0:
        raise SampleFailure(f"{data_dir}: the test split is empty; cannot measure the classifier")
    per_class = [c / s if s else float("nan") for c, s in zip(correct.tolist(), seen.tolist())]
    return int(correct.sum()) / total, total, per_class


def train_classifier(data_dir, digest: str, settings: ClassifierSettings, device="cpu", progress: bool = True
                     ) -> tuple[SmallCNN, ClassifierInfo]:
    """Train a SmallCNN on data_dir's train split and measure it on the test split; digest: its manifest's sha256."""
    manifest = load_manifest(data_dir)
    n_classes = len(manifest.class_names)
    if n_classes < 2:
        raise SampleFailure(f"{manifest_path(data_dir)}: class_names has {n_classes} classes; "
                            "a classifier needs at least 2")
    torch.manual_seed(settings.seed)
    net = SmallCNN(manifest.channels, n_classes).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps)
    batches = train_batches(data_dir, settings.batch_size, num_workers=0, seed=settings.seed,
                            shuffle_buffer=min(1000, manifest.splits["train"].total))
    began = time.perf_counter()
    net.train()
    bar = tqdm(range(settings.steps), desc="training classifier", unit="step", disable=not progress, leave=False)
    for step, batch in zip(bar, batches):  # the steps first: the bar closes when they run out
        images = sequences_to_tensor(batch.seqs, manifest).to(device)  # (B, C, H, W)
        loss = nn.functional.cross_entropy(net(images), batch.labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - began
    accuracy, images, per_class = test_accuracy(net, data_dir, manifest, progress)
    info = ClassifierInfo(FORMAT_VERSION, digest, asdict(settings), manifest.channels, manifest.height,
                          manifest.width, n_classes, accuracy, images, per_class, seconds)
    return net.eval(), info


def _load_cached(path: Path, digest: str, settings: ClassifierSettings, device
                 ) -> tuple[Optional[SmallCNN], Optional[ClassifierInfo], str]:
    """(classifier, info, "") if the cache fits this data and these settings, else (None, None, why not)."""
    if not path.is_file():
        return None, None, "none cached"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        info = ClassifierInfo(**saved["info"])
        state = saved["state_dict"]
    except Exception as err:  # a damaged cache is rebuilt, not fatal
        return None, None, f"unreadable cache ({type(err).__name__})"
    if info.format_version != FORMAT_VERSION:
        return None, None, f"cache format {info.format_version}, now {FORMAT_VERSION}"
    if info.manifest_sha256 != digest:
        return None, None, "the data's manifest changed"
    if info.settings != asdict(settings):
        return None, None, "other training settings"
    net = SmallCNN(info.channels, info.n_classes)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        return None, None, "cached weights do not fit the network"
    return net.to(device).eval(), info, ""


def load_or_train(data_dir, settings: ClassifierSettings = ClassifierSettings(), device="cpu",
                  cache_dir: Optional[str] = None, retrain: bool = False, progress: bool = True,
                  log=print) -> tuple[SmallCNN, ClassifierInfo, Path, bool]:
    """(classifier, its info, cache path, whether it was trained now): the cached one when it fits."""
    path = Path(cache_dir if cache_dir is not None else Path(data_dir) / CACHE_FOLDER) / CACHE_NAME
    # manifest.json names every shard's digest, so its own digest changes with the data
    digest = file_sha256(manifest_path(data_dir))
    why = "--retrain-classifier"
    if not retrain:
        net, info, why = _load_cached(path, digest, settings, device)
        if net is not None:
            log(f"classifier: cached {path}")
            return net, info, path, False
    log(f"classifier: training on the train split ({why}; {settings.steps} steps, once per data folder)")
    net, info = train_classifier(data_dir, digest, settings, device, progress)
    state = {key: value.cpu() for key, value in net.state_dict().items()}
    try:
        with atomic_file(path) as stream:  # readers see the old cache or the new one, never half of one
            torch.save({"info": asdict(info), "state_dict": state}, stream)
    except OSError as err:
        raise SampleFailure(f"{path}: cannot cache the classifier ({err.strerror}); "
                            "pass --classifier-dir to put it elsewhere") from None
    log(f"classifier: saved {path}")
    return net, info, path, True
