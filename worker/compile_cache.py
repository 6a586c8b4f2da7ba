"""JAX's persistent compilation cache (on by default) and a count of what this process compiled.

The directory is $ACTFLEET_JAX_CACHE, else ~/.cache/actfleet/jax: stable across processes, so a restarted
worker or a second `actfleet extract` loads its programs instead of compiling them. JAX keys each entry by
the program's HLO, the compile options, the devices and the jax/jaxlib versions, so one directory serves
every model, shape and version without stale hits. Every program is cached, however quick to compile
(on a TPU the small ones still cost seconds each).

`stats()` counts, from jax.monitoring events, the programs compiled by this process and those loaded from
the cache: `actfleet extract --json` reports them, bench/whole_process.py prints them, and a test checks
that a second process compiles nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()
_counts = {"compiles": 0, "cache_hits": 0, "compile_seconds": 0.0}
_listening = False

_HIT = "/jax/compilation_cache/cache_hits"
_COMPILE = "/jax/core/compile/backend_compile_duration"  # every backend compile, cache lookup included


def cache_dir() -> str:
    return os.environ.get("ACTFLEET_JAX_CACHE") or str(Path.home() / ".cache" / "actfleet" / "jax")


def enable() -> str:
    """Point JAX's persistent cache at cache_dir() (before the process compiles anything: JAX decides
    once, at its first compilation, whether the cache is in use) and start counting."""
    import jax

    path = cache_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _listen()
    return path


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    from jax import monitoring

    def on_event(event: str, **_) -> None:
        if event == _HIT:
            with _lock:
                _counts["cache_hits"] += 1

    def on_duration(event: str, seconds: float, **_) -> None:
        if event == _COMPILE:
            with _lock:
                _counts["compiles"] += 1
                _counts["compile_seconds"] += seconds

    monitoring.register_event_listener(on_event)
    monitoring.register_event_duration_secs_listener(on_duration)


def stats() -> dict:
    """{"compiled": programs compiled here, "cache_hits": programs loaded from the cache, "compile_seconds":
    time in both} since enable() was first called in this process."""
    with _lock:
        return {
            "compiled": _counts["compiles"] - _counts["cache_hits"],
            "cache_hits": _counts["cache_hits"],
            "compile_seconds": round(_counts["compile_seconds"], 3),
        }
