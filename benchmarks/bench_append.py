"""The cost of growing a Kinetics-400-size frame store by 1 % against building it, measured in one run.

Run on demand: ``python benchmarks/bench_append.py [--rows 246000] [--append 0.01] [--decode-all]``. The
synthetic K400 split of ``bench_scale.py`` (official layout, 10 % of the videos missing, 1 % undecodable,
the rest symbolic links to one small real video). The store is built with the frame stage's own steps
(manifest, file identities, creation, the ledger); then ``--append`` of new videos (new annotation rows,
their files present as in the rest of the split) is added as ``pipeline frames`` adds it: the change
planned against the live rows, written (journal, resized arrays, new columns, snapshot), and the new
blocks decoded for real by ``extract_block`` (the worker the stage runs).

The full build's decoding is the per-video decode time measured on the append's videos times the present
videos of the build (``--decode-all`` decodes them all instead: hours on 2 cores). The source video is tiny
(32x32, 8 frames), so decoding is cheap here and bookkeeping weighs more than with real videos: the ratio
printed is a pessimistic one. Target (issue #21): the append's bookkeeping in seconds, its whole cost about
the decoding of its new videos.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import make_dataset, placeholder_frame_chunks, timed  # noqa: E402

from pipeline.core.progress import Progress  # noqa: E402
from pipeline.media.datasets import load_manifest  # noqa: E402
from pipeline.media.video import FrameSpec  # noqa: E402
from pipeline.storage import store  # noqa: E402
from pipeline.storage.framestore import (
    FrameCodec,
    apply_plan,
    extract_block,
    file_identity,
    frames_fingerprint_record,
    init_frame_store,
    plan_change,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=246_000, help="videos of the built store")
    ap.add_argument("--append", type=float, default=0.01, help="new videos, as a fraction of --rows")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--decode-all", action="store_true", help="decode every video of the build too (slow)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-append-"))
    try:
        run(tmp, args.rows, int(round(args.rows * args.append)), args.block_size, args.decode_all)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_annotation(root: Path, lines: list[str]) -> None:
    (root / "annotations" / "train.csv").write_text("".join(lines))


def decode_blocks(group, path: Path, blocks: list[int], desc: str) -> tuple[float, int]:  # noqa: ANN001
    """Decode ``blocks`` with the stage's worker and record them (the ledger): (seconds, videos decoded)."""
    t0 = time.perf_counter()
    videos = 0
    with Progress(store.rows_in(group, blocks), desc, False) as bar, store.Ledger(group) as ledger:
        for b in blocks:
            result = extract_block(str(path), b, 1)
            videos += int(((result.status == store.OK) | (result.status == store.FAILED)).sum())
            ledger.record(result)
            bar.update(result.n)
    return time.perf_counter() - t0, videos


def run(tmp: Path, rows: int, new: int, block: int, decode_all: bool) -> None:
    total = rows + new
    print(f"synthetic K400 split: {rows:,} videos built, then {new:,} appended ({new / rows:.1%}), block {block}")
    (missing, broken), setup_s = timed(lambda: make_dataset(tmp / "k400", total))
    root = tmp / "k400"
    lines = (root / "annotations" / "train.csv").read_text().splitlines(keepends=True)
    write_annotation(root, lines[:1 + rows])  # the split as built: its first `rows` videos
    print(f"  (dataset written in {setup_s:.1f} s, not measured)")
    spec, codec = FrameSpec(num_frames=8), FrameCodec()  # the default box
    block = store.bounded_block(block, spec.num_frames * spec.height * spec.width * 3)
    path = tmp / "cache" / "frames" / "k400" / "train"
    fp = store.fingerprint(frames_fingerprint_record("k400", spec, codec, block))
    results: list[tuple[str, str, float, str]] = []

    # ---- the full build: the stage's bookkeeping measured; its decoding below ----
    (part, identity), manifest_s = timed(lambda: (lambda p: (p, file_identity(p.records)))(
        load_manifest("k400", str(root)).split("train")))
    results.append(("build", "manifest + file identities", manifest_s, f"{rows:,} rows"))

    def create():
        with store.writer_lock(path):
            return store.open_output(path, fp, {}, replace_mismatched=False,
                                     init=lambda g: init_frame_store(g, part, "train", spec, codec, block, identity))

    group, create_s = timed(create)
    results.append(("build", "store creation (first snapshot)", create_s, ""))
    pending = store.pending_blocks(group)
    present_build = int((~missing[:rows]).sum())
    if decode_all:
        build_decode_s, _ = decode_blocks(group, path, pending, "decode (build)")
        decode_note = f"{present_build:,} videos decoded"
    else:
        # the workers' results, as the coordinator's ledger records them (bench_scale.py's way); decoding is
        # estimated below from the append's measured rate
        def record_blocks():
            with store.Ledger(group) as ledger:
                for b in pending:
                    rs = store.block_slice(group, b)
                    status = np.where(missing[rs] | broken[rs], store.FAILED, store.OK).astype(np.int8)
                    reasons = np.where(missing[rs], "missing file: not found under the dataset root",
                                       np.where(broken[rs], "not a decodable video", "")).astype(object)
                    ledger.record(store.BlockResult(b, status, reasons))

        _, ledger_s = timed(record_blocks)
        results.append(("build", "ledger: every block recorded", ledger_s, f"{len(pending):,} blocks"))
        build_decode_s = None
        placeholder_frame_chunks(path, group)  # the build's chunk files, as the decode leaves them (not measured)
    build_summary = store.summarize(group, path, max_failures=20)
    build_summary_s = timed(lambda: store.summarize(group, path, max_failures=20))[1]
    assert build_summary["complete"] and not build_summary["damaged"], build_summary
    results.append(("build", "summary", build_summary_s, ""))

    # ---- the append: the dataset gains `new` videos; `pipeline frames` as it runs ----
    write_annotation(root, lines)
    (grown, identity2), manifest2_s = timed(lambda: (lambda p: (p, file_identity(p.records)))(
        load_manifest("k400", str(root)).split("train")))
    results.append(("append", "manifest + file identities", manifest2_s, f"{total:,} rows"))

    def open_again():
        with store.writer_lock(path):
            return store.open_output(path, fp, {}, replace_mismatched=False, init=lambda g: None)

    group, open_s = timed(open_again)
    results.append(("append", "open (fingerprint, bookkeeping check)", open_s, ""))
    plan, plan_s = timed(lambda: plan_change(group, grown, identity2))
    assert plan.added == new and not plan.dropped and not plan.redone, plan.as_dict()
    results.append(("append", "plan: live rows vs manifest, by id", plan_s, f"{plan.added:,} new videos"))
    entry, apply_s = timed(lambda: apply_plan(group, plan))
    results.append(("append", "change: journal, resize, columns, snapshot", apply_s, f"snapshot {entry['version']}"))
    pending = store.pending_blocks(group)
    append_decode_s, decoded = decode_blocks(group, path, pending, "decode (append)")
    present_new = int((~missing[rows:]).sum())
    results.append(("append", "decode the new blocks (extract_block)", append_decode_s,
                    f"{present_new:,} present videos decoded ({decoded - present_new} missing), {len(pending)} blocks"))
    summary, summary_s = timed(lambda: store.summarize(group, path, max_failures=20))
    assert summary["complete"] and not summary["damaged"] and summary["total"] == total, summary
    results.append(("append", "summary", summary_s, ""))
    per_video = append_decode_s / max(1, present_new)
    if build_decode_s is None:
        build_decode_s = per_video * present_build
        decode_note = f"{per_video * 1e3:.1f} ms per video (the append's rate) x {present_build:,} present videos"
    results.insert(2, ("build", "decode every video (estimated)" if not decode_all else "decode every video",
                       build_decode_s, decode_note))

    build = sum(s for w, _, s, _ in results if w == "build")
    bookkeeping = manifest2_s + open_s + plan_s + apply_s + summary_s
    append = bookkeeping + append_decode_s
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'':<7} {'what':<46} {'seconds':>9}  notes")
    for where, what, seconds, note in results:
        print(f"{where:<7} {what:<46} {seconds:>9.2f}  {note}")
    print(f"\nfull build of {rows:,} videos: {build:,.1f} s")
    print(f"append of {new:,} videos ({new / rows:.1%}): {append:.1f} s, of which bookkeeping {bookkeeping:.1f} s "
          f"and decoding {append_decode_s:.1f} s")
    print(f"append / full build: {append / build:.4f} ({build / append:.0f}x cheaper); a rebuild would have "
          f"decoded {present_build + present_new:,} videos, the append decoded {present_new:,}")
    print(f"peak memory (this process): {peak_mib:.0f} MiB")
    g = store.open_group(path)  # (the build's blocks hold no frames here unless --decode-all: no damage check)
    assert int(store.live_mask(g).sum()) == total and not store.pending_blocks(g)


if __name__ == "__main__":
    main()
