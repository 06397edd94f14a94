"""What the benchmarks and examples read about their own process and machine (Linux first).

Peak CPU memory is the resident-set high-water mark ``VmHWM`` of ``/proc/self/status``, reset to
the current resident set by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0; refused in some
sandboxes, then the helpers say so with ``None`` / ``False`` instead of guessing). ``malloc_trim``
first gives freed heap pages back, so that memory freed before a measured block and reused inside
it is counted as the block's.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource


def status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, VmSize, ...), or None."""
    return _kib_field("/proc/self/status", field)


def meminfo_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/meminfo (MemAvailable, ...), or None."""
    return _kib_field("/proc/meminfo", field)


def _kib_field(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current resident set; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _empty_kdfused_cache() -> None:
    # kdfused keeps freed CPU gradient buffers for reuse (like torch.cuda's caching allocator):
    # give them back, so that a measured call counts its gradient.
    try:
        import kdfused

        kdfused.empty_cache()
    except ImportError:  # the extension is not built: it holds no buffers
        pass


class PeakRSS:
    """Peak resident memory of a block above the resident set just before it, in MiB (``.mib``;
    None where the high-water mark cannot be reset).

    Before the block: garbage collection, ``malloc_trim`` and ``kdfused.empty_cache()``, then
    the high-water mark is reset. ``.mib`` is VmHWM after the block minus VmRSS before it:
    everything the block touched that was not resident before.
    """

    def __enter__(self):
        gc.collect()
        malloc_trim()
        _empty_kdfused_cache()
        self.base = status_kib("VmRSS")
        self.ok = self.base is not None and reset_hwm()
        self.mib = None
        return self

    def __exit__(self, *exc):
        hwm = status_kib("VmHWM") if self.ok else None
        if hwm is not None:
            self.mib = (hwm - self.base) / 1024.0


def peak_rss_mib(call) -> float | None:
    """``PeakRSS`` of one ``call()``."""
    with PeakRSS() as peak:
        call()
    return peak.mib


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system, all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
