"""Throughput and latency of `pneumoscan listen`: store in by C-STORE, structured report back to a real PACS.

    python benchmarks/dicom_node.py [--images 400] [--senders 2] [--rate R] [--stow] [--fullres] [--fp32]
    python benchmarks/dicom_node.py --large 8 [--large-mb 95]

A real Orthanc (Debian's package) on loopback ports receives the reports; K dcmtk `storescu` processes send
real chest X-rays (CR, JPEG baseline: the 224 px training images, or with --fullres the full-resolution sample
at 400-2900 px) to a `pneumoscan listen --send-to` process as fast as it takes them (saturation: latency is
then mostly time in the node's bounded queue), or with --rate R one sender (pynetdicom) offers R images/s.
Prints images/s from the first store to the last report sent, receipt-to-report-sent latency percentiles
(each image's time from the node holding it to Orthanc acknowledging its report), the node's peak RSS, and,
for reference, the same images classified in-process without the network (decode + model, batch 16), and
the transport's own rate: the same senders storing the same files straight into the same Orthanc.

--large N: N storescu processes (each its own AE title) send one large uncompressed multi-frame CR dataset
(about --large-mb MB, real film frames) each, all at once; prints the node's RSS before and at its peak, and
the seconds until every one has its row (refused: over the decoding limit; the point is what receiving costs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import process_memory_mb  # noqa: E402
from pacs import ECHOSCU, STORESCU, Orthanc, chest_dicom, free_port  # noqa: E402

from pneumoscan.io.dataset import shared_data_root  # noqa: E402


def films(count: int, fullres: bool) -> list[Path]:
    root = shared_data_root()
    folders = [root / "fullres_sample"] if fullres else [root / "chest_xray_224" / "train"]
    found = sorted(p for f in folders for p in f.glob("*/*.jpeg"))
    step = max(1, len(found) // count)
    picked = found[::step][:count]
    return [picked[i % len(picked)] for i in range(count)]


def wait_rows(path: Path, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if len(rows) >= count:
                return rows
        time.sleep(0.05)
    raise SystemExit(f"only {len(rows) if path.exists() else 0} of {count} results within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--rate", type=float, default=None, help="offer this many images/s from one sender")
    parser.add_argument("--stow", action="store_true", help="send the reports by DICOMweb STOW-RS, not C-STORE")
    parser.add_argument("--fullres", action="store_true", help="full-resolution films instead of 224 px")
    parser.add_argument("--fp32", action="store_true", help="the fp32 model where the bundle's default is int8")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--large", type=int, default=0, help="N concurrent senders of one large dataset each")
    parser.add_argument("--large-mb", type=float, default=95)
    args = parser.parse_args()
    if args.large:
        large(args.large, args.large_mb, args.fp32, args.max_seconds)
        return

    work = Path(tempfile.mkdtemp(prefix="pneumoscan-dicom-bench-"))
    port = free_port()
    orthanc = Orthanc(work / "orthanc", {"pneumoscan": ["PNEUMOSCAN", "127.0.0.1", port]}, dicomweb=args.stow)
    chosen = films(args.images, args.fullres)
    files = []
    for n, film in enumerate(chosen):
        files.append(work / "in" / f"{n % args.senders}" / f"{n:05d}.dcm")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_bytes(chest_dicom(film))
    command = [sys.executable, "-m", "pneumoscan.cli", "listen", "--port", str(port), "--out", str(work / "out")]
    send_to = (
        f"http://127.0.0.1:{orthanc.http_port}/dicom-web" if args.stow else f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    )
    command += ["--send-to", send_to, "--allow", "BENCH"]
    command += ["--fp32"] * args.fp32 + (["--model", args.model] if args.model else [])
    node = subprocess.Popen(command, stderr=open(work / "listen.log", "w"))
    try:
        echo = [ECHOSCU, "-aet", "BENCH", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
        while subprocess.run(echo, capture_output=True).returncode != 0:
            if node.poll() is not None:
                raise SystemExit(f"listen exited; see {work / 'listen.log'}")
            time.sleep(0.2)
        start = time.monotonic()
        if args.rate:
            codes = [paced(sorted(work.glob("in/*/*.dcm")), port, args.rate)]
        else:
            codes = send_all(work, port, args.senders, args.max_seconds)
        rows = wait_rows(work / "out" / "results.jsonl", len(files), args.max_seconds)
        elapsed = time.monotonic() - start
        rss = process_memory_mb(node.pid)["peak"]
    finally:
        node.terminate()
        node.wait(60)
    try:
        held = orthanc.get("/statistics")["CountInstances"]
        direct = None if args.rate else stored_directly(work, orthanc.dicom_port, args.senders, args.max_seconds)
    finally:
        orthanc.stop()
    report(args, files, rows, elapsed, rss, held, codes, direct)


def large(senders: int, megabytes: float, fp32: bool, max_seconds: float) -> None:
    """Peak RSS of the node while ``senders`` large C-STOREs arrive at once."""
    work = Path(tempfile.mkdtemp(prefix="pneumoscan-dicom-large-"))
    film = films(1, fullres=True)[0]
    frame_mb = len(chest_dicom(film, jpeg=False)) / 1e6
    frames = max(1, round(megabytes / frame_mb))
    files = []
    for n in range(senders):
        files.append(work / "in" / f"{n}.dcm")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_bytes(chest_dicom(film, jpeg=False, frames=frames))
    port = free_port()
    titles = [f"BENCH{n}" for n in range(senders)]
    command = [sys.executable, "-m", "pneumoscan.cli", "listen", "--port", str(port), "--out", str(work / "out")]
    command += [a for t in titles for a in ("--allow", t)] + ["--fp32"] * fp32
    command += ["--max-associations", str(max(8, senders))]
    node = subprocess.Popen(command, stderr=open(work / "listen.log", "w"))
    try:
        echo = [ECHOSCU, "-aet", titles[0], "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
        while subprocess.run(echo, capture_output=True).returncode != 0:
            if node.poll() is not None:
                raise SystemExit(f"listen exited; see {work / 'listen.log'}")
            time.sleep(0.2)
        before = process_memory_mb(node.pid)["rss"]
        start = time.monotonic()
        sending = [
            subprocess.Popen(
                [STORESCU, "-aet", title, "-aec", "PNEUMOSCAN", "-xy", "127.0.0.1", str(port), str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for title, path in zip(titles, files)
        ]
        codes = [s.wait(max_seconds) for s in sending]
        rows = wait_rows(work / "out" / "results.jsonl", codes.count(0), max_seconds)
        elapsed = time.monotonic() - start
        peak = process_memory_mb(node.pid)["peak"]
    finally:
        node.terminate()
        node.wait(60)
    size = sum(f.stat().st_size for f in files) / len(files) / 1e6
    print(f"\n{senders} concurrent C-STOREs of {size:.0f} MB ({frames} frames); senders' exit codes {codes}")
    print(f"node RSS before {before:.0f} MB, peak {peak:.0f} MB; {len(rows)} rows in {elapsed:.1f} s")


def send_all(work: Path, port: int, senders: int, max_seconds: float, called: str = "PNEUMOSCAN") -> list[int]:
    """``senders`` storescu processes, each sending its share of the files as fast as ``called`` takes them."""
    senders = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCH", "-aec", called, "-xy", "127.0.0.1", str(port)]
            + [str(f) for f in sorted((work / "in" / str(k)).iterdir())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k in range(senders)
    ]
    return [s.wait(max_seconds) for s in senders]


def stored_directly(work: Path, port: int, senders: int, max_seconds: float) -> float:
    """The transport's own rate: the same senders storing the same files straight into Orthanc (images/s)."""
    count = len(list(work.glob("in/*/*.dcm")))
    start = time.monotonic()
    codes = send_all(work, port, senders, max_seconds, called="ORTHANC")
    if any(codes):
        raise SystemExit(f"storing into Orthanc directly failed: storescu exit codes {codes}")
    return count / (time.monotonic() - start)


def paced(files: list[Path], port: int, rate: float) -> int:
    """One association offering ``rate`` images/s; returns 0 when every store succeeded."""
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.4.50")
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    failed, start = 0, time.monotonic()
    for n, path in enumerate(files):
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
        status = assoc.send_c_store(path)
        failed += not status or status.Status != 0
    assoc.release()
    return failed


def report(args, files, rows, elapsed, rss, held, codes, direct: float | None) -> None:
    seconds = np.array([r["seconds"] for r in rows])
    sent = sum("sr_instance_uid" in r for r in rows)
    refused = sum("error" in r for r in rows)
    reference = classify_in_process([f.read_bytes() for f in files], args.model, args.fp32)
    size = "full resolution" if args.fullres else "224 px"
    how = f"offered at {args.rate:g}/s by one sender" if args.rate else f"from {args.senders} storescu senders"
    engine = ("fp32" if args.fp32 else "the bundle's default") + ("; reports by STOW-RS" if args.stow else "")
    print(f"\n{len(files)} CR images ({size}, JPEG baseline) {how}; senders' exit codes {codes}; engine {engine}")
    print(f"| {'measure':<56} | {'value':>10} |")
    print(f"|{'-' * 58}|{'-' * 12}|")
    for name, value in [
        ("images/s, first store to last report sent", f"{len(files) / elapsed:.1f}"),
        ("receipt to report sent, p50 (ms)", f"{1000 * np.percentile(seconds, 50):.0f}"),
        ("receipt to report sent, p95 (ms)", f"{1000 * np.percentile(seconds, 95):.0f}"),
        ("receipt to report sent, max (ms)", f"{1000 * seconds.max():.0f}"),
        ("reports sent / images", f"{sent} / {len(files)}"),
        ("refused by the node (report says why)", f"{refused}"),
        ("reports Orthanc holds", f"{held}"),
        ("node peak RSS (MB)", f"{rss:.0f}"),
        ("reference: classify in-process, images/s", f"{reference:.1f}"),
        ("node rate / in-process rate", f"{len(files) / elapsed / reference:.2f}"),
        *(
            [
                ("reference: the senders into Orthanc directly, images/s", f"{direct:.1f}"),
                ("node rate / direct rate", f"{len(files) / elapsed / direct:.2f}"),
            ]
            if direct
            else []
        ),
    ]:
        print(f"| {name:<56} | {value:>10} |")
    share = len(files) / elapsed / reference
    verdict = "met" if share >= 0.8 else "NOT met"
    print(f"must: the node at least 80% of classifying in-process: {verdict} ({share:.2f})")


def classify_in_process(files: list[bytes], model: str | None, fp32: bool) -> float:
    import io

    from pneumoscan import Classifier

    clf = Classifier.load(model, fp32=fp32)
    clf.predict([io.BytesIO(files[0])])  # warm up
    start = time.monotonic()
    clf.predict([io.BytesIO(f) for f in files], batch_size=16)
    return len(files) / (time.monotonic() - start)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
