"""The server-side environment: the packages imgsim's routines import inside PostgreSQL.

It is a folder laid out like a virtual environment (``lib/pythonX.Y/site-packages``),
readable by the server's OS user and owned by whoever prepared it (not the server), with
exactly the packages of ``server-requirements.txt`` (every one pinned, installed
without resolving anything else: no torch) for the server's own Python version, and a
copy of this package stamped with its build id (a digest of its files).

Each routine puts the folder first on ``sys.path`` and checks, before running anything,
that the imgsim it imports is the build it was deployed for and that the packages it
depends on came from the folder, not from the system's Python (:func:`check`). A session
that was open during a redeploy loads the new build on its next call.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REQUIREMENTS = PACKAGE / "server-requirements.txt"
# Packages whose loaded copy must be the folder's (imported by the steps inside the server).
DEPENDENCIES = ("numpy", "PIL", "sqlalchemy", "onnxruntime", "onnx", "sklearn", "scipy",
                "skl2onnx", "tqdm")
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn"}


def package_build(package: Path = PACKAGE) -> str:
    """The build id of the imgsim package at ``package``: a digest of its files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        relative = path.relative_to(package).as_posix()
        if "__pycache__" in relative or relative == "BUILD":
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def site_packages(folder: Path, python: str) -> Path:
    return Path(folder) / "lib" / f"python{python}" / "site-packages"


def prepare(folder: Path, python: str | None = None, log=print) -> Path:
    """Create or update the server-side environment at ``folder`` for Python ``python``
    (``"3.11"``; default: this Python's); return its site-packages path.

    The pinned packages are installed once (a marker records which); the package itself
    is copied afresh every time, which is how deploying again upgrades the code."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = Path(folder)
    site = site_packages(folder, python)
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes() + python.encode()).hexdigest()
    marker = folder / ".imgsim-requirements"
    if not (marker.is_file() and marker.read_text() == wanted):
        log(f"preparing the server-side environment {folder} for Python {python} "
            "(pinned packages, no torch)")
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--target", str(site), "--python-version", python,
                        "--only-binary=:all:", "--no-deps", "-r", str(REQUIREMENTS)],
                       check=True)
        marker.write_text(wanted)
    target = site / "imgsim"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / "BUILD").write_text(package_build(PACKAGE) + "\n")
    closed = [p for p in folder.resolve().parents if not p.stat().st_mode & 0o001]
    if closed:
        raise PermissionError(f"the server's OS user cannot reach {folder}: {closed[0]} is not "
                              "searchable by others; choose a path outside it")
    subprocess.run(["chmod", "-R", "u+rwX,go+rX,go-w", str(folder)], check=True)
    return site


def check(site: str, build: str) -> None:
    """In a routine, after ``import imgsim``: refuse to run another build than the one
    the routines were deployed for, or dependencies loaded from elsewhere than ``site``."""
    import imgsim

    if imgsim.__build__ != build:
        raise RuntimeError(f"the server-side environment {site} holds imgsim build "
                           f"{imgsim.__build__}, but the routines were deployed for build "
                           f"{build}: run imgsim deploy again")
    for name in DEPENDENCIES:
        module = sys.modules.get(name)
        if module is None:
            continue
        where = getattr(module, "__file__", "") or ""
        if not where.startswith(site):
            raise RuntimeError(f"{name} was loaded from {where} before imgsim in this session "
                               f"(by other Python code); imgsim needs its own from {site}: "
                               "reconnect")
        version = getattr(module, "__version__", None)
        try:
            on_disk = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            continue
        if version is not None and version != on_disk:
            raise RuntimeError(f"{name} {version} is loaded in this session but {on_disk} is "
                               "deployed: imgsim was upgraded with new dependencies; reconnect")


# What deploy asks the server (as a temporary PL/Python function): its Python version,
# which host it runs on, and what the environment at ``site`` holds.
PROBE = '''
import json, os, socket, sys
info = {"python": "%d.%d" % sys.version_info[:2], "host": socket.gethostname()}
if os.path.isfile("/etc/machine-id"):
    with open("/etc/machine-id") as fh:
        info["machine_id"] = fh.read().strip()
if site:
    if not os.path.isdir(os.path.join(site, "imgsim")):
        info["error"] = "the server cannot find %s/imgsim" % site
    else:
        sys.path.insert(0, site)
        try:
            import imgsim
            info["build"] = imgsim.__build__
        except Exception as exc:
            info["error"] = "the server cannot import imgsim from %s: %s" % (site, exc)
        finally:
            sys.path.remove(site)
return json.dumps(info)
'''


def this_host() -> dict:
    """The identity of the host deploy runs on, as :data:`PROBE` reports the server's."""
    import socket

    info = {"host": socket.gethostname()}
    machine_id = Path("/etc/machine-id")
    if machine_id.is_file():
        info["machine_id"] = machine_id.read_text().strip()
    return info


def same_host(server: dict) -> bool:
    here = this_host()
    key = "machine_id" if "machine_id" in here and "machine_id" in server else "host"
    return here.get(key) == server.get(key)


def parse_probe(text: str) -> dict:
    return json.loads(text)
