"""Extract the peers' chosen test files at their pinned commits into ``.conformance/`` (git-ignored).

    python3 benchmarks/conformance/fetch_suites.py [--mirrors /work/.mirror] [--out .conformance]

Each peer is read from a local bare git mirror ``<mirrors>/<owner>+<name>/repo`` (or a path given with
``--git-dir-<suite>``) with ``git archive <commit> <paths>``; nothing is downloaded. Files listed in the
suite's ``replace`` map are overwritten by the harness's minimal versions (``harness/``), each recorded
in ``MANIFEST.json`` with the reason. The peers' pure-Python test dependencies (``suites.TEST_DEPS``) are
downloaded as wheels with pip into ``_deps/``. The folder is about 1 MB and travels to a GPU machine as is.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from suites import DEPS_DIR, SUITES, TEST_DEPS, Suite, destination  # noqa: E402

HARNESS = HERE / "harness"


def _git_dir(mirrors: Path, suite: Suite, override: str | None) -> Path:
    if override:
        return Path(override)
    return mirrors / suite.repo.replace("/", "+") / "repo"


def _archive(git_dir: Path, commit: str, paths: tuple[str, ...]) -> tarfile.TarFile:
    """``git archive`` of ``paths`` at ``commit``; a missing path is an error naming it."""
    cmd = ["git", f"--git-dir={git_dir}", "archive", "--format=tar", commit, "--", *paths]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"git archive failed for {git_dir} @ {commit}: {proc.stderr.decode().strip()}")
    return tarfile.open(fileobj=io.BytesIO(proc.stdout))


def extract(suite: Suite, git_dir: Path, out: Path) -> dict:
    """Write ``suite`` under ``out/suite.name``; returns its manifest entry."""
    root = out / suite.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    resolved = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", f"{suite.commit}^{{commit}}"],
                              capture_output=True, text=True, check=False).stdout.strip()
    if resolved != suite.commit:
        raise SystemExit(f"{git_dir} lacks commit {suite.commit} ({suite.repo} {suite.tag})")
    files = []
    with _archive(git_dir, suite.commit, suite.extract) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            dest = root / destination(member.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
            files.append(destination(member.name))
    if not (root / "pytest.ini").exists():
        # The peer's tests have no pytest configuration of their own; an empty one keeps pytest from
        # taking the configuration of whatever project surrounds the folder.
        (root / "pytest.ini").write_text("[pytest]\n")
        files.append("pytest.ini (harness: empty)")
    replaced = {}
    for peer_path, harness_file in suite.replace.items():
        dest = root / destination(peer_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HARNESS / harness_file, dest)
        replaced[peer_path] = f"benchmarks/conformance/harness/{harness_file}"
    return {"repo": suite.repo, "tag": suite.tag, "commit": suite.commit, "tests": list(suite.tests),
            "import_mode": suite.import_mode, "files": sorted(files), "replaced": replaced}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirrors", default="/work/.mirror", help="folder holding <owner>+<name>/repo bare mirrors")
    ap.add_argument("--out", default=".conformance")
    for suite in SUITES:
        ap.add_argument(f"--git-dir-{suite.name}", default=None, help=f"git dir of {suite.repo}")
    ap.add_argument("--no-deps", action="store_true", help=f"skip downloading {', '.join(TEST_DEPS)}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for suite in SUITES:
        override = getattr(args, f"git_dir_{suite.name.replace('-', '_')}")
        manifest[suite.name] = extract(suite, _git_dir(Path(args.mirrors), suite, override), out)
        print(f"{suite.name}: {suite.repo} {suite.tag} {suite.commit[:12]}: "
              f"{len(manifest[suite.name]['files'])} files, {len(manifest[suite.name]['replaced'])} replaced")
    deps = out / DEPS_DIR
    if args.no_deps:
        print(f"test dependencies not downloaded ({', '.join(TEST_DEPS)}): they must be installed where tests run")
    else:
        deps.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "-d", str(deps), *TEST_DEPS], check=True)
        manifest["_deps"] = sorted(p.name for p in deps.glob("*.whl"))
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
