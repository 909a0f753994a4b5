"""Run the peers' own test suites against pagoda through the import shim, time-boxed, and tabulate.

    PYTHONPATH=$PWD python3 benchmarks/conformance/run.py --suites .conformance --out OUT/conformance

Steps: (1) collect each suite (``--collect-only``) with the plugin (``conformance_plugin``) sampling
the parametrizations as pytest generates them: per test function the full product is counted and
classified (``classify.exclusions``), and up to ``--per-function`` in-claim cases plus
``--excluded-per-reason`` excluded ones per reason are kept (``param_sampling``); (2) run the sample in
``--workers`` pytest processes (same sampling options, so the same cases), each test function whole in
one process, until the time budget; (3) write ``conformance.md`` / ``conformance.json`` (``report``)
and the raw files (collected cases, per-case records, junit XML, logs) under ``OUT/raw``.

pytest runs with the shim first on ``PYTHONPATH`` (``shim/``: ``flash_attn`` and ``flashinfer`` re-export
pagoda), then the suite's folder (the peer's ``tests`` package), then this folder (the plugin), then
the repository (pagoda). ``-p no:cacheprovider``; ``PAGODA_AUTOTUNE=0`` unless set (the fixed launch
configuration: hundreds of shapes would each autotune otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from select_cases import interleave, shard  # noqa: E402
from suites import DEPS_DIR  # noqa: E402


def _env(suite_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(HERE / "shim"), str(suite_root), str(HERE), str(REPO)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    path += [str(w) for w in sorted((suite_root.parent / DEPS_DIR).glob("*.whl"))]  # test-only deps, last
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["CONFORMANCE_PEER_PKG"] = str(suite_root / "peer_pkg")
    env.setdefault("PAGODA_AUTOTUNE", "0")
    return env


def _pytest_cmd(suite_root: Path, manifest: dict, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-c", str(suite_root / "pytest.ini"), "--rootdir", str(suite_root),
            f"--import-mode={manifest['import_mode']}", "-p", "conformance_plugin", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "-q", "-rN", *extra]


def _launch(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(procs: list[subprocess.Popen], until: float) -> None:
    for p in procs:
        try:
            p.wait(timeout=max(1.0, until - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # our own process group (start_new_session)
            p.wait()


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "CPU (dry run: no CUDA)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default=".conformance", help="folder written by fetch_suites.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma-separated suite names (default: all in MANIFEST.json)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall time for the whole run")
    ap.add_argument("--per-function", type=int, default=12, help="in-claim cases run per test function")
    ap.add_argument("--excluded-per-reason", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="pytest processes (default 4 on CUDA, 2 otherwise)")
    ap.add_argument("--case-timeout", type=float, default=40.0, help="seconds before one case is failed")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k filter applied at collection")
    ap.add_argument("--cpu-redirect", action="store_true",
                    help="no GPU: run the cases with every CUDA device read as the CPU (cpu_redirect.py), so that "
                         "pagoda's CPU path answers them: a check of semantics and signatures, not of the kernels")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of collection/classification: fakes the CUDA capability at collection")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from what --out/raw already holds (a run cut short before its report)")
    ap.add_argument("--device", default=None, help="with --report-only: the device the raw records came from")
    ap.add_argument("--resume", default=None,
                    help="an earlier run's --out folder (same sampling options): its collection is reused, its "
                         "recorded cases are not run again and count in this report")
    args = ap.parse_args(argv)

    t0 = time.time()
    suites_dir, out = Path(args.suites).resolve(), Path(args.out).resolve()
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((suites_dir / "MANIFEST.json").read_text())
    names = args.only.split(",") if args.only else [n for n in manifest if not n.startswith("_")]
    device = (args.device or "unknown device") if args.report_only else _device()
    workers = args.workers or (4 if "CPU" not in device else 2)
    common = ["--conformance-per-function", str(args.per_function),
              "--conformance-excluded-per-reason", str(args.excluded_per_reason), "--conformance-seed", str(args.seed)]
    if args.dry_run:
        common += ["--conformance-fake-capability", "9.0"]
    if args.cpu_redirect:
        common += ["-p", "cpu_redirect"]
        device = "CPU (CUDA devices read as the CPU: pagoda's CPU path)"
    if args.keyword:
        common += ["-k", args.keyword]

    # 1. collect (or take an earlier run's collection and records)
    done: dict[str, dict] = {}
    if args.resume:
        prev = Path(args.resume).resolve() / "raw"
        for name in names:
            src = prev / f"{name}-collect.json"
            if not src.exists():
                raise SystemExit(f"--resume: {src} is missing (the earlier run did not finish collecting {name})")
            (raw / src.name).write_text(src.read_text())
        done = report.load_records(sorted(p for name in names for p in prev.glob(f"{name}-*.jsonl")))
        (raw / "resumed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    procs = {}
    for name in ([] if args.report_only or args.resume else names):
        root = suites_dir / name
        cmd = _pytest_cmd(root, manifest[name], [*common, "--collect-only",
                                                 "--conformance-collect-out", str(raw / f"{name}-collect.json"),
                                                 *manifest[name]["tests"]])
        procs[name] = _launch(cmd, root, _env(root), raw / f"{name}-collect.log")
    _wait(list(procs.values()), t0 + args.budget_s / 3)
    suites = {}
    for name in names:
        path = raw / f"{name}-collect.json"
        data = json.loads(path.read_text()) if path.exists() else {"cases": [], "population": {}, "errors": [
            {"nodeid": name, "error": f"collection did not finish (see raw/{name}-collect.log)"}]}
        suites[name] = {"cases": data["cases"], "population": data["population"], "errors": data["errors"],
                        "manifest": manifest[name],
                        "selected": [c for c in interleave(data["cases"]) if c["nodeid"] not in done]}

    # 2. run: workers shared between suites in proportion to their selections
    total = sum(len(s["selected"]) for s in suites.values()) or 1
    deadline = t0 + args.budget_s - args.case_timeout - 15
    procs, records = [], ([raw / "resumed.jsonl"] if args.resume or (raw / "resumed.jsonl").exists() else [])
    if args.report_only:
        records += sorted(p for name in suites for p in raw.glob(f"{name}-*.jsonl"))
    for name, s in ({} if args.report_only else suites).items():
        root = suites_dir / name
        n = max(1, round(workers * len(s["selected"]) / total))
        for i, part in enumerate(shard(s["selected"], n)):
            if not part:
                continue
            select_file, rec = raw / f"{name}-{i}.select", raw / f"{name}-{i}.jsonl"
            select_file.write_text("\n".join(c["nodeid"] for c in part) + "\n")
            rec.unlink(missing_ok=True)
            records.append(rec)
            files = sorted({c["file"] for c in part})
            cmd = _pytest_cmd(root, manifest[name], [
                *common, "--conformance-select", str(select_file), "--conformance-record", str(rec),
                "--conformance-deadline", str(deadline), "--conformance-case-timeout", str(args.case_timeout),
                "--junitxml", str(raw / f"{name}-{i}.xml"), *files])
            procs.append(_launch(cmd, root, _env(root), raw / f"{name}-{i}.log"))
    _wait(procs, t0 + args.budget_s + 30)

    # 3. report
    recs = report.load_records(records)
    for s in suites.values():
        s["records"] = recs
    rep = report.aggregate(suites)
    meta = {"device": device, "wall_s": time.time() - t0, "per_function": args.per_function, "seed": args.seed,
            "workers": workers, "budget_s": args.budget_s, "case_timeout_s": args.case_timeout,
            "dry_run": args.dry_run, "cpu_redirect": args.cpu_redirect, "keyword": args.keyword,
            "report_only": args.report_only,
            "resumed_cases": len(done) if args.resume else None}
    report.write(rep, meta, out)
    t = rep["totals"]
    print(f"conformance: {t['passed'] + t['passed_fwd']} passed, {t['failed']} failed, {t['skipped']} skipped, "
          f"{t['not_run']} not run; in-claim pass rate {report._pct(t['pass_rate'])}; excluded {t['excluded']} "
          f"of {t['collected']} collected; {meta['wall_s']:.0f} s -> {out / 'conformance.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
