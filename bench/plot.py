"""Charts of the last benchmark runs: ``python -m bench.plot`` (``make bench`` runs it last).

Reads the newest ``boot-*.json``, ``fs-*.json`` and ``blk-*.json`` in bench/results/
(what ``make bench-boot``, ``bench-fs`` and ``bench-blk`` write) and draws PNGs into
bench/figures/, which README.md and bench/README.md show:

* ``boot.png``: time to ``pyvmm-guest: ready`` and to the first output, per setup;
* ``boot-ram.png``: time to ready per RAM size (the newest boot run of each size);
* ``fs.png``: virtio-fs throughput per path and setup, with the host's page cache
  (the limit) drawn over each group;
* ``blk.png``: virtio-blk sequential throughput per setup;
* ``rss.png``: memory of a running VMM and its back-end (``make bench-boot``'s RSS row);
* ``exit.png``: CPU time of one port-I/O and one MMIO exit, pyvmm against C (``make bench-exit``).

matplotlib is a bench extra (``pip install -e '.[bench]'``), never a VMM dependency.
The ``*_series`` functions turn a JSON result into plain numbers; the tests check them
without matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIGURES_DIR = Path(__file__).resolve().parent / "figures"

# (heading, phase, key) as bench/fs.py's COLUMNS name them.
FS_PATHS = (("read()", "read", "mbps"), ("mmap read", "mmap_read", "mbps"),
            ("mmap again", "mmap_read", "again_mbps"), ("write()", "write", "mbps"),
            ("mmap write", "mmap_write", "mbps"))
RSS_FIELDS = ("RssAnon", "RssFile", "RssShmem")


def newest(kind: str, results: Path = RESULTS_DIR) -> list[dict]:
    """Every ``KIND-*.json`` result, newest first (file names carry the date)."""
    return [json.loads(p.read_text()) for p in sorted(results.glob(f"{kind}-*.json"), reverse=True)]


def median(summary: dict, key: str) -> float | None:
    s = summary.get(key)
    return s["median"] if s else None


def boot_series(result: dict) -> list[tuple[str, float | None, float | None]]:
    """(setup, seconds to ready, seconds to first output) of one bench-boot run."""
    return [(s["setup"], median(s, "ready"), median(s, "first")) for s in result["summaries"]]


def boot_ram_series(results: list[dict]) -> dict[str, dict[str, float]]:
    """setup -> {memory size: seconds to ready}, from the newest run of each size."""
    series: dict[str, dict[str, float]] = {}
    for result in results:                      # newest first: the first one seen wins
        memory = result["guest"]["memory"]
        for setup, ready, _ in boot_series(result):
            if ready is not None:
                series.setdefault(setup, {}).setdefault(memory, ready)
    return series


def fs_series(result: dict) -> tuple[list[str], dict[str, list[float | None]]]:
    """Path headings, and MB/s per setup label ("host" first) for each path."""
    def value(phase: dict | None, key: str) -> float | None:
        if not phase or phase.get("check") != "ok" or key not in phase["words"]:
            return None
        return float(phase["words"][key])

    series = {"host": [value(result["host_reference"].get(p), k) for _, p, k in FS_PATHS]}
    for run in result["runs"]:
        series[run["label"]] = [value(run["phases"].get(p), k) for _, p, k in FS_PATHS]
    return [h for h, _, _ in FS_PATHS], series


def blk_series(result: dict) -> dict[str, tuple[float | None, float | None]]:
    """setup -> (sequential write, sequential read) MB/s medians."""
    return {s["setup"]: (median(s, "seqwrite_mbps"), median(s, "seqread_mbps"))
            for s in result["summaries"]}


def exit_series(result: dict) -> dict[str, list[float]]:
    """side -> [port-I/O exit, MMIO exit] in CPU microseconds (the exit alone: *_net medians)."""
    return {side: [clocks["cpu_ns"][row]["median"] / 1000 for row in ("pio_net", "mmio_net")]
            for side, clocks in result["ns_per_iteration"].items()}


def rss_series(result: dict) -> dict[str, dict[str, float]]:
    """process -> {RssAnon/RssFile/RssShmem: MiB} from bench-boot's "rss" record."""
    return {proc: {f: fields[f] / 1024 for f in RSS_FIELDS if f in fields}
            for proc, fields in (result.get("rss") or {}).items()}


# --- drawing --------------------------------------------------------------------------
def _label(value: float | None) -> str:
    return "" if not value else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Grouped bars, each labelled with its value; a setup with no value at all (it
    failed) is left out rather than drawn as empty bars."""
    series = {label: values for label, values in series.items() if any(v for v in values)}
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=label)
        ax.bar_label(bars, labels=[_label(v) for v in values], fontsize="x-small")
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.legend(fontsize="small")


def plain_log_ticks(axis) -> None:
    """Ticks at 1, 2 and 5 times each power of ten, labelled as plain numbers: a log axis
    that spans about one decade otherwise labels its minor ticks, which overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def draw_all(results: Path, figures: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(figures / name, dpi=110)
        plt.close(fig)
        written.append(figures / name)

    boots = newest("boot", results)
    if boots:
        # boot.png and rss.png: the newest run at the default RAM size (make bench-boot);
        # make bench-boot-ram adds runs of other sizes for boot-ram.png
        from pyvmm.cli import DEFAULT_MEMORY
        full = next((b for b in boots if _bytes(b["guest"]["memory"]) == _bytes(DEFAULT_MEMORY)),
                    boots[0])
        rows = boot_series(full)
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
        names = [r[0] for r in rows]
        ax.barh(names, [r[1] or 0 for r in rows], label="ready")
        ax.barh(names, [r[2] or 0 for r in rows], height=0.3, label="first output")
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        for name, ready, _ in rows:
            if ready is None:
                ax.annotate(" did not boot (see the JSON)", (ax.get_xlim()[0], name), va="center")
        ax.set_xlabel("seconds (log scale), median")
        ax.set_title(f"boot, {full['guest']['memory']} guest, {full['host']['kvm_flavour']} "
                     f"({full['date'][:10]})")
        ax.legend(fontsize="small")
        save(fig, "boot.png")

        ram = boot_ram_series(boots)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for setup, points in ram.items():
            sizes = sorted(points, key=lambda m: _bytes(m))
            ax.plot(sizes, [points[m] for m in sizes], marker="o", label=setup)
        ax.set_yscale("log")
        ax.set_ylabel("seconds to ready (log), median")
        ax.set_xlabel("guest RAM")
        ax.legend(fontsize="small")
        save(fig, "boot-ram.png")

        rss = rss_series(full)
        if rss:
            fig, ax = plt.subplots(figsize=(6, 3))
            left = [0.0] * len(rss)
            for field in RSS_FIELDS:
                values = [rss[p].get(field, 0) for p in rss]
                ax.barh(list(rss), values, left=left, label=field)
                left = [a + b for a, b in zip(left, values)]
            ax.set_xlabel("MiB (RssShmem: mapped guest-RAM pages)")
            ax.legend(fontsize="small")
            save(fig, "rss.png")

    fs = newest("fs", results)
    if fs:
        paths, series = fs_series(fs[0])
        fig, ax = plt.subplots(figsize=(11, 4))
        _bars(ax, paths, series)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))   # clear of the bars
        ax.set_yscale("log")
        ax.set_ylabel("MB/s (log); 'host' = the host's page cache, the limit")
        ax.set_title(f"virtio-fs, {fs[0]['file_bytes'] >> 20} MiB file ({fs[0]['date'][:10]})")
        save(fig, "fs.png")

    exits = newest("exit", results)
    if exits:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _bars(ax, ["port I/O exit", "MMIO exit"], exit_series(exits[0]))
        ax.set_ylabel("µs of vCPU-thread CPU time, median")
        ax.set_title(f"one exit, pyvmm against a C KVM_RUN loop ({exits[0]['host']['kvm_flavour']})")
        save(fig, "exit.png")

    blk = newest("blk", results)
    if blk:
        series = blk_series(blk[0])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _bars(ax, ["seq write", "seq read"], {k: list(v) for k, v in series.items()})
        ax.set_yscale("log")
        ax.set_ylabel("MB/s (log), median")
        ax.set_title(f"virtio-blk ({blk[0]['date'][:10]})")
        save(fig, "blk.png")
    return written


def _bytes(size: str) -> int:
    from pyvmm.cli import parse_size
    return parse_size(size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=FIGURES_DIR)
    args = p.parse_args(argv)
    try:
        written = draw_all(args.results, args.out)
    except ImportError:
        sys.stderr.write("bench.plot: matplotlib is missing: pip install -e '.[bench]'\n")
        return 2
    if not written:
        sys.stderr.write(f"bench.plot: no results in {args.results}: run make bench-boot first\n")
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
