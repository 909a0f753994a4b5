"""PNG plots for the studies (matplotlib, optional: without it, plots are skipped with a message)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:
        return None


def _lines(ax, rows, x, y, series):
    for name in sorted({r[series] for r in rows}):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == name and r.get(y) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linewidth=2.5 if name.startswith("pagoda") else 1.2)


def plot(report: dict, out_dir: str | Path) -> list[Path]:
    """Write the study's plots under ``out_dir``; returns the files written ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        print("matplotlib not installed: no plots written (pip install 'pagoda-attn[bench]')")
        return []
    study = report["study"]
    rows = [r for r in report["results"] if r.get("status") == "ok"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "attention": (("head_dim", "causal"), "seqlen", "tflops", "backend", "sequence length", "TFLOP/s", True),
        "e2e": (("cache", "processor"), "batch", "tokens_per_s", "impl", "batch size", "tokens/s", True),
        "decode": (("batch",), "context", "tb_per_s", "backend", "context length", "KV read TB/s", True),
        "layers": (("op",), "tokens", "copy_frac", "series", "tokens", "fraction of copy bandwidth", True),
    }.get(study)
    if spec is None or not rows or not all(k in rows[0] for k in spec[0] + (spec[1], spec[2], spec[3])):
        return []
    panels_by, x, y, series, xlabel, ylabel, logx = spec
    panels = sorted({tuple(r[k] for k in panels_by) for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        sub = [r for r in rows if tuple(r[k] for k in panels_by) == panel]
        _lines(ax, sub, x, y, series)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panels_by, panel, strict=False)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    meta = report["meta"]
    fig.suptitle(f"pagoda bench {study} · {meta.get('device_name')} · {meta.get('date', '')[:10]}")
    fig.tight_layout()
    path = out / f"{study}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
