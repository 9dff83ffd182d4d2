"""Accuracy over 5 seeds on the reference set, with the default configuration (or with
``--fine-tune``): train/test accuracy and top-k ranking accuracy (cosine and L2, in score
and feature space, and combined), edited copies of the queries ranked first and their mean
rank, as mean and standard deviation, and the seconds train_classifier took. Featurized
once; each seed draws its own split and evaluation set, and trains its own classifier
(and, fine-tuned, its own backbone).

    python -m bench.accuracy [--fine-tune]
"""

import sys
import tempfile
import time

import numpy as np

from bench.common import REFERENCE, emit
from imgsim import (evaluate_model, featurize_images, open_store, prepare_data,
                    sync_image_folder, train_classifier)

SEEDS = (0, 1, 2, 3, 4)
KS = (1, 2, 4, 5, 8, 10, 15, 20, 28, 32)


def main():
    fine_tune = "--fine-tune" in sys.argv[1:]
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/accuracy.db")
        sync_image_folder(store, REFERENCE, progress=False)
        featurize_images(store, progress=False)
        for seed in SEEDS:
            prepare_data(store, seed=seed)
            start = time.perf_counter()
            trained = train_classifier(store, seed=seed, fine_tune=fine_tune)
            figures.setdefault("train_seconds", []).append(time.perf_counter() - start)
            figures.setdefault("train_accuracy", []).append(trained["train_accuracy"])
            figures.setdefault("test_accuracy", []).append(trained["test_accuracy"])
            figures.setdefault("close_pair_distance", []).append(
                store.last_run("train_classifier")[2]["close_pair_distance"])
            for space in ("combined", "scores", "features"):
                for m in evaluate_model(store, ks=KS, space=space, copies=True):
                    if m["measure"] == "copy":
                        for what in ("accuracy", "mean_rank"):
                            figures.setdefault(f"{space}_{m['distance']}_copy_{what}",
                                               []).append(m[what])
                    else:
                        name = f"{space}_{m['distance']}_top{m['k']}"
                        figures.setdefault(name, []).append(m["accuracy"])
    emit({name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "values": v}
          for name, v in figures.items()})


if __name__ == "__main__":
    main()
