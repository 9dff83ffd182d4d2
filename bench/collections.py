"""Fine-tuning on labeled collections other than the reference set, which none of its
settings were chosen on: per seed, the default classifier and the fine-tuned one, their
test accuracy, the template's cosine top-k and edited copies ranked first (combined
space), the training images' close pairs, train_classifier's seconds, and which backbone
the fine-tune kept.

    python -m bench.collections fashion-mnist|digits [SEEDS...]

fashion-mnist: 120 images a class of Debian's dataset-fashion-mnist test set (28 x 28
grey clothes, 10 classes). digits: 120 images a class of scikit-learn's bundled
handwritten digits (8 x 8 grey, 10 classes).
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import emit
from bench.scale import CLASSES as FASHION_CLASSES
from bench.scale import SOURCE as FASHION_SOURCE
from bench.scale import _idx

PER_CLASS = 120
KS = (1, 5, 32)


def collection(name: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(images, labels, class names)`` of the collection ``name``, as uint8 grey."""
    if name == "fashion-mnist":
        if not FASHION_SOURCE.is_dir():
            raise SystemExit("install Debian's dataset-fashion-mnist (make bench does)")
        return (_idx(FASHION_SOURCE / "t10k-images-idx3-ubyte.gz"),
                _idx(FASHION_SOURCE / "t10k-labels-idx1-ubyte.gz"), FASHION_CLASSES)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
        return pixels, digits.target, tuple(f"digit_{n}" for n in range(10))
    raise SystemExit(f"unknown collection {name!r}")


def write_folder(name: str, out: Path) -> int:
    """The first ``PER_CLASS`` images of each class as PNG files, a sub-folder a class."""
    images, labels, classes = collection(name)
    written = 0
    for label, class_name in enumerate(classes):
        (out / class_name).mkdir(parents=True)
        for n in np.flatnonzero(labels == label)[:PER_CLASS]:
            Image.fromarray(images[n], "L").save(out / class_name / f"{n:05d}.png")
            written += 1
    return written


def figures(store) -> dict:
    """Cosine top-k of the template's evaluation and edited copies ranked first (combined
    space), and the training images' close pairs (which scale the near-copy thresholds)."""
    from imgsim import evaluate_model

    found = {"copy" if m["measure"] == "copy" else f"top{m['k']}": m["accuracy"]
             for m in evaluate_model(store, ks=KS, space="combined", copies=True)
             if m["distance"] == "cosine"}
    close = store.last_run("train_classifier")[2]["close_pair_distance"]
    return {**found, "close_pair_distance": close}


def main():
    from imgsim import featurize_images, open_store, prepare_data, sync_image_folder
    from imgsim import train_classifier

    name = sys.argv[1]
    seeds = [int(s) for s in sys.argv[2:]] or [0, 1, 2]
    result = {"collection": name, "seeds": {}}
    with tempfile.TemporaryDirectory(prefix="imgsim-collection-") as tmp:
        result["images"] = write_folder(name, Path(tmp) / "images")
        store = open_store(f"sqlite:///{tmp}/collection.db")
        sync_image_folder(store, Path(tmp) / "images", progress=False)
        begun = time.perf_counter()
        featurize_images(store, progress=False)
        result["featurize_seconds"] = time.perf_counter() - begun
        for seed in seeds:
            prepare_data(store, seed=seed)
            row = {}
            for way, fine_tune in (("default", False), ("fine_tuned", True)):
                begun = time.perf_counter()
                trained = train_classifier(store, seed=seed, fine_tune=fine_tune)
                row[way] = {"train_seconds": time.perf_counter() - begun,
                            "test_accuracy": trained["test_accuracy"], **figures(store)}
                if fine_tune:
                    row[way]["fine_tune"] = trained["fine_tune"]
            result["seeds"][seed] = row
        store.close()
    emit(result)


if __name__ == "__main__":
    main()
