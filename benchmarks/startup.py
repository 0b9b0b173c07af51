"""Start-up: what one image costs end to end, and where a process spends the time before its first answer.

    python benchmarks/startup.py [--rounds 5] [--model default]

Each case is a fresh process, interleaved round after round; medians. Cases: ``pneumoscan --help``;
``pneumoscan predict ONE`` (one official val JPEG) on ONNX fp32 and int8; the service from its start to
its first ``POST /v1/predict`` answer, and the next answer. Then the phases of one image in a fresh process
(``--phases``): importing the package, loading the bundle (config, digests, gate and heads), creating the
ONNX Runtime session with the first image's answer, and a second image's answer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import interleaved, medians, run_child, table

DATA = Path(os.environ.get("PNEUMOSCAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FILM = DATA / "chest_xray_224" / "val" / "PNEUMONIA" / "person1946_bacteria_4875.jpeg"
SECOND = DATA / "chest_xray_224" / "val" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg"


def phases(model: str) -> None:
    """Run in a fresh process: seconds of each phase before and after the first answer, as JSON."""
    start = time.perf_counter()
    from pneumoscan.inference.classifier import Classifier

    imported = time.perf_counter()
    clf = Classifier.load(model)
    loaded = time.perf_counter()
    clf.predict([FILM])
    first = time.perf_counter()
    clf.predict([SECOND])
    second = time.perf_counter()
    steps = {"import": imported - start, "load bundle": loaded - imported, "first image": first - loaded}
    print(json.dumps({**steps, "second image": second - first}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_first_answers(model: str) -> tuple[float, float]:
    """Seconds from starting ``pneumoscan serve`` to its first prediction's answer, and the next answer's."""
    import httpx

    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan.cli", "serve", "--port", str(port), "--model", model],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/predict"
    try:
        while True:
            try:
                with FILM.open("rb") as f:
                    answer = httpx.post(url, files={"file": (FILM.name, f, "image/jpeg")}, timeout=30)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.perf_counter() - start > 120:
                    raise SystemExit("pneumoscan serve did not answer") from None
                time.sleep(0.02)
        first = time.perf_counter() - start
        answer.raise_for_status()
        begin = time.perf_counter()
        with SECOND.open("rb") as f:
            httpx.post(url, files={"file": (SECOND.name, f, "image/jpeg")}, timeout=30).raise_for_status()
        return first, time.perf_counter() - begin
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--model", default="default", help="bundle folder or bundled name (default: default)")
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases:
        return phases(args.model)
    peaks: dict[str, list[float]] = {}

    def child(name: str, argv: list[str]):
        def measure() -> float:
            seconds, peak = run_child("pneumoscan.cli", argv)
            peaks.setdefault(name, []).append(peak)
            return seconds

        return measure

    nexts: list[float] = []

    def service() -> float:
        first, following = service_first_answers(args.model)
        nexts.append(following)
        return first

    cases = {
        "pneumoscan --help": child("--help", ["--help"]),
        "pneumoscan predict ONE (fp32)": child("fp32", ["predict", FILM, "--model", args.model]),
        "pneumoscan predict ONE --int8": child("int8", ["predict", FILM, "--model", args.model, "--int8"]),
        "serve: start to first answer": service,
    }
    walls = medians(interleaved(cases, args.rounds))
    rows = []
    for (name, seconds), key in zip(walls.items(), ["--help", "fp32", "int8", None]):
        peak = f"{statistics.median(peaks[key]):.0f}" if key else "-"
        rows.append([name, f"{seconds * 1000:.0f}", peak])
    rows.append(["serve: the next answer", f"{statistics.median(nexts) * 1000:.0f}", "-"])
    print(
        f"Fresh processes, medians of {args.rounds} interleaved rounds, model {args.model}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(table(["case", "wall ms", "peak RSS MB"], rows))

    runs = []
    for _ in range(args.rounds):
        out = subprocess.run(
            [sys.executable, __file__, "--phases", "--model", args.model], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
    print("\nOne image in a fresh process, by phase (medians):")
    print(table(["phase", "ms"], [[k, f"{statistics.median(r[k] for r in runs) * 1000:.0f}"] for k in runs[0]]))


if __name__ == "__main__":
    main()
