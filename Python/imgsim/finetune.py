"""Fine-tuning (transfer learning) of a backbone on the training images.

``train_classifier(fine_tune=True)`` runs this before fitting its classifier. The
backbone's early stages (its *trunk*) stay frozen; its last stages and a new linear
head are trained on the training images only (the test images never reach it):

1. each training image gives ``VIEWS`` augmented views: a random square crop of
   30-100% of the image's area (textures seen at several scales), resized to
   ``TRAIN_SIZE`` (288 px, the size the tuned backbone then featurizes at), flipped
   left-right half the time;
2. the frozen trunk runs once on every view, exported to ONNX Runtime; its outputs are
   kept in a temporary file (memory-mapped, so large sets do not fill memory);
3. the last stages are trained by PyTorch on those outputs for ``epochs`` epochs, a
   random view of each image an epoch: AdamW (weight decay 1e-4), a one-cycle learning
   rate peaking at 1e-3 (1e-2 for the new head), label smoothing 0.1, dropout 0.2;
4. the whole tuned backbone is exported to ONNX and stored in the models table under
   its own feature key (``efficientnet_lite0-288-tuned@<sha256 of the graph>``), so
   featurize_images, the scheduled refresh and similar_images use it like any other,
   in the database too, without torch.

Measured on the reference set (efficientnet_lite0, mlp, seed 0, 2 cores): six 288 px views
and 12 epochs took 385 s (302 s of them training the top stages), test accuracy 89.0%,
cosine top-1 65.9% (the defaults; five seeds in bench/RESULTS.md: 88.9% and 65.9%).
Cheaper settings tried: three 224 px views and 12 epochs 242 s, and on seed 0 the same
figures, but over five seeds 87.8% and 63.5% (top-32 96.4%); three 224 px views and 8
epochs 174 s, over five seeds 87.6% and 61.0%. Neither kept: they trade accuracy for time.
Tuning only the last stage was 3x faster but 11 points worse at top-1
(one seed); tuning three stages was 2x slower and no better (one seed); mirrored test-time
views gave no consistent gain (two seeds).
Torch is needed (the ``export`` extra); the database server does not have it, so
fine-tuning runs from a client against the database's store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import backbones, checks
from .featurize import Featurizer, feature_key, graph_metadata
from .images import ImageError, load_rgb

VIEWS = 6
TRAIN_SIZE = 288  # pixels of the training views (the tuned graph featurizes at 288)
DEFAULT_EPOCHS = 12
MAX_EPOCHS = 200
BATCH = 32


def check_request(epochs: int) -> None:
    """Refuse a fine-tune, before anything is touched, for bad ``epochs`` or where torch
    is missing."""
    check_epochs(epochs)
    if importlib.util.find_spec("torch") is None:
        raise checks.ParameterError(
            "fine_tune needs torch, which this Python lacks (pip install 'imgsim[export]'); "
            "the database server has none: fine-tune from a client, e.g. "
            "imgsim --db postgresql://... train --fine-tune")


def check_epochs(epochs: int) -> int:
    checks.count("epochs", epochs, 1)
    if epochs > MAX_EPOCHS:
        raise checks.ParameterError(f"epochs must be <= {MAX_EPOCHS}; got {epochs}")
    return epochs


def augmented_view(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of 30-100% of the image's area, 288 px, maybe mirrored."""
    width, height = image.size
    side = max(1, int(min(width, height) * np.sqrt(rng.uniform(0.3, 1.0))))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    view = image.crop((left, top, left + side, top + side)).resize(
        (TRAIN_SIZE, TRAIN_SIZE), Image.BILINEAR, reducing_gap=3.0)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view)


def fine_tune_backbone(store, train_ids, categories, backbone: str = backbones.DEFAULT_BACKBONE,
                       weights=None, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                       progress: bool = True) -> str:
    """Tune ``backbone`` on the images ``train_ids`` (labelled ``categories``); store the
    tuned graph in the models table and return its feature key."""
    import torch

    check_epochs(epochs)
    classes = sorted(set(categories))
    labels = np.array([classes.index(c) for c in categories], dtype=np.int64)
    module = backbones.build_module(backbone, weights)
    rng = np.random.default_rng([seed, 2])
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="imgsim-tune-") as tmp:
        outputs, kept = _trunk_outputs(store, module, backbone, list(train_ids), rng,
                                       os.path.join(tmp, "trunk.npy"), progress)
        _train_top(module, outputs, labels[kept], len(classes),
                   backbones.get_spec(backbone).dim, epochs, rng, progress)
        del outputs
    graph = backbones.module_to_onnx(module.eval(), backbone)
    key = f"{backbone}-{backbones.INPUT_SIZE}-tuned@{hashlib.sha256(graph).hexdigest()[:12]}"
    with store.transaction():
        store.save_model(key, "backbone", graph, {
            **graph_metadata(backbone), "tuned_from": feature_key(backbone, weights),
            "epochs": epochs, "views": VIEWS, "view_size": TRAIN_SIZE, "seed": seed,
            "train_images": int(len(kept)), "classes": classes})
    return key


def _trunk_outputs(store, module, backbone, ids, rng, path, progress):
    """Run the frozen trunk (ONNX Runtime) on ``VIEWS`` augmented views of each image.

    Returns a memory-mapped ``(images, VIEWS, C, H, W)`` float16 array and the positions
    in ``ids`` of the images that decoded."""
    trunk = Featurizer(backbones.module_to_onnx(module, backbone, part="trunk",
                                                size=TRAIN_SIZE))
    outputs, kept = None, []
    bar = tqdm(total=len(ids), desc="fine-tune: views", unit="img", disable=not progress)
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        data = store.image_data(chunk)
        images = []
        for offset, image_id in enumerate(chunk):
            try:
                images.append((start + offset, load_rgb(data[image_id])))
            except ImageError:
                continue  # recorded by featurize; such images never reach the split
        if images:
            views = np.stack([trunk.run(np.stack([augmented_view(im, rng) for _, im in images]))
                              for _ in range(VIEWS)], axis=1).astype(np.float16)
            if outputs is None:
                outputs = np.lib.format.open_memmap(path, "w+", np.float16,
                                                    (len(ids), *views.shape[1:]))
            outputs[len(kept):len(kept) + len(images)] = views
            kept += [position for position, _ in images]
        bar.update(len(chunk))
    bar.close()
    if not kept:
        raise ValueError("no training image could be decoded")
    return outputs[:len(kept)], np.array(kept)


def _train_top(module, outputs, labels, n_classes, dim, epochs, rng, progress):
    """Train the backbone's top stages and a new linear head on trunk outputs, in place."""
    import torch
    from torch import nn

    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, n_classes))
    tuned = nn.ModuleList(module.top_modules())
    peak = [1e-3, 1e-2]
    optimiser = torch.optim.AdamW([{"params": tuned.parameters(), "lr": peak[0]},
                                   {"params": head.parameters(), "lr": peak[1]}],
                                  weight_decay=1e-4)
    steps_per_epoch = -(-len(labels) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=peak, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    loss_of = nn.CrossEntropyLoss(label_smoothing=0.1)
    tuned.train()
    head.train()
    for _ in tqdm(range(epochs), desc="fine-tune: epochs", unit="epoch", disable=not progress):
        order = rng.permutation(len(labels))
        views = rng.integers(0, outputs.shape[1], len(labels))
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            x = torch.from_numpy(outputs[rows, views[rows]].astype(np.float32))
            loss = loss_of(head(module.top(x)), torch.from_numpy(labels[rows]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    module.eval()
