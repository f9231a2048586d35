"""bench.plot's series: what the charts show is what the JSON results say (no matplotlib)."""

from __future__ import annotations

import json

from bench import plot


def boot_result(date: str, memory: str, ready: float) -> dict:
    def s(median):
        return {"n": 3, "median": median, "min": median, "max": median}
    return {"date": date, "guest": {"memory": memory}, "host": {"kvm_flavour": "pvm"},
            "summaries": [{"setup": "pyvmm", "ready": s(ready), "first": s(ready + 1)},
                          {"setup": "qemu-tcg", "ready": s(0.8), "first": None}],
            "rss": {"pyvmm": {"VmRSS": 57000, "RssAnon": 16384, "RssFile": 11264, "RssShmem": 29000}}}


def test_boot_series_and_ram_series_take_the_newest_run_of_each_size(tmp_path):
    for name, result in (("boot-20261201-000000", boot_result("2026-12-01", "256M", 30.0)),
                         ("boot-20261202-000000", boot_result("2026-12-02", "256M", 25.0)),
                         ("boot-20261203-000000", boot_result("2026-12-03", "1G", 38.0))):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    results = plot.newest("boot", tmp_path)
    assert [r["date"] for r in results] == ["2026-12-03", "2026-12-02", "2026-12-01"]
    assert plot.boot_series(results[0]) == [("pyvmm", 38.0, 39.0), ("qemu-tcg", 0.8, None)]
    assert plot.boot_ram_series(results) == {"pyvmm": {"1G": 38.0, "256M": 25.0},
                                             "qemu-tcg": {"1G": 0.8, "256M": 0.8}}
    assert plot.rss_series(results[0]) == {"pyvmm": {"RssAnon": 16.0, "RssFile": 11.0,
                                                     "RssShmem": 29000 / 1024}}


def test_fs_series_puts_the_host_limit_first_and_drops_failed_phases():
    ok = {"check": "ok", "words": {"mbps": "100.0", "again_mbps": "300.0"}}
    result = {"host_reference": {"read": {"check": "ok", "words": {"mbps": "3000"}},
                                 "mmap_read": {"check": "ok", "words": {"mbps": "3200", "again_mbps": "3300"}}},
              "runs": [{"label": "pyvmm dax", "phases": {"mmap_read": ok,
                                                         "read": {"check": "hash", "words": {"mbps": "9"}}}}]}
    paths, series = plot.fs_series(result)
    assert paths == ["read()", "mmap read", "mmap again", "write()", "mmap write"]
    assert list(series) == ["host", "pyvmm dax"]
    assert series["host"] == [3000.0, 3200.0, 3300.0, None, None]
    assert series["pyvmm dax"] == [None, 100.0, 300.0, None, None]


def test_blk_series():
    s = {"median": 50.0}
    assert plot.blk_series({"summaries": [{"setup": "pyvmm", "seqwrite_mbps": s, "seqread_mbps": None}]}) == \
        {"pyvmm": (50.0, None)}


def test_exit_series_is_the_net_cpu_cost_per_side():
    def row(ns):
        return {"median": ns}
    result = {"ns_per_iteration": {
        "c": {"cpu_ns": {"pio_net": row(7000), "mmio_net": row(7100)}},
        "pyvmm": {"cpu_ns": {"pio_net": row(9500), "mmio_net": row(10200)}}}}
    assert plot.exit_series(result) == {"c": [7.0, 7.1], "pyvmm": [9.5, 10.2]}
