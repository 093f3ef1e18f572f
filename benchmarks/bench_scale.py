"""Kinetics-400-size bookkeeping: manifest, missing rows, failure summary and status at 246,000 rows.

Run on demand: ``python benchmarks/bench_scale.py [--rows 246000]``. A synthetic K400 split in the
official layout (annotations/train.csv, 400 classes): 10 % of the videos missing, 1 % present but
undecodable, the rest present (symbolic links to one small real video, so the tree costs no disk).
Decoding itself is not measured here (bench_frames.py does): the blocks' results are handed to the
coordinator's ledger as the workers would return them.

Targets (issue #12): manifest < 15 s; missing rows recorded at < 0.1 ms each; summary and status
< 5 s; peak memory < 1 GiB. The baseline, measured in the same run on a sample of failed rows, is
the per-element summary (one ``video_id[i]``, ``path[i]``, ``reason[i]`` read per failed row).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.media.datasets import load_manifest  # noqa: E402
from pipeline.media.video import FrameSpec  # noqa: E402
from pipeline.storage import store  # noqa: E402
from pipeline.storage.framestore import FrameCodec, file_identity, frames_fingerprint_record, init_frame_store


def make_dataset(root: Path, rows: int, seed: int = 0, missing_fraction: float = 0.10) -> tuple[np.ndarray, np.ndarray]:
    """K400 layout with ``rows`` annotation rows; returns the missing and the undecodable masks."""
    from videos import write_video

    rng = random.Random(seed)
    kind = np.array([rng.random() for _ in range(rows)])
    missing = kind < missing_fraction
    broken = (kind >= missing_fraction) & (kind < missing_fraction + 0.01)
    (root / "annotations").mkdir(parents=True)
    videos = root / "train"
    videos.mkdir()
    good = root / "good.mp4"
    write_video(good, n_frames=8, width=32, height=32)
    bad = root / "bad.bin"
    bad.write_bytes(b"not a video" * 10)
    lines = ["label,youtube_id,time_start,time_end,split\n"]
    for i in range(rows):
        yid = f"y{i:010d}"
        lines.append(f"class {i % 400},{yid},10,20,train\n")
        if not missing[i]:
            os.symlink(bad if broken[i] else good, videos / f"{yid}_000010_000020.mp4")
    (root / "annotations" / "train.csv").write_text("".join(lines))
    return missing, broken


def placeholder_frame_chunks(path: Path, group) -> int:  # noqa: ANN001
    """An empty chunk file of each per-block array for each finished block with an ok video. This benchmark
    decodes nothing, and the damage check of `status` and every reader (one listing of the store) must find a
    real store's files, or it reports the store damaged and skips its counts. `verify` reads them and reports
    each such block."""
    size, status, done = int(group.attrs["block_size"]), group["status"][:], group[store.DONE_ARRAY][:]
    n = int(group.attrs["n"])
    has_ok = np.zeros(len(done), bool)
    has_ok[np.flatnonzero(status[:n] == store.OK) // size] = True
    blocks = np.flatnonzero(has_ok & (done == 1))
    for name in (a for a in store.BLOCK_ARRAYS if a in group):
        for b in blocks.tolist():
            (path / name / "c" / str(b)).mkdir(parents=True, exist_ok=True)
            (path / name / "c" / str(b) / "0").touch()
    return int(blocks.size)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=246_000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--missing-fraction", type=float, default=0.10,
                    help="1.0: every file missing (the checks' worst case: a million failed rows)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        run(tmp, args.rows, args.block_size, args.missing_fraction)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, rows: int, block: int, missing_fraction: float = 0.10) -> None:
    (missing, broken), setup_s = timed(lambda: make_dataset(tmp / "k400", rows, missing_fraction=missing_fraction))
    print(f"synthetic K400 split: {rows:,} rows ({missing.mean():.0%} missing, {broken.mean():.0%} undecodable), "
          f"block {block}")
    print(f"  (dataset written in {setup_s:.1f} s, not measured)")
    results: list[tuple[str, float, str]] = []

    spec, codec = FrameSpec(num_frames=8, height=256, width=320), FrameCodec()

    def build_manifest():
        part = load_manifest("k400", str(tmp / "k400")).split("train")
        return part, file_identity(part.records)  # stats every file: what tells a changed one

    (part, identity), manifest_s = timed(build_manifest)
    results.append(("manifest (adapter + file identities)", manifest_s,
                    f"{manifest_s / rows * 1e6:.1f} us/row; < 15 s"))
    assert sum(not r.path for r in part.records) == int(missing.sum())

    path = tmp / "cache" / "frames" / "k400" / "train"
    fp = store.fingerprint(frames_fingerprint_record("k400", spec, codec, block))

    def create():
        with store.writer_lock(path):
            return store.open_output(path, fp, {}, replace_mismatched=False,
                                     init=lambda g: init_frame_store(g, part, "train", spec, codec, block, identity))

    group, create_s = timed(create)
    n_missing = int(missing.sum())
    results.append(("store creation, missing rows recorded", create_s,
                    f"{create_s / n_missing * 1e3:.4f} ms per missing row (all of creation); < 0.1 ms"))

    # The workers' results for every pending block, as the coordinator's ledger records them.
    pending = store.pending_blocks(group)

    def record_blocks():
        with store.Ledger(group) as ledger:
            for b in pending:
                rs = store.block_slice(group, b)
                status = np.where(missing[rs] | broken[rs], store.FAILED, store.OK).astype(np.int8)
                reasons = np.where(missing[rs], "missing file: not found under the dataset root",
                                   np.where(broken[rs], "not a decodable video: Invalid data found when "
                                            "processing input", "")).astype(object)
                ledger.record(store.BlockResult(b, status, reasons))

    _, ledger_s = timed(record_blocks)
    results.append(("ledger: every block recorded", ledger_s,
                    f"{ledger_s / max(1, len(pending)) * 1e3:.3f} ms per block, {len(pending):,} blocks"))

    placeholder_frame_chunks(path, group)  # not measured
    summary, summary_s = timed(lambda: store.summarize(group, path, max_failures=None))
    assert summary["failed"] == int((missing | broken).sum()) and summary["complete"], summary
    results.append(("summary, every failure listed", summary_s, f"{summary['failed']:,} failures; < 5 s"))
    short, short_s = timed(lambda: store.summarize(group, path, max_failures=20))
    results.append(("summary, first 20 failures + counts by reason", short_s, str(short["failure_reasons"])))

    from pipeline.storage import integrity

    # (this benchmark writes no frames: blocks with ok rows are read and reported; failed rows cost no reads)
    report, verify_s = timed(lambda: integrity.verify(path, group))
    results.append(("verify (bookkeeping and every block with an ok row)", verify_s,
                    f"{len(report.damaged_blocks):,} blocks with ok rows and no frames here"))

    from stages import status as status_stage

    entries, status_s = timed(lambda: status_stage.run(tmp / "cache", all_failures=False))
    results.append(("status (in process)", status_s, "< 5 s"))
    cli = [sys.executable, "-m", "pipeline", "status", "--json", "--cache", str(tmp / "cache")]
    proc, status_cli_s = timed(lambda: subprocess.run(cli, capture_output=True, text=True, check=True))
    results.append(("pipeline status --json (new process)", status_cli_s, f"{len(proc.stdout) / 1e3:.1f} kB of JSON"))

    # Baseline, same run: the per-element summary on a sample of failed rows.
    failed_rows = np.flatnonzero(group["status"][:] == store.FAILED)
    sample = failed_rows[np.linspace(0, failed_rows.size - 1, 100).astype(int)]
    ids, paths, reasons = group["video_id"], group["path"], group["reason"]
    _, per_elem_s = timed(lambda: [(str(ids[i]), str(paths[i]), str(reasons[i])) for i in sample.tolist()])
    per_row = per_elem_s / sample.size
    baseline = per_row * failed_rows.size
    results.append(("baseline: per-element summary (extrapolated)", baseline,
                    f"{per_row * 1e3:.1f} ms per failed row, measured on {sample.size}"))

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'what':<46} {'seconds':>9}  notes")
    for what, seconds, note in results:
        print(f"{what:<46} {seconds:>9.2f}  {note}")
    print(f"\nsummary speed-up over the per-element baseline: {baseline / summary_s:.0f}x")
    print(f"peak memory (this process): {peak_mib:.0f} MiB (target < 1024)")


if __name__ == "__main__":
    main()
