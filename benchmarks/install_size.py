"""Install size and time: a fresh virtual environment per variant (the base install, and with the
``train`` extra), what ``pip install`` took, the venv's size on disk, whether torch is in it, and the time
from a fresh venv to the demo's answer (the README's first command) for the base install.

    python benchmarks/install_size.py                 # base and train
    python benchmarks/install_size.py --variants base # base only

Package downloads come from pip's cache: run twice and read the second (warm) table for the README's
"with a warm package cache" figure. Wall times depend on what else the machine runs (the load average is
printed); the CPU seconds of the whole first command (user + system, all its processes) do much less.
Prints a Markdown table."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS = {"base": "", "train": "[train]"}


def folder_mb(path: Path) -> float:
    total = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total / 2**20


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def measure(variant: str, workdir: Path, editable: bool) -> dict:
    venv = workdir / f"venv-{variant}"
    start, cpu = time.perf_counter(), children_cpu_s()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    target = f"{REPO}{EXTRAS[variant]}"
    install = [str(venv / "bin" / "pip"), "install", "-q", *(["-e"] if editable else []), target]
    pip_s = timed(install, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    row = {"variant": variant, "pip_s": pip_s, "size_mb": folder_mb(venv)}
    listed = subprocess.run([str(venv / "bin" / "pip"), "list"], capture_output=True, text=True, check=True).stdout
    row["torch"] = next((line.split()[1] for line in listed.splitlines() if line.split()[:1] == ["torch"]), "no")
    demo_s = timed([str(venv / "bin" / "pneumoscan"), "demo", "--out", str(workdir / f"demo-{variant}")])
    row.update(demo_s=demo_s, first_command_s=time.perf_counter() - start, cpu_s=children_cpu_s() - cpu)
    shutil.rmtree(venv)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(EXTRAS), default=list(EXTRAS))
    parser.add_argument("--no-editable", action="store_true", help="pip install REPO (default: pip install -e REPO)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pneumoscan-install-") as tmp:
        rows = [measure(v, Path(tmp), not args.no_editable) for v in args.variants]
    how = "pip install" if args.no_editable else "pip install -e"
    load = os.getloadavg()[0]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores (load average {load:.1f} at the end), {how}")
    print("| install | pip install (s) | venv size (MB) | torch | demo (s) | venv+install+demo (s) | its CPU (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "base (`pip install -e .`)" if r["variant"] == "base" else "`.[train]`"
        print(
            f"| {name} | {r['pip_s']:.1f} | {r['size_mb']:.0f} | {r['torch']} | {r['demo_s']:.1f} "
            f"| {r['first_command_s']:.1f} | {r['cpu_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
