"""``bench.cpu_split``: perf's samples grouped by where the CPU went."""

from __future__ import annotations

import pytest

from bench.cpu_split import OTHER, split_from_reports

DSO = [
    "    60.00%           600  libpython3.11.so.1.0",
    "    20.00%           200  [kernel.kallsyms]",
    "     8.00%            80  libsqlite3.so.0.8.6",
    "     5.00%            50  libavcodec-5e6b81c2.so.62.28.102",
    "     2.00%            20  libcrypto.so.3",
    "     3.00%            30  libc.so.6",
    "     2.00%            20  _pydantic_core.cpython-311-x86_64-linux-gnu.so",
]
KERNEL = [
    "    18.00%     0.30%  [k] do_syscall_64",
    "     3.00%     0.01%  [k] __x64_sys_fdatasync",
    "     2.00%     0.00%  [k] __x64_sys_fsync",
    "     1.50%     0.02%  [k] __x64_sys_futex",
    "     0.50%     0.00%  [k] asm_exc_page_fault",
]


def test_samples_are_milliseconds_grouped_by_library() -> None:
    split = split_from_reports(DSO, KERNEL, jobs=100)
    assert split.total_ms == 1000
    assert split.per_job("Python interpreter") == pytest.approx(6.0)
    assert split.per_job("kernel") == pytest.approx(2.0)
    assert split.per_job("SQLite") == pytest.approx(0.8)
    assert split.per_job("FFmpeg (PyAV)") == pytest.approx(0.5)
    assert split.per_job("OpenSSL") == pytest.approx(0.2)
    assert split.per_job("libc") == pytest.approx(0.3)
    assert split.per_job(OTHER) == pytest.approx(0.2)


def test_the_kernel_part_is_split_by_system_call_from_inclusive_shares() -> None:
    split = split_from_reports(DSO, KERNEL, jobs=100)
    assert split.ms["kernel: fsync / fdatasync"] == 50  # (3 % + 2 %) of 1000 samples
    assert split.ms["kernel: futex (threads waiting, waking)"] == 15
    assert split.ms["kernel: page faults"] == 5


def test_lines_that_are_not_samples_are_ignored() -> None:
    split = split_from_reports(["", "# header", "  1.00%  abc  libc.so.6"], [], jobs=1)
    assert split.total_ms == 0
