"""Results on disk (JSON per dsr1/data/bench-results.schema.json, CSV) and as tables.

Files are written atomically after every finished point, so Ctrl-C or a crash
leaves the points finished so far, never a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from dsr1.errors import ConfigError, NotFoundError
from dsr1.fsutil import atomic_write_bytes

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "bench-results.schema.json"
SCHEMA_VERSION = 1
STATS = ("mean", "p50", "p90", "p95", "p99")
LATENCIES = ("ttft_ms", "ttft_answer_ms", "tpot_ms", "itl_ms", "e2el_ms")


def point_label(p: dict[str, Any]) -> str:
    if p["mode"] == "concurrency":
        return f"c={p['concurrency']}"
    rate = p["rate"]
    return f"rate={'inf' if rate is None else f'{rate:g}'}"


def point_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per point: what the CSV holds and the tables show."""
    rows = []
    for p in doc["points"]:
        s = p["summary"]
        row: dict[str, Any] = {"point": point_label(p), "mode": p["mode"], "concurrency": p.get("concurrency"),
                               "rate": p.get("rate"), "arrival": p.get("arrival")}
        for k in ("requests", "completed", "failed", "duration_s", "request_throughput", "output_throughput",
                  "answer_throughput", "total_token_throughput", "goodput", "slo_attainment", "input_tokens",
                  "output_tokens", "reasoning_tokens", "answer_tokens", "token_source", "short_outputs",
                  "max_concurrency_observed"):
            row[k] = s.get(k)
        row["errors"] = ";".join(f"{k}={v}" for k, v in sorted(s["errors"].items()))
        for lat in LATENCIES + ("client_lag_ms",):
            for st in STATS:
                row[f"{lat[:-3]}_{st}_ms"] = (s.get(lat) or {}).get(st)
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def request_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in doc["points"]:
        for i, r in enumerate(p["requests"]):
            out.append({"point": point_label(p), "request": i,
                        **{k: v for k, v in r.items() if k not in ("itl", "detail")}})
    return out


def paths(out_dir: Path) -> dict[str, Path]:
    """Where `write` puts results.json, points.csv and requests.csv."""
    return {"json": out_dir / "results.json", "csv": out_dir / "points.csv", "requests_csv": out_dir / "requests.csv"}


def write(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json, points.csv and requests.csv under `out_dir`; returns `paths(out_dir)`."""
    files = paths(out_dir)
    atomic_write_bytes(files["json"], (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write_bytes(files["csv"], _csv(point_rows(doc)).encode())
    atomic_write_bytes(files["requests_csv"], _csv(request_rows(doc)).encode())
    return files


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist", hint="pass results.json files written by `dsr1 bench`") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}", hint="pass results.json files written by `dsr1 bench`") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION or "points" not in doc:
        raise ConfigError(f"{path} is not a dsr1 bench results file (schema_version {SCHEMA_VERSION})",
                          hint="pass results.json files written by `dsr1 bench`")
    return doc


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _pair(row: dict[str, Any], key: str) -> str:
    a, b = row[f"{key}_p50_ms"], row[f"{key}_p99_ms"]
    return "-" if a is None else f"{_ms(a)} / {_ms(b)}"


def sweep_tables(doc: dict[str, Any]) -> list[Table]:
    """Two narrow tables per sweep (fit an 80-column terminal): throughput, then latency p50 / p99."""
    s0 = doc["server"]
    rows = point_rows(doc)
    sources = ", ".join(sorted({str(r["token_source"]) for r in rows}))
    thr = Table(title=f"{s0.get('model')} @ {s0.get('base_url')}: throughput (tokens from {sources})")
    slo = bool(doc["config"].get("slo"))
    for c in ["point", "ok", "err", "req/s", "out tok/s", "total tok/s", "think%"] + (["goodput (met)"] if slo else []):
        thr.add_column(c, justify="left" if c == "point" else "right")
    for r in rows:
        share = f"{r['reasoning_tokens'] / r['output_tokens']:.0%}" if r["output_tokens"] else "-"
        cells = [r["point"], str(r["completed"]), str(r["failed"]), f"{r['request_throughput']:.2f}",
                 f"{r['output_throughput']:,.1f}", f"{r['total_token_throughput']:,.1f}", share]
        if slo:
            cells.append("-" if r["goodput"] is None else f"{r['goodput']:.2f} ({r['slo_attainment']:.0%})")
        thr.add_row(*cells)
    lat = Table(title="latency ms, p50 / p99 (definitions in results.json)")
    for c in ("point", "TTFT", "TTFT answer", "TPOT", "ITL", "E2E"):
        lat.add_column(c, justify="left" if c == "point" else "right")
    for r in rows:
        lat.add_row(r["point"], *(_pair(r, k) for k in ("ttft", "ttft_answer", "tpot", "itl", "e2el")))
    return [thr, lat]


COMPARE_METRICS = [("request_throughput", "req/s", True), ("output_throughput", "out tok/s", True),
                   ("ttft_p50_ms", "TTFT p50 ms", False), ("ttft_p99_ms", "TTFT p99 ms", False),
                   ("tpot_p50_ms", "TPOT p50 ms", False), ("tpot_p99_ms", "TPOT p99 ms", False),
                   ("e2el_p50_ms", "E2E p50 ms", False), ("goodput", "goodput req/s", True)]


def compare(docs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Points matched by label across files; each metric per file and its ratio to the first file."""
    tables = [{r["point"]: r for r in point_rows(d)} for d in docs]
    labels = list(dict.fromkeys(lbl for t in tables for lbl in t))
    rows = []
    for lbl in labels:
        for key, title, higher_better in COMPARE_METRICS:
            vals = [t.get(lbl, {}).get(key) for t in tables]
            if all(v is None for v in vals):
                continue
            base = vals[0]
            ratios = [None if (v is None or not base) else v / base for v in vals[1:]]
            rows.append({"point": lbl, "metric": key, "title": title, "higher_is_better": higher_better,
                         "values": vals, "ratios_to_first": ratios})
    return {"files": names, "rows": rows}


def compare_table(cmp: dict[str, Any]) -> Table:
    t = Table(title="dsr1 bench compare (ratio = file / first file)")
    t.add_column("point")
    t.add_column("metric")
    for i, name in enumerate(cmp["files"]):
        t.add_column(name, justify="right")
        if i:
            t.add_column("ratio", justify="right")
    last = None
    for r in cmp["rows"]:
        cells = [r["point"] if r["point"] != last else "", r["title"]]
        last = r["point"]
        for i, v in enumerate(r["values"]):
            cells.append("-" if v is None else f"{v:,.2f}")
            if i:
                ratio = r["ratios_to_first"][i - 1]
                if ratio is None:
                    cells.append("-")
                else:
                    better = (ratio > 1) == r["higher_is_better"] and abs(ratio - 1) > 0.02
                    worse = (ratio < 1) == r["higher_is_better"] and abs(ratio - 1) > 0.02
                    style = "green" if better else "red" if worse else ""
                    cells.append(f"[{style}]{ratio:.2f}x[/]" if style else f"{ratio:.2f}x")
        t.add_row(*cells)
    return t
