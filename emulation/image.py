"""The docker backend's node image: built by the testbed itself, offline, tagged by its content.

`make image` (= `python -m emulation.image build`) does, on a machine with no image registry:
1. base image `fedge-base:bookworm-minbase` (once): `debootstrap --variant=minbase
   --include=python3,python3-venv,iproute2,ca-certificates bookworm DIR MIRROR` with MIRROR the
   system's apt mirror, trimmed, then `tar -C DIR -c . | docker import - fedge-base:...`;
2. a wheelhouse on the host: `pip download` of docker/requirements.txt (torch pinned in the same
   command, so the CPU wheel is used) and, with --no-deps, docker/requirements-nodeps.txt,
   for CPython 3.11 on manylinux of this machine's architecture (cached between builds);
3. `docker build` of docker/Dockerfile FROM that base: `pip install --no-index` from the
   wheelhouse into /opt/venv, plus the `node/` package. Nothing else of the project goes in.

With a registry, `FEDGE_IMAGE_BASE=registry` (or `--base registry`) builds the same Dockerfile
FROM python:3.11-slim instead of step 1.

The image is tagged `fedge-node:<hash>`, the hash covering node/, the requirement files and the
Dockerfile: a rebuild happens only when one of them changes, and the docker backend looks for
exactly the tag of the code it runs (`require_image`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
NODE_DIR = ROOT / "node"
REPOSITORY = "fedge-node"
BASE_IMAGE = "fedge-base:bookworm-minbase"
REGISTRY_BASE = "python:3.11-slim"
BASE_ENV = "FEDGE_IMAGE_BASE"           # debootstrap (default) | registry
CACHE_ENV = "FEDGE_CACHE"               # where wheelhouses are kept (default ~/.cache/fedge-testbed)
LABEL_IMAGE = "fedge.image"             # node | base
LABEL_HASH = "fedge.hash"
LABEL_BASE = "fedge.base"
BUILD_HINT = "build it with `make image` (or `python -m emulation.image build`; no registry needed)"
DEBOOTSTRAP_INCLUDE = "python3,python3-venv,iproute2,ca-certificates"
SUITE = "bookworm"
PYTHON_TAG = "3.11"                     # the base images' interpreter; the wheelhouse is made for it
CONTEXT_FILES = ("Dockerfile", "requirements.txt", "requirements-nodeps.txt")


class ImageError(RuntimeError):
    pass


# -- what the image is made of -------------------------------------------------------------
def _node_files() -> list[Path]:
    return sorted(p for p in NODE_DIR.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))


def content_hash() -> str:
    """sha256 over node/ and the build recipe (Dockerfile, requirement files): the image tag."""
    h = hashlib.sha256()
    for p in [*(DOCKER_DIR / f for f in CONTEXT_FILES), *_node_files()]:
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def image_tag() -> str:
    return f"{REPOSITORY}:{content_hash()}"


def requirements(nodeps: bool = False) -> list[str]:
    f = DOCKER_DIR / ("requirements-nodeps.txt" if nodeps else "requirements.txt")
    return [line.split("#")[0].strip() for line in f.read_text().splitlines() if line.split("#")[0].strip()]


def base_kind(requested: str | None = None) -> str:
    kind = requested or os.environ.get(BASE_ENV) or "debootstrap"
    if kind not in ("debootstrap", "registry"):
        raise ImageError(f"{BASE_ENV}={kind!r}: choose debootstrap (offline, default) or registry (python:3.11-slim)")
    return kind


# -- engine --------------------------------------------------------------------------------
def client(timeout: float = 60):
    try:
        import docker
    except ImportError as exc:
        raise ImageError("the docker SDK is not installed: pip install docker==7.2.0") from exc
    try:
        c = docker.from_env(timeout=timeout)
        c.ping()
        return c
    except Exception as exc:
        raise ImageError(f"no docker engine reachable ({type(exc).__name__}: {str(exc)[:200]}); install docker.io "
                         "and start it (`dockerd > /var/log/dockerd.log 2>&1 &`)") from exc


def find_image(c, tag: str | None = None):
    """The node image of the current code, or None."""
    import docker
    try:
        return c.images.get(tag or image_tag())
    except docker.errors.ImageNotFound:
        return None


def require_image(c) -> str:
    """The tag of the node image for the current code; ImageError saying how to build it if missing."""
    tag = image_tag()
    if find_image(c, tag) is not None:
        return tag
    others = sorted(t for im in c.images.list(name=REPOSITORY) for t in im.tags)
    stale = f" (found only {', '.join(others[:3])}: node/ or the requirements changed since)" if others else ""
    raise ImageError(f"docker image {tag} for this code is not built{stale}; {BUILD_HINT}")


def copy_image(target, source=None, say=print) -> float | None:
    """Make sure engine `target` has the node image of the current code: streamed from `source`
    (default: this host's engine) with `docker save | docker load` if missing. Seconds taken, or None."""
    tag = image_tag()
    if find_image(target, tag) is not None:
        return None
    source = source or client(timeout=600)
    img = find_image(source, tag)
    if img is None:
        raise ImageError(f"docker image {tag} for this code is not built on this host, so it cannot be copied "
                         f"to another engine; {BUILD_HINT}")
    say(f"copying the node image {tag} ({img.attrs.get('Size', 0) / 1e6:.0f} MB) to the engine")
    t0 = time.monotonic()
    target.images.load(img.save(named=tag))  # streamed: the tarball is never held whole in memory
    if find_image(target, tag) is None:
        raise ImageError(f"the engine did not keep {tag} after loading it")
    return time.monotonic() - t0


# -- step 1: base image from debootstrap -----------------------------------------------------
def apt_mirror() -> str:
    """The `URIs:` of the system's apt sources (deb822 files, else sources.list), security archive excluded."""
    d = Path("/etc/apt/sources.list.d")
    files = sorted(d.glob("*.sources"), key=lambda f: f.name != "debian.sources") if d.is_dir() else []
    for f in files:
        for uri in re.findall(r"^URIs:\s*(\S+)", f.read_text(), re.M):
            if "security" not in uri:
                return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def build_base(c, log=print) -> str:
    """`fedge-base:bookworm-minbase` from debootstrap (about 1.5 minutes; needs root and debootstrap)."""
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root; run `make image` as root or use FEDGE_IMAGE_BASE=registry")
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap is not installed: apt-get install -y debootstrap "
                         "(or use FEDGE_IMAGE_BASE=registry with a registry)")
    mirror = apt_mirror()
    work = Path(tempfile.mkdtemp(prefix="fedge-debootstrap-", dir="/var/tmp"))
    root = work / "rootfs"
    try:
        log(f"base: debootstrap --variant=minbase {SUITE} from {mirror} (about 1.5 min)")
        t = time.monotonic()
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}", SUITE, str(root),
                            mirror], capture_output=True, text=True)
        if r.returncode != 0:
            raise ImageError(f"debootstrap failed ({r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
        log(f"base: debootstrap took {time.monotonic() - t:.0f} s")
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                    "usr/share/info", "usr/share/locale", "dev", "tmp", "run"):
            d = root / sub
            if d.is_dir():
                for child in d.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        log(f"base: tar -C {root} -c . | docker import - {BASE_IMAGE}")
        repo, tag = BASE_IMAGE.split(":")
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            c.api.import_image(src=tar.stdout, repository=repo, tag=tag, stream_src=True, changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8", f"LABEL {LABEL_IMAGE}=base", 'CMD ["/bin/bash"]'])
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise ImageError(f"tar of {root} failed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BASE_IMAGE


# -- step 2: wheelhouse on the host --------------------------------------------------------
def _platforms() -> list[str]:
    arch = platform.machine()
    if arch in ("amd64", "AMD64"):
        arch = "x86_64"
    if arch == "arm64":
        arch = "aarch64"
    # pip does not expand a manylinux tag to older compatible ones: list them (glibc 2.36 = bookworm).
    return [f"manylinux_2_{v}_{arch}" for v in range(36, 4, -1)] + \
           [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def wheelhouse(log=print) -> Path:
    """A folder of wheels for CPython 3.11 / manylinux (cached by the requirement files' hash)."""
    h = hashlib.sha256((DOCKER_DIR / "requirements.txt").read_bytes()
                       + (DOCKER_DIR / "requirements-nodeps.txt").read_bytes() + platform.machine().encode())
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedge-testbed")
    dest = cache / f"wheelhouse-{h.hexdigest()[:12]}"
    if (dest / ".complete").exists():
        log(f"wheelhouse: {dest} (cached)")
        return dest
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = ["--only-binary=:all:", "--python-version", PYTHON_TAG, "--implementation", "cp",
              "--abi", "cp" + PYTHON_TAG.replace(".", "")]
    for p in _platforms():
        target += ["--platform", p]
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(tmp), *target]
    for nodeps, reqs in ((False, requirements()), (True, requirements(nodeps=True))):
        log(f"wheelhouse: pip download {'--no-deps ' if nodeps else ''}{' '.join(reqs)}")
        r = subprocess.run([*pip, *(["--no-deps"] if nodeps else []), *reqs], capture_output=True, text=True)
        if r.returncode != 0:
            err = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "is ignored" not in line)
            raise ImageError(f"pip download failed: {err[-2000:]}")
    torch = [w.name for w in tmp.glob("torch-*.whl")]
    if any("cu" in n.split("+")[-1] for n in torch if "+" in n) or any(tmp.glob("nvidia_*.whl")):
        raise ImageError(f"the wheelhouse got a CUDA torch ({torch}); pin torch and put the CPU wheel in pip's find-links")
    (tmp / ".complete").write_text("\n".join(sorted(w.name for w in tmp.glob("*.whl"))) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# -- step 3: the node image ----------------------------------------------------------------
def _context(wheels: Path, into: Path) -> None:
    for f in CONTEXT_FILES:
        shutil.copy2(DOCKER_DIR / f, into / f)
    (into / "wheels").mkdir()
    for w in wheels.glob("*.whl"):
        try:
            os.link(w, into / "wheels" / w.name)
        except OSError:
            shutil.copy2(w, into / "wheels" / w.name)
    for p in _node_files():
        dst = into / p.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)


def build(base: str | None = None, force: bool = False, log=print) -> str:
    """Build (or find up to date) the node image; returns its tag."""
    kind = base_kind(base)
    c = client(timeout=600)
    tag = image_tag()
    found = find_image(c, tag)
    if found is not None and not force and found.labels.get(LABEL_BASE) == kind:
        log(f"image {tag} is up to date ({kind} base)")
        return tag
    t0 = time.monotonic()
    if kind == "debootstrap":
        try:
            c.images.get(BASE_IMAGE)
            log(f"base: {BASE_IMAGE} (already imported)")
        except Exception:
            build_base(c, log)
        from_image = BASE_IMAGE
    else:
        from_image = REGISTRY_BASE
    wheels = wheelhouse(log)
    with tempfile.TemporaryDirectory(prefix="fedge-image-", dir="/var/tmp") as ctx:
        _context(wheels, Path(ctx))
        log(f"image: docker build FROM {from_image} -> {tag}")
        h = tag.split(":")[1]
        last = ""
        for chunk in c.api.build(path=ctx, tag=tag, buildargs={"BASE": from_image}, rm=True, forcerm=True,
                                 pull=False, decode=True,
                                 labels={LABEL_IMAGE: "node", LABEL_HASH: h, LABEL_BASE: kind}):
            if "error" in chunk:
                raise ImageError(f"docker build failed: {chunk['error'].strip()}\n{last}")
            line = chunk.get("stream", "").rstrip()
            if line:
                last = line
                if line.startswith("Step ") or "node image ok" in line:
                    log(f"  {line}")
    image = c.images.get(tag)
    image.tag(REPOSITORY, "latest")
    log(f"image {tag} built in {time.monotonic() - t0:.0f} s, {image.attrs['Size'] / 2**20:.0f} MB ({kind} base)")
    return tag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emulation.image", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the node image if node/ or the requirements changed")
    b.add_argument("--base", choices=("debootstrap", "registry"), default=None,
                   help=f"debootstrap: offline base (default); registry: FROM {REGISTRY_BASE} (or set {BASE_ENV})")
    b.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    sub.add_parser("tag", help="print the tag the docker backend will use for the current code")
    sub.add_parser("check", help="exit 0 if the image for the current code exists")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "tag":
            print(image_tag())
        elif a.cmd == "check":
            print(require_image(client()))
        else:
            build(a.base, a.force)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
