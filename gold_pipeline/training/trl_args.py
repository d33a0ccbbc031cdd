"""TRL's GOLD script command line (trl/experimental/gold/gold.py) as `gold train` options.

TRL runs GOLD as `python trl/experimental/gold/gold.py --model_name_or_path ... --dataset_name ...`, parsed by
TrlParser over (ScriptArguments, GOLDConfig, ModelConfig): every field is `--field_name` (HfArgumentParser's
spelling; `--field-name` too), booleans are `--flag`, `--flag true|false` and, for those on by default,
`--no_flag`; list fields take several values; `--config FILE` is a YAML mapping of the same names plus an optional
`env` mapping of environment variables. This module turns such options into `gold train`'s: the TrainJob keys and
GOLDConfig fields that `training.job.build_job` takes.

    parse_argv(argv) -> options              the options given on a command line, typed per field
    read_options_file(path) -> options       a TRL- or gold-style YAML/JSON file, typed the same way
    parse_set_items(items) -> options        `--set KEY=VALUE` items (VALUE parsed as YAML)
    merge_command_line(first, second)        two spellings of one command line; a name given twice differently
                                             is refused
    to_gold_options(options) -> options      TRL names -> TrainJob keys + GOLDConfig fields
    train_options(...) -> options            all of it, in `gold train`'s order: file < command line < --set

`options` are dicts {canonical name: value}. Canonical names are the TRL/HfArgumentParser field names; gold's own
names are aliases of them where both exist (`--student` = `--model_name_or_path`, `--teacher` =
`--teacher_model_name_or_path`, `--dataset-split` = `--dataset_train_split`, `--teacher-tokenizer` =
`--teacher_tokenizer_name_or_path`), otherwise gold's names stay (`aligned`, `dataset`, `eval_aligned`,
`eval_dataset`, `eval_split`, `overwrite`). Unknown names are refused with the closest valid one.

What each TRL name does:
- ScriptArguments: `dataset_name` -> `dataset` (or `aligned` for a `gold align` output folder), `dataset_config`,
  `dataset_train_split` -> the split of dataset_name; `dataset_test_split` -> the eval set (the same dataset, that
  split) when eval_strategy != "no", TRL's rule. `dataset_streaming` and `ignore_bias_buffers` have no effect (TRL's
  GOLD script does not read them either).
- ModelConfig: `model_name_or_path` -> the student; `model_revision`, `use_peft`, `lora_r`, `lora_alpha`,
  `lora_dropout`, `lora_target_modules` are GOLDConfig fields; `dtype` and `attn_implementation` (and TRL
  GOLDConfig's `trust_remote_code`) go into the init kwargs of both models; `load_in_4bit` / `load_in_8bit`
  quantize the student with bitsandbytes (CUDA only, with --use_peft; the teacher stays unquantized, in `dtype`).
  The other LoRA and quantization options are accepted only at TRL's defaults.
- TRL GOLDConfig fields inherited from SFTConfig that gold has no use for (packing, dataset_text_field, ...):
  accepted only at TRL's defaults; `dataset_num_proc` has no effect (`gold align --num-workers` is the knob).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import typing
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from gold_pipeline.errors import GoldInputError

logger = logging.getLogger(__name__)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrlScriptArguments:
    """TRL's ScriptArguments (trl/scripts/utils.py), same names and defaults."""

    dataset_name: str | None = field(default=None, metadata=_help(
        "Training data: raw conversations (.jsonl/.json/.parquet, a data folder, a hub id, a `gold teacher-cache` "
        "folder) or a `gold align` output folder."))
    dataset_config: str | None = field(default=None, metadata=_help("Dataset configuration name (hub datasets)."))
    dataset_train_split: str = field(default="train", metadata=_help("Split of dataset_name to train on."))
    dataset_test_split: str = field(default="test", metadata=_help(
        "Split of dataset_name to evaluate on when eval_strategy is not 'no'."))
    dataset_streaming: bool = field(default=False, metadata=_help("Accepted; no effect (as in TRL's GOLD script)."))
    ignore_bias_buffers: bool = field(default=False, metadata=_help("Accepted; no effect (as in TRL's GOLD script)."))


@dataclass
class TrlModelArguments:
    """The fields of TRL's ModelConfig that GOLDConfig has not (model_revision, use_peft and lora_r/alpha/dropout/
    target_modules are GOLDConfig fields)."""

    model_name_or_path: str | None = field(default=None, metadata=_help(
        "Student model: local path, hub id or pkg: name (gold's --student)."))
    dtype: str | None = field(default=None, metadata=_help(
        "dtype both models load in: auto, float32, bfloat16 or float16 (default: the checkpoint's own)."))
    attn_implementation: str | None = field(default=None, metadata=_help(
        "Attention implementation of both models, e.g. eager or sdpa."))
    lora_target_parameters: list[str] | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    lora_modules_to_save: list[str] | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    lora_task_type: str = field(default="CAUSAL_LM", metadata=_help("Only CAUSAL_LM."))
    use_rslora: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    use_dora: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    load_in_8bit: bool = field(default=False, metadata=_help("Load the student in 8 bits (bitsandbytes, CUDA)."))
    load_in_4bit: bool = field(default=False, metadata=_help("Load the student in 4 bits (bitsandbytes, CUDA)."))
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help("4-bit quantization type: nf4 or fp4."))
    use_bnb_nested_quant: bool = field(default=False, metadata=_help("Nested (double) 4-bit quantization."))
    bnb_4bit_quant_storage: str | None = field(default=None, metadata=_help("Storage dtype of 4-bit weights."))


@dataclass
class TrlSftArguments:
    """The fields of TRL's GOLDConfig (inherited from SFTConfig) that gold's GOLDConfig has not, TRL's defaults."""

    trust_remote_code: bool = field(default=False, metadata=_help("Run model code from the hub (both models)."))
    dataset_num_proc: int | None = field(default=None, metadata=_help("Accepted; no effect (`gold align "
                                                                      "--num-workers` parallelizes alignment)."))
    dataset_text_field: str = field(default="text", metadata=_help("Only TRL's default."))
    dataset_kwargs: str | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    eos_token: str | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    pad_token: str | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    truncation_mode: str = field(default="keep_start", metadata=_help("Only TRL's default."))
    shuffle_dataset: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    packing: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    packing_strategy: str = field(default="bfd", metadata=_help("Only TRL's default."))
    padding_free: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    pad_to_multiple_of: str | None = field(default="auto", metadata=_help("Only TRL's default."))
    eval_packing: bool | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    completion_only_loss: bool | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    assistant_only_loss: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    loss_type: str = field(default="nll", metadata=_help("Only TRL's default."))
    activation_offloading: bool = field(default=False, metadata=_help("Only TRL's default (False)."))
    router_aux_loss_coef: float | None = field(default=None, metadata=_help("Only TRL's default (None)."))
    callbacks: list[str] = field(default_factory=list, metadata=_help("Only TRL's default (none)."))


@dataclass
class JobArguments:
    """gold's own TrainJob keys that have no TRL name (see training/job.py TrainJob)."""

    aligned: str | None = field(default=None, metadata=_help("Aligned-shard directory from `gold align`."))
    dataset: str | None = field(default=None, metadata=_help("Raw conversations, aligned on the fly."))
    eval_aligned: str | None = field(default=None, metadata=_help("Aligned-shard directory for evaluation."))
    eval_dataset: str | None = field(default=None, metadata=_help("Raw conversations for evaluation."))
    eval_split: str | None = field(default=None, metadata=_help("Split of eval_dataset."))
    overwrite: bool = field(default=False, metadata=_help("Replace the earlier run in output_dir."))


# gold's names -> the canonical (TRL) name of the same option.
ALIASES = {
    "student": "model_name_or_path",
    "teacher": "teacher_model_name_or_path",
    "dataset_split": "dataset_train_split",
    "teacher_tokenizer": "teacher_tokenizer_name_or_path",
}
NO_EFFECT = ("dataset_streaming", "ignore_bias_buffers", "dataset_num_proc")
_LORA_EXTRAS = ("lora_target_parameters", "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")
_QUANTIZATION = ("load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                 "bnb_4bit_quant_storage")
_INIT_KWARGS = ("dtype", "attn_implementation", "trust_remote_code")
GOLD_ONLY_OPTIONS = ("--config", "--set")  # typer options of `gold train` outside these dataclasses


def _defaults(cls) -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


TRL_DEFAULTS = {**_defaults(TrlScriptArguments), **_defaults(TrlModelArguments), **_defaults(TrlSftArguments)}
# TRL options gold takes only at TRL's default value, with the reason.
FIXED = {
    **{name: "gold trains on prompt/completion conversations with its byte alignment and has no SFT "
             "packing, text-field, padding or loss-type options" for name in dataclasses.asdict(TrlSftArguments())
       if name not in ("trust_remote_code", "dataset_num_proc")},
    **{name: "gold's LoRA takes use_peft, lora_r, lora_alpha, lora_dropout and lora_target_modules; for other peft "
             "settings call GOLDTrainer(peft_config=LoraConfig(...)) from Python" for name in _LORA_EXTRAS},
}


# --------------------------------------------------------------------------------------------------------------
# The parser: HfArgumentParser over copies of the dataclasses, every default suppressed (only given options).
# --------------------------------------------------------------------------------------------------------------


class _Parser:
    """An HfArgumentParser whose errors are GoldInputErrors (built lazily: transformers is a heavy import)."""

    def __init__(self) -> None:
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            def error(self, message: str):  # argparse would print usage and exit
                raise GoldInputError(f"train: {message}.")

        from gold_pipeline.training.config import GOLDConfig

        self.parser = Parser((_copy_dataclass(GOLDConfig), _copy_dataclass(TrlScriptArguments),
                              _copy_dataclass(TrlModelArguments), _copy_dataclass(TrlSftArguments),
                              _copy_dataclass(JobArguments)), prog="gold train", add_help=False, allow_abbrev=False)
        self.actions: dict[str, argparse.Action] = {}
        for action in self.parser._actions:
            action.default = argparse.SUPPRESS
            action.required = False
            if action.option_strings and action.option_strings[0] == f"--{action.dest}":
                self.actions[action.dest] = action  # the main spelling (not --no_x)
        self.option_strings = sorted({s for a in self.parser._actions for s in a.option_strings} |
                                     set(GOLD_ONLY_OPTIONS))


def _copy_dataclass(cls):
    """A plain copy of `cls`'s init fields (HfArgumentParser rewrites field types in place; GOLDConfig's own fields
    stay untouched), with gold's alias spellings added."""
    hints = typing.get_type_hints(cls)
    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).extend([f"--{alias}", f"--{alias.replace('_', '-')}"])
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        metadata = dict(f.metadata)
        if f.name in aliases:
            metadata["aliases"] = sorted(set(aliases[f.name]))
        kwargs: dict[str, Any] = {"metadata": metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        else:
            kwargs["default"] = None
        specs.append((f.name, hints[f.name], field(**kwargs)))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", specs)


@lru_cache(maxsize=1)
def _parser() -> _Parser:
    return _Parser()


def option_names() -> list[str]:
    """Every option string `gold train` accepts (`--field_name`, `--field-name`, `--no_flag`, aliases)."""
    return list(_parser().option_strings)


def closest_option(flag: str) -> str | None:
    """The accepted option string closest to `flag` ("--lerning_rate" -> "--learning_rate"), or None."""
    name = flag.split("=", 1)[0]
    if not name.startswith("--"):
        name = "--" + name.lstrip("-")
    matches = difflib.get_close_matches(name, _parser().option_strings, n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_option_error(name: str, where: str = "train") -> GoldInputError:
    flag = name if name.startswith("-") else f"--{name}"
    suggestion = closest_option(flag)
    hint = f"did you mean {suggestion}? " if suggestion else ""
    return GoldInputError(
        f"{where}: unknown option {flag.split('=', 1)[0]}; {hint}(gold train takes gold's options, every "
        "GOLDConfig/TrainingArguments field and TRL's ScriptArguments/ModelConfig fields as --field_name.)"
    )


def parse_argv(argv: Iterable[str]) -> dict[str, Any]:
    """The options given in `argv` (TRL/HfArgumentParser spelling), typed per field; unknown ones are refused.

    Example: ["--max_steps", "2", "--use_peft", "--lora_target_modules", "q_proj", "v_proj"] ->
    {"max_steps": 2, "use_peft": True, "lora_target_modules": ["q_proj", "v_proj"]}.
    """
    namespace, extras = _parser().parser.parse_known_args(list(argv))
    if extras:
        first = next((e for e in extras if e.startswith("-")), None)
        if first is not None:
            raise unknown_option_error(first)
        raise GoldInputError(f"train: unexpected value(s) {extras}: every option takes the form --name VALUE "
                             "(booleans: --flag, --flag true|false).")
    return vars(namespace)


def canonical_name(name: str) -> str:
    """`student` -> `model_name_or_path`, dashes -> underscores; other names unchanged."""
    name = name.replace("-", "_")
    return ALIASES.get(name, name)


def typed_value(name: str, value: Any, where: str) -> Any:
    """`value` (from a YAML/JSON file or --set) converted as the command line would convert it: YAML reads `2e-5`
    as a string, HfArgumentParser as the float 2e-05. Unknown names are refused."""
    action = _parser().actions.get(name)
    if action is None:
        raise unknown_option_error(name, where)
    convert: Callable[[str], Any] | None = action.type if action.type not in (None, str) else None

    def one(item: Any) -> Any:
        if convert is None or not isinstance(item, str):
            return item
        try:
            return convert(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise GoldInputError(f"{where}: {name}={item!r}: {error}") from None

    if value is None:
        return None
    if action.nargs == "+":
        return [one(item) for item in (value if isinstance(value, (list, tuple)) else [value])]
    return one(value)


def read_options_file(path: str | Path, environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (TRL's or gold's, dashes or underscores) to values, typed per field.
    TRL's `env:` mapping sets those environment variables (into `environ`, default os.environ)."""
    from gold_pipeline.training.job import load_config_file

    data = load_config_file(path)
    env = data.pop("env", None)
    if env is not None:
        if not isinstance(env, Mapping):
            raise GoldInputError(f"{path}: `env` must be a mapping of environment variable names to values.")
        target = os.environ if environ is None else environ
        for key, value in env.items():
            target[str(key)] = str(value)
    return {canonical_name(k): typed_value(canonical_name(k), v, str(path)) for k, v in data.items()}


def parse_set_items(items: Iterable[str]) -> dict[str, Any]:
    """["seed=3", "lora_target_modules=[q_proj, v_proj]"] -> {"seed": 3, "lora_target_modules": [...]}."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise GoldInputError(f"--set {item!r}: expected KEY=VALUE.")
        name = canonical_name(key.strip())
        out[name] = typed_value(name, yaml.safe_load(value), "--set")
    return out


def merge_command_line(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Two spellings of one command line (gold's dashed typer options, the TRL-style rest) as one; a name given in
    both with different values is refused."""
    merged = dict(first)
    for name, value in second.items():
        if name in merged and merged[name] != value:
            raise GoldInputError(f"train: {name} is given twice with different values ({merged[name]!r} and "
                                 f"{value!r}); give it once.")
        merged[name] = value
    return merged


# --------------------------------------------------------------------------------------------------------------
# TRL names -> gold's TrainJob keys and GOLDConfig fields.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """What 4/8-bit loading depends on outside the options: CUDA, bitsandbytes, and this process's GPU (LOCAL_RANK,
    as TRL's get_kbit_device_map)."""

    cuda: bool
    bitsandbytes: bool
    local_process_index: int = 0

    @classmethod
    def detect(cls) -> Runtime:
        import torch

        return cls(cuda=torch.cuda.is_available(), bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                   local_process_index=int(os.environ.get("LOCAL_RANK", "0")))


def is_aligned_dir(path: str) -> bool:
    """True for a `gold align` output folder (manifest.json of kind "aligned")."""
    manifest = Path(path) / "manifest.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")).get("kind") == "aligned"
    except (OSError, json.JSONDecodeError):
        return False


def _init_kwargs(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise GoldInputError(f"{name} must be a dict or a JSON object string: {error}.") from None
    if not isinstance(value, Mapping):
        raise GoldInputError(f"{name} must be a dict or a JSON object string, got {type(value).__name__}.")
    return dict(value)


def quantization_kwargs(options: Mapping[str, Any], runtime: Runtime) -> dict[str, Any]:
    """Student init kwargs for --load_in_4bit / --load_in_8bit ({} when neither): a bitsandbytes
    quantization_config (as a dict) and device_map {"": this process's GPU}; refused where it cannot run."""
    bits = [b for b, name in ((4, "load_in_4bit"), (8, "load_in_8bit")) if options.get(name)]
    if not bits:
        return {}
    if len(bits) == 2:
        raise GoldInputError("train: --load_in_4bit and --load_in_8bit exclude each other: pick one.")
    flag = f"--load_in_{bits[0]}bit"
    if not runtime.cuda or not runtime.bitsandbytes:
        missing = " and ".join(m for m, ok in (("a CUDA GPU", runtime.cuda), ("bitsandbytes", runtime.bitsandbytes))
                               if not ok)
        raise GoldInputError(f"train: {flag} quantizes the student with bitsandbytes, which needs a CUDA GPU and the "
                             f"bitsandbytes package; this machine lacks {missing}. Drop {flag} (train in --dtype "
                             "bfloat16 or float32), or run on a CUDA machine with `pip install bitsandbytes`.")
    if not options.get("use_peft"):
        raise GoldInputError(f"train: {flag} needs --use_peft: quantized weights cannot be trained, only LoRA "
                             "adapters on top of them.")
    from transformers import BitsAndBytesConfig

    if bits[0] == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=options.get("dtype") if options.get("dtype") not in (None, "auto") else "float32",
            bnb_4bit_quant_type=options.get("bnb_4bit_quant_type", TRL_DEFAULTS["bnb_4bit_quant_type"]),
            bnb_4bit_use_double_quant=options.get("use_bnb_nested_quant", False),
            bnb_4bit_quant_storage=options.get("bnb_4bit_quant_storage"),
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config.to_dict(), "device_map": {"": runtime.local_process_index}}


def to_gold_options(options: Mapping[str, Any], *, runtime: Runtime | None = None,
                    aligned: Callable[[str], bool] = is_aligned_dir) -> dict[str, Any]:
    """Canonical options (TRL names included) -> `build_job`'s input (TrainJob keys + GOLDConfig fields).

    `runtime` (detected when None and needed) decides whether 4/8-bit loading can run; `aligned(path)` tells a
    `gold align` folder from raw data. Refuses TRL options gold cannot honour, naming the option and the fix.
    """
    from gold_pipeline.models.loading import resolve_dtype

    rest = dict(options)
    for name, why in FIXED.items():
        if name in rest and rest.pop(name) != TRL_DEFAULTS[name]:
            raise GoldInputError(f"train: {name}={options[name]!r} is not supported: {why}. Leave it at TRL's "
                                 f"default ({TRL_DEFAULTS[name]!r}).")
    for name in NO_EFFECT:
        if name in rest and rest.pop(name) != TRL_DEFAULTS[name]:
            logger.warning("%s=%r has no effect in gold train (nor in TRL's GOLD script); ignored.", name,
                           options[name])
    out: dict[str, Any] = {}
    student = rest.pop("model_name_or_path", None)
    if student is not None:
        out["student"] = student
    if rest.get("teacher_model_name_or_path") is not None:
        out["teacher"] = rest["teacher_model_name_or_path"]

    if rest.get("eval_steps") is not None:  # gold's rule: --eval-steps alone means evaluating every N steps
        rest.setdefault("eval_strategy", "steps")
    strategy = rest.get("eval_strategy", "no")
    evaluating = str(getattr(strategy, "value", strategy)) != "no"  # a string or transformers' IntervalStrategy
    dataset_name = rest.pop("dataset_name", None)
    train_split = rest.pop("dataset_train_split", None)
    test_split = rest.pop("dataset_test_split", TRL_DEFAULTS["dataset_test_split"])
    if dataset_name is not None:
        if rest.get("dataset") is not None or rest.get("aligned") is not None:
            raise GoldInputError("train: give the training data once: --dataset_name, --dataset or --aligned.")
        if aligned(dataset_name):
            if train_split not in (None, "train"):
                raise GoldInputError(f"train: {dataset_name} is a `gold align` folder, which has no splits: drop "
                                     f"--dataset_train_split {train_split}.")
            out["aligned"] = dataset_name
            if evaluating and rest.get("eval_dataset") is None and rest.get("eval_aligned") is None:
                raise GoldInputError(f"train: eval_strategy={rest['eval_strategy']!r} needs an eval set, and the "
                                     f"`gold align` folder {dataset_name} has no test split: pass --eval_aligned DIR "
                                     "(or --eval_dataset FILE), or --eval_strategy no.")
        else:
            out["dataset"] = dataset_name
            if evaluating and rest.get("eval_dataset") is None and rest.get("eval_aligned") is None:
                out["eval_dataset"], out["eval_split"] = dataset_name, test_split
    if train_split is not None and "aligned" not in out:
        out["dataset_split"] = train_split

    model_kwargs = _init_kwargs(rest.pop("model_init_kwargs", None), "model_init_kwargs")
    teacher_kwargs = _init_kwargs(rest.pop("teacher_model_init_kwargs", None), "teacher_model_init_kwargs")
    if rest.get("dtype") is not None:
        resolve_dtype(rest["dtype"])  # refuses an unknown name
    for name in _INIT_KWARGS:
        value = rest.pop(name, None)
        if value is not None and value is not False:
            model_kwargs.setdefault(name, value)  # explicit *_init_kwargs win
            teacher_kwargs.setdefault(name, value)
    quantization = {name: rest.pop(name) for name in _QUANTIZATION if name in rest}
    if quantization.get("load_in_4bit") or quantization.get("load_in_8bit"):
        merged = {**quantization, "dtype": model_kwargs.get("dtype"), "use_peft": rest.get("use_peft")}
        model_kwargs.update(quantization_kwargs(merged, runtime or Runtime.detect()))
    if model_kwargs:
        out["model_init_kwargs"] = model_kwargs
    if teacher_kwargs:
        out["teacher_model_init_kwargs"] = teacher_kwargs
    out.update(rest)
    return out


def train_options(*, config: str | Path | None, command_line: Mapping[str, Any], argv: Iterable[str],
                  set_items: Iterable[str] = (), runtime: Runtime | None = None) -> dict[str, Any]:
    """`gold train`'s options: the --config file, overridden by the command line (gold's typer options
    `command_line`, keyed by gold's or TRL's names, and the TRL-style rest `argv`), overridden by --set items;
    then TRL names -> `build_job`'s input."""
    options = read_options_file(config) if config is not None else {}
    given = merge_command_line({canonical_name(k): v for k, v in command_line.items() if v is not None},
                               parse_argv(argv))
    options.update(given)
    options.update(parse_set_items(set_items))
    return to_gold_options(options, runtime=runtime)
