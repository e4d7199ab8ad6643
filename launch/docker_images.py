"""The images a compose cluster runs, built on this machine without an image registry:

- the base, dtrain-base:bookworm: a Debian rootfs from the apt mirror (debootstrap, minbase with python3, venv,
  iproute2 and CA certificates; the host's CA bundle copied in, so TLS inside trusts what the host does), imported
  once;
- dtrain:cpu: docker/Dockerfile on that base, installed from the host's own wheels (its CPU torch and every
  dependency at the venv's versions, served to the build on 127.0.0.1), so the image trains with what the host has.
  It is labelled with a hash of its sources and rebuilt only when they change; unchanged dependencies come
  from the layer cache.
Both stay in the daemon's data root between runs.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import distributions, version
from pathlib import Path

from docker_engine import STATE, Engine, unmount_under
from netns_cluster import SetupError

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "dtrain-base:bookworm"
SUITE = "bookworm"  # python 3.11, as the host's cp311 torch wheel needs
BASE_PACKAGES = "python3,python3-venv,iproute2,ca-certificates"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
IMAGE = "dtrain:cpu"
SOURCE_LABEL = "dtrain.source"
# what docker/Dockerfile copies from the build context (tests/unit/test_docker.py checks the two agree)
CONTEXT = ("pyproject.toml", "README.md", "dtrain", "configs", "launch", "docker")
# Fixed: the URL is a build argument, part of the layer cache's key
WHEEL_PORT = 29398


def has_image(engine: Engine, name: str) -> bool:
    return engine.docker("image", "inspect", name, check=False).returncode == 0


def ensure_base(engine: Engine) -> bool:
    """Build the base image unless the daemon has it; True when it was built."""
    if has_image(engine, BASE_IMAGE):
        return False
    rootfs = STATE / "rootfs.partial"
    try:
        _remove_rootfs(rootfs)  # a crashed earlier build
        cmd = ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout.strip()[-2000:]}")
        shutil.copyfile(Path("/") / CA_BUNDLE, rootfs / CA_BUNDLE)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=engine.env, capture_output=True
        )
        tar.stdout.close()
        if tar.wait() or imported.returncode:
            raise RuntimeError(f"docker import {BASE_IMAGE}: {imported.stderr.decode().strip()}")
    finally:
        _remove_rootfs(rootfs)
    return True


def _remove_rootfs(rootfs: Path) -> None:
    unmount_under(rootfs)  # debootstrap mounts /proc and /sys inside while it installs
    shutil.rmtree(rootfs, ignore_errors=True)


def host_wheels() -> Path:
    """Wheels of everything dtrain needs, at the versions the host's venv has (its CPU torch included), gathered
    by the venv's pip (from its cache and configured mirrors; deepspeed's sdist built once): the image then
    installs offline exactly what the host runs. Gathered again only when the venv's versions change."""
    wheels = STATE / "wheels"
    skip = {"dtrain", "pip", "setuptools", "wheel"}  # the build tools only need to be new enough
    pins = sorted(
        f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"].lower() not in skip
    )
    # dtrain itself (pip reads its dependencies from pyproject.toml), and what the image's builds of it need
    needs = [str(ROOT), "setuptools>=77", "wheel"]
    listing = "\n".join([(ROOT / "pyproject.toml").read_text(), "# constraints", *pins]) + "\n"
    if (wheels / "requirements.txt").exists() and (wheels / "requirements.txt").read_text() == listing:
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    (wheels / "constraints.txt").write_text("\n".join(pins) + "\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), "-c", str(wheels / "constraints.txt"), *needs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"pip wheel (dtrain's dependencies for the image) exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    (wheels / "constraints.txt").unlink()
    for own in wheels.glob("dtrain-*.whl"):
        own.unlink()  # the image builds dtrain from its sources
    (wheels / "requirements.txt").write_text(listing)  # written last: a complete set
    return wheels


def _context_files() -> list[Path]:
    files = []
    for top in CONTEXT:
        path = ROOT / top
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            rel = f.relative_to(ROOT)
            if f.is_file() and "__pycache__" not in rel.parts:
                files.append(rel)
    return files


def source_hash(files: list[Path], wheels: Path) -> str:
    h = hashlib.sha256(f"{BASE_IMAGE}\0".encode() + (wheels / "requirements.txt").read_bytes())
    for rel in files:
        h.update(f"\0{rel}\0".encode() + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def ensure_image(engine: Engine) -> bool:
    """Build dtrain:cpu unless the daemon has one of these sources; True when it was built."""
    wheels = host_wheels()
    files = _context_files()
    digest = source_hash(files, wheels)
    label_of = f'{{{{index .Config.Labels "{SOURCE_LABEL}"}}}}'
    label = engine.docker("image", "inspect", "-f", label_of, IMAGE, check=False)
    if label.returncode == 0 and label.stdout.strip() == digest:
        return False
    # A context of its own: the legacy builder (no buildx here) would send the whole repository, .venv included.
    context = STATE / "context"
    shutil.rmtree(context, ignore_errors=True)
    for rel in files:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    cmd = ["docker", "build", "--network", "host", "-f", str(context / "docker" / "Dockerfile"), "-t", IMAGE]
    cmd += ["--label", f"{SOURCE_LABEL}={digest}", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    cmd += ["--build-arg", f"TORCH_SPEC=torch=={version('torch')}", "--build-arg", "PIP_NO_INDEX=1"]
    with _serve(wheels) as url, open(STATE / "build.log", "w") as log:
        cmd += ["--build-arg", f"PIP_FIND_LINKS={url}", str(context)]
        build = subprocess.run(cmd, env=dict(engine.env, DOCKER_BUILDKIT="0"), stdout=log, stderr=subprocess.STDOUT)
    shutil.rmtree(context, ignore_errors=True)
    if build.returncode:
        raise RuntimeError(f"docker build {IMAGE} exited {build.returncode}; see {STATE / 'build.log'}")
    engine.docker("image", "prune", "-f")  # the previous build's image, now untagged
    return True


@contextmanager
def _serve(directory: Path):
    """The wheels over HTTP on 127.0.0.1 for the length of the build (its RUN steps share the host's network):
    pip reads them from there instead of a 400 MB build context that would be copied into the image."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), partial(Quiet, directory=str(directory)))
    except OSError as err:
        raise SetupError(f"port {WHEEL_PORT} on 127.0.0.1 (the wheels for the image build): {err.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{WHEEL_PORT}/"
    finally:
        server.shutdown()
        server.server_close()
