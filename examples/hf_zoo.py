"""Real architectures as users upload them: Hugging Face transformers classes built from
configs (no weights download) plus plain PyTorch CNN / MLP / LSTM models, each with a task it
can learn from data a package ships or the code makes.

    from examples import hf_zoo
    zm = hf_zoo.build("mobilenetv2")          # a ZooModel
    data = zm.make_data(1500, seed=0)         # {input name: array, "labels": int64}
    hf_zoo.fit(zm, data, epochs=zm.epochs)    # brief supervised training, fixed seed
    hf_zoo.save_pt2(zm, data, "model.pt2")    # torch.export.save with a dynamic batch dim

Vision models read scikit-learn's 8x8 digits upscaled to ``IMAGE`` x ``IMAGE``, one channel.
Text models read a synthetic task (``text_data``): each sequence has tokens drawn from a
class-specific part of the vocabulary mixed with common tokens, padded to ``SEQ`` with an
attention mask; the label is the class whose tokens occur most. The sentence embedder
returns L2-normalised mean-pooled rows (N, D): not logits.

Sizes are kept small enough that the engine compresses each in minutes on 2 CPU cores, but
every model keeps the structure users bring (residual stages, depthwise convs with
``padding="same"``, attention with masks, token-embedding tables, LSTM gates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

IMAGE = 32  # px, side of the upscaled digits
SEQ = 16  # tokens per text sample (padded)
VOCAB = 512  # text vocabulary size
TEXT_CLASSES = 4

Kind = Literal["classifier", "embedding"]


@dataclasses.dataclass
class ZooModel:
    name: str
    module: nn.Module
    input_names: tuple[str, ...]
    kind: Kind
    make_data: Callable[[int, int], dict[str, np.ndarray]]  # (samples, seed) -> arrays
    epochs: int = 8  # brief training that reaches a useful accuracy
    lr: float = 3e-3


class _ImageLogits(nn.Module):
    """A transformers vision model returning its ``logits`` tensor (export wants tensors).
    The forward argument names become the exported input names (= the data keys)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class _TextLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _SentenceEmbedder(nn.Module):
    """Encoder + attention-masked mean pooling + L2 normalisation, as sentence-transformers do."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        # Training head only (not part of the exported embedding output): see fit().
        self.train_head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids, attention_mask)


class LSTMClassifier(nn.Module):
    """Digits rows as a sequence of 8 time steps of 8 features, 2-layer LSTM, linear head."""

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class PlainCNN(nn.Module):
    """VGG-style plain conv net (no residuals): what a user's own small CNN looks like."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values).flatten(1))


class MLP(nn.Module):
    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------- data


def digits_images(n: int, seed: int, size: int = IMAGE) -> dict[str, np.ndarray]:
    """scikit-learn's digits (1,797 samples; ``n`` more repeats them with a fixed shuffle)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.target))
    idx = np.resize(idx, n) if n > len(idx) else idx[:n]
    x = torch.tensor(d.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return {"pixel_values": x.numpy(), "labels": d.target[idx].astype(np.int64)}


def digits_rows(n: int, seed: int) -> dict[str, np.ndarray]:
    d = digits_images(n, seed, size=8)
    return {"x": d["pixel_values"][:, 0], "labels": d["labels"]}


def digits_flat(n: int, seed: int) -> dict[str, np.ndarray]:
    d = digits_images(n, seed, size=8)
    return {"x": d["pixel_values"], "labels": d["labels"]}


def text_data(n: int, seed: int, classes: int = TEXT_CLASSES) -> dict[str, np.ndarray]:
    """Synthetic text classification with padding (see module doc). Token 0 is [PAD]."""
    rng = np.random.default_rng(seed)
    common = np.arange(1, VOCAB // 2)  # tokens shared by every class
    per = (VOCAB - VOCAB // 2) // classes
    labels = rng.integers(0, classes, n)
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    for i, y in enumerate(labels):
        length = int(rng.integers(SEQ // 2, SEQ + 1))
        own = VOCAB // 2 + y * per + rng.integers(0, per, length)
        # A minority of tokens from another class so the task needs counting, not one look.
        other = VOCAB // 2 + rng.integers(0, classes, length) * per + rng.integers(0, per, length)
        tok = np.where(rng.random(length) < 0.35, own, rng.choice(common, length))
        tok = np.where(rng.random(length) < 0.15, other, tok)
        ids[i, :length] = tok
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int64)}


# ---------------------------------------------------------------------------------- models


def _standard_norm_init(model: nn.Module) -> nn.Module:
    """Norm layers back to PyTorch's init (weight 1, bias 0, fresh running stats).

    transformers 5.24 initialises EfficientNet's BatchNorm weights like linear weights
    (normal, std 0.02): every block then scales its activations by ~0.016, they vanish to 0
    by the fifth block, and the model cannot train (loss stuck at ln 10). No other zoo model
    depends on that init, so every model gets the standard one.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
            m.reset_parameters()
    return model


def build(name: str) -> ZooModel:
    """A freshly initialised model of the zoo (seeded: the same weights every call)."""
    zm = _build(name)
    _standard_norm_init(zm.module)
    return zm


def _build(name: str) -> ZooModel:
    import transformers as tf

    torch.manual_seed(0)
    img = ("pixel_values",)
    text = ("input_ids", "attention_mask")
    if name == "resnet":
        cfg = tf.ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                              depths=[1, 1, 1, 1], layer_type="basic", num_labels=10)
        return ZooModel(name, _ImageLogits(tf.ResNetForImageClassification(cfg)), img,
                        "classifier", digits_images)
    if name == "mobilenetv2":
        cfg = tf.MobileNetV2Config(num_channels=1, image_size=IMAGE, depth_multiplier=0.5,
                                   num_labels=10)
        return ZooModel(name, _ImageLogits(tf.MobileNetV2ForImageClassification(cfg)), img,
                        "classifier", digits_images)
    if name == "convnext":
        cfg = tf.ConvNextConfig(num_channels=1, patch_size=2, hidden_sizes=[32, 64, 128, 256],
                                depths=[1, 1, 2, 1], num_labels=10, image_size=IMAGE)
        return ZooModel(name, _ImageLogits(tf.ConvNextForImageClassification(cfg)), img,
                        "classifier", digits_images, lr=1e-3)
    if name == "vit":
        cfg = tf.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=96,
                           num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
                           num_labels=10)
        return ZooModel(name, _ImageLogits(tf.ViTForImageClassification(cfg)), img,
                        "classifier", digits_images, epochs=12, lr=1e-3)
    if name == "efficientnet":
        # EfficientNet-B0's block layout at a quarter width; its stride-1 depthwise convs use
        # padding="same" (the Keras port), which PT2E quantization rejects as is.
        cfg = tf.EfficientNetConfig(num_channels=1, image_size=IMAGE, width_coefficient=0.5,
                                    depth_coefficient=0.5, hidden_dim=640, num_labels=10)
        return ZooModel(name, _ImageLogits(tf.EfficientNetForImageClassification(cfg)), img,
                        "classifier", digits_images)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=512,
                            max_position_embeddings=SEQ, num_labels=TEXT_CLASSES)
        return ZooModel(name, _TextLogits(tf.BertForSequenceClassification(cfg)), text,
                        "classifier", text_data, epochs=6, lr=1e-3)
    if name == "embedder":
        # MiniLM-style sentence encoder (BERT layers, 384 wide as all-MiniLM-L6-v2), smaller.
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=192, num_hidden_layers=3,
                            num_attention_heads=6, intermediate_size=768,
                            max_position_embeddings=SEQ)
        return ZooModel(name, _SentenceEmbedder(tf.BertModel(cfg, add_pooling_layer=False),
                                                TEXT_CLASSES),
                        text, "embedding", text_data, epochs=6, lr=1e-3)
    if name == "lstm":
        return ZooModel(name, LSTMClassifier(), ("x",), "classifier", digits_rows, epochs=15)
    if name == "mlp":
        return ZooModel(name, MLP(), ("x",), "classifier", digits_flat, epochs=15)
    if name == "cnn":
        return ZooModel(name, PlainCNN(), img, "classifier", digits_images)
    raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}")


NAMES = ("resnet", "mobilenetv2", "convnext", "vit", "efficientnet", "bert", "embedder",
         "lstm", "mlp", "cnn")


def _tensors(zm: ZooModel, data: dict[str, np.ndarray], idx: np.ndarray) -> tuple[torch.Tensor,
                                                                                  ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(data[k][idx])) for k in zm.input_names)


def fit(zm: ZooModel, data: dict[str, np.ndarray], *, epochs: int | None = None,
        batch: int = 64, seed: int = 0) -> nn.Module:
    """Brief supervised training (AdamW, one-cycle schedule, fixed seed). The embedder trains
    through its ``train_head`` on the pooled output, so its embeddings separate the classes."""
    model = zm.module
    epochs = zm.epochs if epochs is None else epochs
    torch.manual_seed(seed)
    y = torch.from_numpy(data["labels"])
    n = len(y)
    opt = torch.optim.AdamW(model.parameters(), lr=zm.lr)
    steps = max(1, epochs * ((n + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=zm.lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            xs = _tensors(zm, data, idx)
            if isinstance(model, _SentenceEmbedder):
                logits = model.train_head(model.embed(*xs) * 10.0)  # scale: cosine logits
            else:
                logits = model(*xs)
            opt.zero_grad()
            nn.functional.cross_entropy(logits, y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def predict(zm: ZooModel, data: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """Eager fp32 outputs over every sample (the model's first output)."""
    outs = []
    n = len(next(iter(data.values())))
    with torch.no_grad():
        for i in range(0, n, batch):
            outs.append(zm.module(*_tensors(zm, data, np.arange(i, min(n, i + batch)))).numpy())
    return np.concatenate(outs)


def save_pt2(zm: ZooModel, data: dict[str, np.ndarray], path: str | Path) -> Path:
    """``torch.export`` the eval-mode model with a dynamic batch dimension and save it."""
    path = Path(path)
    ex = _tensors(zm, data, np.arange(4))
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in ex)
    ep = torch.export.export(zm.module.eval(), ex, dynamic_shapes=dyn)
    torch.export.save(ep, path)
    return path


def save_npz(data: dict[str, np.ndarray], path: str | Path, *, labels: bool = True) -> Path:
    """Data as the engine reads it: one key per exported input name (+ ``labels``)."""
    path = Path(path)
    np.savez(path, **{k: v for k, v in data.items() if labels or k != "labels"})
    return path
