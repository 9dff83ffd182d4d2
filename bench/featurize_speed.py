"""Featurization throughput and peak memory, one way per process:

``e2e``    imgsim's featurize_images: read bytes from SQLite, decode, resize, infer, write;
``model``  ONNX Runtime alone on tensors decoded beforehand (this backbone's limit here);
``eager``  a plain PyTorch eager loop, img2vec-style: decode a batch, run the module, repeat.
"""

import os
import sys
import tempfile

import numpy as np

from bench.common import REFERENCE, Timer, emit, peak_rss_mb, reference_files
from imgsim import backbones, featurize_images, open_store, sync_image_folder
from imgsim.featurize import Featurizer, backbone_graph
from imgsim.images import preprocess

BATCH = 32


def e2e():
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/bench.db")
        sync_image_folder(store, REFERENCE, progress=False)
        backbone_graph(store)  # the export is cached; not part of the rate
        with Timer() as t:
            counts = featurize_images(store, progress=False)
        return {"images": counts["featurized"], "seconds": t.seconds}


def model_only():
    arrays = np.stack([preprocess(data) for _, data in reference_files()])
    with tempfile.TemporaryDirectory() as tmp:
        _, graph = backbone_graph(open_store(f"sqlite:///{tmp}/g.db"))
    featurizer = Featurizer(graph)
    featurizer.run(arrays[:BATCH])  # warm-up
    with Timer() as t:
        for start in range(0, len(arrays), BATCH):
            featurizer.run(arrays[start:start + BATCH])
    return {"images": len(arrays), "seconds": t.seconds}


def eager():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    spec = backbones.get_spec(backbones.DEFAULT_BACKBONE)
    module = backbones.build_module(backbones.DEFAULT_BACKBONE)
    files = reference_files()
    mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.std).reshape(1, 3, 1, 1)
    with Timer() as t, torch.no_grad():
        for start in range(0, len(files), BATCH):
            batch = torch.from_numpy(np.stack([preprocess(d) for _, d in
                                               files[start:start + BATCH]]))
            module((batch.permute(0, 3, 1, 2).float() - mean) / std).numpy()
    return {"images": len(files), "seconds": t.seconds}


if __name__ == "__main__":
    result = {"e2e": e2e, "model": model_only, "eager": eager}[sys.argv[1]]()
    result["images_per_second"] = result["images"] / result["seconds"]
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)
