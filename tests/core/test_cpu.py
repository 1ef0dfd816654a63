"""The CPU's vector features, read from /proc/cpuinfo texts written by hand."""

from __future__ import annotations

from codebook_lens.core.cpu import cpu_info, describe_cpu, parse_cpuinfo

AVX512 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512dq avx512bw
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512dq avx512bw
"""

AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""

ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
"""


def test_avx512_machine():
    info = parse_cpuinfo(AVX512, cores=2)
    assert info.model == "AMD EPYC 9B14"
    assert info.features == ("avx512f", "avx2", "fma")
    assert info.kind == "AVX-512"
    assert describe_cpu(info) == "AMD EPYC 9B14, 2 cores, AVX-512 (avx512f avx2 fma)"


def test_avx2_only_machine():
    info = parse_cpuinfo(AVX2, cores=4)
    assert info.features == ("avx2", "fma") and info.kind == "AVX2"
    assert describe_cpu(info) == "AMD EPYC 7B12, 4 cores, AVX2 (avx2 fma)"


def test_no_x86_vector_flags_and_no_model_name():
    info = parse_cpuinfo(ARM, cores=8)
    assert info.known and info.features == () and info.model == "unknown"
    assert describe_cpu(info) == "unknown, 8 cores, no AVX2 (none of avx512f avx2 fma)"


def test_unreadable_cpuinfo(tmp_path):
    info = cpu_info(tmp_path / "missing")
    assert not info.known and info.kind == "unknown" and info.cores >= 1
    assert describe_cpu(info).endswith("unknown (flags not readable)")


def test_this_machine_is_described_from_its_flags():
    info = cpu_info()
    assert set(info.features) <= {"avx512f", "avx2", "fma"} and info.cores >= 1
    if "avx512f" in info.features:
        assert info.kind == "AVX-512"
