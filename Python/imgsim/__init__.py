"""imgsim: in-database image similarity, the SQL Server template re-created on open parts.

The steps, each a function of a store and the template's parameters::

    from imgsim import open_store, sync_image_folder, featurize_images, prepare_data, \\
        train_classifier, evaluate_model, rank_candidates, write_report

    store = open_store("sqlite:///imgsim.db")
    sync_image_folder(store, "Data/textures")
    featurize_images(store)                 # efficientnet_lite0 by default
    prepare_data(store)                     # ratio_train_test=0.75, seed=42
    train_classifier(store)                 # MLP, one hidden layer of 100 units
    evaluate_model(store)                   # top-k accuracy by L2 and cosine
    rank_candidates(store)                  # top_k_candidates=10 per query
    write_report(store, "report.html")

or all of them: ``run_image_similarity(store, "Data/textures")``.
"""

import os
from pathlib import Path

# ONNX Runtime's official builds send usage telemetry and keep a device id and an event
# queue under ~/.cache; this variable, read when onnxruntime is imported, turns all of it
# off. Set here, before any module of imgsim imports onnxruntime (inside PostgreSQL too).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from .checks import ParameterError
from .evaluate import evaluate_model
from .featurize import featurize_images
from .images import ImageError
from .pipeline import run_image_similarity
from .prepare import prepare_data
from .rank import rank_candidates
from .report import write_report
from .store import open_store
from .sync import sync_image_folder
from .train import train_classifier

__version__ = "0.1.0"
# The build id stamped by `imgsim deploy` into the server-side copy (None elsewhere).
_build_file = Path(__file__).with_name("BUILD")
__build__ = _build_file.read_text().strip() if _build_file.is_file() else None
__all__ = ["open_store", "sync_image_folder", "featurize_images", "prepare_data",
           "train_classifier", "evaluate_model", "rank_candidates", "run_image_similarity",
           "write_report", "ParameterError", "ImageError"]
