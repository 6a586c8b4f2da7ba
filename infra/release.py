"""`actfleet release`: publish what a TPU VM installs, once per pinned commit, into the activations bucket.

    gs://{bucket}/actfleet/releases/{commit}/
      SHA256SUMS                      every file below with its sha256; written last (its presence = published)
      python-version                  the commit's bootstrap/python-version
      requirements-tpu.txt            the commit's lock (every package pinned and hashed)
      wheels/*.whl                    the wheelhouse: one file per locked package, its hash among the lock's
      requirements-actfleet.txt       actfleet==VERSION --hash=sha256:... (the project's wheel, no deps)
      actfleet/actfleet-*.whl         the project's wheel, built from the pinned commit's tree
      uv/uv-*.whl                     the uv wheel whose hash the commit's bootstrap/requirements-uv.txt pins
      python/{tag}/cpython-*.tar.gz   the python-build-standalone archive uv installs (uv's file:// mirror layout)

bootstrap/startup.sh fetches SHA256SUMS and every file it names through the storage JSON API with the VM's own
token, checks them all, and installs with `--no-index --require-hashes`: a VM needs no package index, no
repository (a private one works: the operator's checkout is read here, never fetched on a VM) and no
external IP. A release is immutable: once SHA256SUMS exists the commit's release is not rewritten.

Everything is gathered on the operator's machine: the tree by `git archive` of the commit from a local
checkout, the wheelhouse from `--wheelhouse DIR` or by `pip download` (the pip_download_argv below), the CPython
archive from `--python-archive`. Pure parts (lock parsing, choosing files) are separate from I/O.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from actfleet.config import Config
from actfleet.errors import ActfleetError, InputError
from actfleet.hashing import sha256_file
from actfleet.infra.startup_script import release_url

SUMS = "SHA256SUMS"
# Ubuntu 22.04 (every TPU VM image) has glibc 2.35; `pip download --platform` matches tags exactly, so all of them.
TPU_PLATFORMS = ("linux_x86_64", "manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 36)))
PYTHON_TARGET = "x86_64-unknown-linux-gnu"
_REQ = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)(?P<hashes>(?:\s+--hash=sha256:[0-9a-f]{64})+)"
)
_ARCHIVE = re.compile(
    rf"cpython-(?P<version>3\.\d+\.\d+)\+(?P<tag>\d{{8}})-{PYTHON_TARGET}-install_only(?:_stripped)?\.tar\.gz"
)


@dataclass(frozen=True)
class Locked:
    """One requirement of a hashed lock: `name==version` and the sha256s of its files (any platform)."""

    name: str
    version: str
    hashes: frozenset[str]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str, source: str) -> list[Locked]:
    """A `uv pip compile --generate-hashes` lock -> its requirements. Anything the VM could not install with
    --require-hashes from a wheelhouse (a marker, an extra, a URL, an unpinned name) is refused by name."""
    out = []
    for logical in text.replace("\\\n", " ").splitlines():
        logical = re.sub(r"(^|\s)#.*$", "", logical).strip()
        if not logical:
            continue
        m = _REQ.fullmatch(logical)
        if not m:
            raise InputError(
                f"{source}: {logical.split()[0]!r} is not name==version with --hash=sha256:... only "
                f"(markers, extras and URLs cannot be installed from a hashed wheelhouse)"
            )
        hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", m["hashes"]))
        out.append(Locked(normalize(m["name"]), m["version"], hashes))
    if not out:
        raise InputError(f"{source}: no requirements (expected name==version lines with --hash=sha256:...)")
    return out


def wheel_project(filename: str) -> tuple[str, str]:
    """(normalized name, version) from a wheel's file name (PEP 427: name-version-...whl)."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) < 5:
        raise InputError(f"{filename}: not a wheel file name")
    return normalize(parts[0]), parts[1]


def pick_wheels(locked: list[Locked], found: dict[str, Path], source: str) -> list[Path]:
    """For every locked requirement, the wheelhouse files (by sha256) among its hashes; InputError naming the
    first requirement none of whose files is there."""
    chosen: list[Path] = []
    for req in locked:
        files = [found[h] for h in sorted(req.hashes) if h in found]
        if not files:
            raise InputError(
                f"{source}: no file for {req.name}=={req.version} in the wheelhouse with one of its "
                f"{len(req.hashes)} locked hashes (download it for the TPU VM: see docs/infrastructure.md, 'Releases')"
            )
        for f in files:
            if f.name.endswith(".whl") and wheel_project(f.name)[0] != req.name:
                raise InputError(f"{f}: has a hash locked for {req.name}, but names {wheel_project(f.name)[0]}")
        chosen += files
    return chosen


def hash_dir(directory: Path) -> dict[str, Path]:
    """sha256 -> file for every file under `directory`."""
    return {sha256_file(p): p for p in sorted(directory.rglob("*")) if p.is_file()}


def python_archive_name(path: Path, want: str) -> str:
    """The release name of a python-build-standalone archive: python/{tag}/{filename}, the layout uv reads a
    file:// UV_PYTHON_INSTALL_MIRROR in; InputError unless it is CPython `want` for x86_64 Linux (glibc)."""
    m = _ARCHIVE.fullmatch(path.name)
    if not m:
        raise InputError(
            f"--python-archive {path.name}: not a python-build-standalone archive named "
            f"cpython-VERSION+TAG-{PYTHON_TARGET}-install_only_stripped.tar.gz"
        )
    if m["version"] != want:
        raise InputError(f"--python-archive {path.name}: CPython {m['version']}, but the commit pins {want}")
    return f"python/{m['tag']}/{path.name}"


def redact(url: str) -> str:
    """A URL fit for a log: user and password (a token) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


def sums_text(files: dict[str, Path]) -> str:
    """SHA256SUMS: `sha256sum --check` format, sorted by name."""
    return "".join(f"{sha256_file(files[name])}  {name}\n" for name in sorted(files))


def pip_download_argv(requirements: Path, dest: Path, python_version: str) -> list[str]:
    """`pip download` of a hashed lock's wheels for the TPU VM (x86_64 Linux, CPython `python_version`), run on
    the operator's machine when no --wheelhouse is given."""
    major_minor = "".join(python_version.split(".")[:2])
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "--only-binary=:all:"]
    for platform in TPU_PLATFORMS:
        argv += ["--platform", platform]
    return [*argv, "--python-version", major_minor, "--implementation", "cp", "-d", str(dest), "-r", str(requirements)]


# ----------------------------------------------------------------------------------------------------
# I/O: the commit's tree, the project wheel, gathering and publishing
# ----------------------------------------------------------------------------------------------------


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ActfleetError(f"{what}: {argv[0]} is not installed", 3) from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ActfleetError(f"{what} failed: {tail[0]}")
    return p.stdout


def export_tree(repo: Path, commit: str, dest: Path) -> None:
    """The commit's files (exactly what git stores, nothing of the working tree) into `dest`."""
    if subprocess.run(
        ["git", "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
    ).returncode:
        raise InputError(
            f"repo.commit {commit} is not in the checkout {repo}: fetch it there (git fetch) or pass --repo PATH"
        )
    archive = dest.parent / "tree.tar"
    _run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(archive), commit], "git archive")
    dest.mkdir(parents=True)
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    archive.unlink()


def build_wheel(tree: Path, out: Path) -> Path:
    """The project's wheel from the exported tree (the build backend of this environment; no index)."""
    env_argv = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*env_argv, "-w", str(out), str(tree)], "building the project's wheel")
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise ActfleetError(f"building the project's wheel produced {len(wheels)} wheels, not one")
    return wheels[0]


def _lock_line(wheel: Path) -> str:
    name, version = wheel_project(wheel.name)
    return f"{name}=={version} \\\n    --hash=sha256:{sha256_file(wheel)}\n"


@dataclass(frozen=True)
class Release:
    url: str
    commit: str
    files: int
    bytes: int
    published: bool  # False: it was already there (releases are immutable)

    def as_dict(self) -> dict:
        return {"url": self.url, "commit": self.commit, "files": self.files, "bytes": self.bytes,
                "published": self.published}  # fmt: skip


def gather(
    config: Config, repo: Path, work: Path, *, wheelhouse: Path | None, python_archive: Path | None
) -> dict[str, Path]:
    """Release name -> local file, every file checked against the commit's pins."""
    commit = config.repo.commit
    tree = work / "tree"
    export_tree(repo, commit, tree)
    boot = tree / "bootstrap"
    files: dict[str, Path] = {}
    for name in ("python-version", "requirements-tpu.txt", "requirements-uv.txt"):
        if not (boot / name).is_file():
            raise InputError(f"commit {commit}: bootstrap/{name} is missing")
    python_version = (boot / "python-version").read_text().strip()
    tpu_lock = parse_lock((boot / "requirements-tpu.txt").read_text(), "bootstrap/requirements-tpu.txt")
    uv_lock = parse_lock((boot / "requirements-uv.txt").read_text(), "bootstrap/requirements-uv.txt")
    if [r.name for r in uv_lock] != ["uv"]:
        raise InputError("bootstrap/requirements-uv.txt: must pin uv alone")
    if wheelhouse is None:
        wheelhouse = work / "downloads"
        for lock in ("requirements-tpu.txt", "requirements-uv.txt"):
            _run(pip_download_argv(boot / lock, wheelhouse, python_version), f"pip download of bootstrap/{lock}")
    elif not wheelhouse.is_dir():
        raise InputError(f"--wheelhouse {wheelhouse}: no such directory")
    found = hash_dir(wheelhouse)
    for f in pick_wheels(tpu_lock, found, "bootstrap/requirements-tpu.txt"):
        files[f"wheels/{f.name}"] = f
    uv_wheels = [f for f in pick_wheels(uv_lock, found, "bootstrap/requirements-uv.txt") if "x86_64" in f.name]
    if len(uv_wheels) != 1:
        raise InputError(
            f"--wheelhouse {wheelhouse}: {len(uv_wheels)} uv wheels for x86_64 Linux with a locked hash (need one)"
        )
    files[f"uv/{uv_wheels[0].name}"] = uv_wheels[0]
    if python_archive is None:
        raise InputError(
            f"--python-archive is required: the python-build-standalone archive of CPython {python_version} "
            f"for {PYTHON_TARGET} that the pinned uv installs (docs/infrastructure.md, 'Releases')"
        )
    if not python_archive.is_file():
        raise InputError(f"--python-archive {python_archive}: no such file")
    files[python_archive_name(python_archive, python_version)] = python_archive
    wheel = build_wheel(tree, work / "dist")
    files[f"actfleet/{wheel.name}"] = wheel
    (work / "requirements-actfleet.txt").write_text(_lock_line(wheel))
    files["requirements-actfleet.txt"] = work / "requirements-actfleet.txt"
    files["requirements-tpu.txt"] = boot / "requirements-tpu.txt"
    files["python-version"] = boot / "python-version"
    return files


def published(config: Config) -> bool:
    from actfleet.store import open_store

    return open_store(release_url(config)).generation(SUMS) is not None


def release(
    config: Config, repo: Path | None, *, wheelhouse: Path | None = None, python_archive: Path | None = None
) -> Release:
    """Publish the pinned commit's release unless it is already there. Files first, SHA256SUMS last and only if
    absent: a crashed publish leaves no SHA256SUMS (VMs wait for it), and two operators cannot both write one.
    `repo` None: the checkout around the current directory (looked for only when there is something to publish)."""
    from actfleet.store import PreconditionFailed, open_store

    url = release_url(config)
    store = open_store(url)
    if store.generation(SUMS) is not None:
        return Release(url, config.repo.commit, 0, 0, published=False)
    repo = repo or default_repo()
    with tempfile.TemporaryDirectory(prefix="actfleet-release-") as tmp:
        files = gather(config, repo, Path(tmp), wheelhouse=wheelhouse, python_archive=python_archive)
        sums = sums_text(files)
        for name in sorted(files):
            store.put(name, files[name])
        try:
            store.create(SUMS, sums.encode())
        except PreconditionFailed:
            return Release(url, config.repo.commit, 0, 0, published=False)  # another publish finished first
        return Release(url, config.repo.commit, len(files), sum(os.path.getsize(p) for p in files.values()), True)


def default_repo() -> Path:
    """The git checkout holding the current directory (the operator's clone of the project)."""
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if out.returncode:
        raise InputError("not inside a git checkout of the project: pass --repo PATH (a clone holding repo.commit)")
    return Path(out.stdout.strip())
