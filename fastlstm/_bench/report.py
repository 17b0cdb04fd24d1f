"""Turn timed entries into the report: a table, JSON with machine info, Markdown and a PNG."""

import importlib.metadata
import json
import os
import platform

from .. import __version__, _threads
from .implementations import BASELINE, IMPLEMENTATIONS
from .problems import SHAPES

OP_TITLES = {"fwd": "forward", "layer": "forward through a layer object",
             "fwdbwd": "forward + backward", "step": "one streaming step",
             "train": "training step (2 layers + Adam)"}
PACKAGES = ("numpy", "scipy", "numba", "threadpoolctl", "torch", "onnxruntime", "onnx")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: 1-minute load average per core before a run from which the report warns that other work was
#: running: on 2 cores at a load of ~3.4, a 2-thread S1 forward took 36 ms instead of 0.3 ms.
BUSY_LOAD_PER_CORE = 0.25


def load_average():
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_warning(machine):
    """A warning line when the machine was busy before the run, else None."""
    load, cores = machine.get("load_before"), machine.get("cores_available") or machine["cores"]
    if load is None or load < BUSY_LOAD_PER_CORE * cores:
        return None
    return (f"warning: the load average was {load:.2f} on {cores} cores before this run: other "
            "work was running, and multi-threaded timings can be many times too slow")


def machine_info(n_threads):
    """What the numbers depend on: CPU, cores, package and BLAS versions, thread settings."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    blas = [
        {"library": lib.internal_api, "version": lib.version, "threading": lib.threading_layer,
         "architecture": getattr(lib, "architecture", None),
         "path": os.path.basename(lib.filepath)}
        for lib in _threads._blas_controllers()
    ]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastlstm": __version__,
        "versions": versions,
        "blas": blas,
        "threads": n_threads,
    }


def summarize(entries, peak_gflops, dtype):
    """One row per entry with median/min/max ms, GFLOP/s, % of peak and speed-ups."""
    medians = {(e.op, e.shape, e.impl): e.median_ms for e in entries}
    peers = [name for name, impl in IMPLEMENTATIONS.items() if impl.is_peer]
    rows = []
    for e in entries:
        shape = SHAPES[e.shape]
        gflops = shape.flops(e.op) / (e.median_ms * 1e-3) / 1e9
        row = {
            "op": e.op, "shape": e.shape, "T": shape.T, "B": shape.B, "D": shape.D, "H": shape.H,
            "impl": e.impl, "dtype": dtype, "reps": len(e.times),
            "median_ms": e.median_ms, "min_ms": 1e3 * min(e.times), "max_ms": 1e3 * max(e.times),
            "gflops": gflops, "percent_of_peak": 100 * gflops / peak_gflops,
        }
        for other in [BASELINE] + peers:
            reference = medians.get((e.op, e.shape, other))
            row[f"speedup_vs_{other}"] = reference / e.median_ms if reference else None
        rows.append(row)
    return rows


def _speedup_columns(rows):
    names = [key for key in rows[0] if key.startswith("speedup_vs_")] if rows else []
    return [n for n in names if any(r[n] is not None for r in rows)]


def format_table(rows, markdown=False):
    """The report table as text (aligned columns) or Markdown."""
    speedups = _speedup_columns(rows)
    header = ["op", "shape", "impl", "median ms", "min–max ms", "GFLOP/s", "% peak"] + [
        "× " + name[len("speedup_vs_"):] for name in speedups
    ]
    lines = []
    for r in rows:
        cells = [r["op"], r["shape"], r["impl"], f"{r['median_ms']:.3f}",
                 f"{r['min_ms']:.3f}–{r['max_ms']:.3f}", f"{r['gflops']:.1f}",
                 f"{r['percent_of_peak']:.0f}%"]
        cells += ["—" if r[n] is None else f"{r[n]:.2f}" for n in speedups]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i > 2 else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def _describe_blas(library):
    kernels = library.get("architecture")
    where = library["path"] if kernels is None else f"{kernels} kernels, {library['path']}"
    return f"{library['library']} {library['version']} ({where})"


def describe_setup(report):
    m = report["machine"]
    blas = ", ".join(_describe_blas(b) for b in m["blas"])
    setup = (f"{m['cpu']}, {m['cores']} cores; {report['dtype']}, {m['threads']} threads; "
             f"GEMM peak of NumPy's BLAS measured in this run: {report['peak_gflops']:.1f} "
             f"GFLOP/s; BLAS: {blas}")
    lines = [setup]
    fastest = max((r["percent_of_peak"] for r in report.get("rows", [])), default=0)
    if fastest > 100:
        lines.append(f"note: some entries run at up to {fastest:.0f}% of that GEMM peak: on this "
                     "CPU NumPy's BLAS is not the fastest matrix product, so % peak compares "
                     "with it, not with the hardware's limit")
    warning = busy_warning(m)
    if warning is not None:
        lines.append(warning)
    return "\n".join(lines)


def write_markdown(report, path):
    lines = ["# fastlstm benchmark", "", describe_setup(report), "",
             f"Command: `{report['command']}`", ""]
    if report["skipped"]:
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()] + [""]
    lines += [format_table(report["rows"], markdown=True), "",
              "Medians of repeated calls; × columns are speed-ups measured in this run "
              "(> 1 means faster than that implementation)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(report, path):
    """Bar chart of speed-up over the naive NumPy baseline, one panel per operation.

    Returns False when matplotlib is not installed (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    ops = [op for op in OP_TITLES if any(r["op"] == op for r in rows)]
    n_rows = 1 if len(ops) <= 2 else 2
    n_cols = -(-len(ops) // n_rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.5 * n_cols, 4.8 * n_rows), squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes.flat, ops):
        impls = [n for n in IMPLEMENTATIONS if any((r["op"], r["impl"]) == (op, n) for r in rows)]
        width = 0.8 / len(impls)
        shapes = [s for s in SHAPES if any(r["op"] == op and r["shape"] == s for r in rows)]
        for k, impl in enumerate(impls):
            values = []
            for s in shapes:
                match = [r for r in rows if (r["op"], r["shape"], r["impl"]) == (op, s, impl)]
                values.append(match[0][f"speedup_vs_{BASELINE}"] or 0 if match else 0)
            positions = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            bars = ax.bar(positions, values, width, label=impl)
            ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{s}\nT{SHAPES[s].T} B{SHAPES[s].B}\nD{SHAPES[s].D} H{SHAPES[s].H}"
                            for s in shapes], fontsize=8)
        ax.set_ylabel("speed-up over naive NumPy (×, higher is faster)")
        ax.set_title(f"{OP_TITLES[op]}, {report['dtype']}, {report['machine']['threads']} threads")
        ax.legend(fontsize=8)
    fig.suptitle(f"fastlstm {report['machine']['fastlstm']} on {report['machine']['cpu']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(report, old):
    """Lines showing how each median changed against an earlier report."""
    before = {(r["op"], r["shape"], r["impl"], r["dtype"]): r["median_ms"] for r in old["rows"]}
    lines = [f"{'op':7} {'shape':5} {'impl':12} {'old ms':>10} {'new ms':>10} {'change':>8}"]
    for r in report["rows"]:
        key = (r["op"], r["shape"], r["impl"], r["dtype"])
        if key in before:
            ratio = before[key] / r["median_ms"]
            lines.append(f"{r['op']:7} {r['shape']:5} {r['impl']:12} {before[key]:10.3f} "
                         f"{r['median_ms']:10.3f} {ratio:7.2f}×")
    if len(lines) == 1:
        lines.append("(no entries in common)")
    return lines + ["change = old median / new median (> 1: faster now)"]


def save(report, out_dir):
    """Write report.json, report.md and speedup.png into ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "markdown": os.path.join(out_dir, "report.md"),
             "plot": os.path.join(out_dir, "speedup.png")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, paths["markdown"])
    if not write_plot(report, paths["plot"]):
        paths["plot"] = None
    return paths
