"""The ``pipeline`` command. Each sub-command resolves its settings (flag > params.yaml > default, from
the typed settings of :mod:`pipeline.core.settings`) and calls one stage. User mistakes end with a one-line
``error:`` message, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.core import settings as S
from pipeline.core.cachefs import cache_root
from pipeline.core.errors import PipelineError, read_error
from pipeline.core.params import DEFAULT_PARAMS, Params
from pipeline.core.settings import load_params

CACHE_ENV = "PIPELINE_CACHE"


class Context:
    def __init__(self, cache: str | None, params_file: str | None, quiet: bool, section: str,
                 no_params: bool = False) -> None:
        if no_params and params_file:
            raise PipelineError("--params and --no-params exclude each other")
        self.cache = cache_root(cache or os.environ.get(CACHE_ENV) or "cache")
        self.params_file = params_file
        self.no_params = no_params
        self._loaded = {} if no_params else load_params(params_file)
        self.params = Params(self._loaded, section)
        self.quiet = quiet
        self.flags: dict[str, Any] = {}  # the command's settings flags as given (None: not given)

    def params_for(self, section: str) -> Params:
        return Params(self._loaded, section)

    def resolve(self, cls: type, flags: dict[str, Any], group: str | None = None) -> S.Resolved:
        """The command's settings (from params ``group`` instead of the settings' own when given); old
        spellings and ignored params files are reported on stderr."""
        resolved = S.resolve(cls, self.params_for if group is None else lambda _: self.params_for(group), flags)
        for line in resolved.notes:
            click.echo(line, err=True)
        return resolved


# ---- options made from the settings ------------------------------------------------------------

def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


class ParamsAwareCommand(click.Command):
    """A command that knows its params file before --help is rendered, wherever --help stands on the line:
    ``--help --params k400.yaml`` shows k400.yaml's values (click handles --help as soon as it parses it)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--no-params":
                ctx.meta["no_params"] = True
            elif arg == "--params" and i + 1 < len(args):
                ctx.meta["params_file"] = args[i + 1]
            elif arg.startswith("--params="):
                ctx.meta["params_file"] = arg.split("=", 1)[1]
        return super().parse_args(ctx, args)


class SettingOption(click.Option):
    """An option whose --help default is the effective one: the value of the params file in use (``--params
    FILE``, else ./params.yaml; none with ``--no-params``) when it sets one."""

    def __init__(self, *args: Any, settings_cls: type, field: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings_cls, self.field = settings_cls, field

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        k: S.Knob = self.field.knob
        default = S.default_of(self.field)
        text = k.default_text or (None if default is None or default is False else _shown(default))
        found = False
        if not ctx.meta.get("no_params"):
            chosen = ctx.meta.get("params_file")
            try:
                with warnings.catch_warnings():  # a deprecated params file is reported when a command runs
                    warnings.simplefilter("ignore")
                    params = load_params(chosen)
                found, value, where, _ = Params(params, k.section or self.settings_cls.SECTION).lookup(
                    self.field.name, k.old_keys)
            except PipelineError:
                found = False
        if found:
            text = (f"{_shown(value)} from {ctx.meta.get('params_file') or DEFAULT_PARAMS} {where}"
                    + (f"; built in: {text}" if text else ""))
        if text:
            extra["default"] = text
        return extra


def setting_options(cls: type) -> Callable:
    """One click option per field of ``cls`` (plus hidden, deprecated spellings)."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(S.settings_fields(cls)):
            k: S.Knob = f.knob
            if k.toggle:
                decls = [f"--{k.toggle}"]
            else:
                decls = [S.flag_of(f)] + ([k.short] if k.short else [])
            common = dict(type=None if k.is_flag or k.toggle else S.click_type(cls, f), multiple=k.multiple)
            kwargs: dict[str, Any] = dict(default=None, help=k.help, **common)
            if k.is_flag:
                kwargs["is_flag"] = True
            for old in reversed(k.old_flags):
                fn = click.option(old, S.old_dest(old), hidden=True, is_flag=k.is_flag, default=None,
                                  **common)(fn)
            fn = click.option(*decls, f.name, cls=SettingOption, settings_cls=cls, field=f, **kwargs)(fn)
        if issubclass(cls, S.DataSource):
            fn = click.option("--name", S.old_dest("--name"), hidden=True)(fn)
        return fn

    return decorate


def command(name: str, cls: type | None, section: str | None = None,
            group_of: Callable[[dict[str, Any]], str | None] | None = None) -> Callable:
    """A sub-command with --cache, --params, --no-params, --quiet and, for ``cls``, its settings as
    options, --print-config, and the resolved settings passed to the function as ``s``. ``group_of(flags)``:
    the params group the settings come from when the flags choose another one (``world --kind order``), so
    that --print-config says what the command reads."""

    def decorate(fn: Callable) -> Callable:
        flag_names = set()
        if cls is not None:
            for f in S.settings_fields(cls):
                flag_names.add(f.name)
                flag_names.update(S.old_dest(o) for o in f.knob.old_flags)
            if issubclass(cls, S.DataSource):
                flag_names.add(S.old_dest("--name"))

        @click.option("--cache", "cache",
                      help=f"Cache folder, or an fsspec URL (s3://bucket/prefix, gs://...) [default: ./cache, or "
                           f"${CACHE_ENV}].")
        @click.option("--params", "params_file", type=click.Path(dir_okay=False),
                      help="Parameters file [default: ./params.yaml if present].")
        @click.option("--no-params", is_flag=True,
                      help="Ignore every params file (./params.yaml too): flags and built-in defaults only.")
        @click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines: results and errors only.")
        @functools.wraps(fn)
        def wrapper(cache: str | None, params_file: str | None, no_params: bool, quiet: bool, **kwargs: Any) -> Any:
            ctx = Context(cache, params_file, quiet, section or (cls.SECTION if cls else name), no_params)
            if cls is None:
                return fn(ctx, **kwargs)
            print_config = kwargs.pop("print_config", False)
            flags = {k: kwargs.pop(k) for k in list(kwargs) if k in flag_names}
            ctx.flags = flags
            resolved = ctx.resolve(cls, flags, group_of(flags) if group_of else None)
            if print_config:
                print_settings(name, cls, resolved, ctx)
                return None
            return fn(ctx, resolved.values, **kwargs)

        if cls is not None:
            wrapper = click.option("--print-config", is_flag=True,
                                   help="Print the resolved settings and where each came from, and exit.")(wrapper)
            wrapper = setting_options(cls)(wrapper)
        return cli.command(name, cls=ParamsAwareCommand)(wrapper)

    return decorate


def print_settings(name: str, cls: type, resolved: S.Resolved, ctx: Context) -> None:
    source = "no params file" if ctx.no_params else (ctx.params_file or
                                                     (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else "none"))
    click.echo(f"pipeline {name} (flag > params file > default; params file: {source}; cache: {ctx.cache})")
    for line in S.describe(cls, resolved):
        click.echo(line)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="text4vis-pipeline")
def cli() -> None:
    """Transfer CLIP to video recognition with frozen text-embedding classifiers (Text4Vis).

    Stages read videos and write a cache of Zarr stores; every stage is resumable and
    records the fingerprint of the parameters and inputs that made it. Every setting is a flag and
    a params.yaml key (flag > params.yaml > default); `pipeline config COMMAND` shows them resolved.

    \b
    Examples:
      pipeline frames --format ucf101 --root /data/ucf101
      pipeline status --json
      pipeline export --what frames --dataset ucf101 --split test --out test.h5
    """


@cli.command("config")
@click.argument("command_name", metavar="COMMAND", type=click.Choice(sorted(S.COMMANDS)))
@click.option("--params", "params_file", type=click.Path(dir_okay=False),
              help="Parameters file [default: ./params.yaml if present].")
@click.option("--no-params", is_flag=True, help="Ignore every params file: built-in defaults only.")
def config(command_name: str, params_file: str | None, no_params: bool) -> None:
    """Print COMMAND's settings resolved from params.yaml and the defaults, with where each came from.

    Flags win over both; `pipeline COMMAND [flags] --print-config` shows them with your flags.

    \b
    Examples:
      pipeline config finetune
      pipeline config frames --params data/profiles/k400.yaml
    """
    cls = S.COMMANDS[command_name]
    ctx = Context(None, params_file, True, cls.SECTION, no_params)
    print_settings(command_name, cls, ctx.resolve(cls, {}), ctx)


def dataset_args(s: Any):
    """The frame stage's view of a :class:`~pipeline.core.settings.DataSource`."""
    from stages.frames import DatasetArgs

    if not s.format and s.dataset:
        from pipeline.media.datasets import DATASETS

        raise PipelineError(f"--dataset {s.dataset!r} is not a dataset format and no --format was given: pass "
                            f"--format ({', '.join(DATASETS)}); --dataset names the dataset in the cache")
    if not s.format:
        raise PipelineError("no dataset given: pass --format FORMAT (k400, ucf101, ..., csv, folder) and --root, or "
                            "set data.format in params.yaml")
    return DatasetArgs(dataset=s.format, root=s.root, split_id=s.split_id, untrimmed=s.untrimmed, name=s.dataset,
                       val_fraction=s.val_fraction)


def _run_frames(ctx: Context, s: S.FramesSettings) -> None:
    from pipeline.media.video import FrameSpec
    from pipeline.storage.framestore import FrameCodec
    from stages import frames as frames_stage

    data = dataset_args(s)
    try:
        spec = FrameSpec(num_frames=s.cache_frames, height=s.height, width=s.width, interpolation=s.interpolation,
                         seek=s.seek)
        codec = FrameCodec(name=s.codec, quality=s.jpeg_quality)
    except ValueError as e:
        raise PipelineError(f"bad frame parameters: {e}") from None
    summaries = frames_stage.run(ctx.cache, data, s.splits, spec, codec, block_size=s.block_size, workers=s.workers,
                                 scheduler_address=s.scheduler_address, replace_mismatched=s.replace_mismatched,
                                 quiet=ctx.quiet, retry_failed=s.retry_failed)
    failed = any(x["failed"] for x in summaries)
    for x in summaries:
        _print_summary(x)
    if any(x["errors"] for x in summaries):
        raise PipelineError("some blocks did not finish (see above); re-run the same command to retry them")
    if failed and s.strict:
        sys.exit(1)


def _print_summary(s: dict, shown: int = 5) -> None:
    change = s.get("change")
    if change:
        parts = [f"{change[k]} {k}" for k in ("added", "dropped", "redone", "retried") if change[k]]
        if change.get("new_classes"):
            parts.append(f"{change['new_classes']} new classes")
        click.echo(f"{s['stage']} {s['dataset']}/{s['split']}: {', '.join(parts) or 'classes changed'} "
                   f"-> snapshot {change['snapshot']}")
    click.echo(f"{s['stage']} {s['dataset']}/{s['split']}: {s['total']} videos, {s['ok']} ok, "
               f"{s['failed']} failed" + (f", {s['dropped']} dropped (until `pipeline compact`)" if s.get("dropped")
                                          else "") + f" -> {s['path']}")
    for f in s["failures"][:shown]:
        click.echo(f"  failed {f['video_id']}: {f['reason']}  ({f['path'] or 'no file'})")
    if s["failed"] > shown:
        click.echo(f"  ... and {s['failed'] - shown} more (`pipeline status --json --all-failures` lists them all)")
    for note in s.get("notes", []):
        click.echo(f"  note: {note}")
    for e in s.get("errors", []):
        click.echo(f"  block error: {e}")


@command("frames", S.FramesSettings)
def frames(ctx: Context, s: S.FramesSettings) -> None:
    """Decode videos into the frame store (cache/frames/DATASET/SPLIT).

    Frames are taken at the centres of uniform segments, resized by the decoder (short side to
    HEIGHT, centre crop or pad to WIDTH) and stored in Zarr. Broken or missing videos are recorded
    as failed and reported; the run goes on. A killed run resumes where it stopped.

    \b
    Examples:
      pipeline frames --format ucf101 --root /data/ucf101 --split-id 1
      pipeline frames --format k400 --root /data/k400 --split val --workers 8
      pipeline frames --format folder --root ~/clips --dataset myclips --val-fraction 0.1
      pipeline frames --format csv --root demo/videos.csv --dataset demo --height 64 --width 64
    """
    _run_frames(ctx, s)

@command("status", None)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of entries) on stdout.")
@click.option("--all-failures", is_flag=True, help="List every failed video (default: the first 20 of each "
                                                   "store, and counts by reason).")
def status(ctx: Context, as_json: bool, all_failures: bool) -> None:
    """List what the cache holds: every store with counts and failures, runs, reports and metrics.

    Marks outputs DAMAGED (what can be seen without reading the data: missing arrays or chunk files,
    truncated chunks, an altered head, a run's unreadable files or truncated checkpoint), STALE (made
    from inputs rebuilt since) and RANDOM WEIGHTS (features of a model without pretrained weights), and
    says when `pipeline verify` last read each one whole.

    \b
    Examples:
      pipeline status
      pipeline status --json | jq '.[] | select(.failed > 0) | .failure_reasons'
      pipeline status --json --all-failures | jq '.[] | .failures[]'
    """
    from stages import status as status_stage

    entries = status_stage.run(ctx.cache, all_failures=all_failures)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo(f"nothing cached under {ctx.cache}")
    for e in entries:
        if e["stage"] in ("run", "report", "metrics"):
            detail = _describe(e)
            click.echo(f"{e['stage']:<8} {e['name']:<36} {detail}  {e['path']}")
        else:
            if e.get("damaged"):
                state = "DAMAGED"
            elif e.get("interrupted"):
                state = "interrupted"
            elif not e["fingerprint"]:
                state = "unfinished"
            elif e.get("stale"):
                state = "STALE"
            else:
                state = "complete" if e["complete"] else f"{e['pending']} pending"
            unit = "videos" if e["stage"] in ("frames", "features") else "rows"
            click.echo(f"{e['stage']:<8} {e.get('name') or e['dataset']:<36} {e['total']:>7} {unit:<6} "
                       f"{e['ok']:>7} ok {e['failed']:>5} failed  {state:<12} {(e['fingerprint'] or '-')[:12]}  "
                       f"{e['path']}")
            if e.get("failure_reasons"):
                click.echo("  failed: " + ", ".join(f"{n} {why}" for why, n in e["failure_reasons"].items()))
        notes = []
        if e.get("damaged"):
            notes.append(f"damaged: {e['damaged']}")
        if e.get("stale"):
            notes.append(f"stale: {e['stale']}")
        if e.get("older_snapshot"):
            notes.append(f"older snapshot: {e['older_snapshot']}")
        if e.get("version"):
            notes.append(f"snapshot {e['version']} ({(e.get('snapshot') or '')[:12]})"
                         + (f", {e['dropped']} dropped videos kept until `pipeline compact`" if e.get("dropped")
                            else ""))
        if e.get("interrupted"):
            notes.append(e["interrupted"])
        if e.get("random_weights"):
            notes.append("RANDOM WEIGHTS: made with a model that has no pretrained weights (--random-weights)")
        v = e.get("verified")
        if v:
            notes.append(f"verified {v['at']}: {'ok' if v['ok'] else 'DAMAGED'}")
        for note in notes:
            click.echo(f"  {note}")
    unverified = sum(1 for e in entries if "verified" in e and not e["verified"])
    if unverified:
        click.echo(f"{unverified} of {sum('verified' in e for e in entries)} outputs never read whole since they were "
                   "made: `pipeline verify` checks every chunk (status sees missing files only)")
    if any(e.get("damaged") for e in entries):
        click.echo("damaged outputs: `pipeline verify --repair` marks what must be recomputed", err=True)


def _describe(e: dict) -> str:
    """One line for a run, report or metrics entry of ``status``."""
    if e["stage"] == "run":
        if e.get("damaged"):
            return "DAMAGED"
        best = e.get("best_val_top1")
        return (f"{'STALE, ' if e.get('stale') else ''}{e.get('state')}, step {e.get('step')}"
                + (f", best val top-1 {best:.2f}" if best is not None and best >= 0 else "")
                + f"  ({e.get('kind')} head, {e.get('temporal')}, {e.get('model')})")
    if e["stage"] == "metrics":
        return f"top-1 {e['top1']:.2f}" if e.get("top1") is not None else e.get("state", "-")
    return "written"


@command("compact", S.CompactSettings)
def compact(ctx: Context, s: S.CompactSettings) -> None:
    """Rewrite a dataset's frame stores, and their feature stores, without the videos dropped from the dataset.

    Dropped videos are masked (never read) but kept, so that older snapshots can still be evaluated; compaction
    removes them for good. Bytes are copied, nothing is decoded. The compacted stores are another output (their
    rows moved): heads and runs made from them show as stale; `pipeline heads` makes the heads again. Feature
    stores must be at their frames' snapshot (run `pipeline features` first).

    \b
    Examples:
      pipeline compact --dataset k400
      pipeline compact --dataset demo --split train
    """
    from stages import compact as compact_stage

    ds = need_dataset(s)
    for r in compact_stage.run(ctx.cache, ds, list(s.splits) or None, quiet=ctx.quiet):
        click.echo(f"compact {r['path']}: {r['removed']} dropped videos removed, {r['videos']} kept"
                   f" -> snapshot {r['snapshot']}")


@command("verify", None)
@click.option("--repair", is_flag=True, help="Mark damaged blocks pending and delete their chunk files (delete "
                                             "outputs that cannot be recomputed block by block, and a run's "
                                             "damaged files), so that re-running the stage redoes them.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of entries) on stdout.")
def verify(ctx: Context, repair: bool, as_json: bool) -> None:
    """Read every finished block of every output in the cache, and every run's files, and report damage.

    Checks every array's metadata and chunk files, each chunk's CRC-32C, the recorded digests of columns,
    heads, label embeddings and of every finished block (all its arrays), the bookkeeping, and for runs
    run.json, metrics.json, history.jsonl and the checkpoint's CRC-32s. Exit status 1 when something is
    damaged (0 after --repair: re-run the stages that own the repaired outputs). `pipeline status` shows
    when each output was last verified.

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


@command("world", S.WorldSettings, group_of=lambda flags: "order_world" if flags.get("kind") == "order" else None)
def world(ctx: Context, s: S.WorldSettings) -> None:
    """Generate the embedded demo world: synthetic H.264 clips of coloured shapes.

    Classes are "a <size> <colour> <shape>" (2 sizes x 6 colours x 4 shapes by default). --kind order:
    "a <colour> object then a <colour> object", the classes where frame order matters (its params
    group is order_world). The output is a generic CSV dataset (videos.csv + classes.txt), read by the
    regular `csv` format.

    \b
    Examples:
      pipeline world
      pipeline frames --format csv --root cache/world --dataset demo --height 64 --width 64
    """
    from pipeline.media.world import WorldSpec
    from stages import world as world_stage

    # The order world has its own params group (order_world, see group_of), so both worlds live in one params.yaml.
    colours = s.colours or (("red", "green", "blue", "yellow") if s.kind == "order" else WorldSpec.colours)
    with settings_errors():
        spec = WorldSpec(colours=tuple(colours), shapes=tuple(s.shapes or WorldSpec.shapes),
                         sizes=tuple(s.sizes or WorldSpec.sizes), train_per_class=s.train_per_class,
                         val_per_class=s.val_per_class, frames=s.frames, size=s.size, seed=s.seed, kind=s.kind)
    target = Path(s.out) if s.out else ctx.cache / ("world" if s.kind == "objects" else "world-order")
    path = world_stage.run(target, spec, ctx.quiet)
    click.echo(f"world: {len(spec.classes())} classes -> {path}")


# ---- feature store -------------------------------------------------------------------------

def model_spec(ctx: Context, s: Any, dataset: str | None = None, every_dataset: bool = False):
    """The model of ``s`` (--model / model.name ...). For commands that read the cache (``dataset``
    given): the cache's entry for that model, or, without --model, the one model whose features the
    cache holds for the dataset. ``every_dataset`` (predict): the same over all the cache's datasets."""
    from pipeline.models.clip import ModelSpec

    found: dict = {}
    if dataset:
        from stages.inputs import cached_models

        found = cached_models(ctx.cache, dataset)
    elif every_dataset:
        from stages.inputs import cached_models_anywhere

        found = cached_models_anywhere(ctx.cache)
    if s.model_key and s.model_key in found and not s.model:
        return _spec_from_cache(s.model_key, found[s.model_key])
    if not s.model and (dataset or every_dataset):
        if len(found) == 1:
            return _spec_from_cache(*next(iter(found.items())))
        if found:
            raise PipelineError(f"the cache holds features {f'of {dataset} ' if dataset else ''}from several models "
                                f"({', '.join(found)}): choose one with --model-key KEY (or --model)")
    if not s.model:
        raise PipelineError("no model given: pass --model (e.g. ViT-B-16 --pretrained openai, or local-dir:DIR) "
                            "or set model.name in params.yaml")
    spec = ModelSpec(name=str(s.model), pretrained=s.pretrained, quick_gelu=s.quick_gelu, key=s.model_key,
                     random_weights=bool(s.random_weights))
    if not s.model_key and found:
        # the same model under the key it was cached with (e.g. a model.key chosen by a params file)
        mine = spec.absolute()
        for key, recorded in found.items():
            if recorded and (recorded.get("name"), recorded.get("pretrained")) == (mine.name, mine.pretrained):
                return _spec_from_cache(key, recorded)
    return spec


def _spec_from_cache(key: str, recorded: dict | None):
    from pipeline.models.clip import ModelSpec

    fields = {k: v for k, v in (recorded or {}).items() if k in ("name", "pretrained", "quick_gelu", "random_weights")}
    return ModelSpec(**(fields or {"name": key}), key=key)


def default_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def need_dataset(s: Any) -> str:
    if not s.dataset:
        raise PipelineError("no dataset given: pass --dataset NAME (its name in the cache) or set data.dataset in "
                            "params.yaml")
    return str(s.dataset)


def _run_features(ctx: Context, dataset: str, spec, s: Any) -> list[dict]:
    from stages import features as features_stage

    device = default_device(s.device)
    workers = s.workers
    if workers is None:  # every visible GPU: one dask worker each
        import torch

        workers = torch.cuda.device_count() if device == "cuda" and torch.cuda.device_count() > 1 else 1
    summaries = features_stage.run(
        ctx.cache, dataset, spec, list(s.splits), device=device, batch_size=s.batch_size,
        workers=workers, scheduler_address=s.scheduler_address, replace_mismatched=s.replace_mismatched,
        quiet=ctx.quiet, compile_=bool(getattr(s, "compile", False)))
    for x in summaries:
        _print_summary(x)
    if any(x["errors"] for x in summaries):
        raise PipelineError("some blocks did not finish (see above); re-run the same command to retry them")
    return summaries


@command("features", S.FeaturesSettings)
def features(ctx: Context, s: S.FeaturesSettings) -> None:
    """Encode every stored frame with a CLIP image encoder (cache/features/DATASET/MODEL_KEY/SPLIT).

    Uses the model's own preprocessing (resize mode, crop, mean, std). float16 [N, T, D], rows aligned
    with the frame store; videos that failed there stay failed. AMP on GPU, fp32 on CPU (recorded in
    the fingerprint: the two never mix). MODEL_KEY: --model-key, else the model's name (plus a short
    hash of the weights for local files).

    \b
    Examples:
      pipeline features --dataset k400 --model ViT-B-16 --pretrained openai --device cuda
      pipeline features --dataset demo --model local-dir:cache/tiny-clip --model-key tiny-clip
      pipeline features --dataset k400 --model ViT-B-16 --pretrained ~/weights/ViT-B-16.pt --quick-gelu
    """
    ds = need_dataset(s)
    _run_features(ctx, ds, model_spec(ctx, s, dataset=ds), s)


@command("labels", S.LabelsSettings)
def labels(ctx: Context, s: S.LabelsSettings) -> None:
    """Embed the class names with a text encoder (cache/labels/DATASET/ENCODER).

    \b
    Examples:
      pipeline labels --dataset k400 --model ViT-B-16 --pretrained openai
      pipeline labels --dataset k400 --template kinetics28
      pipeline labels --dataset k400 --encoder hf:distilbert-base-uncased
      pipeline labels --dataset demo --encoder hf:all-MiniLM-L6-v2
    """
    from stages import labels as labels_stage

    ds = need_dataset(s)
    path, emb = labels_stage.run(ctx.cache, ds, s.encoder, s.template, model_spec(ctx, s, dataset=ds),
                                 device=default_device(s.device), replace_mismatched=s.replace_mismatched,
                                 quiet=ctx.quiet, class_names_file=s.class_names)
    click.echo(f"labels {ds}: {emb.shape[0]} classes x {emb.shape[1]}{names_note(s.class_names)} -> {path}")


def names_note(class_names: str | None) -> str:
    """What the labels stage embedded: the dataset's readable names, a file's, or the official code's lists."""
    if not class_names:
        return " (the dataset's readable class names)"
    official = class_names.startswith("text4vis:") or "lists" in Path(class_names).parts
    whose = "the official code's " if official else ""
    return f" ({whose}class names from {class_names})"


def _heads(ctx: Context, s: S.HeadsSettings, kind: str) -> None:
    from stages import heads as heads_stage

    ds = need_dataset(s)
    spec = model_spec(ctx, s, dataset=ds)
    shrink = s.shrinkage
    if shrink not in (None, "auto"):
        try:
            shrink = float(shrink)
        except ValueError:
            raise PipelineError(f"--shrinkage must be 'auto' or a number in [0, 1], not {shrink!r}") from None
        if not 0.0 <= shrink <= 1.0:
            raise PipelineError(f"LDA shrinkage must be 'auto' or a number in [0, 1], not {shrink}")
    path, head, _ = heads_stage.run(
        ctx.cache, ds, kind, spec.tag, encoder=s.encoder, seed=s.seed, per_class=s.per_class, solver=s.solver,
        shrinkage=shrink, split=s.split, replace_mismatched=s.replace_mismatched, snapshot=s.snapshot)
    click.echo(f"head {kind} {ds}: {head.shape[0]} x {head.shape[1]} -> {path}")


@command("heads", S.HeadsSettings)
def heads(ctx: Context, s: S.HeadsSettings) -> None:
    """Build a frozen classifier head [C, D] (cache/heads/DATASET/MODEL_KEY/HEAD).

    \b
    clip-text   the CLIP text embeddings of the class names (labels stage, encoder clip)
    text        another text encoder's embeddings (labels stage, --encoder hf:...)
    random      rows ~ N(0, I), seeded
    orthogonal  first C rows of a random orthogonal D x D matrix (C > D is an error)
    prototype   normalised class means of a per-class sample of cached training features
    lda         LDA coef_ fitted on that sample (same as `pipeline lda`)

    \b
    Examples:
      pipeline heads --dataset k400 --head clip-text
      pipeline heads --dataset k400 --model ViT-B-16 --pretrained openai --head orthogonal --seed 1
    """
    if not s.head:
        raise PipelineError("no head given: pass --head (" + ", ".join(S.HEADS) + ")")
    _heads(ctx, s, s.head)


@command("lda", S.LdaSettings)
def lda(ctx: Context, s: S.LdaSettings) -> None:
    """Fit the LDA head on 60 cached training videos per class (the paper's Algorithm 2); `heads --head lda`.

    Each sampled video's frame features are averaged over time; scikit-learn's
    LinearDiscriminantAnalysis (solver svd by default) is fitted and its coef_ [C, D] is the head.
    The sample is seeded and its video ids are stored with the head. Params group: lda.

    \b
    Examples:
      pipeline lda --dataset k400
      pipeline lda --dataset demo --per-class 20 --solver lsqr --shrinkage auto
    """
    _heads(ctx, s, "lda")


@command("evaluate", S.EvaluateSettings)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(ctx: Context, s: S.EvaluateSettings, as_json: bool) -> None:
    """Evaluate a head on cached features, or a fine-tuned run: top-1, top-5, mean class accuracy (mAP
    for multi-label sets).

    Untuned: the video embedding is the temporal average of the cached frame features; logits are
    cosine similarities with the head rows. With --run-name: the run's model on clips of the frame
    store; --views CxS averages the L2-normalised embeddings of C temporal clips x S crops before
    the head. --dataset other than the run's: zero-shot on that dataset's classes (text heads).

    \b
    Examples:
      pipeline evaluate --run-name k400-ViT-B-16-openai-clip-text-tap --views 4x3
      pipeline evaluate --run-name k400-ViT-B-16-openai-clip-text-tap --dataset ucf101
      pipeline evaluate --dataset ucf101 --head clip-text --protocol half
      pipeline evaluate --dataset k600 --head clip-text --protocol subsets --subsets s1.csv --subsets s2.csv
      pipeline evaluate --dataset demo --head lda --protocol full --protocol half
      pipeline evaluate --dataset demo --head clip-text --snapshot 1   # the videos the split had at snapshot 1
    """
    from stages import evaluate as evaluate_stage

    if s.run_name:
        _evaluate_run(ctx, s, as_json)
        return
    ds = need_dataset(s)
    spec = model_spec(ctx, s, dataset=ds)
    chosen = tuple(s.protocols)
    result = evaluate_stage.run(
        ctx.cache, ds, s.head, spec.tag, split=s.split, encoder=s.encoder, head_dataset=s.head_dataset,
        protocols=chosen, subset_files=list(s.subsets), out=Path(s.out) if s.out else None, snapshot=s.snapshot)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    versions = ", ".join(f"{split} snapshot {r['version']}" for split, r in result["snapshots"]["features"].items()
                         if r["version"])
    click.echo(f"{result['dataset']}/{result['split']}  head {result['head']} ({result['head_dataset']})  "
               f"model {result['model']}" + (f"  ({versions})" if versions else "")
               + (f"  class names from {result['class_names_file']}" if result.get("class_names_file") else ""))
    click.echo(f"  {'protocol':<10} {'top-1':>14} {'top-5':>14} {'mean class':>14}")
    for protocol in chosen:
        r = result[protocol]
        cells = [f"{r[k]:6.2f} +- {r[k + '_std']:5.2f}" if f"{k}_std" in r else f"{r[k]:.2f}"
                 for k in ("top1", "top5", "mean_class")]
        click.echo(f"  {protocol:<10} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")
    for protocol in chosen:
        if result[protocol].get("empty"):
            click.echo(f"  {protocol}: {_over_what(result[protocol], protocol)}")
    if result["videos_without_head_class"]:
        click.echo(f"  ({result['videos_without_head_class']} videos of classes the head does not have were left out)")


MAX_VIEWS = (64, 16)  # temporal clips, spatial crops: each view is a clip through the encoder


def parse_views(text: str) -> tuple[int, int]:
    try:
        temporal, spatial = (int(v) for v in text.lower().split("x"))
        if temporal < 1 or spatial < 1:
            raise ValueError
    except ValueError:
        raise PipelineError(f"--views {text!r}: expected CLIPSxCROPS with positive numbers, e.g. 1x1 or 4x3") from None
    if temporal > MAX_VIEWS[0] or spatial > MAX_VIEWS[1]:
        raise PipelineError(f"--views {text!r}: at most {MAX_VIEWS[0]} clips x {MAX_VIEWS[1]} crops (the paper's "
                            "multi-view test is 4x3)")
    return temporal, spatial


def _evaluate_run(ctx: Context, s: S.EvaluateSettings, as_json: bool) -> None:
    from pipeline.learning import distributed
    from stages import evaluate as evaluate_stage

    try:
        result = evaluate_stage.run_trained(
            ctx.cache, s.run_name, dataset=s.dataset, split=s.split, views=parse_views(s.views),
            batch_size=s.batch_size, workers=s.workers, device=s.device, data_device=s.data_device,
            out=Path(s.out) if s.out else None,
            quiet=ctx.quiet, progress=not as_json,  # machine output: nothing but the JSON
            protocols=tuple(s.protocols), subset_files=list(s.subsets), test_scale=s.test_scale,
            snapshot=s.snapshot)
    finally:
        main = distributed.is_main()
        distributed.teardown()
    if not main:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    keys = ["mAP", "mAP_official", "top1", "top5"] if "mAP" in result else ["top1", "top5", "mean_class"]
    click.echo(f"run {result['run']} (trained on {result['trained_on']}, {result['head']} head) on "
               f"{result['dataset']}/{result['split']}, {result['views']} views, {result['videos']} videos: "
               + ", ".join(f"{k} {result[k]:.2f}" for k in keys))
    for protocol in ("half", "subsets"):
        if protocol in result:
            r = result[protocol]
            click.echo(f"  {protocol}: " + ", ".join(f"{k} {r[k]:.2f} +- {r[k + '_std']:.2f}"
                                                  for k in ("top1", "top5", "mean_class"))
                       + f" {_over_what(r, protocol)}")


def _over_what(r: dict, protocol: str) -> str:
    """What a half-classes or subsets mean averages: every draw, or the ones with videos (the others named)."""
    what = "draws" if protocol == "half" else "subsets"
    if not r.get("empty"):
        return f"over {r['of']} {what}"
    return (f"over {r['used']} of {r['of']} {what}; no videos of their classes in: {', '.join(r['empty'])}"
            if r["used"] else f"no {what[:-1]} has videos of its classes ({', '.join(r['empty'])})")


@command("export", S.ExportSettings)
@click.option("--format", "old_format", type=click.Choice(["npz", "h5"]), hidden=True)
def export(ctx: Context, s: S.ExportSettings, old_format: str | None) -> None:
    """Export a stored output to NumPy (.npz) or HDF5 (.h5), chosen by the suffix of --out; both are
    written block by block (memory for one block, not the store).

    \b
    Keys: frames    `frames` uint8 [N, T, H, W, 3], `frame_index`, `timestamp`, `video_id`, `label`,
                    `status` (1 ok, 2 failed), `reason`, `box` (y0, y1, x0, x1 of each video's pixels)
          features  `features` float16 [N, T, D], `video_id`, `label`, `status`, `reason`
          labels    `embeddings` float32 [C, D_text]
          head      `head` float32 [C, D]
    Attributes (HDF5 attrs; `attr_*` keys in .npz): `class_names`, `fingerprint`, `dataset`, `split`,
    and the provenance (model, pretrained tag, precision, frame spec, input fingerprints).

    \b
    Examples:
      pipeline export --what frames --dataset ucf101 --split test --out ucf_test.h5
      pipeline export --what features --dataset k400 --split val --out f.h5
      pipeline export --what head --dataset k400 --head lda --out lda.npz
    """
    from pipeline.storage.export import format_of
    from stages import export as export_stage

    if not s.out:
        raise PipelineError("export needs --out FILE (.npz or .h5)")
    if old_format:
        click.echo("warning: export --format is deprecated: the suffix of --out (.npz, .h5) chooses it", err=True)
    fmt = format_of(s.out, old_format)  # a --format that contradicts the suffix is an error, never obeyed
    ds = need_dataset(s)
    needs_model = s.model or s.what in ("features", "head", "labels")
    spec = model_spec(ctx, s, dataset=ds) if needs_model else None
    path = export_stage.run(ctx.cache, s.what, ds, fmt, s.out, split=s.split, model_tag=spec.tag if spec else None,
                            encoder=s.encoder, kind=s.head, quiet=ctx.quiet)
    click.echo(f"wrote {path}")


@command("plot-heads", S.PlotSettings)
def plot_heads(ctx: Context, s: S.PlotSettings) -> None:
    """Plot the inter-class correlation map of heads as PNGs (the paper's Fig. 1).

    \b
    Examples:
      pipeline plot-heads --dataset k400 --classes 20
      pipeline plot-heads --dataset demo --head clip-text --head random
    """
    from stages import plots as plots_stage

    ds = need_dataset(s)
    spec = model_spec(ctx, s, dataset=ds)
    written = plots_stage.run(ctx.cache, ds, spec.tag, list(s.heads), str(s.classes), Path(s.out) if s.out else None)
    for path in written:
        click.echo(f"wrote {path}")


@command("extract", S.ExtractSettings)
def extract(ctx: Context, s: S.ExtractSettings) -> None:
    """Fill the cache for a dataset: frames, then CLIP features, then label embeddings.

    Each step is the stage of the same name; frame settings come from frames.* (and data.*),
    --batch-size and --device from features.*, --encoder and --template from labels.*. Without a
    model (--model or model.name) only the frame stage runs.

    \b
    Examples:
      pipeline extract --format k400 --root /data/k400 --model ViT-B-16 --pretrained openai --workers 8
      pipeline extract --params data/profiles/ucf101.yaml
    """
    from stages import labels as labels_stage

    _run_frames(ctx, s)
    if not s.model:
        click.echo("note: no model given (--model or model.name): extract ran the frame stage only", err=True)
        return
    spec = model_spec(ctx, s)
    _run_features(ctx, s.dataset, spec, s)
    path, emb = labels_stage.run(ctx.cache, s.dataset, s.encoder, s.template, spec, device=default_device(s.device),
                                 replace_mismatched=s.replace_mismatched, quiet=ctx.quiet,
                                 class_names_file=s.class_names)
    click.echo(f"labels {s.dataset}: {emb.shape[0]} classes x {emb.shape[1]}{names_note(s.class_names)} -> {path}")


@command("finetune", S.FinetuneSettings)
def finetune(ctx: Context, s: S.FinetuneSettings) -> None:
    """Train a video classifier against a frozen head (the paper's recipe, Table A.3 defaults).

    Full fine-tuning trains the CLIP visual encoder (at --backbone-lr-ratio x --lr) and the
    temporal module on clips of the frame store; the head stays the cached one. With
    --frozen-backbone the encoder is not run: the temporal module trains on cached features.
    A killed run resumes from its last checkpoint when the same command is run again.

    \b
    Examples:
      pipeline finetune -d k400 -m ViT-B-16 --pretrained openai --head clip-text --temporal tokent1d
      torchrun --nproc_per_node=8 -m pipeline finetune -d k400 --head clip-text --global-batch-size 256
      pipeline finetune --frozen-backbone -d demo --head learnable --shots 2
      torchrun --nproc_per_node=2 -m pipeline finetune -d demo --objective contrastive
    """
    from pipeline.learning import distributed
    from pipeline.learning.training import TrainConfig
    from pipeline.learning.transforms import AugmentConfig
    from stages import finetune as finetune_stage

    from .learning.objectives import Objective

    ds = need_dataset(s)
    # few-shot: the released configs train --epochs (30, configs/*/*_few_shot.yaml) by default; the paper's preset
    # (App. B.1) its own epochs per dataset (few_shot_epochs); an --epochs flag wins over both
    paper = s.shots and s.few_shot_recipe == "paper"
    if paper and not s.few_shot_epochs and ctx.flags.get("epochs") is None:
        raise PipelineError("--few-shot-recipe paper needs --few-shot-epochs (App. B.1: 2 on Kinetics-400, 10 on "
                            "UCF101, HMDB51, ActivityNet; the profiles set it) or --epochs")
    epochs = s.few_shot_epochs if (paper and s.few_shot_epochs and ctx.flags.get("epochs") is None) else s.epochs
    if s.hard_templates and s.frozen_backbone:
        raise PipelineError("--hard-templates needs full fine-tuning (the CLIP text tower embeds each template)")
    if s.init_from and s.frozen_backbone:
        raise PipelineError("--init-from starts the visual encoder from a run: it needs full fine-tuning "
                            "(not --frozen-backbone)")
    with settings_errors():
        cfg = TrainConfig(
            epochs=epochs, batch_size=s.global_batch_size, micro_batch=s.micro_batch, lr=s.lr,
            backbone_lr_ratio=s.backbone_lr_ratio, temporal_lr=s.temporal_lr, weight_decay=s.weight_decay,
            warmup_epochs=s.warmup_epochs, min_lr=s.min_lr, checkpoint_every=s.checkpoint_every, amp=s.amp,
            workers=s.workers, compile=s.compile, log_every=s.log_every, betas=tuple(s.betas))
        augment = AugmentConfig(crop_scale=tuple(s.crop_scale), flip=s.flip, grayscale=s.grayscale,
                                randaugment_ops=int(s.randaugment[0]), randaugment_magnitude=int(s.randaugment[1]),
                                randaugment_per_frame=s.randaugment_per_frame, gaussian_blur=s.gaussian_blur,
                                solarization=s.solarization)
    spec = model_spec(ctx, s, dataset=ds)
    goal = Objective(kind=s.objective, batch_gather=s.batch_gather, text=s.text, text_lr=s.text_lr,
                                    text_weight_decay=s.text_weight_decay, template=s.text_template)
    common = dict(encoder=s.encoder, frames=s.frames, shots=s.shots or None, layers=s.layers, device=s.device,
                  ttrans_init=s.ttrans_init, coop_ctx=s.coop_ctx, coop_lr=s.coop_lr,
                  replace_mismatched=s.replace_mismatched, quiet=ctx.quiet, objective=goal)
    seeds = list(s.seed)
    if len(seeds) > 1 and not s.run_name:
        raise PipelineError("several --seed values need a --run-name (runs go to RUN/s<seed>)")
    results = []
    try:
        for one_seed in seeds:
            cfg.seed = int(one_seed)
            run_name = f"{s.run_name}/s{one_seed}" if s.run_name and len(seeds) > 1 else s.run_name
            if s.frozen_backbone:
                result = finetune_stage.run(ctx.cache, ds, spec.tag, s.head, s.temporal, cfg, spec=spec,
                                            run_name=run_name, **common)
            else:
                result = finetune_stage.run_full(ctx.cache, ds, spec, s.head, s.temporal, cfg, augment=augment,
                                                 t1d_init=s.t1d_init, run_name=run_name, init_from=s.init_from,
                                                 hard_templates=s.hard_templates,
                                                 hard_templates_eval=s.hard_templates_eval, data_device=s.data_device,
                                                 grad_checkpointing=s.grad_checkpointing, test_scale=s.test_scale,
                                                 **common)
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


@command("import", S.ImportSettings)
def import_(ctx: Context, s: S.ImportSettings) -> None:
    """Import per-video features made by another extractor into a feature store.

    Videos come from the dataset's annotations (any format); each is read from
    FROM/<video_id>.npy or FROM/<video_id>.h5 (dataset `features`), shaped [frames, dim], and
    resampled to CACHE_FRAMES by segment centres. Later commands find the store by --dataset alone
    (or --model-key MODEL_TAG when the dataset has several models).

    \b
    Example:
      pipeline import --format ucf101 --root /data/ucf101 --from /data/ucf101-vitl14-feats --model-key vitl14-ext
      pipeline heads -d ucf101 --head prototype
    """
    from stages import import_features

    if not s.model_tag or not s.source:
        raise PipelineError("import needs --from DIR and --model-key KEY")
    summaries = import_features.run(ctx.cache, dataset_args(s), Path(s.source), str(s.model_tag), s.cache_frames,
                                    block_size=s.block_size, replace_mismatched=s.replace_mismatched, quiet=ctx.quiet)
    for x in summaries:
        _print_summary(x)


@command("pretrain", S.PretrainSettings)
def pretrain(ctx: Context, s: S.PretrainSettings) -> None:
    """Pretrain the demo's tiny CLIP (open_clip CLIP, contrastive loss) on frame-caption pairs of the world.

    Saved as an open_clip local-dir: model (open_clip_config.json + weights), loaded by every later
    stage exactly like a real CLIP: --model local-dir:cache/tiny-clip.

    \b
    Example:
      pipeline pretrain --dataset demo --steps 600 --heldout "a large blue ring"
    """
    from pipeline.learning.pretrain import PretrainConfig
    from stages import pretrain as pretrain_stage

    shape = {k: getattr(s, k) for k in PretrainConfig().as_dict() if k not in ("batch_size",)}
    with settings_errors():
        cfg = PretrainConfig(**shape, batch_size=s.global_batch_size)
    target = Path(s.out) if s.out else ctx.cache / "tiny-clip"
    summary = pretrain_stage.run(ctx.cache, need_dataset(s), target, cfg, list(s.heldout), ctx.quiet)
    click.echo(f"tiny CLIP: {cfg.steps} steps on {summary['clips']} clips, loss {summary['first_loss']:.2f} -> "
               f"{summary['final_loss']:.2f} -> local-dir:{target}")


@command("predict", S.PredictSettings)
@click.argument("videos", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(ctx: Context, s: S.PredictSettings, videos, as_json) -> None:
    """Label videos with your own label names (zero-shot) or with a fine-tuned run; prints the top-5.

    Zero-shot (--model; without it, the model whose features the cache holds, or the one --model-key
    names there): frames at the centres of uniform segments, preprocessed exactly as the
    features stage does, CLIP image features averaged over time, cosine with the text embeddings
    of the labels, softmax at CLIP's logit scale. --run-name: the run's video model; --labels are
    embedded by the run's text encoder.

    \b
    Examples:
      pipeline predict clip.mp4 -m ViT-B-16 --pretrained openai --labels "juggling,skateboarding,surfing"
      pipeline predict a.mp4 b.webm -m local-dir:cache/tiny-clip --labels-file labels.txt --template "a photo of a {}"
      pipeline predict clip.mp4 --run-name k400-ViT-B-16-openai-clip-text-tap
    """
    from stages import predict as predict_stage

    names = None
    if s.labels_file:
        path = Path(s.labels_file)
        if not path.is_file():
            raise PipelineError(f"labels file not found: {path}")
        names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
    elif s.labels:
        names = [n.strip() for n in s.labels.split(",") if n.strip()]
    elif not s.run_name:
        raise PipelineError("give the label names: --labels 'a,b,c' or --labels-file FILE (or a fine-tuned "
                            "--run-name)")
    if s.run_name:
        results = predict_stage.run_trained(list(videos), ctx.cache, s.run_name, names, template=s.template,
                                            device=default_device(s.device), quiet=ctx.quiet or as_json,
                                            test_scale=s.test_scale)
    else:
        # like every reader of the cache: without --model, the model whose features it holds
        results = predict_stage.run(list(videos), names, model_spec(ctx, s, every_dataset=True), template=s.template,
                                    frames=s.frames, device=default_device(s.device), quiet=ctx.quiet or as_json)
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


@command("report", S.ReportSettings)
def report(ctx: Context, s: S.ReportSettings) -> None:
    """Write the demo report (markdown + PNG): the paper's Tables 6-9, zero-shot, Fig. 1 and Fig. A.4.

    Every number comes from the cache: run metrics, training histories, untuned evaluations.
    Prints the report at the end.

    \b
    Examples:
      pipeline report                       # after `dvc repro` of the demo: cache/report/report.md + PNGs
      pipeline report --out /tmp/report     # elsewhere
    """
    from stages import report as report_stage

    ft = ctx.resolve(S.FinetuneSettings, {}).values
    note = (f"Full fine-tuning settings (params.yaml `finetune`): frames {ft.frames}, epochs {ft.epochs}, "
            f"global_batch_size {ft.global_batch_size}, lr {ft.lr}, backbone_lr_ratio {ft.backbone_lr_ratio}, "
            f"warmup_epochs {ft.warmup_epochs}, min_lr {ft.min_lr}, crop_scale {list(ft.crop_scale)}, flip {ft.flip}, "
            f"grayscale {ft.grayscale}, randaugment {list(ft.randaugment)}; AdamW betas {tuple(ft.betas)}, weight "
            f"decay {ft.weight_decay}.")
    path, text = report_stage.run(ctx.cache, Path(s.out) if s.out else ctx.cache / "report",
                                  dataset=need_dataset(s), order_dataset=s.order_dataset, model_tag=s.model_key,
                                  settings_note=note)
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
        if getattr(e, "exit_now", False):  # a library that would crash at interpreter exit (HDF5 after a failed write)
            click.echo(f"error: {e}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        _fail(str(e), 2)
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        from pipeline.core.files import describe_os_error

        _fail(f"{describe_os_error(e)}" + (f": {e.filename}" if e.filename else ""), 2)
    except (ValueError, RuntimeError) as e:
        if "checksum" not in str(e).lower():
            raise
        _fail(f"damaged data in the cache ({read_error(e)}): run `pipeline verify --repair` and re-run the stage", 2)
    sys.exit(code if isinstance(code, int) else 0)


# Errors of the machine, not of the program: a full disk, a read-only or forbidden folder.
# Also paths that cannot be made (a file where a folder should be): the user's to fix.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                      errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}


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
    # zarr reads chunks in concurrent asyncio tasks: when several fail (a damaged store), only the first is
    # raised and the rest are logged at exit as "Task exception was never retrieved"; the line above says it all
    logging.getLogger("asyncio").disabled = True
    sys.exit(code)
