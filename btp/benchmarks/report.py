"""Report writers: Markdown + JSON (+ PNG plot) under benchmarks/results/, named by machine and date,
and the README performance table generated from the committed JSON (`btp bench table`).

File names: ``<kind>-<machine slug>-<YYYY-MM-DD>.{md,json,png}`` with kind = latency | ops |
parity, e.g. ``latency-cpu-intel-xeon-2c-2026-11-25.md``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from btp.benchmarks.machine import date_tag, machine_line, machine_slug
from btp.export.compare import fmt
from btp.io.files import atomic_write_bytes

# relative to the current folder: the checkout's committed results when run from its root (--out elsewhere)
RESULTS_DIR = Path("benchmarks") / "results"
SHARED_BOX_NOTE = ("Measured on a shared machine (other processes may run at the same time): "
                   "load average {load} at the start; medians are robust to that, tails (p99) less so.")
STAGE_ORDER = ("load", "sanitize", "normalize", "downsample", "fps", "knn", "group", "engine", "propagate",
               "interpolate", "object_score")


def stem(kind: str, machine: dict) -> str:
    return f"{kind}-{machine_slug(machine)}-{date_tag(machine)}"


def report_base(out_dir: Path, kind: str, machine: dict) -> Path:
    """``out_dir / stem``, or ``stem-2``, ``stem-3``... when a report of that name is already
    there: a second run on the same machine and day never overwrites the first."""
    name = stem(kind, machine)
    base, n = Path(out_dir) / name, 2
    while any(base.with_suffix(ext).exists() for ext in (".json", ".md", ".png")):
        base, n = Path(out_dir) / f"{name}-{n}", n + 1
    return base


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _header(title: str, machine: dict) -> list[str]:
    return [f"# {title}", "", f"- Machine: {machine_line(machine)}", f"- Date (UTC): {machine.get('date_utc')}",
            f"- {SHARED_BOX_NOTE.format(load=machine.get('load_avg_1m'))}", ""]


def _ordered_stages(stages: Sequence[str]) -> list[str]:
    known = [s for s in STAGE_ORDER if s in stages]
    rest = sorted(s for s in stages if s not in STAGE_ORDER and s != "end_to_end")
    return known + rest


# ---- latency -------------------------------------------------------------------------------------

def goals_markdown(goals: Sequence[dict]) -> list[str]:
    lines = ["| goal | target | measured | verdict | note |", "|---|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['name']} | {g['target']} | {_cell(g['measured'])} | **{g['verdict']}** | "
                     f"{_cell(g['detail'])} |")
    return lines


def _model_line(data: dict) -> str:
    model = data.get("model", {})
    info = model.get("info", {}) or {}
    source = info.get("source", "")
    text = f"{model.get('name')} ({source})" if source else str(model.get("name"))
    if info.get("fresh_init"):
        text += " - NOT the trained default model: untrained weights, fine for latency (it does not depend on them)"
    return text


def latency_markdown(data: dict) -> str:
    """data = {"machine", "model", "settings", "results", "skipped", optional "goals", "flops",
    "matmul_peak", "ops_summary"}."""
    lines = _header("btp-bench latency", data["machine"])
    model, settings = data["model"], data["settings"]
    torch_rows = [r for r in data["results"] if r["backend"].startswith("torch")]
    lines += [f"- Model: `{model.get('path')}` ({model.get('size_mb')} MB): {_model_line(data)}"
              + (f"; torch row: {torch_rows[0]['weights']}" if torch_rows else ""),
              f"- Settings: warm-up {settings['warmup_s']} s (not recorded), then >= {settings['duration_s']} s and "
              f">= {settings['min_iters']} calls per row; threads {settings['threads'] or 'default (all cores)'}; "
              f"scans sampled from `{settings['mesh']}` (raw units); times in ms; end-to-end = wall clock of "
              "the pipeline call, stages = the pipeline's own timings.", ""]
    if data.get("goals"):
        lines += ["## Performance goals (this run)", ""] + goals_markdown(data["goals"]) + [""]
    lines += ["## End to end", "",
              "| backend | points | batch | p50 | p90 | p99 | mean | scans/s | peak RSS MB | device MB | iters |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        e = r["stages"]["end_to_end"]
        dev = "-" if r.get("device_memory_mb") is None else f"{r['device_memory_mb']:.0f}"
        lines.append(f"| {r['backend']} | {r['points']} | {r['batch']} | {e['p50']:.2f} | {e['p90']:.2f} | "
                     f"{e['p99']:.2f} | {e['mean']:.2f} | {r['throughput']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{dev} | {r['iterations']} |")
    for s in data.get("skipped", []):
        lines.append(f"| {s['backend']} | - | - | skipped: {s['reason']} | | | | | | | |")
    lines += ["", "## Where the time goes (p50 ms per stage; share of end-to-end p50)", ""]
    stages = _ordered_stages({k for r in data["results"] for k in r["stages"]})
    lines += ["| backend | points | batch | e2e | " + " | ".join(stages) + " |",
              "|---|---|---|---|" + "---|" * len(stages)]
    for r in data["results"]:
        e2e = r["stages"]["end_to_end"]["p50"]
        cells = []
        for s in stages:
            v = r["stages"].get(s)
            cells.append("-" if v is None else f"{v['p50']:.2f} ({v['p50'] / e2e:.0%})")
        lines.append(f"| {r['backend']} | {r['points']} | {r['batch']} | {e2e:.2f} | " + " | ".join(cells) + " |")
    if data.get("flops") or data.get("matmul_peak"):
        lines += ["", "## Encoder FLOPs and the machine's matmul peak", ""]
        if data.get("flops"):
            f = data["flops"]
            by_op = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in f["by_op"].items())
            lines.append(f"- Encoder (everything in model.onnx), batch 1: {f['gflop']:.2f} GFLOP "
                         f"(2 FLOPs per multiply-add; {by_op}); element-wise ops not counted.")
        if data.get("matmul_peak"):
            p = data["matmul_peak"]
            libs = ", ".join(f"{k} {v:.0f}" for k, v in p["by_library"].items())
            lines.append(f"- float32 GEMM {p['size']}x{p['size']}: {libs} GFLOP/s (best of repeated calls).")
        for r in data["results"]:
            if data.get("flops") and "engine" in r["stages"]:
                gfs = data["flops"]["total"] * r["batch"] / (r["stages"]["engine"]["p50"] / 1e3) / 1e9
                peak = data.get("matmul_peak", {}).get("gflops")
                share = f" ({gfs / peak:.0%} of peak)" if peak else ""
                lines.append(f"- {r['backend']}, {r['points']} pts, batch {r['batch']}: engine p50 "
                             f"{r['stages']['engine']['p50']:.2f} ms -> {gfs:.0f} GFLOP/s{share}")
    if data.get("thread_sweep"):
        lines += ["", "## Engine only: intra-op threads (same run, one preprocessed 2048-point scan, median ms)", "",
                  "| backend | threads | engine ms |", "|---|---|---|"]
        lines += [f"| {r['backend']} | {r['threads']} | {r['engine_ms']:.2f} |" for r in data["thread_sweep"]]
    if data.get("ops_summary"):
        lines += ["", "## FPS / kNN against the libraries (same run; details in the ops report)", ""]
        lines += ops_summary_markdown(data["ops_summary"])
    return "\n".join(lines) + "\n"


def _size_axis(ax, ylabel: str, title: str) -> None:
    """A panel over scan size: log x, labels, grid, legend."""
    ax.set_xscale("log")
    ax.set_xlabel("points in the raw scan")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def latency_plot(data: dict, path: Path) -> Path | None:
    """Latency vs points per backend (p50 with p10..p90-ish bars: p50 -> p90), log-log, batch 1 solid,
    larger batches dashed (per scan); right panel: stage shares of the ort-cpu rows."""
    if not data["results"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.5))
    backends = sorted({r["backend"] for r in data["results"]})
    for i, backend in enumerate(backends):
        for batch in sorted({r["batch"] for r in data["results"]}):
            rows = sorted((r for r in data["results"] if r["backend"] == backend and r["batch"] == batch),
                          key=lambda r: r["points"])
            if not rows:
                continue
            x = [r["points"] for r in rows]
            p50 = [r["stages"]["end_to_end"]["p50"] / batch for r in rows]
            p90 = [r["stages"]["end_to_end"]["p90"] / batch for r in rows]
            ax.errorbar(x, p50, yerr=[[0] * len(x), [b - a for a, b in zip(p50, p90)]], marker="o", capsize=3,
                        color=f"C{i}", linestyle="-" if batch == 1 else "--",
                        label=f"{backend} batch {batch}" + (" (per scan)" if batch > 1 else ""))
    ax.set_yscale("log")
    _size_axis(ax, "end-to-end ms (p50, bar to p90)", "latency vs scan size")
    for i, backend in enumerate(backends):  # the cost curve's memory side: peak RSS per scan size
        rows = sorted((r for r in data["results"] if r["backend"] == backend and r["batch"] == 1),
                      key=lambda r: r["points"])
        if rows and all(r.get("peak_rss_mb") is not None for r in rows):
            ax3.plot([r["points"] for r in rows], [r["peak_rss_mb"] for r in rows], marker="o", color=f"C{i}",
                     label=backend)
    ax3.axhline(1024.0, color="k", linestyle=":", linewidth=0.8, label="1 GB")
    _size_axis(ax3, "peak RSS of the process (MB), batch 1", "memory vs scan size")
    rows = [r for r in data["results"] if r["batch"] == 1]
    stages = _ordered_stages({k for r in rows for k in r["stages"] if not k.startswith("pipeline_")})
    labels = [f"{r['backend']}\n{r['points']}\n{r['stages']['end_to_end']['p50']:.0f} ms" for r in rows]
    bottom = [0.0] * len(rows)
    for j, s in enumerate(stages):
        shares = [100.0 * r["stages"].get(s, {}).get("p50", 0.0) / r["stages"]["end_to_end"]["p50"] for r in rows]
        ax2.bar(range(len(rows)), shares, bottom=bottom, label=s, color=f"C{j % 10}")
        bottom = [a + b for a, b in zip(bottom, shares)]
    ax2.axhline(100.0, color="k", linewidth=0.8)
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.set_ylabel("% of end-to-end p50 (stage p50s, stacked)")
    ax2.set_title("where the time goes, batch 1")
    ax2.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"btp-bench latency - {data['machine'].get('cpu_model')} - {date_tag(data['machine'])}", fontsize=9)
    return _save_figure(fig, path)


def write_latency(data: dict, out_dir: Path | None = None, json_path: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir or RESULTS_DIR)
    base = report_base(out_dir, "latency", data["machine"])
    paths = [write_json(Path(json_path) if json_path else base.with_suffix(".json"), data),
             write_text(base.with_suffix(".md"), latency_markdown(data))]
    png = latency_plot(data, base.with_suffix(".png"))
    return paths + ([png] if png else [])


# ---- ops ------------------------------------------------------------------------------------------

def ops_summary_markdown(summary: Sequence[dict]) -> list[str]:
    lines = ["| op | N | G | the product runs | ours ms | best library | best ms | ours / best | best same-output "
             "library | ours / it | goal <= 1.2x |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        be = s.get("best_exact_library") or "-"
        ratio_exact = "-" if s.get("ratio_vs_best_exact") is None else f"{s['ratio_vs_best_exact']:.2f}x"
        lines.append(f"| {s['op']} | {s['n_points']} | {s['n_groups']} | {s.get('product_runs', '-')} | "
                     f"{s['ours_ms']:.2f} | {s['best_library']} | "
                     f"{s['best_ms']:.2f} | {s['ratio_vs_best']:.2f}x | {be} | {ratio_exact} | "
                     f"{'MET' if s['meets_goal'] else 'MISSED'} |")
    return lines


def ops_markdown(data: dict) -> str:
    from btp.benchmarks.ops import __doc__ as ops_doc

    lines = _header("btp-bench ops: FPS, kNN and raw-scan downsampling", data["machine"])
    lines += [f"- Settings: {data['settings']}", "", "## How rows are checked", "", ops_doc.split("\n\n", 1)[1].strip(),
              "", "## Ours against the best library", ""]
    lines += ops_summary_markdown(data["summary"])
    lines += ["", "## All rows (median ms)", "",
              "| op | N | G | implementation | median ms | vs ours | same order | same set | quality | exact | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["op"], r["n_points"], r["n_groups"]): r["median_ms"] for r in data["rows"] if r["impl"] == "btp.geometry"}
    for r in data["rows"]:
        if r["median_ms"] is None:
            lines.append(f"| {r['op']} | {r['n_points']} | {r['n_groups']} | {r['impl']} | skipped: {r['skipped']} "
                         f"| | | | | | |")
            continue
        base = ours.get((r["op"], r["n_points"], r["n_groups"]))
        vs = f"{r['median_ms'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['op']} | {r['n_points']} | {r['n_groups']} | {r['impl']} | {r['median_ms']:.2f} | {vs} | "
                     f"{fmt(r['same_order'])} | {fmt(r['same_set'])} | {fmt(r['quality'])} | "
                     f"{'yes' if r['exact'] else 'no'} | {r['note']} |")
    return "\n".join(lines) + "\n"


def ops_plot(data: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, op in zip(axes, ("fps", "knn")):
        rows = [r for r in data["rows"] if r["op"] == op and r["median_ms"] is not None]
        groups = sorted({r["n_groups"] for r in rows})
        g = max(groups) if groups else None
        for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows)):
            pts = sorted((r for r in rows if r["impl"] == impl and r["n_groups"] == g), key=lambda r: r["n_points"])
            if pts:
                ax.plot([r["n_points"] for r in pts], [r["median_ms"] for r in pts], marker="o", color=f"C{i}",
                        linewidth=2.5 if impl == "btp.geometry" else 1.2, label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N points")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op.upper()} (G={g}{', K=32' if op == 'knn' else ''})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save_figure(fig, path)


def write_ops(data: dict, out_dir: Path | None = None, json_path: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir or RESULTS_DIR)
    base = report_base(out_dir, "ops", data["machine"])
    return [write_json(Path(json_path) if json_path else base.with_suffix(".json"), data),
            write_text(base.with_suffix(".md"), ops_markdown(data)), ops_plot(data, base.with_suffix(".png"))]


# ---- parity -----------------------------------------------------------------------------------------

def parity_markdown(data: dict) -> str:
    lines = _header("btp-bench parity", data["machine"])
    lines += [f"- Model: `{data['model']}`; reference: **{data['reference']}** ({data.get('reference_weights', '')})",
              f"- Data: `{data['data']}` ({data['n_samples']} test samples, layout {data.get('layout')})",
              "- Every backend gets the same samples; engine outputs are compared on identical inputs "
              "(neighborhood, center from the CPU preprocessing); point scores and metrics come from each "
              "backend's own full pipeline.", ""]
    for b in data["backends"]:
        if b.get("skipped"):
            lines += [f"## {b['backend']}: skipped: {b['skipped']}", ""]
            continue
        lines += [f"## {b['backend']} ({b['precision']}) vs {data['reference']}: **{b['verdict']}**", "",
                  "| check | kind | value | mean | tolerance | verdict | n | rule |", "|---|---|---|---|---|---|---|---|"]
        for c in b["checks"]:
            op = {"abs": "max abs diff <=", "metric": "abs delta <=", "cosine": "min cos >=",
                  "index": "agreement >="}[c["kind"]]
            show = _cos if c["kind"] == "cosine" else fmt
            note = f" ({c['note']})" if c.get("note") else ""
            lines.append(f"| {c['output']} | {c['kind']} | {show(c['value'])} | {show(c['mean'])} | {op} "
                         f"{show(c['limit'])} | {c['verdict']}{note} | {c['n']} | {_cell(c['why'])} |")
        if b.get("metrics"):
            m = b["metrics"]
            lines += ["", f"Metrics: {', '.join(f'{k} {fmt(v)}' for k, v in m.items())}"]
        lines.append("")
    return "\n".join(lines) + "\n"


def _cos(value: float | None) -> str:
    """Cosines near 1 as '1 - 3.2e-06' (a plain 4-digit print would hide the difference)."""
    if value is None:
        return "-"
    return "1" if value >= 1.0 else f"1 - {1.0 - value:.1e}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def write_parity(data: dict, out_dir: Path | None = None, json_path: Path | None = None) -> list[Path]:
    out_dir = Path(out_dir or RESULTS_DIR)
    base = report_base(out_dir, "parity", data["machine"])
    return [write_json(Path(json_path) if json_path else base.with_suffix(".json"), data),
            write_text(base.with_suffix(".md"), parity_markdown(data))]


# ---- README table ------------------------------------------------------------------------------------

def latest(kind: str, results_dir: Path | None = None, cpu_only: bool = True) -> Path | None:
    """The newest ``<kind>-*.json`` (by the date in its name and ``report_base``'s run number,
    then mtime) in results_dir."""
    import re

    results_dir = Path(results_dir or RESULTS_DIR)
    files = [p for p in results_dir.glob(f"{kind}-*.json") if not cpu_only or "-cpu-" in p.name]
    if not files:
        return None

    def order(path: Path):
        m = re.search(r"(\d{4}-\d{2}-\d{2})(?:-(\d+))?$", path.stem)
        return (m.group(1), int(m.group(2) or 1)) if m else ("", 0), path.stat().st_mtime

    return max(files, key=order)


def readme_table(results_dir: Path | None = None) -> str:
    """The README performance section, generated from the newest latency (and ops/parity) JSON."""
    results_dir = Path(results_dir or RESULTS_DIR)
    lat_path = latest("latency", results_dir)
    if lat_path is None:
        raise FileNotFoundError(f"no latency-*.json in {results_dir}: run `btp bench latency` first")
    data = json.loads(lat_path.read_text())
    m = data["machine"]
    lines = [f"<!-- generated by `btp bench table` from benchmarks/results/{lat_path.name}; do not edit by hand -->",
             f"Measured on {machine_line(m)} ({date_tag(m)}; a shared box, medians). Model: {_model_line(data)}.", "",
             "| backend | points | batch | e2e p50 ms | p90 | p99 | engine p50 ms | scans/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        e = r["stages"]["end_to_end"]
        eng = r["stages"].get("engine", {}).get("p50")
        lines.append(f"| {r['backend']} | {r['points']:,} | {r['batch']} | {e['p50']:.1f} | {e['p90']:.1f} | "
                     f"{e['p99']:.1f} | {'-' if eng is None else f'{eng:.1f}'} | {r['throughput']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    for s in data.get("skipped", []):
        lines.append(f"| {s['backend']} | | | skipped: {s['reason']} | | | | | |")
    if data.get("goals"):
        lines += ["", "Performance goals (same run):", ""] + goals_markdown(data["goals"])
    gpu = sorted(results_dir.glob("gpu-*.md"))
    if gpu:
        lines += ["", "GPU results: " + ", ".join(f"[{p.name}](benchmarks/results/{p.name})" for p in gpu)]
    par = latest("parity", results_dir)
    if par is not None:
        pdata = json.loads(par.read_text())
        verdicts = ", ".join(f"{b['backend']} {b.get('verdict') or 'skipped'}" for b in pdata["backends"])
        lines += ["", f"Parity vs {pdata['reference']} on {pdata['n_samples']} samples: {verdicts} "
                      f"([{par.stem}.md](benchmarks/results/{par.stem}.md))."]
    lines += ["", f"Full report: [{lat_path.stem}.md](benchmarks/results/{lat_path.stem}.md)"]
    return "\n".join(lines) + "\n"
