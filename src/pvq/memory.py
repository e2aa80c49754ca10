"""Process memory: give freed heap back to the OS, and the peak resident set size (RSS).

Peak RSS is the kernel's high-water mark, VmHWM of /proc/self/status (Linux), which `reset_peak_rss`
sets back to the current RSS (writing 5 to /proc/self/clear_refs): a measurement can then leave out
what came before it (loading, say). Elsewhere getrusage's ru_maxrss, which cannot be reset.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import sys
from contextlib import contextmanager
from pathlib import Path


def release_memory() -> None:
    """Give freed heap memory back to the OS between blocks.

    Each block allocates and frees hundreds of MB of activations; glibc keeps such freed chunks in
    its arenas, and RSS would climb block after block. malloc_trim returns them (Linux/glibc only).
    """
    gc.collect()
    trim_heap()


@contextmanager
def settled_heap():
    """Leave the objects alive on entry (imported modules: some 400,000 with transformers, the model's
    modules) out of the garbage collections inside, which then walk only what was made since: each
    release_memory between blocks costs milliseconds instead of a quarter of a second. They are handed
    back to the collector on exit, so one that dies meanwhile inside a reference cycle waits until then.
    Nothing changes where the caller has frozen objects of its own (gc.freeze)."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim; nothing elsewhere). Cheap: called after
    each large linear, whose float64 temporaries would otherwise stay resident until the block ends."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_mib(key: str) -> float | None:
    """A memory line of /proc/self/status in MiB (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Resident set size now, in MiB (None where /proc is unavailable)."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak RSS of this process in MiB since it started or since the last reset_peak_rss()."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Set the high-water mark back to the current RSS; False where the OS cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
