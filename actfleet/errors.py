"""Errors that end a command with a one-line message and a documented exit code.

Exit codes (README "Exit codes"):
  0  success (converged, repaired, verified, nothing to do)
  1  the operation failed (API error after retries, terraform failure, verify found problems)
  2  bad input: configuration, command-line usage, missing or corrupt model/dataset files
  3  a prerequisite is missing (terraform, node, npm, a Python extra)
  74 disk full (ENOSPC, EDQUOT, EFBIG) writing a local file: the store, a cache, an export (sysexits EX_IOERR)
"""

from __future__ import annotations

import contextlib
import errno
import os

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING_PREREQ = 3
EXIT_DISK_FULL = 74


class ActfleetError(Exception):
    """An expected failure: the CLI prints `actfleet: <message>` on stderr and exits with `exit_code`."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ActfleetError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""

    exit_code = EXIT_BAD_INPUT


class InputError(ActfleetError):
    """A model directory, dataset or other input file is missing or corrupt."""

    exit_code = EXIT_BAD_INPUT


class PrerequisiteError(ActfleetError):
    """A program or package the command needs is not installed."""

    exit_code = EXIT_MISSING_PREREQ


class DiskFull(ActfleetError):
    """A local write failed for lack of space: retrying on this machine cannot help until space is freed."""

    exit_code = EXIT_DISK_FULL


# "No space left on device", "Disk quota exceeded", "File too large" (RLIMIT_FSIZE, a filesystem's file size
# limit): each means this machine cannot hold what it must write, whichever way the disk is bounded.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)


def disk_full_error(e: OSError, doing: str) -> DiskFull:
    """The one-line error for a disk-full OSError: what was being done, the path, the errno's name."""
    where = f" {e.filename}" if e.filename else ""
    doing = doing if where else doing.rstrip(":")  # "storing K in URL:" with no path after it: one colon, not two
    return DiskFull(
        f"disk full: {doing}{where}: {os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)}); "
        f"free space (or raise the quota) and run it again"
    )


def no_space_at(path: "str | os.PathLike") -> bool:
    """Whether the filesystem holding `path` (or its nearest existing parent) has under 1 MiB left for us."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


@contextlib.contextmanager
def disk_full_is_fatal(doing: str, path: "str | os.PathLike | None" = None):
    """Turn a disk-full OSError raised inside into DiskFull (one line, exit 74); other errors pass unchanged.
    With `path` (where it writes), an OSError without an errno counts too when that filesystem is full: numpy's
    tofile reports a short write as "64 requested and 0 written", nothing more."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(e, doing) from None
        if e.errno is None and path is not None and no_space_at(path):
            raise DiskFull(
                f"disk full: {doing} {path}: {e}; free space (or raise the quota) and run it again"
            ) from None
        raise
