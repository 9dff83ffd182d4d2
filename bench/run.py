"""Run the benchmarks and write bench/RESULTS.md: every figure beside its target and
whether it is met. Each section runs in a fresh process and is kept in
bench/results/SECTION.md with the machine, commit and date it was measured on; RESULTS.md
puts the kept sections together.

    python -m bench.run [--large] [--scale] [--only SECTION ...]

``--large`` measures pgvector HNSW on 1,000,000 vectors instead of 100,000; ``--scale``
adds the 70,000 images of Debian's dataset-fashion-mnist (both take long); ``--only``
runs the sections named, keeping the others' last results.
"""

import argparse
import datetime as dt
import os
import platform
import subprocess
import tempfile

from bench.common import REFERENCE, ROOT, in_subprocess

TEMPLATE = {"train_accuracy": 0.897, "test_accuracy": 0.751, 1: 0.355, 2: 0.45, 4: 0.58,
            5: 0.62, 8: 0.66, 10: 0.695, 15: 0.78, 20: 0.82, 28: 0.88, 32: 0.895}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}"
            f"; commit {commit}; {dt.datetime.now().isoformat(timespec='minutes')}")


def row(figure, value, target, met) -> str:
    return f"| {figure} | {value} | {target} | {'yes' if met else '**no**'} |"


def photo_section(args) -> list[str]:
    """Featurizing 12-megapixel photos and large screenshots against the reference set."""
    with tempfile.TemporaryDirectory(prefix="imgsim-photos-") as root:
        made = in_subprocess("photos", "make", root)
        kinds = ("reference", "jpeg", "png")
        e2e = {k: in_subprocess("photos", "e2e", root, k)[k] for k in kinds}
        parts = in_subprocess("photos", "split", root, *kinds)
        same = in_subprocess("photos", "same", root)
    labels = {"reference": "reference set (320 px JPEG)",
              "jpeg": f"4032 x 3024 JPEG photos, q92 ({made['jpeg']})",
              "png": f"2560 x 1600 PNG screenshots ({made['png']})"}
    lines = ["## Photos (efficientnet_lite0, end to end into SQLite)", "",
             "Photos made at bench time from the reference images (upscaled, sensor-like noise, "
             "a third stored sideways with an EXIF orientation). Milliseconds an image on one "
             "thread; images/s end to end on all cores "
             f"({e2e['reference']['workers']} decoding thread(s) beside inference).", "",
             "| images | MB a file | images/s | ms decode | ms resize | ms infer | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for k in kinds:
        lines.append(f"| {labels[k]} | {parts[k]['mean_file_mb']:.2f} | "
                     f"{e2e[k]['images_per_second']:.1f} | {parts[k]['decode_ms']:.1f} | "
                     f"{parts[k]['resize_ms']:.1f} | {parts[k]['infer_ms']:.1f} | "
                     f"{e2e[k]['peak_rss_mb']:.0f} MiB |")
    ratio = e2e["jpeg"]["images_per_second"] / e2e["reference"]["images_per_second"]
    memory = e2e["jpeg"]["peak_rss_mb"] / e2e["reference"]["peak_rss_mb"]
    lines += ["", "| figure | measured | target | met |", "|---|---|---|---|",
              row("photos / reference set, images/s", f"{ratio:.2f}x", ">= 0.7x", ratio >= 0.7),
              row("peak memory, photos / reference set", f"{memory:.2f}x", "<= 1.2x",
                  memory <= 1.2)]
    for k in ("jpeg", "png"):
        lines.append(row(f"cosine, fast vs full decode ({k}), mean (min)",
                         f"{same[k]['mean']:.4f} ({same[k]['min']:.4f})", ">= 0.99",
                         same[k]["mean"] >= 0.99))
    return lines + [""]


def web_section(args) -> list[str]:
    """The similar-images endpoint of ``imgsim serve`` against the query called directly."""
    web = in_subprocess("web_speed")
    lines = ["## Web API (POST /api/similar, k 10)", "",
             f"{web['requests']} uploads of new textures a measurement, among {web['images']} "
             f"stored images; `imgsim serve --workers {web['workers']}`, one keep-alive "
             "connection a client. Direct: `imgsim.rank.similar_images` in the benchmark's "
             "process on SQLite (a store a client), `SELECT * FROM imgsim.similar_images(...)` "
             "on PostgreSQL (a connection a client, the same analyst login as the app).", "",
             "| database | clients | API req/s | API p50 / p99 ms | direct req/s "
             "| direct p50 / p99 ms | API / direct |", "|---|---|---|---|---|---|---|"]
    figures = []
    for database in ("sqlite", "postgresql"):
        for clients, r in web[database].items():
            api, direct = r["api"], r["direct"]
            lines.append(f"| {database} | {clients} | {api['requests_per_s']:.1f} | "
                         f"{api['p50_ms']:.0f} / {api['p99_ms']:.0f} | "
                         f"{direct['requests_per_s']:.1f} | {direct['p50_ms']:.0f} / "
                         f"{direct['p99_ms']:.0f} | {r['ratio']:.2f}x |")
            figures.append(row(f"API / direct, {database}, {clients} client(s)",
                               f"{r['ratio']:.2f}x", ">= 0.8x", r["ratio"] >= 0.8))
    return lines + ["", "| figure | measured | target | met |", "|---|---|---|---|",
                    *figures, ""]


def featurize_section(args) -> list[str]:
    speed = {m: in_subprocess("featurize_speed", m) for m in ("e2e", "model", "eager")}
    e2e, model, eager = (speed[m]["images_per_second"] for m in ("e2e", "model", "eager"))
    lines = ["## Featurization (efficientnet_lite0, 288 px, batch 32)", "",
             "| way | images/s | peak memory |", "|---|---|---|"]
    for m, label in (("e2e", "imgsim featurize_images, end to end (SQLite)"),
                     ("model", "ONNX Runtime alone, tensors decoded beforehand"),
                     ("eager", "PyTorch eager loop, img2vec-style")):
        lines.append(f"| {label} | {speed[m]['images_per_second']:.1f} | "
                     f"{speed[m]['peak_rss_mb']:.0f} MiB |")
    return lines + [
        "", "| figure | measured | target | met |", "|---|---|---|---|",
        row("end to end / model-only", f"{e2e / model:.2f}x", ">= 0.9x", e2e / model >= 0.9),
        row("end to end / eager loop", f"{e2e / eager:.1f}x", ">= 3x", e2e / eager >= 3), ""]


def pipeline_section(args) -> list[str]:
    times = in_subprocess("pipeline_time")
    ratio = times["postgres_in_db"] / times["postgres_client"]
    lines = ["## Whole pipeline (sync, featurize, prepare, train, evaluate, rank)", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    for key, label in (("sqlite_client", "client on SQLite"),
                       ("postgres_client", "client on PostgreSQL"),
                       ("postgres_in_db", "in-database on PostgreSQL")):
        lines.append(row(label, f"{times[key]:.1f} s", "<= 60 s", times[key] <= 60))
    return lines + [row("in-database / client", f"{ratio:.2f}x", "<= 1.15x", ratio <= 1.15), ""]


def ranking_section(args) -> list[str]:
    exact = in_subprocess("ranking_speed", "exact")
    hnsw = in_subprocess("ranking_speed", "hnsw", str(1_000_000 if args.large else 100_000),
                         timeout=14400)
    best = hnsw["ef200"]
    lines = ["## Ranking", "",
             f"Exact top-10 of {exact['queries']:,} queries among {exact['candidates']:,} "
             f"clustered 1280-d vectors: imgsim {exact['imgsim_seconds']:.2f} s, faiss "
             f"IndexFlatIP {exact['faiss_seconds']:.2f} s (same top-10 for "
             f"{100 * exact['agreement']:.2f}% of results).", "",
             f"pgvector HNSW (m 16, ef_construction 64, cosine) on {hnsw['vectors']:,} such "
             f"vectors in PostgreSQL 15 (maintenance_work_mem {hnsw['maintenance_work_mem']}, "
             f"the graph {'fitting' if hnsw['graph_fit_in_memory'] else 'not fitting'} in it; "
             f"{hnsw['build_workers']} build processes): loaded by binary COPY in "
             f"{hnsw['load_seconds']:.0f} s, table {hnsw['table_mb']:,.0f} MiB; index built in "
             f"{hnsw['build_seconds']:.0f} s, {hnsw['index_mb']:,.0f} MiB. "
             f"{hnsw['queries']} queries, one connection, after one untimed pass over them:",
             "",
             "| ef_search | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|"]
    for ef in (40, 100, 200):
        r = hnsw[f"ef{ef}"]
        lines.append(f"| {ef} | {r['recall_at_10']:.3f} | {r['median_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} |")
    return lines + [
        "", "imgsim's similar_images and feature ranking search with ef_search 200.", "",
        "| figure | measured | target | met |", "|---|---|---|---|",
        row("exact top-k speed / faiss", f"{exact['speed_vs_faiss']:.2f}x", ">= 0.8x",
            exact["speed_vs_faiss"] >= 0.8),
        row(f"HNSW recall@10 (ef_search 200, {hnsw['vectors']:,} vectors)",
            f"{best['recall_at_10']:.3f}", ">= 0.98", best["recall_at_10"] >= 0.98), ""]


def ray_section(args) -> list[str]:
    r = in_subprocess("ray_speed", timeout=3600)
    lines = ["## Featurize on Ray (efficientnet_lite0, into a deployed PostgreSQL)", "",
             f"{r['images']:,} images (the reference set and three edits of each), featurized "
             "from none by each way in one run. Ray: a head and a second raylet on loopback, "
             "one CPU each, one actor a CPU; the times include connecting to Ray and starting "
             f"the actors. Local: this process on all {r['cores']} cores.", "",
             "| way | seconds | images/s |", "|---|---|---|"]
    for key, label in (("local", "local (threads)"), ("ray_1_node", "Ray, 1 node x 1 CPU"),
                       ("ray_2_nodes", "Ray, 2 nodes x 1 CPU")):
        lines.append(f"| {label} | {r[key]['seconds']:.1f} | "
                     f"{r[key]['images_per_second']:.1f} |")
    return lines + [
        "", "| figure | measured | target | met |", "|---|---|---|---|",
        row("Ray 2 nodes / 1 node", f"{r['two_nodes_vs_one']:.2f}x", ">= 1.7x",
            r["two_nodes_vs_one"] >= 1.7),
        row("Ray 2 one-CPU nodes / local on 2 cores", f"{r['two_nodes_vs_local']:.2f}x",
            ">= 0.85x", r["two_nodes_vs_local"] >= 0.85), ""]


def accuracy_section(args) -> list[str]:
    frozen = in_subprocess("accuracy")
    tuned = in_subprocess("accuracy", "--fine-tune", timeout=7200)
    lines = ["## Accuracy on the reference set, 5 seeds (mean ± sd)", "",
             "Default configuration (efficientnet_lite0, mlp), and the same with `--fine-tune` "
             "(the backbone's last two stages tuned on six 288 px views of each training image "
             "for at most 12 epochs, a tenth of each category's training images held out to "
             "keep the best epoch and to judge the tuning against the frozen backbone). "
             "Each seed draws its own split and evaluation set; the template's evaluation "
             "(220 queries, 1 positive and 100 negatives each). Template: ResNet18 features, "
             "rx_neural_network, one run. Spaces: combined (imgsim's default: scores, the "
             "features breaking near-ties, near copies first), scores alone (the "
             "template's), features alone. "
             "Copies: four edited copies of each query (cropped, mirrored, recoloured, "
             "halved) ranked among all 1,712 images by their distance to the query.", "",
             "| figure | default: combined, cosine | default: scores, cosine | default: "
             "scores, L2 | default: features, cosine | fine-tuned: combined, cosine | "
             "fine-tuned: scores, cosine | fine-tuned: scores, L2 | fine-tuned: features, "
             "cosine | template (cosine) |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(m):
        return f"{100 * m['mean']:.1f} ± {100 * m['sd']:.1f}"

    for name in ("train_accuracy", "test_accuracy"):
        lines.append(f"| {name.replace('_', ' ')} | {cell(frozen[name])} | | | | "
                     f"{cell(tuned[name])} | | | | {100 * TEMPLATE[name]:.1f} |")
    columns = (("combined", "cosine"), ("scores", "cosine"), ("scores", "l2"),
               ("features", "cosine"))
    for k in (1, 2, 4, 5, 8, 10, 15, 20, 28, 32):
        cells = [acc[f"{space}_{d}_top{k}"] for acc in (frozen, tuned) for space, d in columns]
        lines.append(f"| top-{k} | " + " | ".join(map(cell, cells))
                     + f" | ~{100 * TEMPLATE[k]:.1f} |")
    lines.append("| copy ranked first | " + " | ".join(
        cell(acc[f"{space}_{d}_copy_accuracy"]) for acc in (frozen, tuned)
        for space, d in columns) + " | |")
    lines.append("| copy mean rank | " + " | ".join(
        "{mean:.1f} ± {sd:.1f}".format(**acc[f"{space}_{d}_copy_mean_rank"])
        for acc in (frozen, tuned) for space, d in columns) + " | |")
    seconds = {n: sum(a["train_seconds"]["values"]) / len(a["train_seconds"]["values"])
               for n, a in (("frozen", frozen), ("tuned", tuned))}
    close = {n: a["close_pair_distance"]["values"] for n, a in (("frozen", frozen),
                                                                ("tuned", tuned))}
    lines += ["", f"train_classifier took {seconds['frozen']:.0f} s a seed by default and "
              f"{seconds['tuned']:.0f} s with `--fine-tune` (views, tuning, featurizing all "
              "images with the tuned backbone, classifier), on this machine's cores. "
              "The training images' close pairs (1% quantile of their features' cosine "
              f"distances) were {min(close['frozen']):.3f} to {max(close['frozen']):.3f} "
              f"by default and {min(close['tuned']):.3f} to {max(close['tuned']):.3f} "
              "fine-tuned" + (": at or above 0.25, where the near-copy thresholds are as "
                              "chosen." if min(close["frozen"] + close["tuned"]) >= 0.25 else
                              "; below 0.25 the near-copy thresholds shrank."),
              "",
              "| figure | measured | target | met |", "|---|---|---|---|"]
    for name, key in (("test accuracy", "test_accuracy"),
                      ("cosine top-1", "combined_cosine_top1"),
                      ("cosine top-32", "combined_cosine_top32")):
        target = TEMPLATE["test_accuracy" if key == "test_accuracy" else
                          (1 if key.endswith("top1") else 32)]
        lines.append(row(f"default: {name} >= template", f"{100 * frozen[key]['mean']:.1f}%",
                         f">= {100 * target:.1f}%", frozen[key]["mean"] >= target))
    for name, key, target in (("test accuracy", "test_accuracy", 0.88),
                              ("cosine top-1", "combined_cosine_top1", 0.60),
                              ("cosine top-5", "combined_cosine_top5", 0.85),
                              ("cosine top-32", "combined_cosine_top32", 0.97)):
        lines.append(row(f"fine-tuned: {name}", f"{100 * tuned[key]['mean']:.1f}%",
                         f">= {100 * target:.0f}%", tuned[key]["mean"] >= target))
    for label, acc in (("default", frozen), ("fine-tuned", tuned)):
        combined_top1 = acc["combined_cosine_top1"]["mean"]
        scores_top1 = acc["scores_cosine_top1"]["mean"]
        copies = acc["combined_cosine_copy_accuracy"]["mean"]
        lines += [row(f"{label}: combined cosine top-1 >= scores alone",
                      f"{100 * combined_top1:.1f}% vs {100 * scores_top1:.1f}%",
                      ">= scores alone", combined_top1 >= scores_top1),
                  row(f"{label}: copy ranked first (combined, cosine)",
                      f"{100 * copies:.1f}%", ">= 95%", copies >= 0.95)]
    return lines + [""]


def collections_section(args) -> list[str]:
    """Default against fine-tuned on collections no setting was chosen on."""
    results = [in_subprocess("collections", name, timeout=7200)
               for name in ("fashion-mnist", "digits")]
    lines = ["## Fine-tuning on other collections (mean over seeds)", "",
             "The default configuration and `--fine-tune`, each seed its own split, on "
             "collections none of imgsim's settings were chosen on: 120 images a class of "
             "Debian's dataset-fashion-mnist test set (28 x 28 grey, 10 classes) and of "
             "scikit-learn's bundled digits (8 x 8 grey, 10 classes). Cosine top-k of the "
             "template's evaluation in the combined space; seconds of train_classifier "
             "(fine-tuned: views, tuning, featurizing with the tuned backbone when kept, "
             "classifier). Close pairs: the 1% quantile of the training images' feature "
             "distances, which scales the near-copy thresholds (0.29 on the reference set; "
             "below 0.25 they shrink in proportion); copies first: an edited copy of each "
             "query (evaluate --copies) ranked first among all the images.", "",
             "| collection | seeds | way | test accuracy | top-1 | top-5 | top-32 | close "
             "pairs | copies first | seconds | tuned backbone kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    figures = []
    for r in results:
        seeds = list(r["seeds"].values())

        def mean(way, key):
            return float(sum(s[way][key] for s in seeds) / len(seeds))

        for way in ("default", "fine_tuned"):
            kept = (f"{sum(s[way]['fine_tune']['kept'] == 'tuned' for s in seeds)} of "
                    f"{len(seeds)}" if way == "fine_tuned" else "")
            lines.append(f"| {r['collection']} ({r['images']:,} images) | {len(seeds)} | "
                         f"{way.replace('_', '-')} | {100 * mean(way, 'test_accuracy'):.1f} | "
                         f"{100 * mean(way, 'top1'):.1f} | {100 * mean(way, 'top5'):.1f} | "
                         f"{100 * mean(way, 'top32'):.1f} | "
                         f"{mean(way, 'close_pair_distance'):.3f} | "
                         f"{100 * mean(way, 'copy'):.1f} | {mean(way, 'train_seconds'):.0f} | "
                         f"{kept} |")
        gain = mean("fine_tuned", "top1") - mean("default", "top1")
        figures.append(row(f"{r['collection']}: fine-tuned cosine top-1 over default",
                           f"{100 * gain:+.1f} points", ">= +5 points", gain >= 0.05))
    return lines + ["", "| figure | measured | target | met |", "|---|---|---|---|",
                    *figures, ""]


def scale_section(args) -> list[str]:
    scale = in_subprocess("scale", "main", timeout=14400)
    lines = ["## Scale: Debian's dataset-fashion-mnist", "",
             "| database | images | images/s | peak memory |", "|---|---|---|---|"]
    for key, r in scale.items():
        lines.append(f"| {key.split('_')[0]} | {r['images']:,} | "
                     f"{r['images_per_second']:.1f} | {r['peak_rss_mb']:.0f} MiB |")
    peak = max(r["peak_rss_mb"] for r in scale.values())
    return lines + ["", "| figure | measured | target | met |", "|---|---|---|---|",
                    row("peak memory, any size", f"{peak:.0f} MiB", "< 1536 MiB", peak < 1536),
                    ""]


SECTIONS = {"featurize": featurize_section, "photos": photo_section,
            "pipeline": pipeline_section, "web": web_section, "ranking": ranking_section,
            "ray": ray_section, "accuracy": accuracy_section,
            "collections": collections_section, "scale": scale_section}
SAVED = ROOT / "bench" / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run these sections ({', '.join(SECTIONS)}); the others keep "
                             "their last results")
    args = parser.parse_args()
    SAVED.mkdir(exist_ok=True)
    default = [name for name in SECTIONS if name != "scale" or args.scale]
    for name in args.only or default:
        lines = SECTIONS[name](args)
        lines[1:1] = ["", f"Measured on {machine()}."]
        (SAVED / f"{name}.md").write_text("\n".join(lines))
    lines = ["# imgsim benchmarks", "",
             f"Reference data: `{REFERENCE.relative_to(ROOT.parent)}` (1,712 images). "
             "Reproduce with `make bench` (`make bench-full` adds `--large --scale`; "
             "`python -m bench.run --only SECTION...` runs some sections again). Each section "
             "names the machine and commit it was measured on; the machines are shared: read "
             "the ratios, measured within one run, rather than the times.", ""]
    lines += [(SAVED / f"{name}.md").read_text() for name in SECTIONS
              if (SAVED / f"{name}.md").is_file()]
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
