"""Tests only: a process started with this folder on PYTHONPATH runs with its wall clock off by
$ACTFLEET_TEST_CLOCK_OFFSET_S seconds (time.time, time.time_ns), as a VM whose NTP is broken would. The
kernel's clock (file timestamps), time.monotonic and every server's clock are left alone."""

import os
import time

_offset = float(os.environ.get("ACTFLEET_TEST_CLOCK_OFFSET_S", "0") or 0)
if _offset:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _offset
    time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
