"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, print the table, write results.json."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import Bench, Figure, not_measured, raise_nofile

# name -> module (each has ``run(bench) -> list[Figure]``), in the order they run.
BENCHMARKS = {
    "sg-throughput": "bench.sg_throughput",
    "sg-memory": "bench.sg_memory",
    "sg-udp": "bench.sg_udp",
    "cm-keepalive": "bench.cm_load:run_keepalive",
    "cm-establish": "bench.cm_load:run_establish",
    "cm-handshakes": "bench.cm_load:run_handshakes",
    "identity-login": "bench.identity_login",
    "halb-failover": "bench.halb_failover",
    "deploy": "bench.deploy",
}
RESULTS = Path(__file__).resolve().parent / "results.json"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "reference", "ratio", "goal", "")]
    for f in figures:
        verdict = {True: "met", False: "MISSED", None: ""}[f.met]
        value = f"{_fmt(f.value)} {f.unit}" if f.value is not None else f.note or "-"
        ref = f"{_fmt(f.reference)} {f.unit}" if f.reference is not None else "-"
        rows.append((f.name, value, ref, _fmt(f.ratio), f.goal or "-", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The figures of a results.json as a Markdown table (for docs/benchmarks.md)."""
    lines = [
        "| figure | value | reference | ratio | goal | |",
        "|---|---|---|---|---|---|",
    ]
    for f in results["figures"]:
        ratio = f["value"] / f["reference"] if f["value"] is not None and f["reference"] else None
        value = f"{_fmt(f['value'])} {f['unit']}" if f["value"] is not None else f["note"]
        ref = (
            f"{_fmt(f['reference'])} {f['unit']} ({f['reference_name']})"
            if f["reference"] is not None
            else "-"
        )
        verdict = {True: "met", False: "**missed**", None: ""}[f["met"]]
        lines.append(f"| {f['name']} | {value} | {ref} | {_fmt(ratio)} | {f['goal'] or '-'} | {verdict} |")
    return "\n".join(lines)


def run_one(name: str, target: str, quick: bool) -> list[Figure]:
    module, _, func = target.partition(":")
    runner = getattr(importlib.import_module(module), func or "run")
    with tempfile.TemporaryDirectory(prefix="gatehouse-bench-") as tmp:
        bench = Bench(Path(tmp), quick)
        try:
            return runner(bench)
        except Exception as exc:
            traceback.print_exc()
            return [not_measured(name, f"{type(exc).__name__}: {exc}"[:300])]
        finally:
            bench.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs and smaller counts")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="repeatable")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--markdown", action="store_true", help="print the figures of --output as Markdown and exit (no run)"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.output.read_text())))
        return 0
    raise_nofile()
    selected = args.only or list(BENCHMARKS)
    figures: list[Figure] = []
    timings = {}
    for name in selected:
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        got = run_one(name, BENCHMARKS[name], args.quick)
        timings[name] = round(time.monotonic() - started, 1)
        for figure in got:
            print(
                f"   {figure.name}: {_fmt(figure.value)} {figure.unit} "
                f"(reference {_fmt(figure.reference)}, ratio {_fmt(figure.ratio)}) {figure.note}",
                file=sys.stderr,
                flush=True,
            )
        figures += got
    print(table(figures))
    args.output.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "quick": args.quick,
                "machine": {
                    "cpus": __import__("os").cpu_count(),
                    "python": platform.python_version(),
                    "kernel": platform.release(),
                },
                "seconds": timings,
                "figures": [f.to_dict() for f in figures],
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
