"""Fine-tuning (transfer learning) of a backbone on the training images.

``train_classifier(fine_tune=True)`` runs this before fitting its classifier. The
backbone's early stages (its *trunk*) stay frozen; its last stages and a new linear
head are trained on the training images only (the test images never reach it):

1. ``VALIDATION`` (a tenth) of each category's training images is held out of the
   tuning, to choose from the training images themselves rather than from settings
   chosen on one collection;
2. each other training image gives ``VIEWS`` augmented views: a random square crop of
   30-100% of the image's area (textures seen at several scales), resized to
   ``TRAIN_SIZE`` (288 px, the size the tuned backbone then featurizes at), flipped
   left-right half the time; every training image gives its centre view too;
3. the frozen trunk runs once on every view, exported to ONNX Runtime; its outputs are
   kept in temporary files (memory-mapped, so large sets do not fill memory);
4. the last stages are trained by PyTorch on those outputs for at most ``epochs``
   epochs, a random view of each image an epoch: AdamW (weight decay 1e-4), a one-cycle
   learning rate peaking at 1e-3 (1e-2 for the new head), label smoothing 0.1, dropout
   0.2, in channels-last layout (1.4x faster on CPU). After each epoch the held-out
   images are classified; the best epoch is kept, and past half the epochs training
   stops after ``PATIENCE`` epochs without a better one. A time budget (``minutes``)
   sets how many epochs fit, from two timed steps, and stops the views or the epochs
   when it has passed;
5. train_classifier fits its classifier on the held-in images' features, frozen and
   tuned (centre views), and keeps the tuned backbone only when it classifies the
   held-out images better. A kept one is exported to ONNX and stored in the models
   table under its own feature key (``efficientnet_lite0-288-tuned@<sha256 of the
   graph>``), so featurize_images, the scheduled refresh and similar_images use it like
   any other, in the database too, without torch.

Measured on the reference set (efficientnet_lite0, mlp, 2 cores, five seeds,
bench/RESULTS.md): 276 to 290 s a seed, test accuracy 88.0%, cosine top-1 65.0% (before the
held-out images and the channels-last layout: 385 s, 88.9% and 65.9%). Cheaper settings
tried: three 224 px views and 12 epochs, five seeds: 242 s, 87.8% and 63.5%; the same with 8
epochs: 174 s, 87.6% and 61.0%; crops of at least 50% of the area (seed 0): 88.1% / 62.3%;
of at least 70%, five seeds: 258 s, 87.8% / 62.3%; the top stages trained on random 14 x 14
crops of the 18 x 18 trunk outputs (seed 0): 229 s against 301 s, 87.6% both, combined top-1
60.0% against 65.9%. Not kept: they trade accuracy for time.
Tuning only the last stage was 3x faster but 11 points worse at top-1 (one seed); tuning
from the third block of the 192-channel stage on was 0.89x the time (259 s against 290 s)
and 2.3 points worse at top-1 (63.6% against 65.9%, seed 0); tuning three stages was 2x
slower and no better (one seed); mirrored test-time views gave no consistent gain (two
seeds); bfloat16 autocast, batches of 64 and batch-norm statistics frozen at the
pretrained ones trained no faster than float32 batches of 32. Half the training step is
oneDNN's convolution backward (the depthwise weight gradient takes ~9x its forward; no
torch formulation of it measured faster).
Torch is needed (the ``export`` extra); the database server does not have it, so
fine-tuning runs from a client against the database's store.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import backbones, checks
from .featurize import Featurizer, feature_key, graph_metadata
from .images import ImageError, center_square, load_rgb

VIEWS = 6
MIN_CROP = 0.3  # the smallest share of an image's area a training view is cropped to
TRAIN_SIZE = 288  # pixels of the training views (the tuned graph featurizes at 288)
DEFAULT_EPOCHS = 12
MAX_EPOCHS = 200
VALIDATION = 0.1  # share of each category's training images held out (0: none)
MAX_VALIDATION = 0.5
PATIENCE = 3  # epochs without a better validation accuracy before stopping (past half)
MAX_MINUTES = 24 * 60
BATCH = 32


@dataclass
class Tuning:
    """What a fine-tune produced. ``graph`` is None when no epoch could run (``reason``
    says why); ``fit_features`` and ``validation_features`` are the tuned backbone's
    features of the held-in and held-out training images (centre views), for
    train_classifier to compare with the frozen backbone's."""
    graph: bytes | None
    key: str | None
    metadata: dict
    fit_ids: list
    validation_ids: list
    fit_features: np.ndarray | None = None
    validation_features: np.ndarray | None = None
    reason: str = ""
    record: dict = field(default_factory=dict)


def check_request(epochs: int, validation: float = VALIDATION,
                  minutes: float | None = None) -> None:
    """Refuse a fine-tune, before anything is touched, for bad ``epochs``, ``validation``
    or ``minutes``, or where torch is missing."""
    check_epochs(epochs)
    checks.between("validation", validation, 0.0, MAX_VALIDATION)
    if minutes is not None:
        checks.between("tune_minutes", minutes, 0.0, MAX_MINUTES, low_included=False)
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
    side = max(1, int(min(width, height) * np.sqrt(rng.uniform(MIN_CROP, 1.0))))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    view = image.crop((left, top, left + side, top + side)).resize(
        (TRAIN_SIZE, TRAIN_SIZE), Image.BILINEAR, reducing_gap=3.0)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view)


def validation_split(labels: np.ndarray, share: float, rng: np.random.Generator):
    """Positions held in and held out: ``share`` of each category (at least one, never
    all of it), drawn at random."""
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if share > 0 and len(members) > 1:
            size = min(len(members) - 1, max(1, round(share * len(members))))
            held_out += rng.choice(members, size, replace=False).tolist()
    held_out = sorted(held_out)
    return sorted(set(range(len(labels))) - set(held_out)), held_out


def fine_tune_backbone(store, train_ids, categories, backbone: str = backbones.DEFAULT_BACKBONE,
                       weights=None, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                       progress: bool = True, validation: float = VALIDATION,
                       minutes: float | None = None) -> Tuning:
    """Tune ``backbone`` on the images ``train_ids`` (labelled ``categories``), holding
    out ``validation`` of them to stop early and keep the best epoch, within ``minutes``
    when given. Stores nothing: train_classifier decides whether the tuning is kept."""
    import torch

    begun = time.monotonic()
    check_request(epochs, validation, minutes)
    deadline = begun + 60 * minutes if minutes is not None else None
    classes = sorted(set(categories))
    labels = np.array([classes.index(c) for c in categories], dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    fit, held_out = validation_split(labels, validation, np.random.default_rng([seed, 3]))
    torch.manual_seed(seed)
    module = backbones.build_module(backbone, weights)
    trunk = Featurizer(backbones.module_to_onnx(module, backbone, part="trunk",
                                                size=TRAIN_SIZE))
    ids = [train_ids[p] for p in fit]
    validation_ids = [train_ids[p] for p in held_out]
    record = {"validation_images": len(validation_ids), "epochs_run": 0}
    with tempfile.TemporaryDirectory(prefix="imgsim-tune-") as tmp:
        made = _trunk_outputs(store, trunk, ids, rng, tmp, "fit", VIEWS, progress, deadline)
        checked = (_trunk_outputs(store, trunk, validation_ids, rng, tmp, "validation", 0,
                                  progress, deadline) if validation_ids and made else None)
        del trunk  # its ONNX Runtime arena (~0.9 GB on the reference set) before training
        if made is None or (validation_ids and checked is None):
            return Tuning(None, None, {}, ids, validation_ids,
                          reason="the time budget ran out while making the views",
                          record=record)
        outputs, centres, kept = made
        fit_labels = labels[fit][kept]
        fit_ids = [ids[p] for p in kept]
        if checked is not None:
            validation_ids = [validation_ids[p] for p in checked[2]]
            checked = (checked[1], labels[held_out][checked[2]])
        planned = epochs
        if deadline is not None:
            per_epoch = _seconds_per_epoch(module, backbone, outputs, fit_labels, len(classes))
            planned = min(epochs, int((deadline - time.monotonic()) // per_epoch))
            if planned < 1:
                return Tuning(None, None, {}, fit_ids, validation_ids,
                              reason=f"the time budget leaves no room for an epoch "
                                     f"(~{per_epoch:.0f} s each)", record=record)
        record.update(_train_top(module, outputs, fit_labels, len(classes),
                                 backbones.get_spec(backbone).dim, planned, rng, progress,
                                 checked, deadline))
        fit_features = _pooled(module, centres)
        validation_features = _pooled(module, checked[0]) if checked is not None else None
        del outputs, centres, checked
    graph = backbones.module_to_onnx(module.eval(), backbone)
    key = f"{backbone}-{backbones.INPUT_SIZE}-tuned@{hashlib.sha256(graph).hexdigest()[:12]}"
    record["seconds"] = round(time.monotonic() - begun, 1)
    metadata = {**graph_metadata(backbone), "tuned_from": feature_key(backbone, weights),
                "epochs": epochs, "views": VIEWS, "view_size": TRAIN_SIZE, "seed": seed,
                "train_images": len(fit_ids), "classes": classes, **record}
    return Tuning(graph, key, metadata, fit_ids, validation_ids, fit_features,
                  validation_features, record=record)


def _trunk_outputs(store, trunk, ids, rng, folder, name, views, progress, deadline):
    """Run the frozen trunk (ONNX Runtime) on ``views`` augmented views and the centre
    view of each image.

    Returns memory-mapped float16 arrays ``(images, views, C, H, W)`` (None when
    ``views`` is 0) and ``(images, C, H, W)``, and the positions in ``ids`` of the
    images that decoded; None when ``deadline`` passed first."""
    augmented, centres, kept = None, None, []
    bar = tqdm(total=len(ids), desc=f"fine-tune: {name} views", unit="img",
               disable=not progress)
    for start in range(0, len(ids), BATCH):
        if deadline is not None and time.monotonic() > deadline:
            bar.close()
            return None
        chunk = ids[start:start + BATCH]
        data = store.image_data(chunk)
        images = []
        for offset, image_id in enumerate(chunk):
            try:
                images.append((start + offset, load_rgb(data[image_id])))
            except ImageError:
                continue  # recorded by featurize; such images never reach the split
        if images:
            centre = trunk.run(np.stack([np.asarray(center_square(im, TRAIN_SIZE))
                                         for _, im in images])).astype(np.float16)
            if centres is None:
                centres = np.lib.format.open_memmap(os.path.join(folder, f"{name}-c.npy"),
                                                    "w+", np.float16,
                                                    (len(ids), *centre.shape[1:]))
            centres[len(kept):len(kept) + len(images)] = centre
            if views:
                batch = np.stack([trunk.run(np.stack([augmented_view(im, rng)
                                                      for _, im in images]))
                                  for _ in range(views)], axis=1).astype(np.float16)
                if augmented is None:
                    augmented = np.lib.format.open_memmap(
                        os.path.join(folder, f"{name}-v.npy"), "w+", np.float16,
                        (len(ids), *batch.shape[1:]))
                augmented[len(kept):len(kept) + len(images)] = batch
            kept += [position for position, _ in images]
        bar.update(len(chunk))
    bar.close()
    if not kept:
        raise ValueError(f"no {name} image could be decoded")
    return (augmented[:len(kept)] if views else None), centres[:len(kept)], np.array(kept)


def _setup(module, dim, n_classes, epochs, steps_per_epoch):
    """The new head, the tuned stages and their optimiser and schedule."""
    import torch
    from torch import nn

    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, n_classes))
    tuned = nn.ModuleList(module.top_modules()).to(memory_format=torch.channels_last)
    peak = [1e-3, 1e-2]
    optimiser = torch.optim.AdamW([{"params": tuned.parameters(), "lr": peak[0]},
                                   {"params": head.parameters(), "lr": peak[1]}],
                                  weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=peak, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    return head, tuned, optimiser, schedule


def _step(module, head, optimiser, schedule, loss_of, x, y):
    import torch

    x = torch.from_numpy(x.astype(np.float32)).contiguous(memory_format=torch.channels_last)
    loss = loss_of(head(module.top(x)), torch.from_numpy(y))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()


def _seconds_per_epoch(module, backbone, outputs, labels, n_classes) -> float:
    """An epoch's seconds, timed on two steps of a throwaway copy of the module."""
    from torch import nn

    probe = copy.deepcopy(module)
    steps = -(-len(labels) // BATCH)
    head, tuned, optimiser, schedule = _setup(probe, backbones.get_spec(backbone).dim,
                                              n_classes, 1, 3)
    loss_of = nn.CrossEntropyLoss()
    tuned.train()
    rows = np.arange(min(BATCH, len(labels)))
    timings = []
    for _ in range(3):
        begun = time.monotonic()
        _step(probe, head, optimiser, schedule, loss_of, outputs[rows, 0], labels[rows])
        timings.append(time.monotonic() - begun)
    return steps * min(timings[1:]) * 1.1  # and the validation pass


def _train_top(module, outputs, labels, n_classes, dim, epochs, rng, progress, checked,
               deadline) -> dict:
    """Train the backbone's top stages and a new linear head on trunk outputs, in place.

    With ``checked`` (validation centre outputs and labels) the epoch with the best
    validation accuracy is kept and training stops after ``PATIENCE`` epochs without a
    better one; it stops too once ``deadline`` has passed. Returns what happened."""
    import torch
    from torch import nn

    steps_per_epoch = -(-len(labels) // BATCH)
    head, tuned, optimiser, schedule = _setup(module, dim, n_classes, epochs, steps_per_epoch)
    loss_of = nn.CrossEntropyLoss(label_smoothing=0.1)
    best, history = None, []
    for epoch in tqdm(range(1, epochs + 1), desc="fine-tune: epochs", unit="epoch",
                      disable=not progress):
        tuned.train()
        head.train()
        order = rng.permutation(len(labels))
        views = rng.integers(0, outputs.shape[1], len(labels))
        for start in range(0, len(order), BATCH):
            rows = np.sort(order[start:start + BATCH])
            _step(module, head, optimiser, schedule, loss_of, outputs[rows, views[rows]],
                  labels[rows])
        if checked is not None:
            tuned.eval()
            head.eval()
            with torch.no_grad():
                logits = torch.cat([head(module.top(torch.from_numpy(
                    checked[0][s:s + BATCH].astype(np.float32))))
                    for s in range(0, len(checked[1]), BATCH)])
            accuracy = float((logits.argmax(1).numpy() == checked[1]).mean())
            history.append(round(accuracy, 4))
            if best is None or accuracy >= best[0]:  # a tie: the later, calmer epoch
                best = (accuracy, epoch, copy.deepcopy(tuned.state_dict()))
            elif epoch - best[1] >= PATIENCE and 2 * epoch >= epochs:
                break  # not while the learning rate is still high
        if deadline is not None and time.monotonic() > deadline:
            break
    if best is not None:
        tuned.load_state_dict(best[2])
    tuned.to(memory_format=torch.contiguous_format)
    module.eval()
    return {"epochs_run": epoch, "best_epoch": best[1] if best else epoch,
            "validation_history": history}


def _pooled(module, centres) -> np.ndarray:
    """The tuned backbone's features of trunk outputs, batch by batch."""
    import torch

    with torch.no_grad():
        return np.concatenate([module.top(torch.from_numpy(
            centres[s:s + BATCH].astype(np.float32))).numpy()
            for s in range(0, len(centres), BATCH)]).astype(np.float32)
