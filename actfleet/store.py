"""Object stores: one small interface, two implementations with the same atomicity contract (docs/jobs.md).

    store = open_store("out/")            # or "file:///abs/path", or "gs://bucket/prefix"
    data, gen = store.read("job/job.json")
    gen = store.create("job/leases/000003", b"...")          # only if absent, else PreconditionFailed
    gen = store.replace("job/leases/000003", b"...", gen)    # only if still at `gen`, else PreconditionFailed
    store.delete("job/leases/000003", gen)                   # only if still at `gen`
    store.put("job/shards/000003-0000.safetensors", path)    # unconditional, atomic (readers never see half)

Every object has a *generation*: a positive integer that changes on every write, as on GCS. The
conditional operations are the building blocks of leases and locks, the way Terraform's GCS backend builds
its state lock: create-if-absent to take, generation-matched replace to renew, generation-matched delete
to release.

- GcsStore maps them onto `if_generation_match` preconditions (0 = "must not exist").
- LocalStore gives a filesystem the same contract: every write goes to a hidden temporary file (written
  and fsynced outside any lock) that is renamed into place (atomic on POSIX), and the generation is the
  file's nanosecond mtime, set explicitly and strictly increasing per key. Only the compare-and-rename of
  a write (stamp the generation, check the current one, rename) runs under an `flock` on a per-key lock
  file, so it is atomic between processes on one machine (not over NFS) and a writer stalled in the
  middle of a large payload (SIGSTOP, a slow disk) never blocks anyone else. Waiting for that lock is
  bounded (`LOCK_WAIT_S`) and ends in a clear error naming the key. Reads need no lock: a file is never
  changed in place, so the descriptor read and its fstat describe the same generation.

Every store also has a *clock*: `now()` is the store's own current time and `read_stamped`/`list_written`
give each object's write time by that clock (GCS: the server's `Date` header and the objects' `updated`;
a local directory: the filesystem's timestamps). Lease expiry and heartbeat ages are judged by it, never by
the clock of the process that wrote or reads a record (docs/jobs.md, "Guarantees and limits: clocks").

Errors: `NotFound` (read/delete of an absent key) and `PreconditionFailed` (a condition did not hold). Both
are ActfleetErrors. Transient GCS errors (429, 5xx, timeouts) are retried with jittered exponential backoff
by google-cloud-storage's retry policy, which we pass explicitly to every call (our writes are idempotent:
conditional, or of deterministic content).
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import fcntl
import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from actfleet.errors import ActfleetError, InputError
from actfleet.retry import retry


class NotFound(ActfleetError):
    """The key does not exist."""


class PreconditionFailed(ActfleetError):
    """create: the key exists; replace/delete: the key is at another generation (or absent)."""


class StoreBusy(ActfleetError):
    """A local key's lock was held for longer than LOCK_WAIT_S (its holder is stalled): nothing was written."""


def parse_gs(url: str, what: str = "") -> tuple[str, str]:
    """ "gs://bucket/some/key/" -> ("bucket", "some/key"): the one parser of gs:// URLs (the key, an object name
    or a prefix, has no leading or trailing "/"; it may be ""). InputError, naming `what` (e.g. 'store') and the
    URL, for a URL that is not gs://, has no bucket, or has a ".." segment (a key must not climb out of the
    prefix a grant or a store is scoped to)."""
    culprit = f'{what} "{url}"' if what else f'"{url}"'
    if not url.startswith("gs://"):
        raise InputError(f"{culprit}: not a gs:// URL")
    bucket, _, key = url[len("gs://") :].partition("/")
    if not bucket:
        raise InputError(f'{culprit}: no bucket (a GCS URL looks like "gs://bucket/prefix")')
    key = key.strip("/")
    if ".." in key.split("/"):
        raise InputError(f'{culprit}: ".." is not allowed in a GCS object name or prefix')
    return bucket, key


def open_store(url: str) -> "Store":
    """A path, "file:///abs/path" or "gs://bucket/prefix" -> the Store rooted there."""
    if url.startswith("gs://"):
        return GcsStore(*parse_gs(url, "store"))
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f'store "{url}": a file URL needs an absolute path, e.g. "file:///data/acts"')
        return LocalStore(parsed.path)
    if "://" in url:
        raise InputError(f'store "{url}": must be a path, "file:///abs/path" or "gs://bucket/prefix"')
    if not url:
        raise InputError("store: empty store URL")
    return LocalStore(url)


# Under a store: hub models mirrored at prepare, {store}/models/{org}--{name}/{commit}/ (worker/model_mirror.py).
MODEL_MIRROR = "models"


def join(*parts: str) -> str:
    """Join key parts with "/" (keys always use "/", whatever the OS)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store:
    """The interface. Keys are "/"-separated relative names, e.g. "myjob/done/000003"."""

    url: str

    def read(self, key: str) -> tuple[bytes, int]:
        """(data, generation); NotFound if absent."""
        raise NotImplementedError

    def read_range(self, key: str, start: int, end: int, generation: int | None = None) -> tuple[bytes, int]:
        """(bytes start..end-1, generation): a ranged read, so a reader fetches only the tensors it wants.
        With `generation`, PreconditionFailed if the object is no longer at it (a reader that took offsets
        from one version's header never reads another version's bytes). NotFound if absent."""
        raise NotImplementedError

    def generation(self, key: str) -> int | None:
        """The current generation, or None if absent."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> int:
        """Write only if absent; returns the new generation; PreconditionFailed if it exists."""
        raise NotImplementedError

    def replace(self, key: str, data: bytes, generation: int) -> int:
        """Write only if the key is at `generation`; PreconditionFailed otherwise (also when absent)."""
        raise NotImplementedError

    def delete(self, key: str, generation: int | None = None) -> None:
        """Delete (only if at `generation`, when given). NotFound if absent; PreconditionFailed on mismatch."""
        raise NotImplementedError

    def put(self, key: str, data: "bytes | os.PathLike | str") -> int:
        """Unconditional atomic write of bytes or of a local file's contents; returns the generation."""
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[str]:
        """Keys that start with `prefix` (use a trailing "/" for a folder), sorted."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """A local file holding the key's bytes (for mmap), or None (absent, or not a local store)."""
        return None

    def now(self) -> float:
        """The store's own current time (unix seconds by the store's clock, not this process's)."""
        raise NotImplementedError

    def read_stamped(self, key: str) -> tuple[bytes, int, float]:
        """(data, generation, written): `written` is the store's time of that generation's write. NotFound."""
        raise NotImplementedError

    def list_written(self, prefix: str) -> dict[str, float]:
        """Keys that start with `prefix`, each with the store's time of its last write (one listing)."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None if absent."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise InputError(f'store key "{key}": must be a relative "/"-separated name without "." or ".." parts')
    if any(p.startswith(".") for p in key.split("/")):
        # Hidden names are the local store's own (temporary files, locks).
        raise InputError(f'store key "{key}": parts must not start with "."')
    return key


# ----------------------------------------------------------------------------------------------------
# Local filesystem
# ----------------------------------------------------------------------------------------------------

LOCK_DIR = ".locks"
LOCK_WAIT_S = 30.0  # the locked section is a stat, a utime and a rename: only a stalled holder takes longer
_GEN_STEP_NS = 1000  # generations advance by >= 1 µs so filesystems with µs timestamps still see a change


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.url = str(self.root)

    # -- helpers --------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    @contextlib.contextmanager
    def _locked(self, key: str):
        """Hold the per-key lock: the check and the rename of a conditional write happen as one step.
        Waits at most LOCK_WAIT_S, polling, so a holder stopped inside its (tiny) section cannot hang us."""
        lock_dir = self.root / LOCK_DIR
        lock_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        fd = os.open(lock_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:  # polls 1, 2, 4 ... 50 ms apart
                retry(
                    lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
                    deadline=LOCK_WAIT_S,
                    base=0.001,
                    cap=0.05,
                    jitter=False,
                    retryable=(BlockingIOError,),
                )
            except BlockingIOError:
                raise StoreBusy(
                    f"{self.url}/{key}: its lock has been held for over {LOCK_WAIT_S:.0f} s "
                    f"(a stalled writer?); nothing was written"
                ) from None
            yield
        finally:
            os.close(fd)  # closing releases the flock (also when the process is killed)

    @staticmethod
    def _gen_of(path: Path) -> int | None:
        try:
            return os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _staged(self, path: Path, data: "bytes | os.PathLike | str") -> Iterator[Path]:
        """A hidden temporary file next to `path` holding `data`, written and fsynced with no lock held;
        removed afterwards unless it was renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                shutil.copyfile(data, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _stamp(tmp: Path, floor_gen: int | None) -> int:
        """Give the staged file a generation above `floor_gen` (under the key's lock: it is the compare).
        The generation is the mtime the kernel sets (the store's clock, whatever this process's clock says),
        so it is also the write's time; only a write within the same clock tick steps it on explicitly."""
        os.utime(tmp)
        actual = os.stat(tmp).st_mtime_ns
        if floor_gen is not None and actual <= floor_gen:
            gen = floor_gen + _GEN_STEP_NS
            os.utime(tmp, ns=(gen, gen))
            actual = os.stat(tmp).st_mtime_ns
        if floor_gen is not None and actual <= floor_gen:  # a filesystem with coarse timestamps
            gen = floor_gen + 1_000_000_000
            os.utime(tmp, ns=(gen, gen))
            actual = os.stat(tmp).st_mtime_ns
        return actual

    # -- the interface --------------------------------------------------------------------------------

    def read(self, key: str) -> tuple[bytes, int]:
        try:
            with open(self._path(key), "rb") as f:
                gen = os.fstat(f.fileno()).st_mtime_ns
                return f.read(), gen
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.url}/{key}: not found") from None

    def read_range(self, key: str, start: int, end: int, generation: int | None = None) -> tuple[bytes, int]:
        try:
            with open(self._path(key), "rb") as f:
                gen = os.fstat(f.fileno()).st_mtime_ns
                if generation is not None and gen != generation:
                    raise PreconditionFailed(f"{self.url}/{key}: at generation {gen}, expected {generation}")
                f.seek(start)
                return f.read(max(0, end - start)), gen
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.url}/{key}: not found") from None

    def generation(self, key: str) -> int | None:
        p = self._path(key)
        return self._gen_of(p) if p.is_file() else None

    def size(self, key: str) -> int | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size

    def create(self, key: str, data: bytes) -> int:
        path = self._path(key)
        if path.exists():  # cheap early answer; the decisive check is link() below
            raise PreconditionFailed(f"{self.url}/{key}: already exists")
        with self._staged(path, data) as tmp, self._locked(key):
            gen = self._stamp(tmp, None)
            # link() fails if the name exists: create-if-absent even against a writer that skips the lock.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PreconditionFailed(f"{self.url}/{key}: already exists") from None
            return gen

    def replace(self, key: str, data: bytes, generation: int) -> int:
        path = self._path(key)
        with self._staged(path, data) as tmp, self._locked(key):
            current = self._gen_of(path)
            if current != generation:
                raise PreconditionFailed(f"{self.url}/{key}: at generation {current}, expected {generation}")
            gen = self._stamp(tmp, current)
            os.replace(tmp, path)
            return gen

    def delete(self, key: str, generation: int | None = None) -> None:
        path = self._path(key)
        with self._locked(key):
            current = self._gen_of(path)
            if current is None:
                raise NotFound(f"{self.url}/{key}: not found")
            if generation is not None and current != generation:
                raise PreconditionFailed(f"{self.url}/{key}: at generation {current}, expected {generation}")
            path.unlink()

    def put(self, key: str, data: "bytes | os.PathLike | str") -> int:
        path = self._path(key)
        with self._staged(path, data) as tmp, self._locked(key):
            gen = self._stamp(tmp, self._gen_of(path))
            os.replace(tmp, path)
            return gen

    def list(self, prefix: str) -> Iterator[str]:
        # Walk only the directory the prefix names (or is inside), never the whole store.
        head, _, _ = prefix.rpartition("/")
        start = self.root / head if head else self.root
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/")
            for name in filenames:
                if name.startswith("."):
                    continue
                key = f"{rel}/{name}" if rel else name
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def local_path(self, key: str) -> Path | None:
        p = self._path(key)
        return p if p.is_file() else None

    def now(self) -> float:
        """The filesystem's clock: touch a hidden file (the kernel stamps it) and read its mtime."""
        clock = self.root / LOCK_DIR / "clock"
        try:
            clock.parent.mkdir(parents=True, exist_ok=True)
            clock.touch()
            return os.stat(clock).st_mtime_ns / 1e9
        except OSError:  # a read-only store: the machine's clock is the filesystem's
            return time.time()

    def read_stamped(self, key: str) -> tuple[bytes, int, float]:
        data, gen = self.read(key)
        return data, gen, gen / 1e9  # the generation is the kernel's mtime of the write (_stamp)

    def list_written(self, prefix: str) -> dict[str, float]:
        out = {}
        for key in self.list(prefix):
            gen = self._gen_of(self.root / key)
            if gen is not None:
                out[key] = gen / 1e9
        return out


# ----------------------------------------------------------------------------------------------------
# Google Cloud Storage
# ----------------------------------------------------------------------------------------------------


def _rfc3339(text: str) -> float:
    """GCS's '2026-12-03T17:35:11.123Z' (or with µs/ns digits) -> epoch seconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    t = datetime.datetime.fromisoformat(f"{head}.{frac[:6].ljust(6, '0')}")  # as Blob.updated: µs kept
    return t.replace(tzinfo=datetime.timezone.utc).timestamp()


def _gcs_retry():
    """Jittered exponential backoff on 429/5xx/connection errors (google-api-core's policy)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(120.0)


class GcsStore(Store):
    """`gs://bucket/prefix`. Credentials: application default credentials (the VM's attached service
    account); with STORAGE_EMULATOR_HOST set (tests), an anonymous client for that endpoint."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        from google.cloud import storage

        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client or storage.Client()
        self.bucket = self.client.bucket(bucket)
        # The server's clock as (a lower bound of server time - time.monotonic(), when last observed): every
        # response's `Date` and every write's `updated` were at or before the moment we received them.
        self._clock: tuple[float, float] | None = None
        hooks = getattr(getattr(self.client, "_http", None), "hooks", None)  # a requests.Session's
        if isinstance(hooks, dict):
            hooks.setdefault("response", []).append(self._observe_date)

    def _observe(self, server_time: float) -> None:
        at = time.monotonic()
        offset = server_time - at
        old = self._clock
        fresh = old is None or at - old[1] > self.CLOCK_REFRESH_S
        self._clock = (offset if fresh else max(offset, old[0]), at)

    def _observe_date(self, response, *args, **kwargs):
        """A response's `Date` header (whole seconds, truncated) is a reading of the server's clock."""
        date = getattr(response, "headers", {}).get("Date")
        if date:
            try:
                self._observe(email.utils.parsedate_to_datetime(date).timestamp())
            except (TypeError, ValueError):
                pass
        return None

    def _observe_write(self, blob) -> None:
        if blob.updated is not None:  # the server's time of our write (microseconds)
            self._observe(blob.updated.timestamp())

    CLOCK_REFRESH_S = 60.0  # readings older than this are dropped, and refreshed with a one-object listing

    def now(self) -> float:
        """The server's clock: the best lower bound its readings give, advanced by this machine's monotonic
        clock since (this machine's wall clock never enters); a fresh reading first if there is none recent.
        At most about a second behind the server (Date's resolution), never ahead."""
        if self._clock is None or time.monotonic() - self._clock[1] > self.CLOCK_REFRESH_S:
            prefix = self.prefix + "/" if self.prefix else None
            list(self.client.list_blobs(self.bucket_name, prefix=prefix, max_results=1, retry=_gcs_retry()))
        if self._clock is None:  # a server that sends no Date header
            return time.time()
        return self._clock[0] + time.monotonic()

    def read_stamped(self, key: str) -> tuple[bytes, int, float]:
        for _ in range(5):  # rewritten between the metadata and the download: read again
            meta = self.bucket.get_blob(self._name(key), retry=_gcs_retry())
            if meta is None:
                raise NotFound(f"{self.url}/{key}: not found")
            try:
                return self.read_at(key, int(meta.generation)), int(meta.generation), meta.updated.timestamp()
            except PreconditionFailed:
                continue
        raise PreconditionFailed(f"{self.url}/{key}: keeps changing while read")

    def list_written(self, prefix: str) -> dict[str, float]:
        full = join(self.prefix, prefix) if prefix else self.prefix
        if prefix.endswith("/") or (not prefix and self.prefix):
            full += "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        # Only the two fields, read from each page's JSON (no Blob objects, whose `updated` goes through
        # strptime): ~0.1 ms an object otherwise, a second for 10,000 worker records, listed every pass.
        blobs = self.client.list_blobs(
            self.bucket_name, prefix=full or None, retry=_gcs_retry(), fields="items(name,updated),nextPageToken"
        )
        out = {}
        for page in blobs.pages:
            for item in (page.raw_page or {}).get("items", ()):
                out[item["name"][cut:]] = _rfc3339(item["updated"])
        return dict(sorted(out.items()))

    def _name(self, key: str) -> str:
        return join(self.prefix, _check_key(key))

    def _blob(self, key: str):
        return self.bucket.blob(self._name(key))

    def read(self, key: str) -> tuple[bytes, int]:
        from google.api_core import exceptions as gexc

        blob = self._blob(key)
        try:
            data = blob.download_as_bytes(retry=_gcs_retry())
        except gexc.NotFound:
            raise NotFound(f"{self.url}/{key}: not found") from None
        if blob.generation is None:  # a server that does not send x-goog-generation
            meta = self.bucket.get_blob(self._name(key), retry=_gcs_retry())
            if meta is None:
                raise NotFound(f"{self.url}/{key}: not found")
            return self.read_at(key, meta.generation), int(meta.generation)
        return data, int(blob.generation)

    def read_at(self, key: str, generation: int) -> bytes:
        from google.api_core import exceptions as gexc

        try:
            return self._blob(key).download_as_bytes(if_generation_match=generation, retry=_gcs_retry())
        except (gexc.NotFound, gexc.PreconditionFailed):
            raise PreconditionFailed(f"{self.url}/{key}: changed while reading") from None

    def read_range(self, key: str, start: int, end: int, generation: int | None = None) -> tuple[bytes, int]:
        from google.api_core import exceptions as gexc

        if end <= start:
            return b"", int(generation or 0)
        blob = self._blob(key)
        try:  # `end` is inclusive in google-cloud-storage (an HTTP Range header)
            data = blob.download_as_bytes(start=start, end=end - 1, if_generation_match=generation, retry=_gcs_retry())
        except gexc.NotFound:
            raise NotFound(f"{self.url}/{key}: not found") from None
        except gexc.PreconditionFailed:
            raise PreconditionFailed(f"{self.url}/{key}: not at generation {generation}") from None
        gen = blob.generation if blob.generation is not None else generation
        if gen is None:  # a server that does not send x-goog-generation
            gen = self.generation(key)
        return data, int(gen or 0)

    def generation(self, key: str) -> int | None:
        blob = self.bucket.get_blob(self._name(key), retry=_gcs_retry())
        return None if blob is None else int(blob.generation)

    def size(self, key: str) -> int | None:
        blob = self.bucket.get_blob(self._name(key), retry=_gcs_retry())
        return None if blob is None else int(blob.size)

    def _conditional_upload(self, key: str, data: bytes, if_generation_match: int) -> int:
        from google.api_core import exceptions as gexc

        blob = self._blob(key)
        try:
            blob.upload_from_string(
                data,
                content_type="application/octet-stream",
                if_generation_match=if_generation_match,
                retry=_gcs_retry(),
            )
            self._observe_write(blob)
            return int(blob.generation)
        except gexc.PreconditionFailed:
            # A retried request whose first attempt did land answers 412 though the write is ours. Our
            # records carry a unique nonce, so identical bytes at the key mean the write succeeded.
            try:
                current, gen = self.read(key)
            except NotFound:
                current, gen = None, None
            if current == data and gen is not None:
                return gen
            what = "already exists" if if_generation_match == 0 else f"not at generation {if_generation_match}"
            raise PreconditionFailed(f"{self.url}/{key}: {what}") from None

    def create(self, key: str, data: bytes) -> int:
        return self._conditional_upload(key, data, 0)

    def replace(self, key: str, data: bytes, generation: int) -> int:
        if not generation:
            raise PreconditionFailed(f"{self.url}/{key}: replace needs the generation it replaces")
        return self._conditional_upload(key, data, generation)

    def delete(self, key: str, generation: int | None = None) -> None:
        from google.api_core import exceptions as gexc

        try:
            self._blob(key).delete(if_generation_match=generation, retry=_gcs_retry())
        except gexc.NotFound:
            raise NotFound(f"{self.url}/{key}: not found") from None
        except gexc.PreconditionFailed:
            raise PreconditionFailed(f"{self.url}/{key}: not at generation {generation}") from None

    def put(self, key: str, data: "bytes | os.PathLike | str") -> int:
        blob = self._blob(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            blob.upload_from_string(bytes(data), content_type="application/octet-stream", retry=_gcs_retry())
        else:
            blob.upload_from_filename(os.fspath(data), content_type="application/octet-stream", retry=_gcs_retry())
        self._observe_write(blob)
        return int(blob.generation)

    def list(self, prefix: str) -> Iterator[str]:
        full = join(self.prefix, prefix) if prefix else self.prefix
        if prefix.endswith("/") or (not prefix and self.prefix):
            full += "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        names = [
            b.name[cut:] for b in self.client.list_blobs(self.bucket_name, prefix=full or None, retry=_gcs_retry())
        ]
        return iter(sorted(names))


def unavailable(e: BaseException) -> bool:
    """Whether `e` says the store is unavailable for now rather than that the request is wrong: a local key's
    lock held by a stalled writer (StoreBusy), a GCS outage that outlasted the client's retries (RetryError,
    5xx, 429, a request timeout), a dropped connection. Waiting and trying again may succeed; a 403 or a
    bad key never will."""
    if isinstance(e, (StoreBusy, ConnectionError, TimeoutError)):
        return True
    try:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as gauth
    except ImportError:  # the cloud extra is not installed: no GCS errors to classify
        return False
    import requests

    return isinstance(
        e,
        (
            gexc.RetryError,
            gexc.ServerError,
            gexc.TooManyRequests,
            gexc.DeadlineExceeded,
            gauth.TransportError,
            requests.ConnectionError,
            requests.Timeout,
        ),
    )
