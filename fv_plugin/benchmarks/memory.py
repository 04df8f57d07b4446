"""Process memory, for the benchmarks: resident set now and at its peak, in MiB."""

from __future__ import annotations

import resource

__all__ = ["peak_rss_mib", "rss_mib"]


def rss_mib() -> float:
    """This process's resident set size now (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """The largest resident set this process has had (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
