"""The one gin root: `build_experiment` turns the parsed config into live components.

Factories bound as `@Name` (no parentheses) are called here with what only the
composition knows (token size, grid, number of classes, model width and depth),
so presets never repeat those numbers. Arguments a factory does not accept are
not passed.

Seeding: the run's seed (TrainConfig.seed) owns initialisation. Everything built here draws
from the global torch RNG inside a fork seeded with it, so initial weights depend on the seed
alone and the process's own RNG is left as it was.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import gin
import torch
from torch import nn

from selfflow.components.protocols import Backbone, Objective, Tokenizer
from selfflow.platform.config.configurable import configurable
from selfflow.platform.config.devices import parse_device
from selfflow.platform.errors import ConfigError, UserError, first_line
from selfflow.platform.evaluate.generation import SamplingConfig
from selfflow.platform.host import PRESETS as HOST_PRESETS

LR_DECAYS = ("constant", "cosine", "linear")
EVAL_MODES = ("auto", "inline", "background")
CHECKPOINT_MODES = ("background", "blocking")
CHECKPOINT_HOST_BUFFERS = ("reuse", "fresh")
COMPILE_MODES = ("none", "backbone", "step")


@dataclass
class TrainConfig:
    """Optimisation and loop settings."""

    steps: int = 1000
    batch_size: int = 64  # the GLOBAL batch of one optimizer step, over all workers (the paper's number)
    micro_batch: int = 0  # samples per worker per forward/backward (memory); 0: batch_size / workers, no accumulation
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_decay: str = "constant"  # after warmup: 'constant', 'cosine' or 'linear' down to lr * final_lr_fraction
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    device: str = "auto"  # 'auto' (a CUDA GPU if visible, else the CPU), 'cpu', 'cuda', 'cuda:1'; platform/devices.py
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    keep_best_metric: str = ""  # also keep the checkpoint with the best value of this logged metric
    keep_best_mode: str = "min"  # 'min' or 'max': which value of keep_best_metric is best
    nan_policy: str = "raise"
    num_threads: int = 0
    host: str = "stock"  # 'stock' or 'cpu_shared' (platform/host.py; the preset train/cpu_shared.gin)
    eval_mode: str = "auto"  # 'inline', 'background' (a separate process from a snapshot) or 'auto' (background with > 1 worker)
    checkpoint_mode: str = "background"  # 'background' (write + verify on a thread) or 'blocking'
    # 'reuse': background saves copy into host buffers kept between saves (one more copy of the state
    # resident in host memory); 'fresh': allocate them on every save
    checkpoint_host_buffers: str = "reuse"
    process_group_timeout_s: float = 1800.0  # how long a collective waits for a slow rank (Ray's TorchConfig.timeout_s)
    compile: str = "none"  # torch.compile: 'none', 'backbone' (student, EMA teacher, sampling), 'step' (+ the objective)

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "num_threads", "micro_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"TrainConfig.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not math.isfinite(self.lr):
            raise ConfigError(f"TrainConfig.lr must be finite, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"TrainConfig.grad_clip must be a finite number >= 0 (0: no clipping), "
                              f"got {self.grad_clip}")
        check_betas(self.betas)
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"TrainConfig.lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(f"TrainConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"TrainConfig.ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.keep_best_mode not in ("min", "max"):
            raise ConfigError(f"TrainConfig.keep_best_mode must be 'min' or 'max', got {self.keep_best_mode!r}")
        parse_device(self.device)  # the name only: whether it exists is checked where training starts
        if self.nan_policy not in ("raise", "skip"):
            raise ConfigError(f"TrainConfig.nan_policy must be 'raise' or 'skip', got {self.nan_policy!r}")
        if self.host not in HOST_PRESETS:
            raise ConfigError(f"TrainConfig.host must be one of {', '.join(HOST_PRESETS)}, got {self.host!r}")
        for name, allowed in (("eval_mode", EVAL_MODES), ("checkpoint_mode", CHECKPOINT_MODES),
                              ("checkpoint_host_buffers", CHECKPOINT_HOST_BUFFERS),
                              ("compile", COMPILE_MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"TrainConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.process_group_timeout_s > 0:
            raise ConfigError(f"TrainConfig.process_group_timeout_s must be positive, got {self.process_group_timeout_s}")
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ConfigError(f"TrainConfig.batch_size = {self.batch_size} (the global batch) is not a multiple of "
                              f"TrainConfig.micro_batch = {self.micro_batch}")

    def layout(self, workers: int) -> "BatchLayout":
        """How the global batch splits over `workers`: micro-batch per worker and accumulation steps."""
        if self.micro_batch:
            per_step = workers * self.micro_batch
            if self.batch_size % per_step:
                raise ConfigError(f"TrainConfig.batch_size = {self.batch_size} (the global batch) is not a multiple of "
                                  f"{workers} workers x TrainConfig.micro_batch = {self.micro_batch} = {per_step}")
            return BatchLayout(self.batch_size, workers, self.micro_batch, self.batch_size // per_step)
        if self.batch_size % workers:
            raise ConfigError(f"TrainConfig.batch_size = {self.batch_size} (the global batch) does not divide over "
                              f"{workers} workers: make it a multiple of {workers} (or set TrainConfig.micro_batch)")
        return BatchLayout(self.batch_size, workers, self.batch_size // workers, 1)


@dataclass(frozen=True)
class BatchLayout:
    """global_batch = workers x micro_batch x accumulation: each optimizer step, every worker runs
    `accumulation` forward/backward passes of `micro_batch` samples."""

    global_batch: int
    workers: int
    micro_batch: int
    accumulation: int

    def describe(self) -> str:
        steps = "step" if self.accumulation == 1 else "steps"
        return (f"global batch {self.global_batch} = {self.workers} worker{'s' if self.workers > 1 else ''} x "
                f"micro-batch {self.micro_batch} x {self.accumulation} accumulation {steps}")


def check_betas(betas: Any) -> None:
    """AdamW's (beta1, beta2): two numbers in [0, 1), checked here so a bad value is named as the
    config's, not met as an IndexError or ValueError inside torch.optim."""
    numbers = isinstance(betas, (tuple, list)) and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    if not numbers or len(betas) != 2:
        raise ConfigError(f"TrainConfig.betas must be two numbers (beta1, beta2), got {betas!r}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"TrainConfig.betas must each be in [0, 1), got {tuple(betas)!r}")


@dataclass
class Experiment:
    """A built experiment: the components the trainer, sampler and evaluation use (their seams are
    components/protocols.py); a mixture has one tokenizer (and evaluation suite) per modality."""

    name: str
    tokenizer: Tokenizer | Mapping[str, Tokenizer]
    model: Backbone
    objective: Objective
    data: Any
    train: TrainConfig
    sampling: SamplingConfig
    evaluation: Any = None
    tags: dict[str, str] = field(default_factory=dict)
    callbacks: tuple = ()  # extra trainer callbacks bound in gin (build_experiment.callbacks)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    @property
    def modalities(self) -> tuple[str, ...]:
        """A mixture's modality names (sorted; platform/mixture.py); () for one modality."""
        return tuple(self.tokenizer) if isinstance(self.tokenizer, Mapping) else ()

    def tokenizer_for(self, modality: str | None):
        """The tokenizer of a batch of `modality` (None: the experiment's only tokenizer)."""
        if not self.modalities:
            if modality is not None:
                raise UserError(f"experiment {self.name!r} has one modality, but a batch says {modality!r}")
            return self.tokenizer
        if modality not in self.tokenizer:
            raise UserError(f"experiment {self.name!r} mixes {list(self.modalities)}; a batch says {modality!r}")
        return self.tokenizer[modality]

    def view(self, modality: str) -> "Experiment":
        """The mixture seen as one modality: the same model (and objective, training and sampling
        settings) with that modality's tokenizer, data and evaluation suite."""
        tokenizer = self.tokenizer_for(modality)
        suites = self.evaluation if isinstance(self.evaluation, Mapping) else {}
        return replace(self, name=f"{self.name}/{modality}", tokenizer=tokenizer, data=self.data.parts[modality],
                       evaluation=suites.get(modality),
                       tags=dict(self.tags, modality=str(getattr(self.data.parts[modality], "modality", modality))))

    def views(self) -> list[tuple[str, "Experiment"]]:
        """(modality, view) per modality of a mixture; [("", self)] for a single-modality experiment."""
        return [(name, self.view(name)) for name in self.modalities] or [("", self)]


def factory_parameters(factory: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters a factory (class or function) or an instance's class is built with."""
    target = factory if callable(factory) and not isinstance(factory, nn.Module) else type(factory)
    try:
        return inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    except (TypeError, ValueError):
        return {}


def call_with_context(factory: Callable[..., Any] | Any, context: dict[str, Any], what: str) -> Any:
    """Call `factory` with the context arguments it accepts; instances pass through."""
    if not callable(factory) or isinstance(factory, nn.Module):
        return factory
    parameters = factory_parameters(factory)
    accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in context.items() if accepts_all or k in parameters}
    try:
        return factory(**kwargs)
    except TypeError as error:
        text = str(error)
        if "missing" in text and "required" in text:
            missing = text.split("argument")[-1].strip(": s")
            raise ConfigError(f"missing required binding for {what}: {missing.splitlines()[0]}") from None
        raise


@configurable(module="selfflow")
def build_experiment(
    name: str = "experiment",
    tokenizer: Any = gin.REQUIRED,
    backbone: Any = gin.REQUIRED,
    objective: Any = gin.REQUIRED,
    data: Any = gin.REQUIRED,
    train: TrainConfig | None = None,
    sampling: SamplingConfig | None = None,
    evaluation: Any = None,
    callbacks: Sequence[Any] = (),
) -> Experiment:
    train = train or TrainConfig()
    with seeded(train.seed):
        return _compose(name, tokenizer, backbone, objective, data, train, sampling, evaluation, callbacks)


def _compose(name, tokenizer, backbone, objective, data, train, sampling, evaluation, callbacks) -> Experiment:
    num_classes = int(getattr(data, "num_classes", 0))
    if isinstance(tokenizer, Mapping):
        tokenizer, evaluation = mixture_parts(tokenizer, data, backbone, objective, evaluation)
        context: dict[str, Any] = {
            "layouts": {name: (part.token_shape[1], tuple(part.grid)) for name, part in tokenizer.items()},
            "num_classes": num_classes,
        }
        model = call_with_context(backbone, context, "the backbone")
        # No encoder_input / num_tokens: objectives that need one token layout (REPA) cannot mix.
        context.update(hidden_dim=model.hidden_dim, depth=model.depth)
    else:
        context = {
            "in_dim": tokenizer.token_shape[1],
            "grid": tuple(tokenizer.grid),
            "num_classes": num_classes,
        }
        model = call_with_context(backbone, context, "the backbone")
        context.update(
            hidden_dim=model.hidden_dim,
            depth=model.depth,
            encoder_input=tokenizer.decode,
            num_tokens=tokenizer.token_shape[0],
        )
    built_objective = call_with_context(objective, context, "the objective")
    tags = {
        "objective": type(built_objective).__name__,
        "dataset": str(getattr(data, "dataset", "unknown")),
        "modality": str(getattr(data, "modality", "unknown")),
        "backbone": type(model).__name__,
    }
    return Experiment(
        name=name,
        tokenizer=tokenizer,
        model=model,
        objective=built_objective,
        data=data,
        train=train,
        sampling=sampling or SamplingConfig(),
        evaluation=evaluation,
        tags=tags,
        callbacks=tuple(callbacks),
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global torch RNG seeded with `seed` inside the block and restored after it."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else ()):
        torch.manual_seed(seed)
        yield


def mixture_parts(tokenizers: Mapping[str, Any], data: Any, backbone: Any, objective: Any,
                  evaluation: Any) -> tuple[dict, Any]:
    """Checks a mixture's per-modality bindings agree; returns (tokenizers in name order, evaluation:
    None or a {modality: suite} dict in name order)."""
    names = sorted(tokenizers)
    if not isinstance(getattr(data, "parts", None), Mapping):
        raise ConfigError(f"build_experiment.tokenizer names modalities {names}, so build_experiment.data must be "
                          f"a @MixtureData() with the same parts, got {type(data).__name__}")
    if list(data.names) != names:
        raise ConfigError(f"modalities differ: build_experiment.tokenizer has {names}, MixtureData.parts has "
                          f"{list(data.names)}")
    if "layouts" not in factory_parameters(backbone):
        raise ConfigError(f"a mixture needs a backbone that takes per-modality layouts (build_experiment.backbone = "
                          f"@MultiModalDiT), got {getattr(backbone, '__name__', type(backbone).__name__)}")
    single_layout = {"encoder_input", "num_tokens"} & set(factory_parameters(objective))
    if single_layout:
        name = getattr(objective, "__name__", type(objective).__name__)
        raise ConfigError(f"{name} works on one token layout (it takes {', '.join(sorted(single_layout))}); "
                          f"a mixture has one per modality ({', '.join(names)})")
    if isinstance(evaluation, Mapping):
        if sorted(evaluation) != names:
            raise ConfigError(f"build_experiment.evaluation names {sorted(evaluation)}, the mixture has {names}")
        evaluation = {name: evaluation[name] for name in names}
    elif evaluation is not None:
        raise ConfigError("a mixture evaluates each modality with its own suite: bind build_experiment.evaluation "
                          f"= {{{', '.join(repr(n) + ': @' + n + '/EvalSuite()' for n in names)}}}")
    return {name: tokenizers[name] for name in names}, evaluation


def configured_seed(default: int = 0) -> int:
    """TrainConfig.seed as bound in the current gin config (before anything is built)."""
    try:
        return int(gin.query_parameter("TrainConfig.seed"))
    except (ValueError, TypeError):
        return default


def train_config_from_gin() -> TrainConfig:
    """The TrainConfig the parsed gin config describes, built alone (cheap): its values are checked
    before a launcher writes anything, not when the experiment is built."""
    try:
        bound = gin.query_parameter("build_experiment.train")
    except ValueError:
        return TrainConfig()
    if not isinstance(bound, gin.config.ConfigurableReference):
        return bound if isinstance(bound, TrainConfig) else TrainConfig()
    try:
        built = bound.scoped_configurable_fn()
    except UserError as error:  # gin's proxy subclass carries call-site lines
        raise ConfigError(first_line(error)) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"TrainConfig: {first_line(error)}") from None
    return built if isinstance(built, TrainConfig) else TrainConfig()


def build_from_gin() -> Experiment:
    """Build the experiment from the current (parsed) gin state with one-line errors. The parts gin
    builds before build_experiment runs (tokenizer, data, ...) draw from the seeded fork too."""
    try:
        with seeded(configured_seed()):
            return build_experiment()
    except ConfigError as error:  # gin appends its call-site lines to errors raised inside configurables
        raise ConfigError(first_line(error)) from None
    except UserError as error:  # gin re-raises it as a proxy subclass with call-site lines appended
        raise UserError(first_line(error)) from None
    except (TypeError, ValueError, RuntimeError) as error:
        text = str(error)
        first = first_line(error)
        if "Required bindings" in text:
            raise ConfigError(f"missing required binding: {first}") from None
        if "No values supplied by Gin or caller for arguments" in text:
            where = [line.strip() for line in text.splitlines() if "In call to configurable" in line]
            missing = [line.strip() for line in text.splitlines() if "No values supplied" in line]
            raise ConfigError(f"missing required binding: {missing[0]} {where[-1] if where else ''}") from None
        where = [line.strip() for line in text.splitlines() if "In call to configurable" in line]
        raise ConfigError(f"{first} ({where[-1]})" if where else first) from None
