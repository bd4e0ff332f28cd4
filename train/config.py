"""The experiment config: frozen dataclasses per component, composed into `ExperimentConfig`.

An experiment YAML holds only what differs from the defaults; the command line adds
`section.key=value` overrides. Anything unknown or ill-typed is a `ConfigError` whose one-line
message names the key and what is allowed. `model.preset=NAME` starts the model section from a
named preset (see `model/config.py`); the other model keys override its fields.

    cfg = load_config("experiments/quickstart.yaml", ["train.steps=10", "model.n_layers=2"])
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import ConfigError, ModelConfig, build_section, choice, model_config_from_dict


SOURCES = ("python_stdlib", "tinyshakespeare", "files", "url", "chat_jsonl", "stdlib_chat")
CHAT_SOURCES = ("chat_jsonl", "stdlib_chat")  # conversations: packed examples, loss on assistant tokens only
LORA_TARGETS = ("q", "k", "v", "o", "mlp")
TOKENIZERS = ("byte", "char", "bpe")
SAMPLING = ("windows", "packed")


@dataclass(frozen=True)
class DataConfig:
    source: str = "python_stdlib"  # python_stdlib | tinyshakespeare | files | url | chat_jsonl | stdlib_chat
    # files: a file, directory or glob; tinyshakespeare: a local copy (else downloaded); chat_jsonl: a
    # JSONL file of {"messages": [...]} (the last val_fraction held out) or a directory with train.jsonl
    # and val.jsonl
    path: str = ""
    url: str = ""  # url: where to download the text from (once, into cache_dir)
    sha256: str = ""  # url: expected checksum of the download ("" = not checked)
    cache_dir: str = "~/.cache/jaxlm"
    max_chars: int = 0  # cap on the corpus size in characters (0 = all); python_stdlib uses it
    tokenizer: str = "byte"  # byte | char | bpe
    tokenizer_path: str = ""  # bpe: an existing tokenizer.json instead of training one
    bpe_vocab_size: int = 4096  # bpe: vocabulary size to train
    seq_len: int = 0  # tokens per training example (0 = the model's max_seq_len)
    val_fraction: float = 0.1  # last fraction of the token stream held out for validation
    sampling: str = "windows"  # windows: random offsets (nanoGPT); packed: shuffled disjoint chunks
    store: str = ""  # token store location (local path or gs://...); "" = <run dir>/tokens
    worker_count: int = 0  # Grain worker processes (0 = in the main process)

    def validate(self) -> "DataConfig":
        choice("data.source", self.source, SOURCES)
        choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        choice("data.sampling", self.sampling, SAMPLING)
        if self.source == "files" and not self.path:
            raise ConfigError("data.path is required with data.source=files (a file, directory or glob)")
        if self.source == "chat_jsonl" and not self.path:
            raise ConfigError("data.path is required with data.source=chat_jsonl (a .jsonl file, or a directory "
                              "with train.jsonl and val.jsonl)")
        if self.source == "url" and not self.url:
            raise ConfigError("data.url is required with data.source=url")
        if self.seq_len < 0:
            raise ConfigError(f"data.seq_len={self.seq_len} must be a positive integer (0 = model.max_seq_len)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.bpe_vocab_size < 260:
            raise ConfigError(f"data.bpe_vocab_size={self.bpe_vocab_size} must be >= 260")
        if self.max_chars < 0 or self.worker_count < 0:
            raise ConfigError("data.max_chars and data.worker_count must be >= 0")
        return self


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to lr
    decay_steps: int = 0  # cosine decay from lr to min_lr ends here (0 = train.steps)
    min_lr: float = 1e-4  # the floor of the cosine
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms, biases and embeddings
    clip_norm: float = 1.0  # global gradient-norm clipping (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step

    def validate(self) -> "OptimConfig":
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr} must be > 0 and 0 <= optim.min_lr={self.min_lr} <= lr")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1={self.beta1} and optim.beta2={self.beta2} must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ConfigError("optim.weight_decay and optim.clip_norm must be >= 0")
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum={self.grad_accum} must be >= 1")
        return self


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch, in sequences, per optimizer step
    eval_every: int = 250  # periodic validation estimate (0 = only the final full evaluation)
    eval_batches: int = 20  # batches per periodic estimate
    log_every: int = 10
    seed: int = 0
    sample_tokens: int = 256  # tokens sampled at the end of the run (0 = none)
    sample_prompt: str = ""  # "" = the start of the validation text
    progress: bool = True  # tqdm progress bars
    max_nonfinite: int = 5  # this many non-finite (skipped) steps in a row stop the run (0 = never)
    spike_factor: float = 0.0  # skip a step whose loss exceeds factor x the running mean (0 = off)
    debug_nonfinite_steps: str = ""  # testing: comma-separated steps whose gradients are made NaN
    # Slices of each (micro)batch whose forward/backward are traced side by side (same loss: total
    # over total tokens). They share no op, so XLA:CPU runs one slice's ops on one core while the
    # other's run on the other: 3 % (jnp attention) to 7.5 % (the CPU kernels) faster on the 2-core
    # shakespeare_char_cpu recipe (issue 7).
    # Not a memory saving (that is optim.grad_accum); leave 1 on accelerators.
    batch_splits: int = 1

    def nonfinite_steps(self) -> tuple[int, ...]:
        """`debug_nonfinite_steps` as a sorted tuple of step indices (0-based, like `state.step`)."""
        try:
            return tuple(sorted({int(s) for s in self.debug_nonfinite_steps.split(",") if s.strip()}))
        except ValueError:
            raise ConfigError(f"train.debug_nonfinite_steps={self.debug_nonfinite_steps!r} must be "
                              "comma-separated step numbers, e.g. 3,4,10") from None

    def validate(self) -> "TrainConfig":
        if self.steps <= 0 or self.batch_size <= 0:
            raise ConfigError(f"train.steps={self.steps} and train.batch_size={self.batch_size} must be positive")
        for name in ("eval_every", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.log_every <= 0:
            raise ConfigError(f"train.log_every={self.log_every} must be positive")
        if self.batch_splits < 1:
            raise ConfigError(f"train.batch_splits={self.batch_splits} must be >= 1")
        if self.max_nonfinite < 0:
            raise ConfigError(f"train.max_nonfinite={self.max_nonfinite} must be >= 0 (0 = never stop)")
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be 0 (off) or > 1")
        if any(s < 0 for s in self.nonfinite_steps()):
            raise ConfigError(f"train.debug_nonfinite_steps={self.debug_nonfinite_steps!r} must list steps >= 0")
        return self


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 takes the devices the other axes leave), the logical-axis rule preset,
    pipeline microbatches, multi-slice and multi-host settings (see sharding/mesh.py)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    stage: int = 1
    rules: str = "fsdp_tp"  # logical-axis rule preset: dp | fsdp | fsdp_tp | tp | fsdp_sp (sharding/rules.py)
    microbatches: int = 0  # pipeline microbatches per step with stage > 1 (0 = 2 * stage)
    # Multi-slice TPU: how many slices each axis spans over DCN (the sizes above are per slice).
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_sequence: int = 1
    dcn_stage: int = 1
    num_devices: int = 0  # single process: use only the first N devices (0 = all)
    # Multi-host without auto-detection (auto: Cloud TPU VM, SLURM); env JAX_COORDINATOR_ADDRESS etc. also work.
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1

    def validate(self) -> "MeshConfig":
        from sharding.rules import RULE_PRESETS

        sizes = {a: getattr(self, a) for a in ("data", "fsdp", "tensor", "sequence", "stage")}
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")
        for a, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{a}={v} must be a positive integer or -1 (the remaining devices)")
            if getattr(self, f"dcn_{a}") < 1:
                raise ConfigError(f"mesh.dcn_{a}={getattr(self, f'dcn_{a}')} must be a positive integer")
        choice("mesh.rules", self.rules, tuple(RULE_PRESETS))
        if self.microbatches < 0 or self.num_devices < 0 or self.num_processes < 0:
            raise ConfigError("mesh.microbatches, mesh.num_devices and mesh.num_processes must be >= 0")
        return self


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0 = only at the end)
    keep: int = 3  # the last K checkpoints are kept
    async_save: bool = True
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    min_free_mb: int = 100  # pre-flight: less free space than this in the checkpoint directory is an error

    def validate(self) -> "CheckpointConfig":
        if self.every < 0 or self.keep < 1:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 and checkpoint.keep={self.keep} >= 1")
        if self.keep_every < 0 or self.min_free_mb < 0:
            raise ConfigError(f"checkpoint.keep_every={self.keep_every} and checkpoint.min_free_mb={self.min_free_mb} "
                              "must be >= 0")
        return self


@dataclass(frozen=True)
class FinetuneConfig:
    """Starting from a trained (or imported) model instead of random parameters (train/finetune.py),
    and LoRA adapters (model/lora.py)."""

    init_from: str = ""  # RUN_DIR or RUN_DIR@STEP: its parameters and tokenizer start this run (optimizer fresh)
    chat_tokens: bool = True  # chat data: reserve <|im_start|>/<|im_end|> (ChatML) unless the tokenizer has a template
    lora_rank: int = 0  # 0 = full fine-tuning; > 0: only rank-r adapters on lora_targets train
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_targets: str = "q,k,v,o"  # comma list of q, k, v, o, mlp
    max_bad_fraction: float = 0.1  # chat data: more bad lines (JSON, messages, too long) than this is an error

    def lora_target_list(self) -> tuple[str, ...]:
        """`lora_targets` as a tuple of names, in the order given."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def validate(self) -> "FinetuneConfig":
        if self.lora_rank < 0:
            raise ConfigError(f"finetune.lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tuning)")
        if self.lora_alpha <= 0:
            raise ConfigError(f"finetune.lora_alpha={self.lora_alpha} must be > 0")
        targets = self.lora_target_list()
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ConfigError(f"finetune.lora_targets={self.lora_targets!r} must be a comma list of distinct names "
                              f"from {', '.join(LORA_TARGETS)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"finetune.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        return self


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: str = ""  # "" = runs/<name>

    @property
    def path(self) -> Path:
        return Path(os.path.expanduser(self.dir or os.path.join("runs", self.name)))

    def validate(self) -> "RunConfig":
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name={self.name!r} must be a non-empty name without '/'")
        return self


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "ExperimentConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.model.max_seq_len < self.data.seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        m = self.mesh
        if m.stage != 1 and self.model.n_layers % m.stage:
            raise ConfigError(f"model.n_layers={self.model.n_layers} must be divisible by mesh.stage={m.stage} "
                              "(each pipeline stage holds n_layers / stage layers)")
        micro = m.microbatches or 2 * m.stage
        if m.stage > 1 and (self.train.batch_size // self.optim.grad_accum) % micro:
            raise ConfigError(f"the per-step batch train.batch_size / optim.grad_accum = "
                              f"{self.train.batch_size // self.optim.grad_accum} must be divisible by "
                              f"mesh.microbatches={micro}")
        if self.data.source in CHAT_SOURCES and self.model.attention != "xla":
            raise ConfigError(f"data.source={self.data.source} packs conversations with segment ids, which only "
                              f"model.attention='xla' masks; got model.attention={self.model.attention!r}")
        if self.data.source in CHAT_SOURCES and m.stage > 1:
            raise ConfigError(f"data.source={self.data.source} (segment ids) is not supported with pipeline "
                              "parallelism (mesh.stage > 1)")
        if m.stage > 1 and self.model.dropout > 0:
            raise ConfigError("model.dropout must be 0 with pipeline parallelism (mesh.stage > 1)")
        if self.train.batch_size % self.optim.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} must be divisible by optim.grad_accum={self.optim.grad_accum}"
            )
        if (self.train.batch_size // self.optim.grad_accum) % self.train.batch_splits:
            raise ConfigError(f"the per-step batch train.batch_size / optim.grad_accum = "
                              f"{self.train.batch_size // self.optim.grad_accum} must be divisible by "
                              f"train.batch_splits={self.train.batch_splits}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTION_TYPES = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
    "mesh": MeshConfig, "checkpoint": CheckpointConfig, "run": RunConfig, "finetune": FinetuneConfig,
}


# ---- building a config from YAML and overrides ---------------------------------------------

def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults <- YAML file (only the keys it names) <- `section.key=value` overrides."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        tree = read_yaml(path)
    for item in overrides:
        section, key, value = parse_override(item)
        tree.setdefault(section, {})[key] = value
    return from_dict(tree)


def read_yaml(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file {str(p)!r} does not exist")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections ({', '.join(_SECTION_TYPES)})")
    for section, body in tree.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{p}: unknown section {section!r}; allowed: {', '.join(_SECTION_TYPES)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{p}: section {section!r} must be a mapping of key: value")
    return tree


def parse_override(item: str) -> tuple[str, str, Any]:
    """'train.steps=10' -> ('train', 'steps', 10). Values are parsed as YAML scalars."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
    dotted, raw = item.split("=", 1)
    section, key = dotted.split(".", 1)
    if section not in _SECTION_TYPES:
        raise ConfigError(f"override {item!r}: unknown section {section!r}; allowed: {', '.join(_SECTION_TYPES)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def from_dict(tree: dict[str, dict[str, Any]]) -> ExperimentConfig:
    """Build and validate a config from a (possibly partial) nested dict."""
    tree = _init_from_alias(tree)
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        body = dict(tree.get(name) or {})
        sections[name] = model_config_from_dict(body) if name == "model" else build_section(name, cls(), body)
    if sections["data"].seq_len == 0:
        sections["data"] = dataclasses.replace(sections["data"], seq_len=sections["model"].max_seq_len)
    return ExperimentConfig(**sections).validate()


def _init_from_alias(tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`model.init_from` (the name issue 17 uses) is an alias of `finetune.init_from`, the one field:
    it is moved there, so resolved configs and checkpoints only ever hold `finetune.init_from`."""
    model = tree.get("model") or {}
    if not isinstance(model, dict) or "init_from" not in model:
        return tree
    model = dict(model)
    value = model.pop("init_from")
    finetune = dict(tree.get("finetune") or {})
    if finetune.get("init_from", value) != value:
        raise ConfigError(f"model.init_from={value!r} and finetune.init_from={finetune['init_from']!r} disagree; "
                          "set one (model.init_from is an alias of finetune.init_from)")
    finetune["init_from"] = value
    return {**tree, "model": model, "finetune": finetune}
