"""engine/crossover.py: the CPU class from /proc/cpuinfo flags and the crossover measured for it, and the
gauge both engines' servers export from it (the operator's gear advice reads it: tests/test_gear.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gearshift.engine import crossover
from gearshift.engine.outputs import EngineStats
from gearshift.engine.server.metrics import ServerMetrics
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
EPYC = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
        "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid extd_apicid pni pclmulqdq "
        "ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm avx2 "
        "avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni")


# flags -> class: native bf16 (the paged engine runs bf16 there) is what moves the crossover
@pytest.mark.parametrize(("flags", "cls", "x"), [
    (EPYC, "avx512_bf16", 2),
    (EPYC.replace(" avx512_bf16", ""), "avx2", 4),  # AVX-512 without bf16: bf16 emulated, paged runs fp32
    ("sse4_2 avx avx2 fma amx_bf16 amx_tile", "avx512_bf16", 2),  # AMX: native bf16 too
    ("sse sse2 avx fma f16c avx2 bmi2", "avx2", 4),
    ("sse sse2 sse4_2 avx", "other", 4),  # never measured: the conservative figure
    ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics", "other", 4),  # aarch64's Features line
    ("", "other", 4),
    ("avx2x avx512_bf16x", "other", 4),  # whole words only
])
def test_cpu_class_and_its_crossover(flags: str, cls: str, x: int) -> None:
    assert crossover.cpu_class(flags) == cls
    assert crossover.crossover(cls) == x


def test_node_cpu_class_reads_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {EPYC}\n\nprocessor\t: 1\n")
    assert crossover.node_cpu_class(str(info)) == "avx512_bf16"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert crossover.node_cpu_class(str(info)) == "other"
    assert crossover.node_cpu_class(str(tmp_path / "missing")) == "other"


@pytest.mark.parametrize(("cls", "path"), [("avx512_bf16", "docs/bench/serve.json"),
                                           ("avx2", "docs/bench/serve-2026-11-26.json")])
def test_the_table_is_the_runs_it_names(cls: str, path: str) -> None:
    """The figures are those of the bench/serve.py run each entry cites (gguf and paged, every concurrency)."""
    m = crossover.MEASURED[cls]
    assert path in m.run
    rows = json.loads((ROOT / path).read_text())["rows"]
    got = {(r["target"], r["concurrency"]): r["output_tok_s"] for r in rows if r["target"] in ("gguf", "paged")}
    want = {(e, c): v[i] for c, v in m.tokens_per_second.items() for i, e in enumerate(("gguf", "paged"))}
    assert want.keys() == got.keys()
    assert all(got[k] == pytest.approx(v, abs=0.05) for k, v in want.items()), (got, want)


def test_the_metrics_export_the_crossover_of_the_cpu_class() -> None:
    for cls, x in (("avx512_bf16", 2), ("avx2", 4), ("other", 4)):
        body = ServerMetrics("smol", EngineStats, cpu_class=cls).render().decode()
        fam = next(f for f in text_string_to_metric_families(body) if f.name == "gearshift:crossover_concurrency")
        assert [(s.labels, s.value) for s in fam.samples] == [({"model_name": "smol", "cpu_class": cls}, x)]
    # by default, this machine's
    assert ServerMetrics("smol", EngineStats).cpu_class == crossover.node_cpu_class()
