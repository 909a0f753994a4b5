"""Reports shared by every study: environment record, terminal/Markdown tables, JSON and CSV files."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch


def significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny CPU bandwidths must not round to 0)."""
    return float(f"{x:.{digits}g}")


def _command(argv: list[str]) -> str:
    """The command line as a user types it: ``pagoda ...`` for the CLI, ``python -m module ...`` for a module run
    with ``-m`` (``__main__``'s spec names it), else the arguments as given."""
    if not argv:
        return ""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name in ("pagoda", "pagoda.__main__") or Path(argv[0]).name == "pagoda":
        return " ".join(["pagoda", *argv[1:]])
    if name:
        return " ".join([f"python -m {name.removesuffix('.__main__')}", *argv[1:]])
    return " ".join(argv)


def environment(device: torch.device) -> dict:
    """Device, versions, date and the exact command: recorded in every report."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "device_name": platform.processor() or platform.machine(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return env


def format_table(headers: list[str], rows: list[list], align_left: int = 1) -> str:
    """A plain fixed-width table; the first ``align_left`` columns are left-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i < align_left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def backend_notes(report: dict, markdown: bool = False) -> list[str]:
    """The paragraphs under a study's tables: the backends not available and why, the cases the budget left out."""
    out = []
    reasons = [f"{n}: {b['reason']}" for n, b in report["backends"].items() if not b["available"]]
    if reasons:
        out.append("Unavailable backends:\n" + ("\n" if markdown else "")
                   + "\n".join(("- " if markdown else "  ") + r for r in reasons))
    if report["meta"].get("skipped_cases"):
        out.append(f"Cases not run ({report['meta']['skipped_why']}): " + ", ".join(report["meta"]["skipped_cases"]))
    return out


def write_outputs(out_dir: str | Path, name: str, report: dict, markdown: str) -> list[Path]:
    """Write ``{name}.json``, ``{name}.csv`` (one row per result) and ``{name}.md`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.csv", out / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    rows = report["results"]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    env = report["meta"]
    head = (f"# pagoda bench: {name}\n\n{env.get('date')} · {env.get('device_name')} · torch {env.get('torch')}"
            f" · triton {env.get('triton')} · CUDA {env.get('cuda')} · cuDNN {env.get('cudnn')}\n\n"
            f"Command: `{env.get('command')}`\n\n")
    paths[2].write_text(head + markdown + "\n")
    return paths
