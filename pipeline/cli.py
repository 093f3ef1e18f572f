"""The ``pipeline`` command. Each sub-command resolves its settings (flag > params.yaml > default)
and calls one stage. User mistakes end with a one-line ``error:`` message, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cachefs import cache_root
from .errors import PipelineError
from .params import Params, load_params

CACHE_ENV = "PIPELINE_CACHE"


class Context:
    def __init__(self, cache: str | None, params_file: str | None, quiet: bool, section: str,
                 no_params: bool = False) -> None:
        if no_params and params_file:
            raise PipelineError("--params and --no-params exclude each other")
        self.cache = cache_root(cache or os.environ.get(CACHE_ENV) or "cache")
        self.params_file = params_file
        self.no_params = no_params
        self.params = Params({} if no_params else load_params(params_file), section)
        self.quiet = quiet

    @classmethod
    def like(cls, other: Context, section: str) -> Context:
        """The same cache and params file, read for another command's group."""
        return cls(str(other.cache), other.params_file, other.quiet, section, other.no_params)


def common_options(section: str) -> Callable:
    """--cache, --params and --quiet on every command; builds a :class:`Context` from them."""

    def decorate(fn: Callable) -> Callable:
        @click.option("--cache", "cache",
                      help=f"Cache folder, or an fsspec URL (s3://bucket/prefix, gs://...) [default: ./cache, or "
                           f"${CACHE_ENV}].")
        @click.option("--params", "params_file", type=click.Path(dir_okay=False),
                      help="Parameters file [default: ./params.yaml if present].")
        @click.option("--no-params", is_flag=True,
                      help="Ignore every params file (./params.yaml too): flags and built-in defaults only.")
        @click.option("--quiet", "-q", is_flag=True, help="Plain log lines instead of progress bars.")
        @functools.wraps(fn)
        def wrapper(cache: str | None, params_file: str | None, no_params: bool, quiet: bool, **kwargs: Any) -> Any:
            return fn(Context(cache, params_file, quiet, section, no_params), **kwargs)

        return wrapper

    return decorate


def dataset_options(fn: Callable) -> Callable:
    from .datasets import DATASETS

    for decorator in reversed([
        click.option("--dataset", "-d", type=click.Choice(DATASETS),
                     help="Dataset format (params: data.dataset)."),
        click.option("--root", type=click.Path(), help="Dataset root folder (params: data.root)."),
        click.option("--split-id", type=click.IntRange(1, 3),
                     help="Official split for UCF101/HMDB51 [default: 1]."),
        click.option("--untrimmed/--trimmed", default=None,
                     help="Kinetics: cut [time_start, time_end] out of full-length videos."),
        click.option("--name", help="Cache name of a csv/folder dataset [default: the format name]."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Hold out this fraction of each class's training videos as 'val' (seeded; for "
                          "flat folders and CSVs without a split column)."),
    ]):
        fn = decorator(fn)
    return fn


def dataset_args(ctx: Context, dataset: str | None, root: str | None, split_id: int | None,
                 untrimmed: bool | None, name: str | None, val_fraction: float | None = None):
    from stages.frames import DatasetArgs

    ds = ctx.params.get("dataset", dataset)
    if ds is None:
        raise PipelineError("no dataset given: pass --dataset NAME or set data.dataset in params.yaml")
    p = ctx.params.for_dataset(ds)
    if p is not ctx.params:
        click.echo(f"note: the params file describes another dataset; its data.* keys are ignored for --dataset {ds} "
                   f"(its {ctx.params.section}.* keys still apply; pass --params FILE for another setup)", err=True)
    return DatasetArgs(dataset=ds, root=p.get("root", root), split_id=int(p.get("split_id", split_id, 1)),
                       untrimmed=bool(p.get("untrimmed", untrimmed, False)), name=p.get("name", name),
                       val_fraction=float(p.get("val_fraction", val_fraction, 0.0)))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="text4vis-pipeline")
def cli() -> None:
    """Transfer CLIP to video recognition with frozen text-embedding classifiers (Text4Vis).

    Stages read videos and write a cache of Zarr stores; every stage is resumable and
    records the fingerprint of the parameters and inputs that made it.

    \b
    Examples:
      pipeline frames --dataset ucf101 --root /data/ucf101
      pipeline status --json
      pipeline export --what frames --dataset ucf101 --split test --format h5 --out test.h5
    """


def frame_options(fn: Callable) -> Callable:
    from .video import INTERPOLATIONS, SEEK_MODES

    for decorator in reversed([
        click.option("--split", "splits", multiple=True,
                     help="Split(s) to process (repeatable) [default: every split of the dataset]."),
        click.option("--num-frames", type=click.IntRange(1), help="Frames kept per video, T_cache [16]."),
        click.option("--height", type=click.IntRange(1), help="Output box height; short side scales to it [256]."),
        click.option("--width", type=click.IntRange(1), help="Output box width (centre crop or pad) [320]."),
        click.option("--interpolation", type=click.Choice(INTERPOLATIONS), help="swscale filter [AREA]."),
        click.option("--seek", type=click.Choice(SEEK_MODES),
                     help="'keyframes' decodes keyframes only: fast, approximate [exact]."),
        click.option("--codec", type=click.Choice(["jpeg", "raw"]),
                     help="Stored frame encoding: JPEG bytes, or lossless uint8 + zstd [jpeg]."),
        click.option("--jpeg-quality", type=click.IntRange(1, 100), help="JPEG quality [90]."),
        click.option("--block-size", type=click.IntRange(1), help="Videos per block (resume unit) [16]."),
        click.option("--workers", type=click.IntRange(1), help="Decoding processes, through dask [1]."),
        click.option("--scheduler-address", help="Use this dask.distributed scheduler instead of a local one."),
        click.option("--replace-mismatched", is_flag=True, default=None,
                     help="Rebuild an output made with other parameters (a matching one is resumed)."),
        click.option("--strict", is_flag=True, default=None, help="Exit with status 1 if any video failed."),
    ]):
        fn = decorator(fn)
    return fn


def _run_frames(ctx: Context, data_kwargs: dict, opts: dict) -> None:
    from stages import frames as frames_stage

    from .framestore import FrameCodec
    from .video import FrameSpec

    p = ctx.params
    data = dataset_args(ctx, **data_kwargs)
    try:
        spec = FrameSpec(
            num_frames=int(p.get("num_frames", opts["num_frames"], 16)),
            height=int(p.get("height", opts["height"], 256)),
            width=int(p.get("width", opts["width"], 320)),
            interpolation=p.get("interpolation", opts["interpolation"], "AREA"),
            seek=p.get("seek", opts["seek"], "exact"),
        )
        codec = FrameCodec(name=p.get("codec", opts["codec"], "jpeg"),
                           quality=int(p.get("jpeg_quality", opts["jpeg_quality"], 90)))
    except ValueError as e:
        raise PipelineError(f"bad frame parameters: {e}") from None
    splits = list(p.get("splits", opts["splits"], []) or [])
    summaries = frames_stage.run(
        ctx.cache, data, splits, spec, codec,
        block_size=int(p.get("block_size", opts["block_size"], 16)),
        workers=int(p.get("workers", opts["workers"], 1)),
        scheduler_address=p.get("scheduler_address", opts["scheduler_address"]),
        replace_mismatched=bool(p.get("replace_mismatched", opts["replace_mismatched"], False)),
        quiet=ctx.quiet,
    )
    failed = any(s["failed"] for s in summaries)
    for s in summaries:
        _print_summary(s)
    if any(s["errors"] for s in summaries):
        raise PipelineError("some blocks did not finish (see above); re-run the same command to retry them")
    if failed and p.get("strict", opts["strict"], False):
        sys.exit(1)


def _print_summary(s: dict, shown: int = 5) -> None:
    click.echo(f"{s['stage']} {s['dataset']}/{s['split']}: {s['total']} videos, {s['ok']} ok, "
               f"{s['failed']} failed -> {s['path']}")
    for f in s["failures"][:shown]:
        click.echo(f"  failed {f['video_id']}: {f['reason']}  ({f['path'] or 'no file'})")
    if s["failed"] > shown:
        click.echo(f"  ... and {s['failed'] - shown} more (pipeline status --json lists them all)")
    for e in s.get("errors", []):
        click.echo(f"  block error: {e}")


@cli.command()
@common_options("frames")
@dataset_options
@frame_options
def frames(ctx: Context, dataset, root, split_id, untrimmed, name, val_fraction, **opts) -> None:
    """Decode videos into the frame store (cache/frames/DATASET/SPLIT).

    Frames are taken at the centres of uniform segments, resized by the decoder (short side to
    HEIGHT, centre crop or pad to WIDTH) and stored in Zarr. Broken or missing videos are recorded
    as failed and reported; the run goes on. A killed run resumes where it stopped.

    \b
    Examples:
      pipeline frames --dataset ucf101 --root /data/ucf101 --split-id 1
      pipeline frames --dataset k400 --root /data/k400 --split val --workers 8
      pipeline frames --dataset csv --root demo/videos.csv --name demo --height 64 --width 64
    """
    _run_frames(ctx, dict(dataset=dataset, root=root, split_id=split_id, untrimmed=untrimmed, name=name,
                         val_fraction=val_fraction), opts)


@cli.command()
@common_options("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of entries) on stdout.")
def status(ctx: Context, as_json: bool) -> None:
    """List what the cache holds: every store with counts and failures, runs, reports and metrics.

    \b
    Examples:
      pipeline status
      pipeline status --json | jq '.[] | select(.failed > 0) | .failures'
    """
    from stages import status as status_stage

    entries = status_stage.run(ctx.cache)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo(f"nothing cached under {ctx.cache}")
    for e in entries:
        if e["stage"] in ("run", "report", "metrics"):
            detail = _describe(e)
            click.echo(f"{e['stage']:<8} {e['name']:<36} {detail}  {e['path']}")
            continue
        if e.get("damaged"):
            state = "DAMAGED"
        elif not e["fingerprint"]:
            state = "unfinished"
        elif e.get("stale"):
            state = "STALE"
        else:
            state = "complete" if e["complete"] else f"{e['pending']} pending"
        unit = "videos" if e["stage"] in ("frames", "features") else "rows"
        click.echo(f"{e['stage']:<8} {e.get('name') or e['dataset']:<36} {e['total']:>7} {unit:<6} {e['ok']:>7} ok "
                   f"{e['failed']:>5} failed  {state:<12} {(e['fingerprint'] or '-')[:12]}  {e['path']}")
        why = e.get("damaged") or e.get("stale")
        if why:
            click.echo(f"  {'damaged' if e.get('damaged') else 'stale'}: {why}")
    if any(e.get("damaged") for e in entries):
        click.echo("damaged outputs: `pipeline verify --repair` marks what must be recomputed", err=True)


def _describe(e: dict) -> str:
    """One line for a run, report or metrics entry of ``status``."""
    if e["stage"] == "run":
        best = e.get("best_val_top1")
        return (f"{e.get('state')}, step {e.get('step')}"
                + (f", best val top-1 {best:.2f}" if best is not None and best >= 0 else "")
                + f"  ({e.get('kind')} head, {e.get('temporal')}, {e.get('model')})")
    if e["stage"] == "metrics":
        return f"top-1 {e['top1']:.2f}" if e.get("top1") is not None else e.get("state", "-")
    return "written"


@cli.command()
@common_options("verify")
@click.option("--repair", is_flag=True, help="Mark damaged blocks pending (delete outputs that cannot be "
                                             "recomputed block by block), so that re-running the stage redoes them.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of entries) on stdout.")
def verify(ctx: Context, repair: bool, as_json: bool) -> None:
    """Read every finished block of every output in the cache and report damage.

    Checks each chunk's CRC-32C, the recorded digests of columns, heads and label embeddings, and
    that every finished video has data and a status. Exit status 1 when something is damaged
    (0 after --repair: re-run the stages that own the repaired outputs).

    \b
    Examples:
      pipeline verify
      pipeline verify --repair && pipeline frames ... && pipeline features ...
    """
    from stages import verify as verify_stage

    results = verify_stage.run(ctx.cache, repair=repair, quiet=ctx.quiet)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            click.echo(f"{'ok' if r['ok'] else 'DAMAGED':<8} {r['path']}")
            for problem in r["problems"][:5]:
                click.echo(f"  {problem}")
            if r.get("repair"):
                click.echo(f"  repaired: {r['repair']}")
        click.echo(f"{sum(not r['ok'] for r in results)} of {len(results)} outputs damaged")
    if any(not r["ok"] for r in results) and not repair:
        sys.exit(1)


@cli.command()
@common_options("world")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: CACHE/world].")
@click.option("--train-per-class", type=click.IntRange(1), help="Training clips per class [8].")
@click.option("--val-per-class", type=click.IntRange(1), help="Validation clips per class [4].")
@click.option("--frames", "num_frames", type=click.IntRange(1), help="Frames per clip [16].")
@click.option("--size", type=click.IntRange(16), help="Frame side in pixels [64].")
@click.option("--seed", type=int, help="World seed [0].")
@click.option("--kind", type=click.Choice(["objects", "order"]), help="Which world [objects].")
def world(ctx: Context, out, train_per_class, val_per_class, num_frames, size, seed, kind) -> None:
    """Generate the embedded demo world: synthetic H.264 clips of coloured shapes.

    Classes are "a <size> <colour> <shape>" (2 sizes x 6 colours x 4 shapes by default). --kind order:
    "a <colour> object then a <colour> object", the classes where frame order matters. The output is
    a generic CSV dataset (videos.csv + classes.txt), read by the regular `csv` adapter.

    \b
    Examples:
      pipeline world
      pipeline frames --dataset csv --root cache/world --name demo --height 64 --width 64
    """
    from stages import world as world_stage

    from .world import WorldSpec

    kind = kind or "objects"
    # the order world has its own params group (order_world), so both worlds live in one params.yaml
    p = ctx.params if kind == "objects" else Context.like(ctx, "order_world").params
    spec = WorldSpec(
        colours=tuple(p.get("colours", None, WorldSpec.colours if kind == "objects" else ("red", "green", "blue",
                                                                                          "yellow"))),
        shapes=tuple(p.get("shapes", None, WorldSpec.shapes)),
        sizes=tuple(p.get("sizes", None, WorldSpec.sizes)),
        train_per_class=int(p.get("train_per_class", train_per_class, WorldSpec.train_per_class)),
        val_per_class=int(p.get("val_per_class", val_per_class, WorldSpec.val_per_class)),
        frames=int(p.get("frames", num_frames, WorldSpec.frames)),
        size=int(p.get("size", size, WorldSpec.size)),
        seed=int(p.get("seed", seed, WorldSpec.seed)),
        kind=kind,
    )
    target = Path(out) if out else ctx.cache / ("world" if kind == "objects" else "world-order")
    path = world_stage.run(target, spec, ctx.quiet)
    click.echo(f"world: {len(spec.classes())} classes -> {path}")



# ---- feature store -------------------------------------------------------------------------

def model_options(fn: Callable) -> Callable:
    for decorator in reversed([
        click.option("--model", "-m", help="open_clip model: a name (ViT-B-16), local-dir:DIR or hf-hub:ORG/NAME "
                                           "(params: model.name)."),
        click.option("--pretrained",
                     help="Pretrained tag (openai) or a local checkpoint file (params: model.pretrained)."),
        click.option("--quick-gelu/--no-quick-gelu", default=None,
                     help="Force QuickGELU (needed for OpenAI weights given as a file) [auto for tags]."),
    ]):
        fn = decorator(fn)
    return fn


def model_spec(ctx: Context, model: str | None, pretrained: str | None, quick_gelu: bool | None,
               dataset: str | None = None):
    """The model from --model / params; for commands that read the cache (``dataset`` given), else the
    one model whose features the cache holds for that dataset."""
    from .models.clip import ModelSpec

    p = ctx.params
    name = p.get("model", model)
    if not name and dataset:
        from stages.inputs import cached_models

        found = cached_models(ctx.cache, dataset)
        if len(found) == 1:
            tag, recorded = next(iter(found.items()))
            return ModelSpec(**recorded) if recorded else ModelSpec(name=tag)
        if found:
            raise PipelineError(f"the cache holds features of {dataset} from several models ({', '.join(found)}): "
                                "choose one with --model")
    if not name:
        raise PipelineError("no model given: pass --model (e.g. ViT-B-16 --pretrained openai, or local-dir:DIR) "
                            "or set model.name in params.yaml")
    return ModelSpec(name=str(name), pretrained=p.get("pretrained", pretrained),
                     quick_gelu=p.get("quick_gelu", quick_gelu))


def cache_dataset(ctx: Context, dataset: str | None) -> str:
    """The dataset's name in the cache: --dataset, else data.name / data.dataset of params.yaml."""
    ds = dataset or ctx.params.get("name", None) or ctx.params.get("dataset", None)
    if not ds:
        raise PipelineError("no dataset given: pass --dataset NAME (its name in the cache)")
    return str(ds)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_features(ctx: Context, dataset: str, spec, opts: dict) -> list[dict]:
    from stages import features as features_stage

    p = ctx.params
    summaries = features_stage.run(
        ctx.cache, dataset, spec, list(p.get("splits", opts.get("splits"), []) or []),
        device=p.get("device", opts.get("device"), None) or default_device(),
        batch_size=int(p.get("batch_size", opts.get("batch_size"), 64)),
        workers=int(p.get("workers", opts.get("workers"), 1)),
        scheduler_address=p.get("scheduler_address", opts.get("scheduler_address")),
        replace_mismatched=bool(p.get("replace_mismatched", opts.get("replace_mismatched"), False)),
        quiet=ctx.quiet)
    for s in summaries:
        _print_summary(s)
    if any(s["errors"] for s in summaries):
        raise PipelineError("some blocks did not finish (see above); re-run the same command to retry them")
    return summaries


@cli.command()
@common_options("features")
@click.option("--dataset", "-d", help="Dataset name in the cache (params: data.name or data.dataset).")
@model_options
@click.option("--split", "splits", multiple=True, help="Split(s) [default: every stored split].")
@click.option("--device", help="torch device [cuda when present, else cpu].")
@click.option("--batch-size", type=click.IntRange(1), help="Frames per forward pass [64].")
@click.option("--workers", type=click.IntRange(1), help="Processes through dask [1].")
@click.option("--scheduler-address", help="Use this dask.distributed scheduler.")
@click.option("--replace-mismatched", is_flag=True, default=None, help="Rebuild an output made with other parameters.")
def features(ctx: Context, dataset, model, pretrained, quick_gelu, **opts) -> None:
    """Encode every stored frame with a CLIP image encoder (cache/features/DATASET/MODEL/SPLIT).

    Uses the model's own preprocessing (resize, centre crop, mean, std). float16 [N, T, D], rows aligned
    with the frame store; videos that failed there stay failed. AMP on GPU, fp32 on CPU (recorded in the
    fingerprint: the two never mix).

    \b
    Examples:
      pipeline features --dataset k400 --model ViT-B-16 --pretrained openai --device cuda
      pipeline features --dataset demo --model local-dir:cache/tiny-clip
      pipeline features --dataset k400 --model ViT-B-16 --pretrained ~/weights/ViT-B-16.pt --quick-gelu
    """
    _run_features(ctx, cache_dataset(ctx, dataset), model_spec(ctx, model, pretrained, quick_gelu), opts)


@cli.command()
@common_options("labels")
@click.option("--dataset", "-d", help="Dataset name in the cache.")
@model_options
@click.option("--encoder", help="'clip' (the model's text tower) or 'hf:NAME_OR_PATH' (mean pooling) [clip].")
@click.option("--template",
              help="paper ('a video of a person {}.'), bare, kinetics28, a file, or a text with {} [paper].")
@click.option("--device", help="torch device [cuda when present, else cpu].")
@click.option("--replace-mismatched", is_flag=True, default=None, help="Rebuild an output made with other parameters.")
def labels(ctx: Context, dataset, model, pretrained, quick_gelu, encoder, template, device, replace_mismatched) -> None:
    """Embed the class names with a text encoder (cache/labels/DATASET/ENCODER).

    \b
    Examples:
      pipeline labels --dataset k400 --model ViT-B-16 --pretrained openai
      pipeline labels --dataset k400 --model ViT-B-16 --pretrained openai --template kinetics28
      pipeline labels --dataset k400 --model ViT-B-16 --pretrained openai --encoder hf:distilbert-base-uncased
      pipeline labels --dataset demo --model local-dir:cache/tiny-clip --encoder hf:all-MiniLM-L6-v2
    """
    from stages import labels as labels_stage

    p = ctx.params
    ds = cache_dataset(ctx, dataset)
    path, emb = labels_stage.run(
        ctx.cache, ds, p.get("encoder", encoder, "clip"), p.get("template", template, "paper"),
        model_spec(ctx, model, pretrained, quick_gelu, dataset=ds),
        device=p.get("device", device, None) or default_device(),
        replace_mismatched=bool(p.get("replace_mismatched", replace_mismatched, False)))
    click.echo(f"labels {ds}: {emb.shape[0]} classes x {emb.shape[1]} -> {path}")


def _heads(ctx: Context, dataset, model, pretrained, quick_gelu, kind, encoder, seed, per_class, solver, shrinkage,
           split, replace_mismatched) -> None:
    from stages import heads as heads_stage

    p = ctx.params
    ds = cache_dataset(ctx, dataset)
    spec = model_spec(ctx, model, pretrained, quick_gelu, dataset=ds)
    shrink = p.get("shrinkage", shrinkage)
    if shrink not in (None, "auto"):
        try:
            shrink = float(shrink)
        except ValueError:
            raise PipelineError(f"--shrinkage must be 'auto' or a number in [0, 1], not {shrink!r}") from None
        if not 0.0 <= shrink <= 1.0:
            raise PipelineError(f"LDA shrinkage must be 'auto' or a number in [0, 1], not {shrink}")
    path, head, _ = heads_stage.run(
        ctx.cache, ds, kind, spec.tag, encoder=p.get("encoder", encoder), seed=int(p.get("seed", seed, 0)),
        per_class=int(p.get("per_class", per_class, 60)), solver=p.get("solver", solver, "svd"), shrinkage=shrink,
        split=p.get("split", split, "train"),
        replace_mismatched=bool(p.get("replace_mismatched", replace_mismatched, False)))
    click.echo(f"head {kind} {ds}: {head.shape[0]} x {head.shape[1]} -> {path}")


def head_options(fn: Callable) -> Callable:
    for decorator in reversed([
        click.option("--dataset", "-d", help="Dataset name in the cache."),
        click.option("--encoder", help="Text encoder of a 'text' head: hf:NAME_OR_PATH."),
        click.option("--seed", type=int, help="Seed of random/orthogonal heads and of the per-class sample [0]."),
        click.option("--per-class", type=click.IntRange(1), help="Training videos per class for lda/prototype [60]."),
        click.option("--solver", type=click.Choice(["svd", "lsqr", "eigen"]), help="LDA solver [svd, as the paper]."),
        click.option("--shrinkage", help="LDA shrinkage: 'auto' or a number (lsqr/eigen solvers)."),
        click.option("--split", help="Split the lda/prototype sample is drawn from [train]."),
        click.option("--replace-mismatched", is_flag=True, default=None,
                     help="Rebuild an output made with other parameters."),
    ]):
        fn = decorator(fn)
    return fn


@cli.command()
@common_options("heads")
@model_options
@click.option("--kind", type=click.Choice(["clip-text", "text", "random", "orthogonal", "prototype", "lda"]),
              help="Head kind (params: heads.kind).")
@head_options
def heads(ctx: Context, model, pretrained, quick_gelu, kind, **opts) -> None:
    """Build a frozen classifier head [C, D] (cache/heads/DATASET/MODEL/KIND).

    \b
    clip-text   the CLIP text embeddings of the class names (labels stage, encoder clip)
    text        another text encoder's embeddings (labels stage, --encoder hf:...)
    random      rows ~ N(0, I), seeded
    orthogonal  first C rows of a random orthogonal D x D matrix (C > D is an error)
    prototype   normalised class means of a per-class sample of cached training features
    lda         LDA coef_ fitted on that sample (same as `pipeline lda`)

    \b
    Examples:
      pipeline heads --dataset k400 --model ViT-B-16 --pretrained openai --kind clip-text
      pipeline heads --dataset k400 --model ViT-B-16 --pretrained openai --kind orthogonal --seed 1
    """
    kind = ctx.params.get("kind", kind)
    if not kind:
        raise PipelineError("no head kind given: pass --kind")
    _heads(ctx, model=model, pretrained=pretrained, quick_gelu=quick_gelu, kind=kind, **opts)


@cli.command()
@common_options("lda")
@model_options
@head_options
def lda(ctx: Context, model, pretrained, quick_gelu, **opts) -> None:
    """Fit the LDA head on 60 cached training videos per class (the paper's Algorithm 2).

    Each sampled video's frame features are averaged over time; scikit-learn's
    LinearDiscriminantAnalysis (solver svd by default) is fitted and its coef_ [C, D] is the head.
    The sample is seeded and its video ids are stored with the head.

    \b
    Examples:
      pipeline lda --dataset k400 --model ViT-B-16 --pretrained openai
      pipeline lda --dataset demo --model local-dir:cache/tiny-clip --per-class 20 --solver lsqr --shrinkage auto
    """
    _heads(ctx, model=model, pretrained=pretrained, quick_gelu=quick_gelu, kind="lda", **opts)


@cli.command()
@common_options("evaluate")
@click.option("--dataset", "-d", help="Dataset name in the cache.")
@model_options
@click.option("--head", "kind", type=click.Choice(["clip-text", "text", "random", "orthogonal", "prototype", "lda"]),
              help="Head kind [clip-text].")
@click.option("--encoder", help="Text encoder of a 'text' head: hf:NAME_OR_PATH.")
@click.option("--from-cache", is_flag=True, default=True, help="Evaluate cached features (no encoder run).")
@click.option("--split", help="Split to evaluate [val].")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(["full", "half", "subsets"]),
              help="full label set; half of the classes x 10 seeds; user subsets (repeatable) [full].")
@click.option("--subsets", "subset_files", multiple=True, type=click.Path(dir_okay=False),
              help="A class-subset file (one class a line, or comma-separated); repeatable.")
@click.option("--head-dataset", help="Use a head built from another dataset's class names (matched by name).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON (e.g. for DVC metrics).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--run", "--run-name", "run_name", help="Evaluate this fine-tuned run (CACHE/runs/RUN) instead of "
              "an untuned head.")
@click.option("--views", help="With --run: temporal clips x spatial crops, e.g. 4x3 [1x1].")
@click.option("--batch-size", type=click.IntRange(1), help="With --run: videos per forward pass [16].")
@click.option("--workers", type=click.IntRange(0), help="With --run: data-loader processes [0].")
@click.option("--device", help="With --run: cpu, cuda or cuda:N [cuda if available].")
def evaluate(ctx: Context, dataset, model, pretrained, quick_gelu, kind, encoder, from_cache, split, protocols,
             subset_files, head_dataset, out, as_json, run_name, views, batch_size, workers, device) -> None:
    """Evaluate a head on cached features, or a fine-tuned run: top-1, top-5, mean class accuracy (mAP
    for multi-label sets).

    Untuned: the video embedding is the temporal average of the cached frame features; logits are
    cosine similarities with the head rows. With --run: the run's model on clips of the frame
    store; --views CxS averages the L2-normalised embeddings of C temporal clips x S crops before
    the head. --dataset other than the run's: zero-shot on that dataset's classes (text heads).

    \b
    Examples:
      pipeline evaluate --run k400-ViT-B-16-openai-clip-text-tap --views 4x3
      pipeline evaluate --run k400-ViT-B-16-openai-clip-text-tap --dataset ucf101
      pipeline evaluate --dataset ucf101 --model ViT-B-16 --pretrained openai --head clip-text --protocol half
      pipeline evaluate --dataset k600 --head clip-text --protocol subsets --subsets s1.csv --subsets s2.csv
      pipeline evaluate --dataset demo --model local-dir:cache/tiny-clip --head lda --protocol full --protocol half
    """
    from stages import evaluate as evaluate_stage

    p = ctx.params
    run_name = p.get("run", run_name)
    if run_name:
        _evaluate_run(ctx, run_name, dataset, split, views, batch_size, workers, device, out, as_json)
        return
    ds = cache_dataset(ctx, dataset)
    spec = model_spec(ctx, model, pretrained, quick_gelu, dataset=ds)
    chosen = tuple(p.get("protocols", protocols, ["full"]))
    result = evaluate_stage.run(
        ctx.cache, ds, p.get("head", kind, "clip-text"), spec.tag, split=p.get("split", split, "val"),
        encoder=p.get("encoder", encoder), head_dataset=p.get("head_dataset", head_dataset), protocols=chosen,
        subset_files=list(p.get("subsets", subset_files, []) or []), out=Path(out) if out else None)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['dataset']}/{result['split']}  head {result['head']} ({result['head_dataset']})  "
               f"model {result['model']}")
    click.echo(f"  {'protocol':<10} {'top-1':>14} {'top-5':>14} {'mean class':>14}")
    for protocol in chosen:
        r = result[protocol]
        cells = [f"{r[k]:6.2f} +- {r[k + '_std']:5.2f}" if f"{k}_std" in r else f"{r[k]:.2f}"
                 for k in ("top1", "top5", "mean_class")]
        click.echo(f"  {protocol:<10} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")
    if result["videos_without_head_class"]:
        click.echo(f"  ({result['videos_without_head_class']} videos of classes the head does not have were left out)")


def parse_views(text: str) -> tuple[int, int]:
    try:
        temporal, spatial = (int(v) for v in text.lower().split("x"))
        if temporal < 1 or spatial < 1:
            raise ValueError
    except ValueError:
        raise PipelineError(f"--views {text!r}: expected CLIPSxCROPS with positive numbers, e.g. 1x1 or 4x3") from None
    return temporal, spatial


def _evaluate_run(ctx: Context, run_name: str, dataset, split, views, batch_size, workers, device, out,
                  as_json) -> None:
    from stages import evaluate as evaluate_stage

    from . import distributed

    p = ctx.params
    try:
        result = evaluate_stage.run_trained(
            ctx.cache, run_name, dataset=dataset, split=p.get("split", split, "val"),
            views=parse_views(str(p.get("views", views, "1x1"))), batch_size=int(p.get("batch_size", batch_size, 16)),
            workers=int(p.get("workers", workers, 0)), device=p.get("device", device), out=Path(out) if out else None,
            quiet=ctx.quiet, progress=not as_json)  # machine output: nothing but the JSON
    finally:
        main = distributed.is_main()
        distributed.teardown()
    if not main:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    keys = ["mAP", "top1", "top5"] if "mAP" in result else ["top1", "top5", "mean_class"]
    click.echo(f"run {result['run']} (trained on {result['trained_on']}, {result['head']} head) on "
               f"{result['dataset']}/{result['split']}, {result['views']} views, {result['videos']} videos: "
               + ", ".join(f"{k} {result[k]:.2f}" for k in keys))


@cli.command()
@common_options("export")
@click.option("--what", type=click.Choice(["frames", "features", "labels", "head"]), default="frames",
              show_default=True, help="Which output to export.")
@click.option("--dataset", "-d", "dataset", required=True, help="Dataset name in the cache.")
@click.option("--split", help="Split (frames, features).")
@model_options
@click.option("--encoder", help="Text encoder of labels / a text head: clip or hf:NAME [clip].")
@click.option("--kind", help="Head kind (--what head).")
@click.option("--format", "fmt", type=click.Choice(["npz", "h5"]), required=True, help="Output format.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file.")
def export(ctx: Context, what, dataset, split, model, pretrained, quick_gelu, encoder, kind, fmt, out) -> None:
    """Export a stored output to NumPy (.npz) or HDF5 (.h5).

    \b
    Keys: frames    `frames` uint8 [N, T, H, W, 3], `frame_index`, `timestamp`, `video_id`, `label`,
                    `status` (1 ok, 2 failed), `reason`
          features  `features` float16 [N, T, D], `video_id`, `label`, `status`, `reason`
          labels    `embeddings` float32 [C, D_text]
          head      `head` float32 [C, D]
    Attributes (HDF5 attrs; `attr_*` keys in .npz): `class_names`, `fingerprint`, `dataset`, `split`.

    \b
    Examples:
      pipeline export --what frames --dataset ucf101 --split test --format h5 --out ucf_test.h5
      pipeline export --what features --dataset k400 --split val -m ViT-B-16 --pretrained openai --format h5 --out f.h5
      pipeline export --what head --dataset k400 -m ViT-B-16 --pretrained openai --kind lda --format npz --out lda.npz
    """
    from stages import export as export_stage

    needs_model = model or what in ("features", "head", "labels")
    spec = model_spec(ctx, model, pretrained, quick_gelu, dataset=dataset) if needs_model else None
    path = export_stage.run(ctx.cache, what, dataset, fmt, out, split=split, model_tag=spec.tag if spec else None,
                            encoder=encoder, kind=kind)
    click.echo(f"wrote {path}")


@cli.command("plot-heads")
@common_options("plot")
@click.option("--dataset", "-d", help="Dataset name in the cache.")
@model_options
@click.option("--kind", "kinds", multiple=True, help="Head kind(s) to plot (repeatable) [every cached head].")
@click.option("--classes", help="Classes to show: a number N (the first N) or a file of class names [20].")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [CACHE/plots/DATASET].")
def plot_heads(ctx: Context, dataset, model, pretrained, quick_gelu, kinds, classes, out) -> None:
    """Plot the inter-class correlation map of heads as PNGs (the paper's Fig. 1).

    \b
    Examples:
      pipeline plot-heads --dataset k400 -m ViT-B-16 --pretrained openai --classes 20
      pipeline plot-heads --dataset demo -m local-dir:cache/tiny-clip --kind clip-text --kind random
    """
    from stages import plots as plots_stage

    p = ctx.params
    ds = cache_dataset(ctx, dataset)
    spec = model_spec(ctx, model, pretrained, quick_gelu, dataset=ds)
    written = plots_stage.run(ctx.cache, ds, spec.tag, list(p.get("kinds", kinds, []) or []),
                              str(p.get("classes", classes, 20)), Path(out) if out else None)
    for path in written:
        click.echo(f"wrote {path}")


@cli.command()
@common_options("frames")
@dataset_options
@frame_options
@model_options
@click.option("--encoder", help="Text encoder of the labels stage: clip or hf:NAME_OR_PATH [clip].")
@click.option("--template", help="Prompt template(s) of the labels stage [paper].")
@click.option("--device", help="torch device for features and labels [cuda when present, else cpu].")
@click.option("--batch-size", type=click.IntRange(1), help="Frames per forward pass [64].")
def extract(ctx: Context, dataset, root, split_id, untrimmed, name, val_fraction, model, pretrained, quick_gelu,
            encoder, template, device, batch_size, **opts) -> None:
    """Fill the cache for a dataset: frames, then CLIP features, then label embeddings.

    Each step is the stage of the same name, with its own params group (frames.*, features.*,
    labels.*); without a model (--model or model.name) only the frame stage runs.

    \b
    Examples:
      pipeline extract --dataset k400 --root /data/k400 --model ViT-B-16 --pretrained openai --workers 8
      pipeline extract --params data/profiles/ucf101.yaml
    """
    from stages import labels as labels_stage

    _run_frames(ctx, dict(dataset=dataset, root=root, split_id=split_id, untrimmed=untrimmed, name=name,
                         val_fraction=val_fraction), opts)
    if not (model or ctx.params.get("model", None)):
        click.echo("note: no model given (--model or model.name): extract ran the frame stage only")
        return
    data = dataset_args(ctx, dataset, root, split_id, untrimmed, name)
    spec = model_spec(ctx, model, pretrained, quick_gelu)
    params = load_params(ctx.params_file)
    feats = Params(params, "features")
    dev = device or default_device()
    _run_features(Context.like(ctx, "features"), data.cache_name, spec, {
        "splits": opts["splits"], "device": dev, "batch_size": batch_size or feats.get("batch_size", None),
        "workers": opts["workers"], "scheduler_address": opts["scheduler_address"],
        "replace_mismatched": opts["replace_mismatched"]})
    lab = Params(params, "labels")
    path, emb = labels_stage.run(ctx.cache, data.cache_name, lab.get("encoder", encoder, "clip"),
                                 lab.get("template", template, "paper"), spec, device=dev,
                                 replace_mismatched=bool(lab.get("replace_mismatched", opts["replace_mismatched"],
                                                                 False)))
    click.echo(f"labels {data.cache_name}: {emb.shape[0]} classes x {emb.shape[1]} -> {path}")


@cli.command()
@common_options("finetune")
@click.option("--dataset", "-d", help="Dataset name in the cache.")
@model_options
@click.option("--head", type=click.Choice(["clip-text", "text", "lda", "prototype", "random", "orthogonal",
                                           "learnable"]), help="Classifier head; learnable = vision-only baseline.")
@click.option("--encoder", help="Text encoder of a 'text' head: hf:NAME_OR_PATH.")
@click.option("--temporal", type=click.Choice(["tap", "ttrans", "tokent1d"]), help="Temporal module [tap].")
@click.option("--frozen-backbone", is_flag=True, default=None,
              help="Train only the temporal module (and projection) on cached features.")
@click.option("--frames", type=click.IntRange(1), help="Frames per clip, T [8].")
@click.option("--shots", type=click.IntRange(0), help="K training videos per class (few-shot), seeded; 0: all [0].")
@click.option("--run", "--run-name", "run_name", help="Run name under CACHE/runs [derived from the settings]; "
              "under torchrun write --run-name (torchrun takes --run for its own --run-path).")
@click.option("--epochs", type=click.IntRange(1), help="Epochs [30].")
@click.option("--batch-size", type=click.IntRange(1), help="Global batch size (all GPUs, all accumulation) [256].")
@click.option("--micro-batch", type=click.IntRange(0), help="Clips per forward pass per process; gradients "
              "accumulate to the global batch (0: no accumulation) [0].")
@click.option("--lr", type=float, help="Learning rate of new modules [5e-5].")
@click.option("--backbone-lr-ratio", type=float, help="The pretrained encoder's lr relative to --lr [0.1].")
@click.option("--temporal-lr", type=float, help="Learning rate of the temporal module [--lr].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [0.2].")
@click.option("--warmup-epochs", type=float, help="Linear warm-up epochs [5].")
@click.option("--min-lr", type=float, help="Cosine floor of the learning rate [5e-6].")
@click.option("--layers", type=click.IntRange(1), help="T-Trans layers [6].")
@click.option("--t1d-init", type=click.Choice(["identity", "shift"]), help="TokenT1D initialisation [identity].")
@click.option("--crop-scale", type=(float, float), help="RandomResizedCrop area range [0.08 1.0].")
@click.option("--flip", type=click.FloatRange(0, 1), help="Horizontal flip probability [0.5].")
@click.option("--grayscale", type=click.FloatRange(0, 1), help="Grayscale probability [0.2].")
@click.option("--randaugment", type=(int, int), help="RandAugment N M (0 0: off) [2 9].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision on GPU (bf16, or fp16 with a scaler) [on].")
@click.option("--grad-checkpointing", is_flag=True, default=None, help="Recompute activations to save memory.")
@click.option("--workers", type=click.IntRange(0), help="Data-loader processes per GPU/process [4].")
@click.option("--device", help="cpu, cuda or cuda:N [cuda if available]; under torchrun: LOCAL_RANK's GPU.")
@click.option("--seed", "seeds", type=int, multiple=True,
              help="Seed of the run [0]; repeat for one run per seed in this process (RUN/s<seed>).")
@click.option("--checkpoint-every", type=click.IntRange(0), help="Steps between checkpoints (0: epoch ends) [0].")
@click.option("--replace-mismatched", is_flag=True, default=None, help="Replace a run made with other parameters.")
@click.option("--objective", type=click.Choice(["ce", "contrastive"]),
              help="ce: cross-entropy against the frozen head (the paper); contrastive: video-text InfoNCE "
              "(the Table 9 baseline) [ce].")
@click.option("--batch-gather/--no-batch-gather", default=None,
              help="Contrastive: score local clips against the batch gathered from all processes [on].")
@click.option("--text", "text_mode", type=click.Choice(["offline", "online"]),
              help="Contrastive: cached label embeddings (offline) or the CLIP text tower trained (online) "
              "[offline].")
@click.option("--text-lr", type=float, help="Contrastive, online text: the text tower's lr [5e-6].")
@click.option("--text-weight-decay", type=float, help="Contrastive, online text: its weight decay [0.2].")
@click.option("--text-template", help="Contrastive, online text: prompt with {} [a video of a person {}.].")
def finetune(ctx: Context, dataset, model, pretrained, quick_gelu, head, encoder, temporal, frozen_backbone, frames,
             shots, run_name, epochs, batch_size, micro_batch, lr, backbone_lr_ratio, temporal_lr, weight_decay,
             warmup_epochs, min_lr, layers, t1d_init, crop_scale, flip, grayscale, randaugment, amp,
             grad_checkpointing, workers, device, seeds, checkpoint_every, replace_mismatched, objective,
             batch_gather, text_mode, text_lr, text_weight_decay, text_template) -> None:
    """Train a video classifier against a frozen head (the paper's recipe, Table A.3 defaults).

    Full fine-tuning trains the CLIP visual encoder (at --backbone-lr-ratio x --lr) and the
    temporal module on clips of the frame store; the head stays the cached one. With
    --frozen-backbone the encoder is not run: the temporal module trains on cached features.
    A killed run resumes from its last checkpoint when the same command is run again.

    \b
    Examples:
      pipeline finetune -d k400 -m ViT-B-16 --pretrained openai --head clip-text --temporal tokent1d
      torchrun --nproc_per_node=8 -m pipeline finetune -d k400 -m ViT-B-16 --pretrained openai --head clip-text
      pipeline finetune --frozen-backbone -d demo -m local-dir:cache/tiny-clip --head learnable --shots 2
      torchrun --nproc_per_node=2 -m pipeline finetune -d demo -m local-dir:cache/tiny-clip --objective contrastive
    """
    from stages import finetune as finetune_stage

    from . import distributed
    from .clips import AugmentConfig
    from .training import TrainConfig

    p = ctx.params
    kind = p.get("temporal", temporal, "tap")
    with settings_errors():
        cfg = TrainConfig(
            epochs=int(p.get("epochs", epochs, 30)), batch_size=int(p.get("batch_size", batch_size, 256)),
            micro_batch=int(p.get("micro_batch", micro_batch, 0)), lr=float(p.get("lr", lr, 5e-5)),
            backbone_lr_ratio=float(p.get("backbone_lr_ratio", backbone_lr_ratio, 0.1)),
            temporal_lr=p.get("temporal_lr", temporal_lr),
            weight_decay=float(p.get("weight_decay", weight_decay, 0.2)),
            warmup_epochs=float(p.get("warmup_epochs", warmup_epochs, 5.0)),
            min_lr=float(p.get("min_lr", min_lr, 5e-6)),
            checkpoint_every=int(p.get("checkpoint_every", checkpoint_every, 0)),
            amp=bool(p.get("amp", amp, True)), workers=int(p.get("workers", workers, 4)))
    if cfg.temporal_lr is not None:
        cfg.temporal_lr = float(cfg.temporal_lr)
    spec = model_spec(ctx, model, pretrained, quick_gelu, dataset=cache_dataset(ctx, dataset))
    common = dict(encoder=p.get("encoder", encoder), run_name=p.get("run", run_name),
                  frames=int(p.get("frames", frames, 8)), shots=int(p.get("shots", shots, 0)) or None,
                  layers=int(p.get("layers", layers, 6)), device=p.get("device", device),
                  replace_mismatched=bool(p.get("replace_mismatched", replace_mismatched, False)), quiet=ctx.quiet)
    head_kind = p.get("head", head, "clip-text")
    goal = finetune_stage.Objective(
        kind=p.get("objective", objective, "ce"), batch_gather=bool(p.get("batch_gather", batch_gather, True)),
        text=p.get("text", text_mode, "offline"), text_lr=float(p.get("text_lr", text_lr, 5e-6)),
        text_weight_decay=float(p.get("text_weight_decay", text_weight_decay, 0.2)),
        template=str(p.get("text_template", text_template, "a video of a person {}.")))
    common["objective"] = goal
    configured = p.get("seed", None)  # params.yaml may list several seeds too
    configured = 0 if configured is None else configured
    seed_list = list(seeds) if seeds else [int(v) for v in (configured if isinstance(configured, list) else
                                                             [configured])]
    name = common.pop("run_name")
    if len(seed_list) > 1 and not name:
        raise PipelineError("several --seed values need a --run name (runs go to RUN/s<seed>)")
    results = []
    try:
        for one_seed in seed_list:
            cfg.seed = one_seed
            run_name = f"{name}/s{one_seed}" if name and len(seed_list) > 1 else name
            if p.get("frozen_backbone", frozen_backbone, False):
                cfg.workers = int(p.get("workers", workers, 0))
                result = finetune_stage.run(ctx.cache, cache_dataset(ctx, dataset), spec.tag, head_kind, kind, cfg,
                                            spec=spec, run_name=run_name, **common)
            else:
                ra = p.get("randaugment", randaugment, (2, 9))
                with settings_errors():
                    augment = AugmentConfig(
                        crop_scale=tuple(float(v) for v in p.get("crop_scale", crop_scale, (0.08, 1.0))),
                        flip=float(p.get("flip", flip, 0.5)), grayscale=float(p.get("grayscale", grayscale, 0.2)),
                        randaugment_ops=int(ra[0]), randaugment_magnitude=int(ra[1]))
                result = finetune_stage.run_full(
                    ctx.cache, cache_dataset(ctx, dataset), spec, head_kind, kind, cfg, augment=augment,
                    t1d_init=p.get("t1d_init", t1d_init, "identity"), run_name=run_name,
                    grad_checkpointing=bool(p.get("grad_checkpointing", grad_checkpointing, False)), **common)
            results.append(result)
    finally:
        main = distributed.is_main()
        distributed.teardown()
    if main:
        for result in results:
            shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()
                     if k.startswith(("val_", "best"))}
            click.echo(f"run {result['run']}: {result['steps']} steps; "
                       + ", ".join(f"{k} {v}" for k, v in shown.items()) + f" -> {result['path']}")


@cli.command("import")
@common_options("import")
@dataset_options
@click.option("--from", "source", type=click.Path(file_okay=False), help="Folder of <video_id>.npy / .h5 files.")
@click.option("--model-tag", help="Cache key for these features, used as --model by later commands.")
@click.option("--num-frames", type=click.IntRange(1), help="Frames per video in the store (resampled) [8].")
@click.option("--block-size", type=click.IntRange(1), help="Videos per block [16].")
@click.option("--replace-mismatched", is_flag=True, default=None, help="Rebuild an output made from other inputs.")
def import_(ctx: Context, dataset, root, split_id, untrimmed, name, val_fraction, source, model_tag, num_frames,
            block_size, replace_mismatched) -> None:
    """Import per-video features made by another extractor into a feature store.

    Videos come from the dataset's annotations (any adapter); each is read from
    FROM/<video_id>.npy or FROM/<video_id>.h5 (dataset `features`), shaped [frames, dim], and
    resampled to NUM_FRAMES by segment centres. Later commands use the store with --model MODEL_TAG.

    \b
    Example:
      pipeline import -d ucf101 --root /data/ucf101 --from /data/ucf101-vitl14-feats --model-tag vitl14-ext
      pipeline heads -d ucf101 --model vitl14-ext --kind prototype
    """
    from stages import import_features

    p = ctx.params
    tag = p.get("model_tag", model_tag)
    src = p.get("from", source)
    if not tag or not src:
        raise PipelineError("import needs --from DIR and --model-tag TAG")
    summaries = import_features.run(
        ctx.cache, dataset_args(ctx, dataset, root, split_id, untrimmed, name, val_fraction), Path(src), str(tag),
        int(p.get("num_frames", num_frames, 8)), block_size=int(p.get("block_size", block_size, 16)),
        replace_mismatched=bool(p.get("replace_mismatched", replace_mismatched, False)), quiet=ctx.quiet)
    for s in summaries:
        _print_summary(s)


@cli.command()
@common_options("pretrain")
@click.option("--dataset", "-d", help="Dataset name in the cache (the demo world) [data.name].")
@click.option("--out", type=click.Path(file_okay=False), help="Model folder [CACHE/tiny-clip].")
@click.option("--steps", type=click.IntRange(1), help="Training steps [600].")
@click.option("--batch-size", type=click.IntRange(2), help="Frame-caption pairs per step [128].")
@click.option("--lr", type=float, help="Peak learning rate [5e-4].")
@click.option("--seed", type=int, help="Seed [0].")
@click.option("--heldout", multiple=True, help="Class never shown in pretraining (repeatable; params: list).")
def pretrain(ctx: Context, dataset, out, steps, batch_size, lr, seed, heldout) -> None:
    """Pretrain the demo's tiny CLIP (open_clip CLIP, contrastive loss) on frame-caption pairs of the world.

    Saved as an open_clip local-dir: model (open_clip_config.json + weights), loaded by every later
    stage exactly like a real CLIP: --model local-dir:cache/tiny-clip.

    \b
    Example:
      pipeline pretrain --dataset demo --steps 600 --heldout "a large blue ring"
    """
    from stages import pretrain as pretrain_stage

    from .pretrain import PretrainConfig

    p = ctx.params
    defaults = PretrainConfig()
    cfg = PretrainConfig(**{k: type(getattr(defaults, k))(p.get(k, None, getattr(defaults, k)))
                            for k in defaults.as_dict()} | {
        k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}.items() if v is not None})
    target = Path(p.get("out", out, None) or ctx.cache / "tiny-clip")
    summary = pretrain_stage.run(ctx.cache, cache_dataset(ctx, dataset), target, cfg,
                                 list(p.get("heldout", heldout, []) or []), ctx.quiet)
    click.echo(f"tiny CLIP: {cfg.steps} steps on {summary['clips']} clips, loss {summary['first_loss']:.2f} -> "
               f"{summary['final_loss']:.2f} -> local-dir:{target}")


@cli.command()
@common_options("predict")
@click.argument("videos", nargs=-1, required=True, type=click.Path())
@model_options
@click.option("--labels", "labels_text", help="Comma-separated label names: 'jumping,running,swimming'.")
@click.option("--labels-file", type=click.Path(dir_okay=False), help="One label name a line.")
@click.option("--template", help="Prompt template: paper, bare, kinetics28, a file, or a text with {} [paper].")
@click.option("--frames", type=click.IntRange(1), help="Frames per video [8].")
@click.option("--device", help="torch device [cuda when present, else cpu].")
@click.option("--run", "--run-name", "run_name", help="A fine-tuned run (CACHE/runs/RUN) as the classifier; "
              "without --labels it uses the run's own classes.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(ctx: Context, videos, model, pretrained, quick_gelu, labels_text, labels_file, template, frames, device,
            run_name, as_json) -> None:
    """Label videos with your own label names (zero-shot) or with a fine-tuned run; prints the top-5.

    Zero-shot (--model): frames at the centres of uniform segments, CLIP image features averaged
    over time, cosine with the text embeddings of the labels, softmax at CLIP's logit scale.
    --run: the run's video model; --labels are embedded by the run's text encoder.

    \b
    Examples:
      pipeline predict clip.mp4 -m ViT-B-16 --pretrained openai --labels "juggling,skateboarding,surfing"
      pipeline predict a.mp4 b.webm -m local-dir:cache/tiny-clip --labels-file labels.txt --template "a photo of a {}"
      pipeline predict clip.mp4 --run k400-ViT-B-16-openai-clip-text-tap
    """
    from stages import predict as predict_stage

    p = ctx.params
    run_name = p.get("run", run_name)
    names = None
    if labels_file:
        path = Path(labels_file)
        if not path.is_file():
            raise PipelineError(f"labels file not found: {path}")
        names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
    elif labels_text:
        names = [n.strip() for n in labels_text.split(",") if n.strip()]
    elif not run_name:
        raise PipelineError("give the label names: --labels 'a,b,c' or --labels-file FILE (or a fine-tuned --run)")
    if run_name:
        results = predict_stage.run_trained(list(videos), ctx.cache, run_name, names,
                                            template=p.get("template", template, "paper"),
                                            device=p.get("device", device, None) or default_device())
    else:
        results = predict_stage.run(list(videos), names, model_spec(ctx, model, pretrained, quick_gelu),
                                    template=p.get("template", template, "paper"),
                                    frames=int(p.get("frames", frames, 8)),
                                    device=p.get("device", device, None) or default_device())
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["video"])
        if "error" in r:
            click.echo(f"  failed: {r['error']}")
            continue
        for name, prob in r["top"]:
            click.echo(f"  {prob:6.1%}  {name}")
    if any("error" in r for r in results):
        sys.exit(1)


@cli.command()
@common_options("report")
@click.option("--dataset", "-d", help="The demo world's name in the cache [data.name].")
@click.option("--out", type=click.Path(file_okay=False), help="Report folder [CACHE/report].")
def report(ctx: Context, dataset, out) -> None:
    """Write the demo report (markdown + PNG): the paper's Tables 6-9, zero-shot, Fig. 1 and Fig. A.4.

    Every number comes from the cache: run metrics, training histories, untuned evaluations.
    Prints the report at the end.
    """
    from stages import report as report_stage

    ft = Context.like(ctx, "finetune").params
    keys = ["frames", "epochs", "batch_size", "lr", "backbone_lr_ratio", "warmup_epochs", "min_lr", "crop_scale",
            "flip", "grayscale", "randaugment"]
    settings = ", ".join(f"{k} {ft.get(k, None)}" for k in keys if ft.get(k, None) is not None)
    note = (f"Full fine-tuning settings (params.yaml `finetune`): {settings}; AdamW betas (0.9, 0.98), weight decay "
            "0.2 (the paper's Table A.3 values for the rest)." if settings else "")
    path, text = report_stage.run(ctx.cache, Path(out) if out else ctx.cache / "report",
                                  dataset=cache_dataset(ctx, dataset), settings_note=note)
    click.echo(text)
    click.echo(f"report -> {path}")


def main() -> None:
    """Run the CLI; every mistake a user or the environment can cause ends in one ``error:`` line."""
    warnings.showwarning = _show_warning
    try:
        code = cli.main(standalone_mode=False)
    except click.UsageError as e:  # a wrong flag or value: one line, and where to look
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        _fail(" ".join(f"{e.format_message()}{where}".split()), 2)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except PipelineError as e:
        _fail(str(e), 2)
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        from .files import describe_os_error

        _fail(f"{describe_os_error(e)}" + (f": {e.filename}" if e.filename else ""), 2)
    except (ValueError, RuntimeError) as e:
        if "checksum" not in str(e).lower():
            raise
        _fail(f"damaged data in the cache ({' '.join(str(e).split())[:160]}): run `pipeline verify --repair` "
              "and re-run the stage", 2)
    sys.exit(code if isinstance(code, int) else 0)


# Errors of the machine, not of the program: a full disk, a read-only or forbidden folder.
# Also paths that cannot be made (a file where a folder should be): the user's to fix.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                      errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one ``warning:`` line on stderr, without the source line that raised them."""
    click.echo(f"warning: {message}", err=True)


@contextlib.contextmanager
def settings_errors():
    """Invalid values found by a settings dataclass (ValueError) as a one-line error."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise PipelineError(f"bad settings: {e}") from None


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
