"""Recipes: YAML files parsed into typed, airtight configs.

Every key a recipe may hold is a field below; an unknown key, a wrong type, an out-of-range value or a
missing file is a :class:`RecipeError` that names the recipe file, the key path and what is allowed.
``key=value`` overrides (``algorithm.beta=0.1``, ``reward.models.0.weight=2``) go through the same checks.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 floats without a dot (``1e-4``, ``3E+2``) as numbers.

    YAML 1.1 (PyYAML) reads ``lr: 1e-4`` as the string ``"1e-4"``; every Hydra/OmegaConf user writes it so.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats (``3e-3`` is the number 0.003, not a string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_NUMBER = re.compile(r"^\s*[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?\s*$")


def as_number(value: Any) -> Any:
    """A string that spells a decimal number (``"3e-3"``, ``"1.0E-4"``) as that float; anything else as is."""
    if isinstance(value, str) and _NUMBER.match(value):
        return float(value.replace("_", ""))
    return value


DIVERGENCE_NAMES = ("kl", "reverse_kl", "js", "hellinger", "chi2", "tv", "fisher", "w2", "none")


class RecipeError(ValueError):
    """A recipe (or an override) is invalid. The message says where and what is allowed."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.detail = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


def _f(default: Any = dataclasses.MISSING, *, help: str = "", ge: float | None = None, gt: float | None = None,
       le: float | None = None, factory: Any = None) -> Any:
    meta = {"help": help, "ge": ge, "gt": gt, "le": le}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    pretrained: str = _f("embedded:tiny/lcm", help="diffusers LCM pipeline: local folder, HF id, or embedded:...")
    revision: str | None = _f(None, help="HF revision")
    cache_dir: str | None = _f(None, help="Hugging Face cache folder")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", help="weights dtype of the frozen parts")
    lora_rank: int = _f(8, ge=0, help="LoRA rank; 0 = full fine-tuning of the UNet")
    lora_alpha: float = _f(8.0, gt=0, help="LoRA alpha")
    lora_targets: list[str] = _f(factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], help="LoRA target modules")


@dataclass
class RewardModelConfig:
    name: str = _f(help="scorer name (rocm_ray.rewards registry)")
    weight: float = _f(1.0, help="weight in the mixture")
    path: str | None = _f(None, help="weights: local path, HF id or embedded:...")
    head_path: str | None = _f(None, help="second file some scorers need (aesthetic head)")
    tokenizer_path: str | None = _f(None, help="tokenizer folder some scorers need (ImageReward)")


@dataclass
class RewardConfig:
    models: list[RewardModelConfig] = _f(factory=list, help="the reward models, summed with their weights")
    scale: float = _f(1.0, gt=0, help="multiplies the reward in the loss")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", help="reward models' weights and autocast: auto = bfloat16 on GPU, float32 on CPU")


@dataclass
class AlgorithmConfig:
    regularizer: Literal["kl", "reverse_kl", "js", "hellinger", "chi2", "tv", "fisher", "w2", "none"] = _f(
        "kl", help="divergence between policy and reference step kernels")
    beta: float = _f(0.01, ge=0, help="regularizer coefficient")
    reduction: Literal["mean", "sum"] = _f("mean", help="per-dimension mean or exact full-Gaussian sum")
    terminal: Literal["auto", "none"] = _f("auto", help="regularize the last (noise-free) step or not")
    num_inference_steps: int = _f(4, ge=1, le=50, help="consistency sampling steps N")
    guidance_scale: float = _f(8.0, ge=1.0, help="LCM guidance scale w (through the guidance embedding)")
    truncate_steps: int | None = _f(None, ge=1, help="backprop through the last K steps only (None = all)")
    gradient_checkpointing: bool = _f(False, help="checkpoint every UNet call")
    block_checkpointing: bool = _f(False, help="checkpoint every block inside the UNet/transformer too (diffusers' "
                                   "gradient checkpointing): a call's recompute holds one block's activations")
    name: Literal["rocm", "ppo"] = _f("rocm", help="rocm (reward backprop) or ppo (RLCM-style policy gradient, "
                                      "docs/ppo.md); ppo also takes non-differentiable rewards")
    ppo_group_size: int = _f(4, ge=2, help="ppo: samples per prompt in a batch (advantages normalized per prompt)")
    ppo_epochs: int = _f(2, ge=1, help="ppo: inner epochs over each sampled batch")
    ppo_minibatches: int = _f(1, ge=1, help="ppo: optimizer steps per inner epoch (minibatches of the batch)")
    ppo_clip_range: float = _f(1e-4, gt=0, help="ppo: clip the probability ratio to [1 - c, 1 + c] (RLCM: 1e-4)")
    ppo_adv_clip_max: float = _f(5.0, gt=0, help="ppo: clip normalized advantages to [-a, a]")


@dataclass
class DataConfig:
    prompts: list[str] = _f(factory=list, help="training prompts (cycled)")
    prompts_file: str | None = _f(None, help="text file, one prompt a line (added to prompts)")
    eval_prompts: list[str] = _f(factory=list, help="fixed prompts for the before/after grid and eval")
    eval_seeds: int = _f(4, ge=1, help="seeds per eval prompt")
    height: int | None = _f(None, ge=8, help="image height in pixels (a multiple of the VAE factor); null = the "
                            "model's native size")
    width: int | None = _f(None, ge=8, help="image width in pixels (a multiple of the VAE factor); null = the "
                           "model's native size")


@dataclass
class TrainConfig:
    steps: int = _f(100, ge=1, help="optimizer steps")
    batch_size: int = _f(8, ge=1, help="global images per step (split over workers)")
    lr: float = _f(1e-4, gt=0, help="AdamW learning rate")
    weight_decay: float = _f(0.0, ge=0, help="AdamW weight decay")
    adam_betas: list[float] = _f(factory=lambda: [0.9, 0.999], help="AdamW betas")
    max_grad_norm: float = _f(1.0, ge=0, help="gradient clipping (0 = off)")
    seed: int = _f(0, ge=0, help="seed of prompts, noise and initialization")
    num_workers: int = _f(0, ge=0, help="0 = in-process; >= 1 = Ray Train workers")
    use_gpu: bool = _f(False, help="Ray Train workers on GPUs")
    zero_stage: int = _f(0, ge=0, le=3, help="DeepSpeed ZeRO stage of the Ray Train workers")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", help="autocast dtype on GPU")
    checkpoint_every: int = _f(0, ge=0, help="steps between checkpoints (Ray: 0 = at the end; in-process: 0 = none)")
    max_failures: int = _f(0, ge=-1, help="Ray Train FailureConfig.max_failures")
    output_dir: str = _f("outputs/{name}", help="where the run lives: a folder or s3://... ({name} = recipe name)")
    cpu_threads: int | None = _f(None, ge=1, help="torch CPU threads of the in-process trainer (null = torch's)")
    micro_batch_size: int | None = _f(None, ge=1, help="images per micro-batch of a Ray worker (gradient "
                                      "accumulation; remote scoring overlaps sampling); null = whole shard")
    max_nonfinite_steps: int = _f(3, ge=1, help="non-finite (NaN/inf) steps in a row skipped before the run stops")


@dataclass
class RayConfig:
    address: str | None = _f(None, help="Ray address (else $RAY_ADDRESS, else a local Ray)")
    reward_replicas: int = _f(1, ge=1, help="RewardService replicas")
    reward_num_gpus: float = _f(0.0, ge=0, help="GPUs per reward replica (fractions allowed)")
    reward_num_cpus: float = _f(1.0, ge=0, help="CPUs per reward replica")
    reward_resources: dict[str, float] = _f(factory=dict, help="custom resources per replica, e.g. {reward: 1}")
    worker_resources: dict[str, float] = _f(factory=dict, help="custom resources per train worker")
    cpus_per_worker: float = _f(1.0, ge=0, help="CPUs per Ray Train worker")
    max_restarts: int = _f(3, ge=-1, help="RewardService actor restarts")
    max_task_retries: int = _f(3, ge=-1, help="RewardService call retries")
    reward_placement: Literal["remote", "colocated"] = _f(
        "remote", help="remote: RewardService replicas; colocated: every train worker holds the reward model")
    reward_micro_batch: int = _f(16, ge=1, help="images per reward forward/backward (bounds reward memory)")
    reward_timeout_s: float = _f(600.0, gt=0, help="seconds a reward request may take before the run stops")


@dataclass
class TuneConfig:
    num_samples: int = _f(1, ge=1, help="trials (times the grid)")
    metric: str = _f("reward", help="metric to optimize")
    mode: Literal["max", "min"] = _f("max", help="optimize direction")
    scheduler: Literal["fifo", "asha", "pbt"] = _f("asha", help="trial scheduler")
    search_space: dict[str, Any] = _f(factory=dict, help="dotted key -> list (grid) or {uniform|loguniform: [a,b]}")
    max_concurrent_trials: int = _f(1, ge=1, help="trials running at once")


@dataclass
class LoggingConfig:
    log_every: int = _f(1, ge=1, help="steps between progress lines")
    sample_every: int = _f(0, ge=0, help="steps between sample log rows (0 = start and end only)")
    wandb: bool = _f(False, help="log to Weights & Biases")
    wandb_project: str = _f("rocm_ray", help="W&B project")
    tensorboard: bool = _f(False, help="write TensorBoard events")


@dataclass
class Recipe:
    name: str = _f("run", help="run name")
    model: ModelConfig = _f(factory=ModelConfig)
    reward: RewardConfig = _f(factory=RewardConfig)
    algorithm: AlgorithmConfig = _f(factory=AlgorithmConfig)
    data: DataConfig = _f(factory=DataConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    ray: RayConfig = _f(factory=RayConfig)
    tune: TuneConfig = _f(factory=TuneConfig)
    logging: LoggingConfig = _f(factory=LoggingConfig)
    source: str = field(default="<memory>", metadata={"internal": True})

    @property
    def output_path(self) -> Path:
        return Path(self.train.output_dir.replace("{name}", self.name))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# --------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in _fields(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _fields(cls: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    err = RecipeError(source, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, source, key)
            except RecipeError:
                pass
        raise err
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise err
    if origin is list:
        if not isinstance(value, list):
            raise err
        (item,) = typing.get_args(tp)
        return [_convert(v, item, source, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise err
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, source, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise err
        return _build(tp, value, source, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise err
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise err
    if tp is float:
        value = as_number(value)  # "3e-3" written where a number belongs: the number meant
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise err
    if tp is str:
        if isinstance(value, str):
            return value
        raise err
    raise err  # pragma: no cover


def _check_range(f: dataclasses.Field, value: Any, source: str, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<=")):
        if m.get(bound) is not None and not ok(value, m[bound]):
            raise RecipeError(source, key, f"must be {word} {m[bound]}, got {value!r} ({m.get('help', '')})")


def _build(cls: Any, data: dict, source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise RecipeError(source, key, "unknown key; allowed keys here: " + ", ".join(fields))
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(data[name], hints[name], source, key)
            _check_range(f, value, source, key)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(source, key, f"missing required key ({f.metadata.get('help', '')})")
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, p in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise RecipeError(source, where, f"list index out of range (the list has {len(node)} items)")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(source, where, f"is not a section, cannot set {dotted}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(source, dotted, f"list index out of range (the list has {len(node)} items)")
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str], source: str = "command line") -> list[tuple[str, Any]]:
    """``["algorithm.beta=0.1", ...]`` -> ``[("algorithm.beta", 0.1), ...]`` (values parsed as YAML)."""
    out = []
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise RecipeError(source, o, "an override must look like key.path=value, e.g. algorithm.beta=0.1")
        k, v = o.split("=", 1)
        try:
            out.append((k.strip(), yaml_load(v) if v != "" else ""))
        except yaml.YAMLError as e:
            raise RecipeError(source, k, f"cannot parse value {v!r}: {e}") from None
    return out


def recipe_from_dict(data: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Recipe:
    """Build a checked :class:`Recipe` from a mapping plus ``key=value`` overrides."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(source, "", "a recipe must be a YAML mapping of sections (model:, reward:, ...)")
    data = yaml_load(yaml.safe_dump(data))  # deep copy
    for key, value in parse_overrides(overrides or [], source):
        _set_dotted(data, key, value, source)
    recipe = _build(Recipe, data, source, "")
    recipe.source = source
    _validate(recipe)
    return recipe


def load_yaml_config(path: str | Path, cls: type, overrides: list[str] | None = None) -> Any:
    """Load any YAML file into the dataclass ``cls`` with the same airtight checks and overrides as recipes.

    Used by schemas other than the training recipe (e.g. ``rocm-ray eval``'s eval recipes). Sets the
    attribute ``source`` when ``cls`` has that field.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(str(path), "", "file not found")
    data = _read_yaml(p) or {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), "", "expected a YAML mapping of keys")
    for key, value in parse_overrides(overrides or [], str(path)):
        _set_dotted(data, key, value, str(path))
    obj = _build(cls, data, str(path), "")
    if any(f.name == "source" for f in dataclasses.fields(cls)):
        obj.source = str(path)
    return obj


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load ``path`` (YAML) with ``key=value`` overrides into a checked :class:`Recipe`."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a recipe file" if p.is_dir() else "recipe file not found"
        raise RecipeError(str(path), "", f"{what} (recipes live in recipes/*.yaml)")
    return recipe_from_dict(_read_yaml(p), str(path), overrides)


def _read_yaml(p: Path) -> Any:
    """The YAML document in ``p``; a file that is not UTF-8 text or not YAML is a :class:`RecipeError`."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(p), "", f"not a UTF-8 text file (byte {e.start}): a recipe is a YAML text file "
                          "such as recipes/tiny_debug.yaml") from None
    except OSError as e:
        raise RecipeError(str(p), "", f"cannot read the file: {e.strerror}") from None
    try:
        return yaml_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(str(p), "", f"not valid YAML{at}: {problem}; a recipe is a YAML mapping of "
                          "sections (model:, reward:, algorithm:, data:, train:, ...)") from None


def _validate(r: Recipe) -> None:
    """Cross-field checks the types cannot express."""
    src = r.source
    if r.data.prompts_file is not None:
        pf = Path(r.data.prompts_file)
        if not pf.is_absolute() and not pf.exists() and r.source not in ("<dict>", "<memory>"):
            pf = Path(r.source).parent / pf
        if not pf.is_file():
            raise RecipeError(src, "data.prompts_file", f"file not found: {r.data.prompts_file}")
        _read_prompts(pf, src)
    if not r.data.prompts and r.data.prompts_file is None:
        raise RecipeError(src, "data.prompts", "no training prompts: give data.prompts or data.prompts_file")
    if not r.reward.models:
        raise RecipeError(src, "reward.models", "no reward model: add at least one (name, weight, path)")
    if all(m.weight == 0 for m in r.reward.models):
        raise RecipeError(src, "reward.models.0.weight", "every reward weight is 0: nothing to optimize; give "
                          "at least one reward a non-zero weight (e.g. reward.models.0.weight=1.0)")
    if r.algorithm.truncate_steps is not None and r.algorithm.truncate_steps > r.algorithm.num_inference_steps:
        raise RecipeError(src, "algorithm.truncate_steps",
                          f"must be <= algorithm.num_inference_steps ({r.algorithm.num_inference_steps})")
    if len(r.train.adam_betas) != 2 or not all(0 <= b < 1 for b in r.train.adam_betas):
        raise RecipeError(src, "train.adam_betas", f"expected two numbers in [0, 1), got {r.train.adam_betas}")
    workers = max(r.train.num_workers, 1)
    if r.train.batch_size % workers:
        raise RecipeError(src, "train.batch_size",
                          f"must be divisible by train.num_workers ({r.train.num_workers}), got {r.train.batch_size}")
    if r.train.zero_stage and r.train.num_workers == 0:
        raise RecipeError(src, "train.zero_stage", "DeepSpeed ZeRO needs Ray Train workers: set train.num_workers >= 1")
    mb = r.train.micro_batch_size
    if mb is not None and (r.train.batch_size // workers) % mb:
        raise RecipeError(src, "train.micro_batch_size",
                          f"must divide the per-worker batch (train.batch_size / train.num_workers = "
                          f"{r.train.batch_size // workers}), got {mb}")
    a = r.algorithm
    if a.name == "ppo":
        per_worker = r.train.batch_size // workers
        if per_worker % a.ppo_group_size:
            raise RecipeError(src, "algorithm.ppo_group_size",
                              f"must divide the images per worker ({per_worker} = train.batch_size / "
                              f"max(train.num_workers, 1)), got {a.ppo_group_size}")
        if (per_worker // a.ppo_group_size) % a.ppo_minibatches:
            raise RecipeError(src, "algorithm.ppo_minibatches",
                              f"must divide the prompt groups per worker ({per_worker // a.ppo_group_size}), "
                              f"got {a.ppo_minibatches}")
        if a.num_inference_steps == 1 and a.terminal == "none":
            raise RecipeError(src, "algorithm.terminal", "ppo needs a stochastic step: with "
                              "num_inference_steps 1 use terminal: auto (RLCM's noisy last step)")
        if mb is not None:
            raise RecipeError(src, "train.micro_batch_size", "micro-batches (overlap of sampling and remote "
                              "scoring) are for ROCM; PPO scores its whole rollout at once: remove the key")
    from rocm_ray.rewards import available_scorers, scorer_options  # lazy: imports torch
    from rocm_ray.rewards.base import differentiable_names, is_differentiable_name

    names = available_scorers()
    for i, m in enumerate(r.reward.models):
        if m.name not in names:
            raise RecipeError(src, f"reward.models.{i}.name", f"unknown reward {m.name!r}; one of: {', '.join(names)}")
        if a.name == "rocm" and not is_differentiable_name(m.name):
            raise RecipeError(src, f"reward.models.{i}.name",
                              f"reward {m.name!r} is not differentiable and ROCM backpropagates through the "
                              "reward; train it with the policy-gradient baseline (algorithm.name: ppo) or "
                              f"choose a differentiable reward: {', '.join(differentiable_names())}")
        for opt in ("head_path", "tokenizer_path"):
            if getattr(m, opt) is not None and opt not in scorer_options(m.name):
                raise RecipeError(src, f"reward.models.{i}.{opt}",
                                  f"reward {m.name!r} takes no {opt}; its options: "
                                  f"{', '.join(scorer_options(m.name)) or 'none'}")


def _read_prompts(pf: Path, source: str) -> list[str]:
    """The prompts of a prompts file (one a line, ``#`` comments); not UTF-8 or no prompt: a RecipeError."""
    try:
        text = pf.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(source, "data.prompts_file", f"{pf} is not UTF-8 text (byte {e.start}): save it as "
                          "UTF-8, one prompt a line") from None
    except OSError as e:
        raise RecipeError(source, "data.prompts_file", f"cannot read {pf}: {e.strerror}") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise RecipeError(source, "data.prompts_file", f"{pf} holds no prompt (empty, or only # comments): "
                          "write one prompt a line")
    return prompts


def prompts_of(recipe: Recipe) -> list[str]:
    """The training prompts: ``data.prompts`` then the lines of ``data.prompts_file``."""
    prompts = list(recipe.data.prompts)
    if recipe.data.prompts_file:
        pf = Path(recipe.data.prompts_file)
        if not pf.is_absolute() and not pf.exists():
            pf = Path(recipe.source).parent / pf
        prompts += _read_prompts(pf, recipe.source)
    return prompts


def describe(cls: Any = Recipe, prefix: str = "") -> list[str]:
    """Lines ``key  type  default  help`` for every recipe key (``rocm-ray keys``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in _fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        lines.append(f"{key:36s} {_type_name(tp):40s} {default!r:24s} {f.metadata.get('help', '')}")
    return lines
