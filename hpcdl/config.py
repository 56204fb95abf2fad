"""Typed run configuration: TOML in, validated dataclasses out.

Every key has a type, a default, a one-line help text and, where it makes
sense, a range or a set of choices. `load(path, overrides)` reads the TOML
file (Python's `tomllib`), applies `--set section.key=value` overrides and
validates everything before any rank touches data or MPI, so a typo costs a
second, not a queue wait. Errors are one line naming the file and the key,
with a did-you-mean suggestion for unknown keys.

`hpcdl train --help-config` prints the reference generated from the same
metadata, so the documentation cannot drift from the code.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from hpcdl.errors import ConfigError


def _key(default, help: str, *, min=None, max=None, choices=None, min_exclusive=False):
    meta = {"help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _key("fmnist_cnn", "model by name; `hpcdl info --models` lists them")
    options: dict = _key({}, "keyword options of the model builder, e.g. {stem = 'cifar', zero_init_residual = true}")


@dataclass
class DataConfig:
    dataset: str = _key("fashion_mnist", "dataset source", choices=("fashion_mnist", "idx", "hdf5", "synthetic"))
    data_dir: str = _key("", "directory with the IDX files; empty searches $HPCDL_DATA, /usr/share/datasets/fashion-mnist, ~/.cache/hpcdl")
    path: str = _key("", "HDF5 file for dataset = 'hdf5' (see `hpcdl data convert`)")
    download: bool = _key(True, "download Fashion-MNIST (SHA-256 checked) when it is nowhere on disk and the network allows")
    synthetic_samples: int = _key(4096, "training samples of the synthetic dataset", min=1)
    synthetic_shape: list = _key([1, 28, 28], "C, H, W of the synthetic dataset")
    random_crop_pad: int = _key(0, "pad for random-crop augmentation at the stored size; 0 disables", min=0)
    random_flip: bool = _key(False, "random horizontal flip augmentation")
    image_size: int = _key(0, "side of the square images the model sees (e.g. 224); 0 = the stored size", min=0)
    random_resized_crop: bool = _key(False, "training crops as torchvision's RandomResizedCrop (crop_scale, crop_ratio), resized to image_size")
    crop_scale: list = _key([0.08, 1.0], "RandomResizedCrop: range of the crop's share of the stored image's area")
    crop_ratio: list = _key([0.75, 4 / 3], "RandomResizedCrop: range of the crop's width/height, drawn log-uniformly")
    eval_crop_fraction: float = _key(0.875, "evaluation of files stored at a short side: the centre crop keeps this fraction of it (224/256), then resizes to image_size", min=0.0, min_exclusive=True, max=1.0)
    memory_mb: float = _key(1024.0, "per-rank memory for data: prefetched batches, worker buffers, labels, in-memory images", min=0.0, min_exclusive=True)
    prefetch: int = _key(4, "micro-batches prepared ahead by background workers; 0 = prepare each in the training thread", min=0)
    workers: int = _key(1, "background workers per rank that read and transform batches", min=1)
    worker_kind: str = _key("auto", "workers as threads of the rank or as processes (HDF5 only); auto = processes for HDF5, threads for in-memory data", choices=("auto", "thread", "process"))


@dataclass
class TrainConfig:
    epochs: float = _key(15.0, "epochs to train (fractional allowed); ignored when max_steps > 0", min=0, min_exclusive=True)
    max_steps: int = _key(0, "stop after this many optimizer steps; 0 = use epochs", min=0)
    global_batch: int = _key(128, "samples per optimizer step over all ranks = per-rank batch × ranks × accumulate_steps", min=1)
    accumulate_steps: int = _key(1, "micro-batches per optimizer step on each rank (emulates a large batch on few ranks)", min=1)
    seed: int = _key(0, "seed of weights, sample order and augmentation (same on every rank)", min=0)
    label_smoothing: float = _key(0.0, "label smoothing of the cross-entropy", min=0.0, max=0.999)
    eval_batch: int = _key(0, "per-rank batch for evaluation; 0 = the per-rank training micro-batch", min=0)
    eval_every_epochs: float = _key(1.0, "evaluate on the test split every so many epochs; 0 = only at the end", min=0)
    max_nonfinite_steps: int = _key(5, "stop with an error after this many consecutive steps with non-finite gradients", min=1)


@dataclass
class OptimConfig:
    name: str = _key("sgd", "optimizer", choices=("sgd", "nesterov", "adamw", "lars", "lamb"))
    momentum: float = _key(0.9, "momentum of sgd/nesterov/lars", min=0.0, max=1.0)
    weight_decay: float = _key(0.0, "L2 (sgd, lars) or decoupled (adamw, lamb) weight decay; a config without it trains with none, unlike `optim.create`, whose defaults are the papers' (adamw, lamb 0.01; lars 1e-4)", min=0.0)
    betas: list = _key([0.9, 0.999], "Adam/LAMB moment decay rates [beta1, beta2]")
    eps: float = _key(0.0, "epsilon of adamw/lamb; 0 = the optimizer's own default, as `optim.create` has it: adamw 1e-8 (PyTorch), lamb 1e-6 (TF-addons); LARS keeps the MLPerf reference's 1e-7", min=0.0)
    trust_coefficient: float = _key(0.001, "LARS trust coefficient eta", min=0.0, min_exclusive=True)
    lamb_mode: str = _key("paper", "LAMB variant: 'paper' (TF-addons) or 'nvlamb' (apex FusedLAMB, global-norm clipping)", choices=("paper", "nvlamb"))
    max_grad_norm: float = _key(1.0, "nvlamb: clip gradients to this global L2 norm", min=0.0, min_exclusive=True)
    trust_clamp: list = _key([], "optional [low, high] clamp of the trust ratio (DeepSpeed uses [0.01, 10]); empty = off")
    no_decay: list = _key(["bias", "norm", "no_decay"], "parameters without weight decay: flags (bias, norm, no_decay, no_adapt) or name globs")
    no_adapt: list = _key(["bias", "norm", "no_adapt"], "parameters without a trust ratio (LARS/LAMB): flags or name globs")


@dataclass
class ScheduleConfig:
    base_lr: float = _key(0.05, "learning rate at base_batch", min=0.0, min_exclusive=True)
    base_batch: int = _key(128, "batch size base_lr was tuned for", min=1)
    scaling: str = _key("linear", "LR rule when global_batch != base_batch: 'linear' (Goyal et al.), 'sqrt' (LAMB: also warmup × k) or 'none'", choices=("none", "linear", "sqrt"))
    warmup_epochs: float = _key(0.0, "linear warmup length in epochs (before any sqrt scaling of warmup)", min=0.0)
    warmup_from: str = _key("zero", "warmup starts at 0 or at the unscaled base_lr", choices=("zero", "base"))
    decay: str = _key("cosine", "decay after warmup", choices=("constant", "poly", "cosine", "step"))
    power: float = _key(2.0, "poly decay power (2 for LARS, MLPerf)", min=0.0, min_exclusive=True)
    end_lr: float = _key(0.0, "LR at the last step for poly/cosine", min=0.0)
    milestones: list = _key([], "step decay: epochs at which LR is multiplied by gamma")
    gamma: float = _key(0.1, "step decay factor", min=0.0, min_exclusive=True)


@dataclass
class CommConfig:
    algorithm: str = _key("auto", "allreduce algorithm", choices=("native", "ring", "recursive_doubling", "rabenseifner", "hierarchical", "shm", "auto"))
    crossovers: str = _key("", "JSON crossover table for 'auto' from `hpcdl bench allreduce --save-crossovers`; empty = shipped default")
    ranks_per_node: int = _key(0, "hierarchical: ranks per node; 0 = detect from MPI shared-memory domains", min=0)
    bucket_mb: float = _key(25.0, "gradient bucket size in MiB", min=0.0, min_exclusive=True)
    bucket_taper: bool = _key(True, "buckets near the first layers no larger than all the parameters before them "
                                    "(>= 1 MiB), so the last ones to start can still hide behind backward")
    overlap: bool = _key(True, "start each bucket's allreduce during backward as soon as its gradients are complete")
    progress: str = _key("auto", "what advances buckets in flight: 'thread' (a communication thread, needs "
                         "MPI_THREAD_MULTIPLE), 'hooks' (backward's gradient-ready hooks poll them), 'auto' = thread "
                         "on the GPU, hooks on the CPU (where the thread competes with backward; docs/comm.md)",
                         choices=("auto", "thread", "hooks"))
    progress_budget_ms: float = _key(0.0, "hooks: keep polling for up to this long in each hook call; 0 = one poll", min=0.0)
    progress_interval_us: float = _key(50.0, "thread: sleep between polls that find nothing finished (bounds its CPU share)", min=0.0)
    piece_kb: int = _key(0, "reduce piece size in KiB; 0 = a quarter of the L2 cache (smallest over ranks)", min=0)
    pipeline_depth: int = _key(2, "reduce pieces in flight per step; 1 = not pipelined", min=1)
    shared_window: bool = _key(True, "ring, hierarchical, auto: put the gradients in an MPI-3 shared window so on-node "
                                     "ranks add each other's gradients in place instead of messaging them; used "
                                     "only with fault_tolerance = 'abort' and on the CPU (a window belongs to one "
                                     "MPI world and to host memory)")
    sync_batchnorm: bool = _key(False, "batch-norm statistics over the global batch (allreduce of the sums)")
    stall_timeout_s: float = _key(60.0, "report ranks that have not arrived after waiting this long in a collective; 0 = off", min=0.0)
    fault_tolerance: str = _key("abort", "what a dead rank does: 'abort' ends the job fast (restart from a checkpoint); "
                                "'shrink' continues on the survivors, 'regrow' also spawns replacements up to the "
                                "original size; both need Open MPI 5 launched with `mpirun --with-ft ulfm` "
                                "(docs/fault-tolerance.md)", choices=("abort", "shrink", "regrow"))


@dataclass
class CheckpointConfig:
    every_steps: int = _key(0, "checkpoint every N optimizer steps; 0 = off", min=0)
    every_minutes: float = _key(0.0, "checkpoint every T minutes (rank 0's clock); 0 = off", min=0.0)
    keep: int = _key(3, "number of newest checkpoints kept", min=1)
    at_end: bool = _key(True, "write a checkpoint when training finishes")


@dataclass
class RuntimeConfig:
    device: str = _key("cpu", "cpu (NumPy + Numba) or gpu (CuPy; one device per rank by local rank)", choices=("cpu", "gpu"))
    threads: int = _key(0, "BLAS/Numba threads per rank; 0 = $OMP_NUM_THREADS, else $SLURM_CPUS_PER_TASK, else the "
                           "cores in the rank's affinity mask / the local ranks sharing them "
                           "(docs/threads-and-binding.md)", min=0)


@dataclass
class LogConfig:
    every_steps: int = _key(50, "metrics.jsonl line (and progress update) every N steps", min=1)
    progress: bool = _key(True, "progress bar with images/s on rank 0 (stderr)")
    layer_stats_every: int = _key(0, "log per-layer ||w||, ||g||, trust ratio every N steps; 0 = off", min=0)
    plots: bool = _key(True, "write curves.png (loss, accuracy, LR) at the end")
    trace_steps: list = _key([], "[first, last]: write a Chrome-trace timeline of these steps (1-based), one track "
                             "per rank (docs/scaling.md); [] = off unless --trace FILE, which traces [1, 20]")
    trace_file: str = _key("", "where the timeline goes (--trace FILE); empty = <run directory>/trace.json")
    trace_layers: bool = _key(False, "the timeline also gets every layer's forward and backward, nested in the "
                              "step's phases (traced steps only; needs log.trace_steps or --trace)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _section_types() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# What each annotated type accepts from TOML, and how the error names it. bool is an
# int in Python, so numbers exclude it explicitly: `epochs = true` is a mistake, not 1.
_ACCEPTS = {
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    list: (lambda v: isinstance(v, list), "a list"),
    dict: (lambda v: isinstance(v, dict), "a table"),
}


def _coerce(value: Any, expected: type, where: str):
    accepts, description = _ACCEPTS[get_origin(expected) or expected]
    if not accepts(value):
        raise ConfigError(f"{where}: expected {description}, got {value!r}")
    return float(value) if expected is float else value


def _check_range(value, meta: dict, where: str):
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}{_suggest(str(value), choices)}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
        bound = f"> {low}" if meta.get("min_exclusive") else f">= {low}"
        raise ConfigError(f"{where}: {value!r} must be {bound}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: {value!r} must be <= {high}")


def from_dict(raw: dict, source: str = "config") -> Config:
    """Validate a parsed TOML document into a Config; errors name `source` and the key."""
    types = _section_types()
    sections = {}
    for section_name, table in raw.items():
        if section_name not in types:
            raise ConfigError(f"{source}: unknown section [{section_name}]{_suggest(section_name, types)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table")
        section_type = types[section_name]
        hints = get_type_hints(section_type)
        metas = {f.name: f.metadata for f in dataclasses.fields(section_type)}
        values = {}
        for key, value in table.items():
            where = f"{source}: {section_name}.{key}"
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section_name}.{key}{_suggest(key, hints, section_name + '.')}")
            value = _coerce(value, hints[key], where)
            _check_range(value, metas[key], where)
            values[key] = value
        sections[section_name] = section_type(**values)
    config = Config(**sections)
    _check_relations(config, source)
    return config


def _low_high(pair) -> bool:
    """[low, high] of two numbers with 0 < low <= high."""
    return (len(pair) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)
            and 0 < pair[0] <= pair[1])


def _check_relations(config: Config, source: str):
    """Checks that involve more than one key."""
    optim = config.optim
    if len(optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"{source}: optim.betas: expected [beta1, beta2] in [0, 1), got {optim.betas!r}")
    if optim.trust_clamp and (len(optim.trust_clamp) != 2 or not 0 < optim.trust_clamp[0] <= optim.trust_clamp[1]):
        raise ConfigError(f"{source}: optim.trust_clamp: expected [] or [low, high] with 0 < low <= high, got {optim.trust_clamp!r}")
    for key in ("no_decay", "no_adapt"):
        if not all(isinstance(x, str) for x in getattr(optim, key)):
            raise ConfigError(f"{source}: optim.{key}: expected a list of flags or name patterns")
    if not all(isinstance(m, (int, float)) and m >= 0 for m in config.schedule.milestones):
        raise ConfigError(f"{source}: schedule.milestones: expected a list of epochs >= 0")
    shape = config.data.synthetic_shape
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ConfigError(f"{source}: data.synthetic_shape: expected [C, H, W] of positive integers, got {shape!r}")
    data = config.data
    if data.dataset == "hdf5" and not data.path:
        raise ConfigError(f"{source}: data.path: dataset = 'hdf5' needs the path of an HDF5 file")
    if not (_low_high(data.crop_scale) and data.crop_scale[1] <= 1):
        raise ConfigError(f"{source}: data.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {data.crop_scale!r}")
    if not _low_high(data.crop_ratio):
        raise ConfigError(f"{source}: data.crop_ratio: expected [low, high] with 0 < low <= high, got {data.crop_ratio!r}")
    if data.random_resized_crop and data.random_crop_pad:
        raise ConfigError(f"{source}: data.random_crop_pad: choose random_crop_pad or random_resized_crop, not both")
    if data.worker_kind == "process" and data.prefetch and data.dataset != "hdf5":
        raise ConfigError(f"{source}: data.worker_kind: 'process' workers read HDF5 files; dataset "
                          f"{data.dataset!r} is in memory (use 'thread')")
    steps = config.log.trace_steps
    if steps and not (len(steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
                      and 1 <= steps[0] <= steps[1]):
        raise ConfigError(f"{source}: log.trace_steps: expected [] or [first, last] with 1 <= first <= last, got {steps!r}")
    if config.log.trace_layers and not (steps or config.log.trace_file):
        raise ConfigError(f"{source}: log.trace_layers: no timeline to put the layers on; set log.trace_steps "
                          "or pass --trace FILE")
    if config.comm.algorithm == "shm" and config.comm.fault_tolerance != "abort":
        raise ConfigError(f"{source}: comm.algorithm: 'shm' cannot be combined with comm.fault_tolerance = "
                          f"{config.comm.fault_tolerance!r}: its shared window belongs to one MPI world, which a "
                          "shrink replaces; use 'ring' or 'hierarchical'")
    if config.comm.algorithm == "shm" and config.runtime.device == "gpu":
        raise ConfigError(f"{source}: comm.algorithm: 'shm' reduces host memory; with runtime.device = 'gpu' "
                          "use 'ring', 'hierarchical' or 'native'")
    train = config.train
    if train.global_batch % train.accumulate_steps:
        raise ConfigError(
            f"{source}: train.global_batch: {train.global_batch} is not divisible by train.accumulate_steps = {train.accumulate_steps}"
        )


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' with a TOML value; bare words that are not TOML become strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, value_text = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=3")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return parts[0], ".".join(parts[1:]), value


def _apply_override(raw: dict, section: str, key: str, value):
    table = raw.setdefault(section, {})
    if "." in key:  # e.g. model.options.stem=cifar
        head, rest = key.split(".", 1)
        _apply_override(table, head, rest, value)
    else:
        table[key] = value


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        _apply_override(raw, section, key, value)
    if overrides:
        source += " + --set"
    return from_dict(raw, source)


def reference() -> str:
    """The config reference as Markdown-ish text, generated from the field metadata."""
    lines = []
    for section_name, section_type in _section_types().items():
        lines.append(f"[{section_name}]")
        hints = get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = f.metadata
            extra = ""
            if meta.get("choices"):
                extra = f"  one of: {', '.join(meta['choices'])}"
            lines.append(f"  {f.name} = {json.dumps(default)}   # {hints[f.name].__name__}: {meta['help']}{extra}")
        lines.append("")
    return "\n".join(lines)
