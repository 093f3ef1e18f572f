"""GPU acceptance check (issue #22): does this install work on this machine's GPUs, and how fast is it? One command.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py [--budget-s 480] [--out-dir cache/gpu-check] [--keep]
    python benchmarks/gpu_check.py --smoke          # on a CPU: a tiny model through every step

Steps, each given what is left of the time budget (default 8 minutes; a step still running at its share is
killed, and the summary says so):
1. environment: versions, the GPUs, bf16, NCCL, Triton, an nvJPEG decode (in a child process: a broken install is
   reported, not fatal);
2. the GPU tests: ``pytest -m gpu tests/test_gpu.py`` (in --smoke, with no visible GPU: every test reports skipped);
3. the pipeline end to end on a small generated world (12 classes of synthetic H.264 clips) with a ViT-B/16 of
   random weights written as a ``local-dir:`` model: frames -> features on the GPU -> labels -> heads -> evaluate ->
   finetune --data-device cuda -> evaluate the run. Nothing is downloaded (HF_HUB_OFFLINE=1; open_clip's tokenizer
   ships its vocabulary);
4. ``benchmarks/gpu_throughput.py`` with the rest of the budget (its JSON survives a kill: every row it measured).
One summary, ``gpu_check.md`` and ``gpu_check.json`` in --out-dir, rewritten after every step; the sections are
environment, gpu_tests, pipeline, throughput, targets and verdict. Exits 1 when a required step (environment, GPU
tests, pipeline, throughput) failed; missed targets are reported, not failed.

This process imports nothing but the standard library: every step runs in a child, so a crash, a hang or a
missing package becomes a line of the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
SECTIONS = ("environment", "gpu_tests", "pipeline", "throughput", "targets", "verdict")
REQUIRED = ("environment", "gpu_tests", "pipeline", "throughput")
DATASET, RUN = "gpucheck", "gpu-check"
# the world's classes: 3 colours x 2 shapes x 2 sizes
WORLD_PARAMS = "world:\n  colours: [red, green, blue]\n  shapes: [disc, ring]\n  sizes: [small, large]\n"
SMOKE_THROUGHPUT_ROWS = "features,train-ttrans-b32,data-path"  # one row of each kind
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ---- children ------------------------------------------------------------------------------------------------

def probe() -> dict:
    """The environment, as a child process sees it (printed as JSON by ``--probe``)."""
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    versions = {}
    for name in ("torch", "torchvision", "open_clip", "zarr", "av", "numpy", "dask", "pytest", "triton"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - a package that does not import is a finding
            versions[name] = f"missing ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    info["packages"] = versions
    if versions["torch"].startswith("missing"):
        return info
    import torch

    info["cuda_build"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["gpus"] = []
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}"})
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = torch.distributed.is_available() and torch.distributed.is_nccl_available()
        info["nvjpeg"] = nvjpeg_probe()
    return info


def nvjpeg_probe() -> str:
    """Decode one JPEG with nvJPEG and with libjpeg-turbo: 'ok (...)' or what went wrong."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    try:
        torch.manual_seed(0)
        image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
        data = encode_jpeg(image, quality=90)
        cpu = decode_jpeg(data, mode=ImageReadMode.RGB)
        gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        diff = (gpu.cpu().int() - cpu.int()).abs().float().mean()
        return f"ok (mean |diff| vs libjpeg-turbo {float(diff):.2f} grey levels)"
    except Exception as e:  # noqa: BLE001
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def pipeline_plan(work: Path, smoke: bool) -> list[tuple[str, list[str]]]:
    """The pipeline's commands, in order: (step name, ``pipeline`` arguments)."""
    cache, world, model = work / "cache", work / "world", work / "model"
    key = "tiny-clip-random" if smoke else "vit-b16-random"
    device = ["--device", "cpu" if smoke else "cuda"]
    data_device = ["--data-device", "cpu" if smoke else "cuda"]
    size, frames, batch = ("32", "4", "8") if smoke else ("64", "8", "32")
    common = ["--cache", str(cache), "--no-params", "-q"]
    ours = ["-d", DATASET, "--model-key", key]
    return [
        ("world", ["world", "--params", str(work / "world.yaml"), "--out", str(world), "--train-per-class",
                   "4" if smoke else "8", "--val-per-class", "2" if smoke else "4", "--frames", "16", "--size", size,
                   "-q"]),
        ("frames", ["frames", "--format", "csv", "--root", str(world), "--dataset", DATASET, "--cache-frames", frames,
                    "--height", size, "--width", size, *common]),
        ("features", ["features", "-d", DATASET, "--model", f"local-dir:{model}", "--model-key", key, *device,
                      "--batch-size", "256", *common]),
        ("labels", ["labels", *ours, "--encoder", "clip", *device, *common]),
        ("heads", ["heads", *ours, "--head", "clip-text", *common]),
        ("evaluate", ["evaluate", *ours, "--head", "clip-text", "--json", *common]),
        # micro-batches of 8: a 24 GiB GPU trains ViT-B/16 too; the global batch of 32 accumulates
        ("finetune", ["finetune", *ours, "--head", "clip-text", "--temporal", "tokent1d", "--frames", frames,
                      "--epochs", "1", "--global-batch-size", batch, "--micro-batch", "8", "--lr", "1e-4",
                      "--warmup-epochs", "0", *device, *data_device, "--workers", "0" if smoke else "2",
                      "--run-name", RUN, *common]),
        ("evaluate-run", ["evaluate", "--run-name", RUN, *device, *data_device, "--batch-size", batch, "--json",
                          *common]),
    ]


def write_model(folder: Path, smoke: bool) -> dict:
    """A CLIP of random weights as a local-dir: model: ViT-B/16 with QuickGELU (the recipe's), or the tiny one."""
    import open_clip
    import torch

    from pipeline.models.clip import save_local_dir

    if smoke:
        cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    else:
        cfg = {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": True}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg)
    save_local_dir(model, cfg, folder)
    return {"model": "tiny CLIP" if smoke else "ViT-B/16", "parameters_m": round(
        sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def step_figures(name: str, output: str, work: Path, seconds: float) -> dict:
    """The figures a step's outputs hold (read from the cache and its JSON output)."""
    import zarr

    cache = work / "cache"

    def videos(kind: str, *parts: str) -> int:
        base = cache.joinpath(kind, DATASET, *parts)
        return sum(int(zarr.open_group(str(p), mode="r").attrs["n"]) for p in sorted(base.iterdir())
                   if (p / "zarr.json").exists())

    def json_out() -> dict:
        return json.loads(output[output.index("{"):])
    if name == "world":
        return {"clips": len((work / "world" / "videos.csv").read_text().splitlines()) - 1}
    if name == "frames":
        return {"videos": videos("frames")}
    if name == "features":
        key = next((cache / "features" / DATASET).iterdir()).name
        n = videos("features", key)
        return {"videos": n, "videos_per_s_with_model_load": round(n / seconds, 1)}
    if name == "evaluate":
        full = json_out()["full"]
        return {"top1": round(full["top1"], 2), "note": "random weights: chance level expected"}
    if name == "finetune":
        run = cache / "runs" / RUN
        steps = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()
                 if json.loads(x).get("kind") == "step"]
        metrics = json.loads((run / "metrics.json").read_text())
        return {"steps": len(steps), "first_loss": round(steps[0]["loss"], 4), "last_loss": round(steps[-1]["loss"], 4),
                "clips_per_s": round(sum(s["clips"] for s in steps) / max(1e-9, sum(s["seconds"] for s in steps)), 1),
                "val_top1": round(metrics.get("val_top1", float("nan")), 2),
                "data_path": json.loads((run / "run.json").read_text()).get("data_path", "per-clip")}
    if name == "evaluate-run":
        result = json_out()
        return {"top1": round(result["top1"], 2), "videos": result["videos"]}
    return {}


def run_pipeline(work: Path, smoke: bool) -> int:
    """``--pipeline WORK``: every step in this one process (torch and open_clip are imported once), each through the
    CLI's own entry point; a record per step in WORK/steps.jsonl as soon as it ends. Stops at the first failure:
    each step needs the ones before it."""
    os.environ.update(OFFLINE)
    from pipeline.cli import main as cli_main

    records = work / "steps.jsonl"
    (work / "world.yaml").write_text(WORLD_PARAMS)

    def record(entry: dict) -> None:
        with records.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    started = time.perf_counter()
    try:
        figures = write_model(work / "model", smoke)
        record({"step": "model", "rc": 0, "seconds": round(time.perf_counter() - started, 1), "figures": figures})
    except Exception:  # noqa: BLE001 - reported as the step's failure
        record({"step": "model", "rc": 1, "seconds": round(time.perf_counter() - started, 1),
                "tail": traceback.format_exc()[-1500:]})
        return 1
    for name, args in pipeline_plan(work, smoke):
        out = io.StringIO()
        started = time.perf_counter()
        sys.argv = ["pipeline", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                cli_main()
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - a crash of the step: its traceback is the report
                traceback.print_exc()
                rc = 1
        seconds = time.perf_counter() - started
        entry = {"step": name, "command": "pipeline " + " ".join(args), "rc": rc, "seconds": round(seconds, 1)}
        if rc == 0:
            try:
                entry["figures"] = step_figures(name, out.getvalue(), work, seconds)
            except Exception as e:  # noqa: BLE001 - the step ran; its figures are a nicety
                entry["figures"] = {"note": f"figures unreadable: {type(e).__name__}: {e}"}
        else:
            entry["tail"] = out.getvalue()[-1500:]
        record(entry)
        if rc != 0:
            return 1
    return 0


# ---- the check (this process: standard library only) -----------------------------------------------------------

def run_child(cmd: list[str], timeout: float, log: Path, cwd: Path,
              env: dict | None = None) -> tuple[int | None, float]:
    """(exit code, or None when killed at ``timeout``; seconds). The child and everything it started (loader workers,
    dask workers, torchrun ranks) live in their own process group, killed together."""
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **OFFLINE,
                                     **(env or {})})
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - started


def tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class Check:
    def __init__(self, out_dir: Path, budget_s: float, smoke: bool, keep: bool) -> None:
        self.out, self.budget, self.smoke, self.keep = out_dir, budget_s, smoke, keep
        self.started = time.monotonic()
        self.work = out_dir / "work"
        self.summary: dict = {"check": "gpu_check", "smoke": smoke, "budget_s": budget_s,
                              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                              "sections": {name: {"status": "not run"} for name in SECTIONS}}
        self.sections = self.summary["sections"]

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def share(self, reserve_fraction: float) -> float:
        """Seconds this step may take: what is left, less what the later steps are promised."""
        return self.left() - reserve_fraction * self.budget

    def set(self, name: str, **values) -> None:  # noqa: ANN003
        self.sections[name] = values
        self.save()
        shown = values.get("reason") or values.get("note") or ""
        print(f"{name:<12} {values['status'].upper():<8} {shown}".rstrip(), flush=True)

    def save(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.started, 1)
        write_atomic(self.out / "gpu_check.json", json.dumps(self.summary, indent=2))
        write_atomic(self.out / "gpu_check.md", markdown(self.summary))

    # -- steps --

    def environment(self) -> None:
        log = self.out / "environment.log"
        rc, seconds = run_child([sys.executable, str(SCRIPT), "--probe"],
                                min(120.0, self.left()), log, ROOT)
        text = tail(log, 20000)
        try:
            info = json.loads(text[text.index("{"):])
        except ValueError:
            self.set("environment", status="failed", seconds=round(seconds, 1),
                     reason="the probe did not run" + (" (time budget)" if rc is None else f" (exit {rc})"),
                     log=tail(log))
            return
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in info.get("gpus", []))
        self.summary["device"] = gpus or "no GPU"
        broken = [f"{k} {v}" for k, v in info["packages"].items() if v.startswith("missing")
                  and k in ("torch", "torchvision", "open_clip", "zarr", "av", "numpy", "dask")]
        if broken:
            status, reason = "failed", "packages do not import: " + "; ".join(broken)
        elif self.smoke:
            status, reason = "ok", "smoke mode: the CPU" + (f" (GPUs present, not used: {gpus})" if gpus else "")
        elif not info["cuda_available"]:
            status = "failed"
            reason = (f"torch {info['packages']['torch']} (CUDA {info['cuda_build'] or 'not built'}) sees no CUDA "
                      "device: run this on a GPU machine, or --smoke to check the scripts on the CPU")
        elif not info["nvjpeg"].startswith("ok"):
            status, reason = "failed", f"nvJPEG {info['nvjpeg']}"
        else:
            status, reason = "ok", f"{len(info['gpus'])} GPU(s): {gpus}; bf16 {info['bf16']}; nvJPEG {info['nvjpeg']}"
        self.set("environment", status=status, seconds=round(seconds, 1), reason=reason, info=info)

    def gpu_tests(self) -> None:
        if not self.smoke and self.sections["environment"]["status"] != "ok":
            self.set("gpu_tests", status="not run", reason="the environment check failed")
            return
        if importlib.util.find_spec("pytest") is None:
            self.set("gpu_tests", status="failed", reason="pytest is not installed: pip install -e '.[dev]' (or "
                     "make setup)")
            return
        timeout = self.share(0.40)  # the pipeline and the throughput table keep 40 % of the budget
        if timeout < 30:
            self.set("gpu_tests", status="failed", reason=f"no time left in the budget ({self.budget:.0f} s)")
            return
        xml, log = self.out / "gpu_tests.xml", self.out / "gpu_tests.log"
        xml.unlink(missing_ok=True)
        env = {"CUDA_VISIBLE_DEVICES": ""} if self.smoke else {}  # smoke: the CPU, whatever the machine has
        rc, seconds = run_child([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider",
                                 "--junitxml", str(xml), "tests/test_gpu.py"], timeout, log, ROOT, env)
        tests = read_junit(xml) if xml.exists() else read_pytest_lines(tail(log, 200000))
        outcomes = [t["outcome"] for t in tests]
        counts = {o: outcomes.count(o) for o in ("passed", "failed", "error", "skipped")}
        summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
        values = {"seconds": round(seconds, 1), "tests": tests, "counts": counts, "log": str(log)}
        if rc is None:
            self.set("gpu_tests", status="failed", reason=f"stopped by the time budget after {seconds:.0f} s "
                     f"({summary or 'no test finished'})", **values)
        elif counts["failed"] or counts["error"] or (rc not in (0, 5) and not tests):
            first = next((t for t in tests if t["outcome"] in ("failed", "error")), None)
            self.set("gpu_tests", status="failed", reason=f"{summary or f'pytest exit {rc}'}" + (
                f"; first: {first['test']}: {first['message'][:300]}" if first else ""), **values, log_tail=tail(log))
        elif not tests or counts["skipped"] == len(tests):
            why = next((t["message"] for t in tests if t["message"]), "no GPU test collected")
            status = "skipped" if self.smoke else "failed"
            lead = "smoke mode (no visible GPU): every GPU test skipped" if self.smoke else "every GPU test skipped"
            self.set("gpu_tests", status=status, reason=f"{lead}: {why}", **values)
        else:
            self.set("gpu_tests", status="ok", reason=summary, **values)

    def pipeline(self) -> None:
        if not self.smoke and self.sections["environment"]["status"] != "ok":
            self.set("pipeline", status="not run", reason="the environment check failed")
            return
        timeout = self.share(0.15)  # the throughput table keeps 15 %: its headline rows take about a minute
        if timeout < 30:
            self.set("pipeline", status="failed", reason="no time left in the budget")
            return
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        log = self.out / "pipeline.log"
        rc, seconds = run_child([sys.executable, str(SCRIPT), "--pipeline", str(self.work)]
                                + (["--smoke"] if self.smoke else []), timeout, log, self.work)
        steps_file = self.work / "steps.jsonl"
        steps = [json.loads(x) for x in steps_file.read_text().splitlines()] if steps_file.exists() else []
        planned = ["model", *(name for name, _ in pipeline_plan(self.work, self.smoke))]
        done = {s["step"] for s in steps}
        failed = next((s for s in steps if s["rc"] != 0), None)
        for name in planned:
            if name not in done:
                why = ("stopped by the time budget" if rc is None and not failed and name == planned[len(done)]
                       else "not run")
                steps.append({"step": name, "rc": None, "note": why})
        values = {"seconds": round(seconds, 1), "steps": steps, "log": str(log)}
        if failed:
            self.set("pipeline", status="failed", reason=f"step {failed['step']} failed (exit {failed['rc']})",
                     **values)
        elif rc is None:
            self.set("pipeline", status="failed", reason=f"stopped by the time budget during step "
                     f"{planned[len(done)] if len(done) < len(planned) else '?'}", **values)
        elif rc != 0 or len(done) < len(planned):
            self.set("pipeline", status="failed", reason=f"the pipeline process ended with exit {rc}", **values,
                     log_tail=tail(log))
        else:
            run = next(s for s in steps if s["step"] == "finetune").get("figures", {})
            self.set("pipeline", status="ok", reason=f"{len(planned)} steps in {seconds:.0f} s; finetune "
                     f"{run.get('clips_per_s', '?')} clips/s on the {run.get('data_path', '?')} data path", **values)
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def throughput(self) -> None:
        if not self.smoke and self.sections["environment"]["status"] != "ok":
            self.set("throughput", status="not run", reason="the environment check failed")
            return
        timeout = self.left() - 10  # the summary's own seconds
        if timeout < 30:
            self.set("throughput", status="failed", reason="no time left in the budget")
            return
        out, log = self.out / "throughput.json", self.out / "throughput.log"
        out.unlink(missing_ok=True)
        # rows stop starting a minute before the kill (a compile row takes about that long)
        row_budget = max(10.0, timeout - 60) if not self.smoke else max(5.0, timeout - 10)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--out", str(out), "--budget-s",
               f"{row_budget:.0f}"] + (["--smoke", "--rows", SMOKE_THROUGHPUT_ROWS] if self.smoke else [])
        rc, seconds = run_child(cmd, timeout, log, ROOT)
        try:
            table = json.loads(out.read_text())
        except (OSError, ValueError):
            self.set("throughput", status="failed", seconds=round(seconds, 1), reason=(
                "stopped by the time budget before its first row" if rc is None else f"gpu_throughput.py exit {rc}")
                + " and no table", log_tail=tail(log))
            return
        rows = table["rows"]
        errors = [r for r in rows if "error" in r]
        measured = [r for r in rows if "per_s" in r]
        state = ("stopped by the time budget" if rc is None else "complete" if table.get("complete")
                 else f"ended early (exit {rc})")
        values = {"seconds": round(seconds, 1), "json": str(out), "table": table,
                  "markdown": out.with_suffix(".md").read_text() if out.with_suffix(".md").exists() else ""}
        status = "ok" if measured else "failed"
        self.set("throughput", status=status, reason=f"{len(measured)} rows measured, {len(errors)} with errors; "
                 f"{state}", **values)

    def targets(self) -> None:
        table = self.sections["throughput"].get("table")
        if not table:
            self.set("targets", status="not run", reason="no throughput table")
            return
        checks = [{"what": r["what"], "batch": r.get("batch"), "measured": r.get("per_s"), "unit": r.get("unit"),
                   "peak_gib": r.get("peak_gib"), "of_peak": r.get("of_peak"), **t}
                  for r in table["rows"] for t in r.get("targets", [])]
        if self.smoke:
            self.set("targets", status="skipped", reason="smoke mode: a tiny model on the CPU; the targets are for "
                     "ViT-B/16 on one H100/H200", checks=checks, targets=table.get("targets"))
            return
        met = sum(c["met"] is True for c in checks)
        judged = sum(c["met"] is not None for c in checks)
        self.set("targets", status="ok" if met == judged else "missed", reason=f"{met} of {judged} met",
                 checks=checks, targets=table.get("targets"))

    def verdict(self) -> int:
        failed = [n for n in REQUIRED if self.sections[n]["status"] in ("failed", "not run")]
        warnings = [f"throughput row {r['what']}: {r['error']}"
                    for r in (self.sections["throughput"].get("table") or {}).get("rows", []) if "error" in r]
        if self.sections["targets"]["status"] == "missed":
            warnings.append(f"targets: {self.sections['targets']['reason']}")
        if failed:
            reason = "FAIL: " + "; ".join(f"{n}: {self.sections[n].get('reason', '')}" for n in failed)
        else:
            reason = ("PASS (smoke: the scripts run on the CPU; nothing was measured on a GPU)" if self.smoke
                      else "PASS: the install works on this GPU")
        self.set("verdict", status="fail" if failed else "pass", reason=reason, failed=failed, warnings=warnings)
        return 1 if failed else 0


def read_junit(path: Path) -> list[dict]:
    """Each test of a junit XML: its outcome, seconds, the message of a failure or skip, its recorded properties."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (node.get("message") or node.text or "").strip()
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                      "message": " ".join(message.split())[:500], "properties": props})
    return tests


def read_pytest_lines(text: str) -> list[dict]:
    """The outcomes pytest -v printed so far (a run killed before it wrote its junit XML)."""
    tests = []
    for line in text.splitlines():
        for outcome in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            if "::" in line and f" {outcome}" in line:
                name = line.split("::", 1)[1].split(" ", 1)[0]
                tests.append({"test": name, "outcome": outcome.lower(), "seconds": None, "message": "",
                              "properties": {}})
                break
    return tests


def cell(value: object) -> str:
    text = "-" if value is None else f"{value:,.1f}" if isinstance(value, float) else str(value)
    return text.replace("|", "/").replace("\n", " ")


def markdown(summary: dict) -> str:
    """The summary as markdown: one section per step, in order."""
    s = summary["sections"]
    verdict = s["verdict"].get("status", "not run").upper()
    lines = [f"# GPU check: {verdict}" + (" (smoke)" if summary["smoke"] else ""), "",
             f"{summary['date']}; device: {summary.get('device', '?')}; {summary.get('seconds', 0):.0f} s of a "
             f"{summary['budget_s']:.0f} s budget; `{summary['command']}`", ""]

    def head(name: str, title: str) -> None:
        sec = s[name]
        lines.extend([f"## {title}: {sec['status']}", ""])
        if sec.get("reason"):
            lines.extend([sec["reason"], ""])

    head("environment", "environment")
    info = s["environment"].get("info")
    if info:
        lines.append("| | |\n|---|---|")
        lines += [f"| {k} | {cell(v)} |" for k, v in info["packages"].items()]
        lines += [f"| {k} | {cell(info.get(k))} |" for k in ("python", "platform", "cuda_build", "cuda_available",
                                                               "bf16", "cudnn", "nccl", "nvjpeg") if k in info]
        lines += [f"| GPU {i} | {g['name']}, {g['memory_gib']} GiB, sm {g['capability']} |"
                  for i, g in enumerate(info.get("gpus", []))]
        lines.append("")
    head("gpu_tests", "GPU tests (pytest -m gpu)")
    tests = s["gpu_tests"].get("tests") or []
    if tests:
        lines.append("| test | outcome | s | note / recorded figures |\n|---|---|---|---|")
        for t in tests:
            note = "; ".join([t["message"]] * bool(t["message"]) + [f"{k}: {v}" for k, v in t["properties"].items()])
            lines.append(f"| {t['test']} | {t['outcome']} | {cell(t['seconds'])} | {cell(note)} |")
        lines.append("")
    head("pipeline", "pipeline end to end (random weights)")
    steps = s["pipeline"].get("steps") or []
    if steps:
        lines.append("| step | exit | s | figures |\n|---|---|---|---|")
        for st in steps:
            figures = st.get("figures") or {}
            note = ", ".join(f"{k} {v}" for k, v in figures.items()) or st.get("note", "") or st.get("tail", "")[-300:]
            lines.append(f"| {st['step']} | {cell(st.get('rc'))} | {cell(st.get('seconds'))} | {cell(note)} |")
        lines.append("")
    head("throughput", "throughput (benchmarks/gpu_throughput.py)")
    if s["throughput"].get("markdown"):
        lines.extend([s["throughput"]["markdown"].rstrip(), ""])
    head("targets", "targets (one H100/H200)")
    checks = s["targets"].get("checks") or []
    if checks:
        lines.append("| what | batch | measured | target | met |\n|---|---|---|---|---|")
        for c in checks:
            met = {True: "yes", False: "**no**", None: "n/a"}[c["met"]]
            lines.append(f"| {c['what']} | {cell(c['batch'])} | {cell(c['measured'])} {c['unit'] or ''} | "
                         f"{c['target']} | {met} |")
        lines.append("")
    head("verdict", "verdict")
    lines += [f"- warning: {w}" for w in s["verdict"].get("warnings", [])]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU and a tiny model: check that every step runs")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time budget (default 8 min)")
    parser.add_argument("--out-dir", default="cache/gpu-check", help="where the summary and the logs go")
    parser.add_argument("--keep", action="store_true", help="keep the pipeline's world, model and cache (OUT/work)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # child: the environment as JSON
    parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)  # child: the pipeline steps in WORK
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe()))
        return
    if args.pipeline:
        sys.exit(run_pipeline(Path(args.pipeline), args.smoke))
    if args.budget_s < 60:
        print("error: --budget-s must be at least 60 (every step needs some time)", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s, args.smoke, args.keep)
    check.save()
    print(f"gpu check{' (smoke)' if args.smoke else ''}: budget {args.budget_s:.0f} s -> {out / 'gpu_check.md'}",
          flush=True)
    check.environment()
    check.gpu_tests()
    check.pipeline()
    check.throughput()
    check.targets()
    code = check.verdict()
    print(f"summary: {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    sys.exit(code)


if __name__ == "__main__":
    main()
