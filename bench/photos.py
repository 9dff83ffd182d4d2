"""Real photos at full speed: featurize throughput on 12-megapixel JPEG photos and large
PNG screenshots against the reference set, in one run.

The photos are made here, deterministically, never committed: every 17th reference image
upscaled to 4032 x 3024 (3024 x 4032 when portrait) with sensor-like noise, saved as JPEG
quality 92, every third one stored sideways with an EXIF orientation of 6 or 8 (so that
it shows upright); and every 80th one as a 2560 x 1600 PNG.

    python -m bench.photos make FOLDER     # the photo sets (jpeg/, png/) under FOLDER
    python -m bench.photos e2e FOLDER      # featurize_images into SQLite: images/s, memory
    python -m bench.photos split FOLDER    # ms per image: decode, resize, inference
    python -m bench.photos same FOLDER     # cosine of fast and exact (full-decode) features
"""

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench.common import REFERENCE, Timer, emit, peak_rss_mb

KINDS = ("reference", "jpeg", "png")


def make(out: Path) -> dict:
    rng = np.random.default_rng(0)
    files = sorted(p for p in REFERENCE.glob("*/*") if p.suffix.lower() in (".jpg", ".png"))
    made = {"jpeg": 0, "png": 0}
    for n, path in enumerate(files):
        if n % 17 and n % 80:
            continue
        image = Image.open(path).convert("RGB")
        portrait = image.height > image.width
        kind = "png" if n % 80 == 0 else "jpeg"
        size = (2560, 1600) if kind == "png" else ((3024, 4032) if portrait else (4032, 3024))
        big = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float32)
        big += rng.normal(0, 6, big.shape).astype(np.float32)
        photo = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))
        target = out / kind / path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        if kind == "png":
            photo.save(target / f"{path.stem}.png")
        else:
            exif = Image.Exif()
            turn = (6, 8, None)[made["jpeg"] % 3]
            if turn:  # stored sideways; the orientation tag turns it back upright
                photo = photo.transpose(Image.ROTATE_90 if turn == 6 else Image.ROTATE_270)
                exif[0x0112] = turn
            photo.save(target / f"{path.stem}.jpg", quality=92, exif=exif.tobytes())
        made[kind] += 1
    return made


def folder_of(root: Path, kind: str) -> Path:
    return REFERENCE if kind == "reference" else root / kind


def e2e(root: Path, kind: str) -> dict:
    from imgsim import featurize_images, open_store, sync_image_folder
    from imgsim.featurize import backbone_graph

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/photos.db")
        sync_image_folder(store, folder_of(root, kind), progress=False)
        backbone_graph(store)  # the export is cached; not part of the rate
        with Timer() as t:
            counts = featurize_images(store, progress=False)
        return {"images": counts["featurized"], "seconds": t.seconds,
                "images_per_second": counts["featurized"] / t.seconds,
                "workers": counts["workers"], "peak_rss_mb": peak_rss_mb()}


def split(root: Path, kind: str, n: int = 40) -> dict:
    """Single-threaded milliseconds per image of each part of featurizing."""
    from imgsim.featurize import Featurizer, backbone_graph
    from imgsim.images import center_square, load_rgb
    from imgsim.store import open_store

    files = sorted(p for p in folder_of(root, kind).glob("*/*"))[:n]
    datas = [p.read_bytes() for p in files]
    with Timer() as decode:
        images = [load_rgb(d, square=True) for d in datas]
    with Timer() as resize:
        arrays = np.stack([np.asarray(center_square(im)) for im in images])
    with tempfile.TemporaryDirectory() as tmp:
        graph = backbone_graph(open_store(f"sqlite:///{tmp}/g.db"))[1]
    featurizer = Featurizer(graph, threads=1)
    featurizer.run(arrays[:8])
    with Timer() as infer:
        for start in range(0, len(arrays), 8):
            featurizer.run(arrays[start:start + 8])
    mean_bytes = sum(map(len, datas)) / len(datas)
    return {"decode_ms": 1000 * decode.seconds / len(datas),
            "resize_ms": 1000 * resize.seconds / len(datas),
            "infer_ms": 1000 * infer.seconds / len(datas), "mean_file_mb": mean_bytes / 2**20}


def same(root: Path, n: int = 30) -> dict:
    """Cosine between features computed the fast way and from a full, exact decode."""
    from imgsim.featurize import Featurizer, backbone_graph
    from imgsim.images import center_square, preprocess
    from imgsim.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        featurizer = Featurizer(backbone_graph(open_store(f"sqlite:///{tmp}/g.db"))[1])
    cosines = {}
    for kind in KINDS:
        values = []
        for path in sorted(folder_of(root, kind).glob("*/*"))[:n]:
            data = path.read_bytes()
            exact = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            a, b = featurizer.run(np.stack([np.asarray(center_square(exact)), preprocess(data)]))
            values.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        cosines[kind] = {"mean": float(np.mean(values)), "min": float(np.min(values))}
    return cosines


if __name__ == "__main__":
    action, root = sys.argv[1], Path(sys.argv[2])
    if action == "make":
        emit(make(root))
    elif action == "same":
        emit(same(root))
    else:
        emit({kind: {"e2e": e2e, "split": split}[action](root, kind) for kind in sys.argv[3:]}
             if len(sys.argv) > 3 else {})
