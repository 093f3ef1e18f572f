"""The settings of every command, typed and validated by pydantic: the single source of their defaults.

Each command has one settings model here. A field is one setting: its default, its help text, its type and
range, the flag that sets it and the params file key (``<command group>.<field>``, or ``data.<field>`` /
``model.<field>`` for the shared groups). Resolution order: flag > params file > default (:func:`resolve`);
pydantic validates the result (types, ranges, unknown keys), and every value remembers where it came from
(``pipeline config COMMAND``). The same declaration gives the click option (type, range, help), so a flag
and its params key accept exactly the same values.

The library's own dataclasses (TrainConfig, AugmentConfig, FrameSpec, FrameCodec, PretrainConfig)
take their defaults from here, so that each default is written once. This module imports nothing
heavy: the CLI reads it before any command runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.params import DATA_KEYS, MODEL_KEYS, read_params_file

# The choices of settings that name things the media layer implements: dataset formats (its adapters) and
# swscale filters and seek modes (its decoder). Declared here, imported there: the layers point down.
FORMATS = ("k400", "k600", "k700", "ucf101", "hmdb51", "anet", "csv", "folder", "imagefolder")
INTERPOLATIONS = ("FAST_BILINEAR", "BILINEAR", "BICUBIC", "AREA", "LANCZOS")
SEEK_MODES = ("exact", "keyframes")

HEADS = ("clip-text", "text", "random", "orthogonal", "prototype", "lda")


@dataclass(frozen=True)
class Knob:
    """How one setting appears on the command line."""

    help: str
    flag: str = ""  # "--cache-frames"; default: the field name with dashes
    short: str = ""  # "-d"
    type: Any = None  # a click type; default: from the field's default
    multiple: bool = False
    is_flag: bool = False
    toggle: str = ""  # "amp": gives --amp/--no-amp
    nargs: int = 1
    old_flags: tuple[str, ...] = ()  # deprecated spellings: still accepted, with a warning
    old_keys: tuple[str, ...] = ()  # deprecated params.yaml keys of the same group
    default_text: str = ""  # how --help shows a default computed at run time ("cuda when present")
    section: str = ""  # the params group, when not the command's own (extract reads features.*, labels.*)
    maximum: int | None = None  # the largest value data and memory allow (a bound for POSITIVE, COUNT, SIDE)


# The named ranges of settings: (minimum, maximum or None for the knob's own ``maximum``, exclusive bounds).
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "POSITIVE": (1, None, False), "COUNT": (0, None, False), "SIDE": (16, None, False), "PERCENT": (1, 100, False),
    "PROBABILITY": (0.0, 1.0, False), "SPLIT_ID": (1, 3, False), "SEED": (0, 2**32 - 1, False),
    "FRACTION": (0.0, 1.0, True),
}


def knob(default: Any, help: str, **kw: Any) -> Any:
    """A settings field: its default, its range (pydantic's constraints, from a named ``type``) and its
    :class:`Knob`."""
    k = Knob(help=help, **kw)
    constraints: dict[str, Any] = {}
    if isinstance(k.type, str) and k.type in RANGES and not k.multiple:  # lists: checked item by item, below
        low, high, exclusive = RANGES[k.type]
        high = k.maximum if high is None else high
        constraints = {"gt": low, "lt": high} if exclusive else {"ge": low, **({"le": high} if high is not None
                                                                               else {})}
    extra = {"knob": k}
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: type(default)(default), description=help, json_schema_extra=extra,
                     **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Settings(BaseModel):
    """A command's settings: unknown names are an error, params numbers read as text ("5e-5") convert."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    SECTION: ClassVar[str] = ""

    @model_validator(mode="after")
    def _items_in_range(self) -> Settings:
        for f in settings_fields(type(self)):
            k = f.knob
            if k.multiple and isinstance(k.type, str) and k.type in RANGES:
                low, high, _ = RANGES[k.type]
                high = k.maximum if high is None else high
                for v in getattr(self, f.name):
                    if v < low or (high is not None and v > high):
                        raise ValueError(f"{f.name}: {v} is not in the range {low}<=x<={high}")
        return self

    @classmethod
    def defaults(cls) -> Settings:
        """Every setting at its default (no validation: the defaults are the declaration)."""
        return cls.model_construct()


# ---- shared groups ----------------------------------------------------------------------------



class DatasetName(Settings):
    """The dataset's name in the cache (every command that reads the cache)."""

    dataset: str | None = knob(None, "Dataset name in the cache (params: data.dataset).", short="-d")


class DataSource(DatasetName):
    """Where videos come from (frames, extract, import)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ("data",)
    dataset: str | None = knob(
        None, "Name of the dataset in the cache [default: the format, or the csv/folder's stem].", short="-d")
    format: str | None = knob(None, "Dataset format (adapter): k400 | k600 | k700 | ucf101 | hmdb51 | anet | csv | "
                                    "folder | imagefolder.", type="FORMATS")
    root: str | None = knob(None, "Dataset root folder (or a CSV file).")
    split_id: int = knob(1, "Official split for UCF101/HMDB51.", type="SPLIT_ID")
    untrimmed: bool = knob(False, "Kinetics: cut [time_start, time_end] out of full-length videos.",
                           toggle="untrimmed/--trimmed")
    val_fraction: float = knob(0.0, "Hold out this fraction of each class's training videos as 'val' (seeded; "
                                    "for flat folders and CSVs without a split column).", type="FRACTION")

    @model_validator(mode="after")
    def _names(self) -> DataSource:
        if self.format is None and self.dataset in FORMATS:
            self.format = self.dataset  # `--dataset ucf101` alone: the format, and its name in the cache
        if self.dataset is None and self.format:
            stem = PurePath(str(self.root or "")).stem if self.format in ("csv", "folder", "imagefolder") else ""
            self.dataset = stem or self.format
        return self


class ModelChoice(Settings):
    model: str | None = knob(None, "open_clip model: a name (ViT-B-16), local-dir:DIR or hf-hub:ORG/NAME "
                                   "(params: model.name) [the cache's model when it holds one].", short="-m")
    pretrained: str | None = knob(None, "Pretrained tag (openai) or a local checkpoint file (params: "
                                        "model.pretrained).")
    quick_gelu: bool | None = knob(None, "Force QuickGELU (needed for OpenAI weights given as a file).",
                                   toggle="quick-gelu/--no-quick-gelu", default_text="auto for tags")
    model_key: str | None = knob(None, "The model's name in the cache (params: model.key) [the model's name plus "
                                       "a short hash of its weights].")
    random_weights: bool = knob(False, "Allow a built-in architecture without --pretrained, i.e. with random "
                                       "weights (tests, benchmarks; recorded, and shown by status and exports).",
                                is_flag=True)


class Replace(Settings):
    replace_mismatched: bool = knob(False, "Rebuild an output made with other parameters (a matching one is "
                                           "resumed).", is_flag=True)


DEVICE_HELP = "torch device: cpu, cuda or cuda:N."
TEST_SCALE_HELP = ("Evaluation crops: the short side is first scaled to TEST_SCALE pixels per 224 of the model's "
                   "input, then one centre crop (or 3 over the full width) of the input size: 256 is test.py:94's "
                   "256 -> 224 (a 64-px input: 73 -> 64). 224: no extra scale (the official rule for 336-px models).")
DATA_DEVICE_HELP = ("Where clips are JPEG-decoded and augmented: cpu (in the loader workers) or cuda (a whole "
                    "batch at once on the training GPU; workers only read bytes); auto: cuda when training on a GPU.")


# ---- commands ---------------------------------------------------------------------------------

class FramesSettings(Replace, DataSource):
    SECTION: ClassVar[str] = "frames"
    splits: list[str] = knob([], "Split(s) to process (repeatable) [default: every split of the dataset]; 'all': "
                                 "every video once, whole, one label (the official *_full_for_zeroshot lists: "
                                 "HMDB51's unused videos and ActivityNet's whole training videos included).",
                             flag="--split", multiple=True)
    cache_frames: int = knob(16, "Frames kept per video in the store, T_cache.", type="POSITIVE", maximum=1024,
                             old_flags=("--num-frames",), old_keys=("num_frames",))
    height: int = knob(256, "Output box height; the short side scales to it.", type="SIDE", maximum=8192)
    width: int = knob(456, "Output box width: 16:9 at a short side of 256, so a video keeps its whole frame "
                           "(narrower ones are padded and their box recorded; wider ones centre-cropped).",
                      type="SIDE", maximum=8192)
    interpolation: str = knob("AREA", "swscale filter.", type="INTERPOLATIONS")
    seek: str = knob("exact", "'keyframes' decodes keyframes only: fast, approximate.", type="SEEK_MODES")
    codec: str = knob("jpeg", "Stored frame encoding: JPEG bytes, or lossless uint8 + zstd.",
                      type=("jpeg", "raw"))
    jpeg_quality: int = knob(90, "JPEG quality.", type="PERCENT")
    block_size: int = knob(16, "Videos per block (the resume unit; at most 4096, and 2 GiB of decoded frames).",
                           type="POSITIVE")
    workers: int = knob(1, "Decoding processes, through dask.", type="POSITIVE", maximum=4096)
    scheduler_address: str | None = knob(None, "Use this dask.distributed scheduler instead of a local one.")
    strict: bool = knob(False, "Exit with status 1 if any video failed.", is_flag=True)
    retry_failed: bool = knob(False, "Decode again the videos recorded as failed (those whose file changed are "
                                     "retried anyway).", is_flag=True)


class FeaturesSettings(Replace, ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "features"
    splits: list[str] = knob([], "Split(s) [default: every stored split].", flag="--split", multiple=True)
    device: str | None = knob(None, DEVICE_HELP, default_text="cuda when present, else cpu")
    batch_size: int = knob(64, "Frames per forward pass.", type="POSITIVE", maximum=65536)
    workers: int | None = knob(None, "Processes, through dask; with --device cuda, worker i uses GPU i mod the "
                                     "visible GPUs.", type="POSITIVE", maximum=4096,
                               default_text="1; with --device cuda, one per visible GPU")
    scheduler_address: str | None = knob(None, "Use this dask.distributed scheduler.")
    compile: bool = knob(False, "torch.compile the image tower (GPU; compiles on the first batches).", is_flag=True)


class LabelsSettings(Replace, ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "labels"
    encoder: str = knob("clip", "'clip' (the model's text tower) or 'hf:NAME_OR_PATH' (mean pooling).")
    template: str = knob("paper", "paper ('a video of a person {}.'), bare, kinetics28, a file, or a text with {}.")
    class_names: str | None = knob(None, "Embed these class names instead of the dataset's readable ones: a file, "
                                         "one a line in the dataset's class order, or the official code's id,name "
                                         "lists (lists/ucf_labels.csv ..., or text4vis:ucf_labels.csv: downloaded "
                                         "once), so numbers compare with the paper's; the profiles set them.",
                                   type="FILE")
    device: str | None = knob(None, DEVICE_HELP, default_text="cuda when present, else cpu")


class ExtractSettings(ModelChoice, FramesSettings):
    """frames, then features, then labels; each reads its own params group for the rest."""

    SECTION: ClassVar[str] = "frames"
    encoder: str = knob(LabelsSettings.model_fields["encoder"].default,
                        "Text encoder of the labels stage: clip or hf:NAME_OR_PATH.", section="labels")
    template: str = knob(LabelsSettings.model_fields["template"].default, "Prompt template(s) of the labels stage.",
                         section="labels")
    class_names: str | None = knob(None, "Class names the labels stage embeds (a file, or the official lists as "
                                         "text4vis:ucf_labels.csv).", type="FILE", section="labels")
    device: str | None = knob(None, "torch device for features and labels.", default_text="cuda when present, else cpu",
                              section="features")
    batch_size: int = knob(FeaturesSettings.model_fields["batch_size"].default,
                           "Frames per forward pass of the features stage.", type="POSITIVE", maximum=65536,
                           section="features")


class HeadsSettings(Replace, ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "heads"
    head: str | None = knob(None, "Head kind: " + ", ".join(HEADS) + ".", type=HEADS, old_flags=("--kind",),
                            old_keys=("kind",))
    encoder: str | None = knob(None, "Text encoder of a 'text' head: hf:NAME_OR_PATH.")
    seed: int = knob(0, "Seed of random/orthogonal heads and of the per-class sample.", type="SEED")
    per_class: int = knob(60, "Training videos per class for lda/prototype (the paper: 60).", type="POSITIVE",
                          maximum=1_000_000)
    solver: str = knob("svd", "LDA solver (svd, as the paper).", type=("svd", "lsqr", "eigen"))
    shrinkage: str | None = knob(None, "LDA shrinkage: 'auto' or a number in [0, 1] (lsqr/eigen solvers).")
    split: str = knob("train", "Split the lda/prototype sample is drawn from.")
    snapshot: int | None = knob(None, "lda/prototype: draw from the videos (and classes) that split's features had "
                                      "at this snapshot [default: the current one].", type="POSITIVE")


class LdaSettings(HeadsSettings):
    SECTION: ClassVar[str] = "lda"
    head: ClassVar[str] = "lda"


class EvaluateSettings(ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "evaluate"
    head: str = knob("clip-text", "Head kind (untuned evaluation; coop: the prompts a `finetune --head coop` run "
                                  "learned).", type=(*HEADS, "coop"))
    encoder: str | None = knob(None, "Text encoder of a 'text' head: hf:NAME_OR_PATH.")
    split: str = knob("val", "Split to evaluate; 'all': the whole dataset as the official zero-shot lists (the "
                             "split `frames --split all` stores).")
    protocols: list[str] = knob(["full"], "full label set; half of the classes x 10 seeds; user subsets "
                                          "(repeatable).", flag="--protocol", multiple=True,
                                type=("full", "half", "subsets"))
    subsets: list[str] = knob([], "A class-subset file (one class a line, or comma-separated); repeatable.",
                              multiple=True, type="FILE")
    head_dataset: str | None = knob(None, "Use a head built from another dataset's class names (matched by name).")
    snapshot: int | None = knob(None, "Evaluate the videos the split's store had at this snapshot (`pipeline "
                                      "status` shows them): an older number, reproduced [default: the current one].",
                                type="POSITIVE")
    out: str | None = knob(None, "Write the results as JSON (e.g. for DVC metrics).", type="FILE")
    run_name: str | None = knob(None, "Evaluate this fine-tuned run (CACHE/runs/RUN) instead of an untuned head.",
                                old_flags=("--run",), old_keys=("run",))
    views: str = knob("1x1", "With --run-name: temporal clips x spatial crops, e.g. 4x3.")
    batch_size: int = knob(16, "With --run-name: videos per forward pass.", type="POSITIVE", maximum=65536)
    workers: int = knob(0, "With --run-name: data-loader processes.", type="COUNT", maximum=1024)
    device: str | None = knob(None, "With --run-name: " + DEVICE_HELP, default_text="cuda when present, else cpu")
    data_device: str = knob("auto", "With --run-name: " + DATA_DEVICE_HELP, type=("auto", "cpu", "cuda"))
    test_scale: int = knob(256, "With --run-name: " + TEST_SCALE_HELP, type="POSITIVE")


class FinetuneSettings(Replace, ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "finetune"
    head: str = knob("clip-text", "Classifier head; learnable = the vision-only baseline; coop = learnable "
                                  "prompt context in the frozen CLIP text tower (Table A.4).",
                     type=(*HEADS, "learnable", "coop"))
    coop_ctx: int = knob(4, "CoOp: learnable context vectors in front of the class name (the paper's M = 4, "
                            "App. A; CoOp's own default is 16).", type="POSITIVE", maximum=64)
    coop_lr: float | None = knob(None, "CoOp: the context vectors' learning rate.", default_text="--lr")
    hard_templates: str | None = knob(None, "Multiple hard templates (Table A.4): CLIP-text rows of one of these "
                                            "templates (kinetics28, a file, ...) drawn per step; evaluation: "
                                            "the single template of the cached clip-text head (the paper). Full "
                                            "fine-tuning, --head clip-text.")
    hard_templates_eval: str = knob("single", "Multiple hard templates: evaluate with the single template of the "
                                              "cached clip-text head (labels --template; the paper) or the "
                                              "templates' ensemble.", type=("single", "ensemble"))
    encoder: str | None = knob(None, "Text encoder of a 'text' head: hf:NAME_OR_PATH.")
    temporal: str = knob("tap", "Temporal module.", type=("tap", "ttrans", "tokent1d"))
    frozen_backbone: bool = knob(False, "Train only the temporal module (and projection) on cached features.",
                                 is_flag=True)
    frames: int = knob(8, "Frames per clip, T.", type="POSITIVE", maximum=1024)
    shots: int = knob(0, "K training videos per class (few-shot), seeded; 0: all.", type="COUNT", maximum=1_000_000)
    few_shot_recipe: str = knob("code", "A --shots run's recipe: 'code', the released configs "
                                        "(configs/*/*_few_shot.yaml: --epochs, 30 there); 'paper', App. B.1's "
                                        "epochs (--few-shot-epochs) unless --epochs is given.",
                                type=("code", "paper"))
    few_shot_epochs: int | None = knob(None, "Epochs of a --shots run with --few-shot-recipe paper unless --epochs "
                                             "is given (App. B.1: 2 on Kinetics-400, 10 on UCF101, HMDB51 and "
                                             "ActivityNet).", type="POSITIVE", maximum=100_000,
                                       default_text="--epochs")
    init_from: str | None = knob(None, "Start from this fine-tuned run's visual encoder, temporal module and "
                                       "logit scale (transfer; the official code loads the whole state dict); the "
                                       "head's rows are this dataset's.")
    run_name: str | None = knob(None, "Run name under CACHE/runs.", old_flags=("--run",), old_keys=("run",),
                                default_text="derived from the settings")
    epochs: int = knob(30, "Epochs.", type="POSITIVE", maximum=100_000)
    global_batch_size: int = knob(256, "Clips per optimiser step, over all GPUs and "
                                                          "accumulation steps.", type="POSITIVE", maximum=1 << 20,
                                  old_flags=("--batch-size",), old_keys=("batch_size",))
    micro_batch: int = knob(0, "Clips per forward pass per process; gradients accumulate to "
                                                     "the global batch (0: no accumulation).", type="COUNT",
                                  maximum=1 << 20)
    lr: float = knob(5e-5, "Learning rate of new modules.")
    backbone_lr_ratio: float = knob(0.1, "The pretrained encoder's lr relative to --lr.")
    temporal_lr: float | None = knob(None, "Learning rate of the temporal module.",
                                     default_text="--lr")
    weight_decay: float = knob(0.2, "AdamW weight decay.")
    betas: tuple[float, float] = knob((0.9, 0.999), "AdamW betas: the released code's (0.9, 0.999) (train.py:280); "
                                                    "the paper's Table A.3: 0.9 0.98.", nargs=2, type=float)
    warmup_epochs: float = knob(5.0, "Linear warm-up epochs.")
    min_lr: float = knob(0.0, "Cosine floor of the learning rate (the official code decays to 0).")
    layers: int = knob(6, "T-Trans layers.", type="POSITIVE", maximum=64)
    ttrans_init: str = knob("official", "T-Trans as the official code builds it, or 'tap': this project's variant "
                                        "that starts exactly as TAP.", type=("official", "tap"))
    t1d_init: str = knob("shift", "TokenT1D initialisation: the official partial shift, or the identity.",
                         type=("shift", "identity"))
    crop_scale: tuple[float, float] = knob((0.08, 1.0), "RandomResizedCrop area range.", nargs=2,
                                           type=float)
    flip: float = knob(0.5, "Horizontal flip probability.", type="PROBABILITY")
    grayscale: float = knob(0.2, "Grayscale probability.", type="PROBABILITY")
    randaugment: tuple[int, int] = knob((2, 9),
                                        "RandAugment N M (0 0: off).", nargs=2, type=int)
    gaussian_blur: float = knob(0.0, "GaussianBlur probability per clip, sigma uniform in [0.1, 2] px after the crop "
                                     "(GroupGaussianBlur, datasets/transforms.py:478-488; the logged K400 run used "
                                     "it, its p is not released).", type="PROBABILITY")
    solarization: float = knob(0.0, "Solarization probability per clip, pixels >= 128 inverted "
                                    "(GroupSolarization, datasets/transforms.py:490-499; p not released).",
                               type="PROBABILITY")
    randaugment_per_frame: bool = knob(True, "RandAugment draws its operations for each frame (the official "
                                             "GroupTransform, applied first) or once per clip.",
                                       toggle="randaugment-per-frame/--randaugment-per-clip")
    amp: bool = knob(True, "Mixed precision on GPU (bf16, or fp16 with a scaler).", toggle="amp/--no-amp")
    grad_checkpointing: bool = knob(False, "Recompute activations to save memory.", is_flag=True)
    data_device: str = knob("auto", DATA_DEVICE_HELP, type=("auto", "cpu", "cuda"))
    test_scale: int = knob(256, "Validation after each epoch: " + TEST_SCALE_HELP, type="POSITIVE")
    compile: bool = knob(False, "torch.compile the visual encoder (compiles on the first steps; GPU runs).",
                         is_flag=True)
    log_every: int = knob(10, "GPU: steps between loss read-backs from the device, the only host "
                              "synchronisation of a step (every step is still logged).", type="POSITIVE",
                          maximum=1_000_000)
    workers: int = knob(4, "Data-loader processes per process (full fine-tuning; a frozen-backbone run reads its "
                           "cached features in memory, with none).", type="COUNT", maximum=1024)
    device: str | None = knob(None, DEVICE_HELP + " Under torchrun: LOCAL_RANK's GPU.",
                              default_text="cuda when present, else cpu")
    seed: list[int] = knob([0], "Seed of the run; repeat for one run per seed (RUN/s<seed>).",
                           multiple=True, type="SEED")
    checkpoint_every: int = knob(0, "Steps between checkpoints (0: at epoch ends).",
                                 type="COUNT", maximum=1 << 30)
    objective: str = knob("ce", "ce: cross-entropy against the frozen head (the paper); contrastive: video-text "
                                "InfoNCE (the Table 9 baseline).", type=("ce", "contrastive"))
    batch_gather: bool = knob(True, "Contrastive: score local clips against the batch gathered from all processes.",
                              toggle="batch-gather/--no-batch-gather")
    text: str = knob("offline", "Contrastive: cached label embeddings (offline) or the CLIP text tower trained "
                                "(online).", type=("offline", "online"))
    text_lr: float = knob(5e-6, "Contrastive, online text: the text tower's lr.")
    text_weight_decay: float = knob(0.2, "Contrastive, online text: its weight decay.")
    text_template: str = knob("a video of a person {}.", "Contrastive, online text: the prompt, with {}.")


class ImportSettings(Replace, DataSource):
    SECTION: ClassVar[str] = "import"
    source: str | None = knob(None, "Folder of <video_id>.npy / .h5 files.", flag="--from", type="DIR")
    model_tag: str | None = knob(None, "The model's name in the cache for these features (--model-key of later "
                                       "commands).", flag="--model-key", old_flags=("--model-tag",))
    cache_frames: int = knob(8, "Frames per video in the store (resampled).", type="POSITIVE", maximum=1024,
                             old_flags=("--num-frames",), old_keys=("num_frames",))
    block_size: int = knob(16, "Videos per block.", type="POSITIVE")


class PredictSettings(ModelChoice):
    SECTION: ClassVar[str] = "predict"
    labels: str | None = knob(None, "Comma-separated label names: 'jumping,running,swimming'.")
    labels_file: str | None = knob(None, "One label name a line.", type="FILE")
    template: str = knob("paper", "Prompt template: paper, bare, kinetics28, a file, or a text with {}.")
    frames: int = knob(8, "Frames per video.", type="POSITIVE", maximum=1024)
    device: str | None = knob(None, DEVICE_HELP, default_text="cuda when present, else cpu")
    run_name: str | None = knob(None, "A fine-tuned run (CACHE/runs/RUN) as the classifier; without --labels it "
                                      "uses the run's own classes.", old_flags=("--run",), old_keys=("run",))
    test_scale: int = knob(256, "With --run-name: " + TEST_SCALE_HELP, type="POSITIVE")


class PretrainSettings(DatasetName):
    SECTION: ClassVar[str] = "pretrain"
    out: str | None = knob(None, "Model folder.", type="DIR", default_text="CACHE/tiny-clip")
    steps: int = knob(600, "Training steps.", type="POSITIVE", maximum=100_000_000)
    global_batch_size: int = knob(128, "Frame-caption pairs per step.", type="POSITIVE", maximum=1 << 20,
                                  old_flags=("--batch-size",), old_keys=("batch_size",))
    lr: float = knob(5e-4, "Peak learning rate.")
    seed: int = knob(0, "Seed.", type="SEED")
    heldout: list[str] = knob([], "Class never shown in pretraining (repeatable; params: a list).", multiple=True)
    weight_decay: float = knob(0.1, "AdamW weight decay.")
    warmup: int = knob(50, "Linear warm-up steps.", type="COUNT", maximum=100_000_000)
    word_dropout: float = knob(0.25, "Probability of dropping each caption word.", type="PROBABILITY")
    embed_dim: int = knob(128, "The tiny CLIP's embedding width.", type="POSITIVE", maximum=4096)
    image_size: int = knob(64, "Its input side in pixels.", type="SIDE", maximum=1024)
    patch_size: int = knob(8, "Its patch side in pixels.", type="POSITIVE", maximum=256)
    width: int = knob(128, "Its towers' width (a multiple of 64).", type="POSITIVE", maximum=4096)
    layers: int = knob(4, "Its image tower's layers.", type="POSITIVE", maximum=64)
    text_layers: int = knob(4, "Its text tower's layers.", type="POSITIVE", maximum=64)
    context_length: int = knob(16, "Its text tower's context length, in tokens.", type="POSITIVE", maximum=77)


class WorldSettings(Settings):
    SECTION: ClassVar[str] = "world"
    out: str | None = knob(None, "Output folder.", type="DIR", default_text="CACHE/world")
    kind: str = knob("objects", "Which world.", type=("objects", "order"))
    train_per_class: int = knob(8, "Training clips per class.", type="POSITIVE", maximum=100_000)
    val_per_class: int = knob(4, "Validation clips per class.", type="POSITIVE", maximum=100_000)
    frames: int = knob(16, "Frames per clip.", type="POSITIVE", maximum=4096)
    size: int = knob(64, "Frame side in pixels.", type="SIDE", maximum=4096)
    seed: int = knob(0, "World seed.", type="SEED")
    colours: list[str] = knob([], "Colours of the objects (repeatable) [objects: red green blue yellow purple cyan; "
                                  "order: red green blue yellow].", flag="--colour", multiple=True)
    shapes: list[str] = knob([], "Shapes of the objects (repeatable) [disc ring plus bar].", flag="--shape",
                             multiple=True)
    sizes: list[str] = knob([], "Sizes of the objects (repeatable) [small large].", flag="--object-size",
                            multiple=True)


class ExportSettings(ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "export"
    what: str = knob("frames", "Which output to export.", type=("frames", "features", "labels", "head"))
    split: str | None = knob(None, "Split (frames, features).")
    encoder: str = knob("clip", "Text encoder of labels / a text head: clip or hf:NAME.")
    head: str | None = knob(None, "Head kind (--what head).", type=HEADS, old_flags=("--kind",))
    out: str | None = knob(None, "Output file: .npz (NumPy) or .h5 (HDF5), by its suffix.", type="FILE")


class PlotSettings(ModelChoice, DatasetName):
    SECTION: ClassVar[str] = "plot"
    heads: list[str] = knob([], "Head kind(s) to plot (repeatable) [every cached head].", flag="--head",
                            multiple=True, old_flags=("--kind",), old_keys=("kinds",))
    classes: str = knob("20", "Classes to show: a number N (the first N) or a file of class names.")
    out: str | None = knob(None, "Output folder.", type="DIR", default_text="CACHE/plots/DATASET")


class ReportSettings(DatasetName):
    SECTION: ClassVar[str] = "report"
    out: str | None = knob(None, "Report folder.", type="DIR", default_text="CACHE/report")
    order_dataset: str = knob("demo-order", "The order world's dataset (Table 8).")
    model_key: str = knob("tiny-clip", "The model whose features, heads and runs the report reads (params: "
                                       "model.key).")


@dataclass
class CompactSettings(DatasetName):
    SECTION: ClassVar[str] = "compact"
    splits: list[str] = knob([], "Split(s) to compact (repeatable) [default: every stored split].", flag="--split",
                             multiple=True)


COMMANDS: dict[str, type] = {
    "frames": FramesSettings, "features": FeaturesSettings, "labels": LabelsSettings, "extract": ExtractSettings,
    "heads": HeadsSettings, "lda": LdaSettings, "evaluate": EvaluateSettings, "finetune": FinetuneSettings,
    "import": ImportSettings, "predict": PredictSettings, "pretrain": PretrainSettings, "world": WorldSettings,
    "export": ExportSettings, "plot-heads": PlotSettings, "report": ReportSettings, "compact": CompactSettings,
}


# Groups of another command's keys: the order world's settings (`world --kind order`), and the demo's
# Table 8 and 9 variants of fine-tuning, which its dvc.yaml passes to `pipeline finetune` as flags.
VARIANT_GROUPS = {"order_world": "world", "temporal": "finetune", "contrastive": "finetune"}


def params_keys() -> dict[str, set[str]]:
    """Every params group and the keys it may hold (old spellings included), from the settings themselves."""
    keys: dict[str, set[str]] = {"data": set(DATA_KEYS) | {"name"}, "model": set(MODEL_KEYS.values())}
    for cls in COMMANDS.values():
        for f in settings_fields(cls):
            group, _, key = key_of(cls, f).partition(".")
            keys.setdefault(group, set()).update({key, *f.knob.old_keys})
    for variant, group in VARIANT_GROUPS.items():
        keys[variant] = set(keys[group])
    return keys


def params_file_model() -> type[BaseModel]:
    """A params file as a pydantic model: one sub-model per group, each of the keys some setting reads, and
    nothing else (``extra="forbid"``). Values are checked when a command resolves them (:func:`resolve`)."""
    from pydantic import create_model

    strict = ConfigDict(extra="forbid")
    groups = {group: (create_model(f"Group_{group}", __config__=strict, **{k: (Any, None) for k in sorted(keys)})
                      | None, None) for group, keys in params_keys().items()}
    return create_model("ParamsFile", __config__=strict, **groups)


def load_params(path: Any) -> dict[str, Any]:
    """A params file read and validated (``./params.yaml`` when present and no path is given; {} without one):
    a group or key no setting reads is an error naming the closest valid one."""
    data = read_params_file(path)
    if data:
        check_params(data, str(path or "params.yaml"))
    return data


def check_params(params: dict[str, Any], where: str) -> None:
    """Refuse a params file with a group or key no setting reads (a typo would be silently ignored), naming the
    closest valid one."""
    import difflib

    from pipeline.core.errors import PipelineError

    try:
        params_file_model().model_validate(params)
    except ValidationError as e:
        known = params_keys()
        for err in e.errors():
            loc = [str(part) for part in err["loc"]]
            if err["type"] == "extra_forbidden" and len(loc) == 1:
                close = difflib.get_close_matches(loc[0], sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (groups: {', '.join(sorted(known))})"
                raise PipelineError(f"{where}: unknown params group {loc[0]!r}{hint}") from None
            if err["type"] == "extra_forbidden":
                group, key = loc[0], loc[-1]
                close = difflib.get_close_matches(key, sorted(known[group]), n=1)
                hint = (f"; did you mean {group}.{close[0]}?" if close else
                        f" (keys of {group}: {', '.join(sorted(known[group]))})")
                raise PipelineError(f"{where}: unknown params key {group}.{key}{hint}") from None
            if len(loc) == 1:
                raise PipelineError(f"{where}: params group {loc[0]!r} must be a mapping of keys to values") \
                    from None
        raise PipelineError(f"{where}: {e.errors()[0]['msg']}") from None


@dataclass(frozen=True)
class SettingField:
    """One setting of a settings model: its name, pydantic's field and its :class:`Knob`."""

    name: str
    info: Any  # pydantic FieldInfo

    @property
    def knob(self) -> Knob:
        return self.info.json_schema_extra["knob"]

    @property
    def annotation(self) -> Any:
        return self.info.annotation


def settings_fields(cls: type) -> list[SettingField]:
    """The settings of ``cls``, in declaration order."""
    return [SettingField(name, info) for name, info in cls.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and "knob" in info.json_schema_extra]


def default_of(f: SettingField) -> Any:
    return f.info.get_default(call_default_factory=True)


def scalar_kind(cls: type, f: SettingField) -> type | None:
    """bool, int, float or str: the field's scalar type (``float | None`` is a float when given; None: other)."""
    import typing

    hint = f.annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(args) == 1 and args[0] in (bool, int, float, str):
        return args[0]
    return None


def click_type(cls: type, f: SettingField) -> Any:
    """The click type of a setting, from its one declaration of type and range."""
    import click

    k = f.knob
    if k.type in ("FORMATS", "INTERPOLATIONS", "SEEK_MODES"):
        return click.Choice({"FORMATS": FORMATS, "INTERPOLATIONS": INTERPOLATIONS, "SEEK_MODES": SEEK_MODES}[k.type])
    if k.type == "FILE":
        return click.Path(dir_okay=False)
    if k.type == "DIR":
        return click.Path(file_okay=False)
    if isinstance(k.type, str):
        low, high, exclusive = RANGES[k.type]
        high = k.maximum if high is None else high
        if isinstance(low, float):
            return click.FloatRange(low, high, min_open=exclusive, max_open=exclusive)
        return click.IntRange(low, high)
    if isinstance(k.type, tuple):
        return click.Choice(k.type)
    if k.nargs > 1:
        return (k.type,) * k.nargs
    if k.type is not None:
        return k.type
    kind = scalar_kind(cls, f)
    return kind if kind in (int, float) else None


@dataclass
class Resolved:
    """One command's settings and where each came from: 'flag', 'params.yaml: group.key' or 'default'."""

    values: Any
    sources: dict[str, str]
    notes: list[str] = field(default_factory=list)  # lines for stderr: old spellings used, ignored params


def given(value: Any) -> bool:
    """Whether a flag was given (click passes None, or () for a repeatable option, when it was not)."""
    return value is not None and value != ()


def old_dest(flag: str) -> str:
    """The click parameter name of a deprecated spelling of a setting."""
    return "old_" + flag.lstrip("-").replace("-", "_")


def flag_of(f: SettingField) -> str:
    k = f.knob
    if k.toggle:
        return "--" + k.toggle.split("/")[0]
    return k.flag or "--" + f.name.replace("_", "-")


def key_of(cls: type, f: SettingField) -> str:
    """The params file key of a field, for messages: ``finetune.lr``, ``data.root``, ``model.name``."""
    if f.name in MODEL_KEYS:
        return f"model.{MODEL_KEYS[f.name]}"
    if f.name in DATA_KEYS:
        return f"data.{f.name}"
    return f"{f.knob.section or cls.SECTION}.{f.name}"


def _as_given(f: SettingField, value: Any) -> Any:
    """A params value in the shape of its field: one item of a repeatable setting as a list of it."""
    if f.knob.multiple and not isinstance(value, (list, tuple)):
        return [value]
    return value


def _model_name(name: Any) -> str:
    """A model name compared as the model it loads (``local-dir:`` paths made absolute)."""
    import os

    text = str(name)
    if text.startswith("local-dir:"):
        return "local-dir:" + os.path.abspath(os.path.expanduser(text[len("local-dir:"):]))
    return text


def resolve(cls: type, params_for: Any, flags: dict[str, Any]) -> Resolved:
    """``cls`` filled from flags, then params (``params_for(section)`` -> :class:`~pipeline.core.params.Params`), then
    defaults. Deprecated spellings are accepted and listed in ``deprecated``."""
    flags = dict(flags)
    deprecated: list[str] = []
    notes: list[str] = []
    if issubclass(cls, DataSource):
        if given(flags.get(old_dest("--name"))):
            # the old `-d csv --name demo`: --dataset was the format, --name the cache name
            if not given(flags.get("format")):
                flags["format"] = flags.get("dataset")
            flags["dataset"] = flags.pop(old_dest("--name"))
            deprecated.append("--name is deprecated: --format FORMAT --dataset NAME")
        described = [v for v in params_for(cls.SECTION).described() if v]
        wanted = [flags[k] for k in ("format", "dataset") if given(flags.get(k))]
        if described and wanted and not set(wanted) & set(described):
            base = params_for
            params_for = lambda section: base(section).without_data()  # noqa: E731
            notes.append(f"note: the params file describes another dataset ({'/'.join(described)}); its data.* "
                         f"keys are ignored here (pass --params FILE for another setup)")
    if issubclass(cls, ModelChoice) and given(flags.get("model")):
        named = params_for(cls.SECTION).described_model()
        if named and _model_name(named) != _model_name(flags["model"]):
            base_model = params_for
            params_for = lambda section: base_model(section).without_model()  # noqa: E731
            notes.append(f"note: the params file's model group describes {named}; its model.* keys (key, "
                         "pretrained, ...) are ignored for --model " + str(flags["model"]))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in settings_fields(cls):
        k = f.knob
        flag = flags.get(f.name)
        for old in k.old_flags:
            value = flags.get(old_dest(old))
            if given(value):
                deprecated.append(f"{old} is deprecated: use {flag_of(f)}")
                flag = flag if given(flag) else value
        if given(flag):
            values[f.name] = list(flag) if k.multiple else flag
            sources[f.name] = "flag"
            continue
        found, value, where, old_key = params_for(k.section or cls.SECTION).lookup(f.name, k.old_keys)
        if found:
            if old_key:
                deprecated.append(f"params key {where} is deprecated: use {key_of(cls, f)}")
            values[f.name] = _as_given(f, value)
            sources[f.name] = f"params: {where}"
        # else: pydantic fills the default
    try:
        made = cls.model_validate(values)
    except ValidationError as e:
        raise _one_line(cls, e, sources) from None
    for f in settings_fields(cls):
        sources.setdefault(f.name, "default")
    return Resolved(made, sources, [f"warning: {line}" for line in deprecated] + notes)


def _one_line(cls: type, e: ValidationError, sources: dict[str, str]) -> Exception:
    """pydantic's first complaint as one line, naming the flag or the params key the value came from."""
    from pipeline.core.errors import PipelineError

    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    if not name and ": " in err["msg"]:  # a model-level check names its field first ("seed: -1 is not ...")
        name, _, rest = err["msg"].removeprefix("Value error, ").partition(": ")
        err = {**err, "msg": rest}
    by_name = {f.name: f for f in settings_fields(cls)}
    source = sources.get(name, "")
    if source.startswith("params: "):
        where = f"{source[len('params: '):]} in the params file"
    elif name in by_name:
        where = flag_of(by_name[name])
    else:
        where = "settings"
    value = f" (got {err['input']!r})" if err.get("loc") and "input" in err else ""
    return PipelineError(f"{where}: {err['msg']}{value}")


def describe(cls: type, resolved: Resolved) -> list[str]:
    """The resolved settings, one line each, with where each value came from."""
    lines = []
    width = max(len(flag_of(f)) for f in settings_fields(cls)) + 2
    for f in settings_fields(cls):
        value = getattr(resolved.values, f.name)
        if isinstance(value, (list, tuple)):
            shown = " ".join(map(str, value)) or "-"
        else:
            shown = "-" if value is None else str(value)
        lines.append(f"  {flag_of(f):<{width}} {shown:<36} {resolved.sources[f.name]}")
    return lines
