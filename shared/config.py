"""The run configuration: Flower's flat ``[tool.flwr.app.config]`` converted once into a validated dataclass.

Every key is kebab-case in Flower (``local-steps``) and snake_case here (``local_steps``). Unknown keys, wrong
types and impossible combinations raise :class:`ConfigError` naming the key and the value.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from shared.privacy import ACCOUNTANTS
from shared.tasks.presets import CAUSAL_LM, TASK_PRESETS

BUILTIN_DATA = "builtin:rotten-tomatoes"
BUILTIN_MODEL = "builtin:all-minilm-l6-v2"


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or impossible."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RunConfig:
    # task
    task: Literal["classify", "causal-lm"] = field(
        default="classify",
        metadata=_help(
            "What is fine-tuned: classify (text classifier) or causal-lm (generative LM); a task's presets "
            "(shared/tasks/presets.py) replace the keys left at these defaults."
        ),
    )
    # federation
    num_server_rounds: int = field(default=8, metadata=_help("Number of federated rounds."))
    fraction_train: float = field(default=1.0, metadata=_help("Fraction of connected nodes sampled per round."))
    min_train_nodes: int = field(default=2, metadata=_help("Fewest nodes a round is run with."))
    seed: int = field(default=42, metadata=_help("Seed of partitioning, FFA-LoRA's frozen A, head init, sampling."))
    # data
    data_path: str = field(default=BUILTIN_DATA, metadata=_help("builtin:rotten-tomatoes or a .csv/.jsonl/.parquet"))
    text_column: str = field(default="text", metadata=_help("Column holding the text (deployed sites: their own)."))
    label_column: str = field(default="label", metadata=_help("Column holding the label (deployed sites: their own)."))
    labels: str = field(
        default="",
        metadata=_help(
            "Comma-separated label set, in class-index order; '' = inferred: every label in the file is a class, and "
            "one on fewer than 10 rows and under 1% of them, beside two common ones, is warned about as a likely typo."
        ),
    )
    partitioning: Literal["iid", "dirichlet"] = field(default="iid", metadata=_help("How rows go to clients."))
    dirichlet_alpha: float = field(default=0.5, metadata=_help("Label-skew concentration (smaller = more skew)."))
    test_fraction: float = field(default=0.15, metadata=_help("Held-out test split no client sees."))
    max_test_examples: int = field(default=600, metadata=_help("Cap on the server's test set (0 = no cap)."))
    server_device: str = field(
        default="cpu",
        metadata=_help(
            "Where the server evaluates the model on its held-out rows each round: cpu, cuda, cuda:N or mps "
            "(privatune simulate --device cuda sets cuda); the model goes back to the CPU after."
        ),
    )
    max_length: int = field(
        default=128,
        metadata=_help(
            "Token limit per example (128: the builtin encoder's training length; rows are batched by length, so short"
            " rows cost no more)."
        ),
    )
    # model
    model_path: str = field(default=BUILTIN_MODEL, metadata=_help("builtin:all-minilm-l6-v2 or a local HF model dir."))
    classifier_pooling: Literal["mean", "cls"] = field(
        default="mean", metadata=_help("Head input: mean of token states (sentence encoders), or [CLS] (HF head).")
    )
    center_features: bool = field(
        default=True,
        metadata=_help(
            "Center the head's input on the sites' mean pooled vector, one DP query before round 1 (mean pooling)."
        ),
    )
    lora_mode: Literal["ffa", "lora"] = field(default="ffa", metadata=_help("ffa: A frozen from the seed, B trained."))
    lora_r: int = field(default=2, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=2, metadata=_help("LoRA scaling numerator."))
    lora_target_modules: str = field(default="query,value", metadata=_help("Comma-separated module names."))
    optimizer: Literal["adam", "sgd"] = field(default="sgd", metadata=_help("Client optimizer (fresh each round)."))
    learning_rate: float = field(default=10.0, metadata=_help("Client learning rate."))
    local_steps: int = field(
        default=4,
        metadata=_help(
            "DP-SGD steps per client per round (4: a 3-round run still takes 12 steps; docs/benchmarks.md)."
        ),
    )
    batch_size: int = field(default=256, metadata=_help("Expected (Poisson) batch size."))
    micro_batch_size: int = field(
        default=32,
        metadata=_help(
            "Rows per forward/backward pass: each (Poisson) batch is sorted by length and taken in micro-batches of "
            "at most this many rows, each cut to its longest row; the step is the whole batch's, memory one "
            "micro-batch's (32: 0.53x the DP step's CPU time on the reviews; docs/benchmarks.md). 0 = whole batch."
        ),
    )
    autocast: Literal["auto", "bf16", "off"] = field(
        default="auto",
        metadata=_help(
            "The forward pass under torch.autocast in bfloat16 (adapter, clipping, noise, optimizer stay fp32): auto "
            "= where the site's device does bf16 natively (CUDA GPUs, CPUs with AVX512-BF16/AMX; accuracy held and "
            "the DP step took 0.56x the CPU time, docs/benchmarks.md), bf16 = always, off = float32."
        ),
    )
    # differential privacy
    dp: bool = field(default=True, metadata=_help("DP-SGD on every client. Off = non-private baseline."))
    target_epsilon: float = field(default=8.0, metadata=_help("Calibrate noise to this epsilon over all rounds."))
    noise_multiplier: float = field(default=0.0, metadata=_help("Set the noise directly (then target-epsilon = 0)."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Per-sample gradient clip norm."))
    center_noise_multiplier: float = field(
        default=5.0,
        metadata=_help(
            "Noise multiplier of the centering query (Gaussian on sum and count; epsilon 0.73 alone, part of the "
            "composed budget). A center whose expected noise exceeds half its norm is not used (too few rows)."
        ),
    )
    center_clip_norm: float = field(
        default=5.0,
        metadata=_help(
            "L2 clip C of each row's pooled vector in the centering query (sensitivity sqrt(2) C with the count)."
        ),
    )
    delta: float = field(
        default=1e-5,
        metadata=_help("Delta the run asks for; every site accounts at its own delta (node config / site.toml)."),
    )
    accountant: Literal["prv", "rdp"] = field(
        default="prv", metadata=_help("Accountant the run asks for; sites compose with their own.")
    )
    reproducible_noise: bool = field(
        default=False,
        metadata=_help("Seed DP noise and sampling from the run seed: experiments only, NOT private."),
    )
    # aggregation
    server_optimizer: Literal["fedavg", "fedadam"] = field(
        default="fedavg", metadata=_help("Server step from the mean update: fedavg, or fedadam (Reddi et al.).")
    )
    server_learning_rate: float = field(default=1.0, metadata=_help("Server step size (fedavg: 1.0 = plain mean)."))
    server_tau: float = field(
        default=0.01, metadata=_help("FedAdam's adaptivity: coordinates whose mean update is below it barely move.")
    )
    update_clip_norm: float = field(default=5.0, metadata=_help("L2 bound of a client's update (encoding range)."))
    secure_aggregation: bool = field(default=True, metadata=_help("Server learns only the sum of updates."))
    dp_noise: Literal["local", "distributed"] = field(
        default="local",
        metadata=_help("DP noise: each site's full noise (local), or shares summing to it (docs/distributed-dp.md)."),
    )
    dp_min_survivors: int = field(
        default=0, metadata=_help("Distributed noise: shares M (abort below M survivors); 0 = max(quorum, 3).")
    )
    secagg_degree: int = field(default=0, metadata=_help("Neighbours per client; 0 = about log2(n)."))
    secagg_threshold: int = field(default=0, metadata=_help("Shamir threshold; 0 = default from the degree."))
    secagg_timeout: float = field(default=120.0, metadata=_help("Seconds each secure-aggregation stage waits."))
    secagg_on_abort: Literal["skip", "stop"] = field(default="skip", metadata=_help("After an aborted round."))
    # empirical audit (simulation only)
    canaries: int = field(default=0, metadata=_help("Canaries for the one-run privacy audit (0 = off)."))
    canary_kind: Literal["gradient", "text"] = field(
        default="gradient",
        metadata=_help(
            "gradient: white-box canaries in each DP step (thousands are cheap; local DP); text: random-label rows "
            "(classifier; black-box, weak). docs/privacy-audit.md."
        ),
    )
    # deployment
    roster_path: str = field(
        default="",
        metadata=_help("Coordinator's roster of site identity keys; '' = simulation (made at start)."),
    )
    eval_data_path: str = field(
        default="",
        metadata=_help("Server's held-out evaluation file (deployment); '' = the test split of data-path."),
    )
    resume: str = field(
        default="",
        metadata=_help("Run dir of an interrupted run: continue after its last checkpointed round."),
    )
    # output
    output_dir: str = field(default="runs", metadata=_help("Where run outputs go (run-<id>/ below it)."))
    sim_dir: str = field(
        default="",
        metadata=_help("Simulated sites' keys and ledgers; '' = a fresh one inside the run's output dir."),
    )
    # monitoring
    metrics_port: int = field(
        default=0, metadata=_help("Serve the run's Prometheus metrics on 127.0.0.1:<port> (0 = off; docs/serving.md).")
    )

    def __post_init__(self) -> None:
        self._apply_presets()

        def need(cond: bool, key: str, value: Any, what: str) -> None:
            if not cond:
                raise ConfigError(f"{key.replace('_', '-')} must be {what}, got {value!r}")

        need(self.num_server_rounds >= 1, "num_server_rounds", self.num_server_rounds, ">= 1")
        need(
            re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.server_device) is not None,
            "server_device",
            self.server_device,
            "cpu, cuda, cuda:N or mps",
        )
        need(0.0 < self.fraction_train <= 1.0, "fraction_train", self.fraction_train, "in (0, 1]")
        need(self.min_train_nodes >= 1, "min_train_nodes", self.min_train_nodes, ">= 1")
        need(
            self.partitioning in ("iid", "dirichlet"),
            "partitioning",
            self.partitioning,
            "'iid' or 'dirichlet'",
        )
        need(self.dirichlet_alpha > 0.0, "dirichlet_alpha", self.dirichlet_alpha, "> 0")
        need(0.0 < self.test_fraction < 1.0, "test_fraction", self.test_fraction, "in (0, 1)")
        need(self.max_test_examples >= 0, "max_test_examples", self.max_test_examples, ">= 0")
        need(self.max_length >= 8, "max_length", self.max_length, ">= 8")
        need(
            self.classifier_pooling in ("mean", "cls"), "classifier_pooling", self.classifier_pooling, "'mean' or 'cls'"
        )
        if self.center_features and self.classifier_pooling != "mean":
            raise ConfigError(
                f"center-features = true needs classifier-pooling = 'mean' (transformers' {self.classifier_pooling!r} "
                "head takes no centered input); set center-features = false"
            )
        need(self.center_clip_norm > 0.0, "center_clip_norm", self.center_clip_norm, "> 0")
        need(
            self.center_noise_multiplier >= 0.0 and math.isfinite(self.center_noise_multiplier),
            "center_noise_multiplier",
            self.center_noise_multiplier,
            "finite and >= 0",
        )
        if self.dp and self.center_features and self.center_noise_multiplier == 0.0:
            raise ConfigError(
                "center-noise-multiplier = 0 with dp = true releases the sites' exact mean vector: set it > 0, "
                "or center-features = false"
            )
        need(self.lora_mode in ("ffa", "lora"), "lora_mode", self.lora_mode, "'ffa' or 'lora'")
        need(self.lora_r >= 1, "lora_r", self.lora_r, ">= 1")
        need(self.lora_alpha >= 1, "lora_alpha", self.lora_alpha, ">= 1")
        need(bool(self.target_modules), "lora_target_modules", self.lora_target_modules, "a non-empty list")
        need(self.optimizer in ("adam", "sgd"), "optimizer", self.optimizer, "'adam' or 'sgd'")
        need(self.learning_rate > 0.0, "learning_rate", self.learning_rate, "> 0")
        need(self.server_tau > 0.0, "server_tau", self.server_tau, "> 0")
        need(self.local_steps >= 1, "local_steps", self.local_steps, ">= 1")
        need(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        need(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, ">= 0")
        need(self.max_grad_norm > 0.0, "max_grad_norm", self.max_grad_norm, "> 0")
        need(0.0 < self.delta < 1.0, "delta", self.delta, "in (0, 1)")
        need(self.accountant in ACCOUNTANTS, "accountant", self.accountant, f"one of {ACCOUNTANTS}")
        need(
            self.server_optimizer in ("fedavg", "fedadam"),
            "server_optimizer",
            self.server_optimizer,
            "'fedavg' or 'fedadam'",
        )
        need(self.server_learning_rate > 0.0, "server_learning_rate", self.server_learning_rate, "> 0")
        need(self.update_clip_norm > 0.0, "update_clip_norm", self.update_clip_norm, "> 0")
        need(self.secagg_degree >= 0, "secagg_degree", self.secagg_degree, ">= 0")
        need(self.secagg_threshold >= 0, "secagg_threshold", self.secagg_threshold, ">= 0")
        need(self.secagg_timeout > 0.0, "secagg_timeout", self.secagg_timeout, "> 0")
        need(
            self.secagg_on_abort in ("skip", "stop"),
            "secagg_on_abort",
            self.secagg_on_abort,
            "'skip' or 'stop'",
        )
        need(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "in 0..65535 (0 = off)")
        need(self.canaries >= 0, "canaries", self.canaries, ">= 0")
        need(self.canary_kind in ("gradient", "text"), "canary_kind", self.canary_kind, "'gradient' or 'text'")
        if self.canaries and self.roster_path:
            raise ConfigError(
                f"canaries = {self.canaries} inserts records into sites' training: simulation only "
                "(roster-path must be empty)"
            )
        if self.canaries and self.canary_kind == "gradient" and (not self.dp or self.dp_noise != "local"):
            raise ConfigError(
                f"canaries = {self.canaries} with canary-kind = 'gradient' audits local DP-SGD: it needs dp = true "
                f"and dp-noise = 'local' (got dp = {self.dp}, dp-noise = {self.dp_noise!r}); the canaries' audit "
                "coordinates stay at the site and never get distributed noise"
            )
        self._check_task()
        need(self.noise_multiplier >= 0.0, "noise_multiplier", self.noise_multiplier, ">= 0")
        need(self.target_epsilon >= 0.0, "target_epsilon", self.target_epsilon, ">= 0")
        if self.dp:
            if self.target_epsilon > 0.0 and self.noise_multiplier > 0.0:
                raise ConfigError(
                    "set either target-epsilon (noise calibrated to it) or noise-multiplier (then "
                    f"target-epsilon = 0), not both: got target-epsilon={self.target_epsilon}, "
                    f"noise-multiplier={self.noise_multiplier}"
                )
            if self.target_epsilon == 0.0 and self.noise_multiplier == 0.0:
                raise ConfigError(
                    "with dp = true, set target-epsilon > 0 or noise-multiplier > 0 "
                    "(for a non-private baseline set dp = false)"
                )
            if math.isinf(self.target_epsilon):
                raise ConfigError(f"target-epsilon must be finite, got {self.target_epsilon}")
        from shared.distributed_dp import config_problem

        problem = config_problem(
            dp_noise=self.dp_noise,
            dp=self.dp,
            secure_aggregation=self.secure_aggregation,
            local_steps=self.local_steps,
            optimizer=self.optimizer,
            noise_multiplier=self.noise_multiplier,
            min_survivors=self.dp_min_survivors,
        )
        if problem is not None:
            raise ConfigError(problem)

    def _apply_presets(self) -> None:
        """Set the task's presets (:mod:`shared.tasks.presets`) on every key left at RunConfig's default.

        Deterministic and idempotent (a preset value is not a default, so converting a run's own ``to_flower()``
        again changes nothing): the server and every site get the same values from the same run config, whether
        it came through :meth:`from_flower` or was built directly."""
        if self.task not in TASK_PRESETS:
            raise ConfigError(f"task must be one of {list(TASK_PRESETS)}, got {self.task!r}")
        defaults = RunConfig.__dataclass_fields__
        for key, value in TASK_PRESETS[self.task].items():
            name = key.replace("-", "_")
            if getattr(self, name) == defaults[name].default:
                object.__setattr__(self, name, value)  # frozen: set once, here, before anything reads it

    def _check_task(self) -> None:
        """Settings the chosen task cannot honour: an error naming the key (a silently ignored key would let a
        run believe it got, e.g., label-skewed sites). ``center-features`` needs no check here: the causal
        preset turns it off, and the loops refuse it for a task without the centering capability."""
        if self.task != CAUSAL_LM:
            return
        defaults = RunConfig.__dataclass_fields__
        refused = {
            "partitioning": (self.partitioning == "dirichlet", "a Dirichlet label skew needs labels; use 'iid'"),
            "canaries": (
                self.canaries > 0 and self.canary_kind == "text",
                "text canaries are the classifier's (random labels); use canary-kind = 'gradient'",
            ),
            "classifier_pooling": (
                self.classifier_pooling != defaults["classifier_pooling"].default,
                "a causal LM has no classification head; leave it at its default",
            ),
            "labels": (bool(self.labels), "a causal LM's rows have no label set; leave it empty"),
        }
        for key, (bad, why) in refused.items():
            if bad:
                raise ConfigError(
                    f"{key.replace('_', '-')} = {getattr(self, key)!r} does not apply to task = {self.task!r}: {why}"
                )

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def label_names(self) -> list[str] | None:
        names = [s.strip() for s in self.labels.split(",") if s.strip()]
        return names or None

    def run_dir(self, run_id: int | str) -> Path:
        """Where this run's outputs go: ``<output-dir>/run-<run id>``."""
        return Path(self.output_dir).expanduser().resolve() / f"run-{run_id}"

    def simulation_dir(self, run_id: int | str) -> Path:
        """The simulated sites' home (keys, roster, ledgers); persistent across runs only if set explicitly."""
        if self.sim_dir:
            return Path(self.sim_dir).expanduser().resolve()
        return self.run_dir(run_id) / "federation"

    def to_flower(self) -> dict[str, Any]:
        """The flat kebab-case dict Flower's run config holds."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Convert Flower's flat run config (kebab-case keys), checking every key and type."""
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown run-config key {key!r}; known keys: {sorted(cls().to_flower())}")
            kwargs[name] = _coerce(key, value, hints[name])
        return cls(**kwargs)


def markdown_table() -> str:
    """The run-config reference table of docs/configuration.md, made from the dataclass (a test keeps them equal)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in fields(RunConfig):
        d = f.default
        shown = f'"{d}"' if isinstance(d, str) else str(d).lower() if isinstance(d, bool) else repr(d)
        lines.append(f"| `{f.name.replace('_', '-')}` | `{shown}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover
