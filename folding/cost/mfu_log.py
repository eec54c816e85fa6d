"""Throughput and MFU from Megatron-LM training logs.

Megatron prints, every log interval, a line with ``elapsed time per iteration (ms)``,
``global batch size`` and, with --log-throughput, ``throughput per GPU (TFLOP/s/GPU)``. This
module reads those lines, recomputes TFLOP/s per GPU from the model's FLOPs (Megatron's
convention by default, so the two should agree to the printed rounding) and MFU against a
peak, and flags intervals where Megatron's own figure disagrees: an older Megatron counting
recomputation, a different world size, or a model that is not the one assumed.

The model comes from a recipe, or from the log itself: at start-up Megatron's training loop
prints its whole argument namespace (``megatron.training.arguments._print_args``)::

    ------------------------ arguments ------------------------
      num_layers ...................................... 32
      moe_layer_freq .................................. [0, 1, 1, 1]
    -------------------- end of arguments ---------------------

one line per argument, its value as ``str()`` prints it. ``ModelArch`` fields are named after
Megatron's arguments, so each field is read from the argument of the same name
(``model_from_arguments`` lists the few that need more than that); sequence length, global batch
size, world size and TP come from the same dump. With a tokenizer and no --vocab-size the dump's
vocab_size is None; the tokenizer's size is then read from Megatron's later
``> padded vocab (size: N) ...`` line.

``iteration_metrics`` is the one reader of Megatron's iteration line (``training_log``)::

     [2026-12-06 05:00:00.000000] iteration        3/      20 | consumed samples: 24 | ...
     elapsed time per iteration (ms): 412.3 | ... | lm loss: 5.582113E+00 | ...

every ``name: value`` field between the ``|`` separators, as floats; ``parse_mfu`` and
tools/compare_runs.py both read the lines through it.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Mapping, Optional

from folding.cost.flops import CONVENTIONS, training_flops
from folding.errors import FoldingError
from folding.recipe import ModelArch, Recipe

# training_log's line: "iteration {:8d}/{:8d} |", then " name: value |" fields. Requiring the "|"
# after the counter keeps out other lines that mention iterations (checkpoint saves, validation).
ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|")
# One field: the value is its last token, the name everything before the colon ahead of it
# (names hold no colon; the timestamp's colons come before the counter, outside every field).
FIELD = re.compile(r"^\s*(?P<name>[^|]*?)\s*:\s*(?P<value>\S+)\s*$")
# Names of the fields parse_mfu reads, exactly as training_log prints them.
ELAPSED_MS = "elapsed time per iteration (ms)"
THROUGHPUT = "throughput per GPU (TFLOP/s/GPU)"
GLOBAL_BATCH = "global batch size"
WORLD_SIZE = re.compile(r"using world size:\s*(\d+)")
# _print_args: a title line, "  name <dots> value" per argument (no dots for names of 48
# characters or more), an end line. Launchers may prefix every line ("[default0]:", "0: ").
ARGS_BEGIN = re.compile(r"^(?P<prefix>.*?)-{3,} arguments -{3,}\s*$")
ARGS_END = re.compile(r"-{3,} end of arguments -{3,}")
ARG_LINE = re.compile(r"^  (?P<name>[A-Za-z_]\w*) \.* ?(?P<value>.*)$")
PADDED_VOCAB = re.compile(r"> padded vocab \(size: (\d+)\) with \d+ dummy tokens \(new size: (\d+)\)")

# Megatron prints throughput with one decimal.
PRINTED_ROUNDING = 0.05

# Arguments that change Megatron's FLOPs count in ways ModelArch cannot describe, with the value
# that means "not used".
UNCOVERED_ARGUMENTS = {"hybrid_layer_pattern": None, "hybrid_override_pattern": None,
                       "experimental_attention_variant": None, "moe_latent_size": None,
                       "attention_output_gate": False}
# The one ModelArch field whose Megatron argument has another name: megatron-core 0.19's
# parser stores --norm-epsilon as layernorm_epsilon (older Megatron-LM as norm_epsilon). Every
# other field is the argument of the same name.
ARGUMENT_ALIASES = {"norm_epsilon": ("norm_epsilon", "layernorm_epsilon")}
# ModelArch's MLA sizes: Megatron's parser gives them defaults that only count with MLA on.
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
# What the FLOPs need that ModelArch has no default for, and the run's shape.
REQUIRED_ARGUMENTS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                      "swiglu", "seq_length", "tensor_model_parallel_size")


@dataclass(frozen=True)
class Interval:
    """One log line: the averages of one log interval."""

    iteration: int
    elapsed_ms: float
    global_batch_size: int
    tflops_per_gpu: float
    """Recomputed from the model's FLOPs."""
    mfu: float
    megatron_tflops_per_gpu: Optional[float]
    """What Megatron printed, when it printed throughput."""
    disagrees: bool
    """Megatron's figure differs from ours by more than the tolerance."""


@dataclass(frozen=True)
class LoggedRun:
    """What a Megatron argument dump says about the run."""

    model: ModelArch
    seq_length: int
    global_batch_size: int
    world_size: Optional[int]
    tp: int


@dataclass(frozen=True)
class MfuReport:
    intervals: List[Interval]
    world_size: int
    world_size_source: str
    peak_tflops: float
    convention: str
    model_from: str = "recipe"
    """Where the model came from: "recipe" or "log" (the log's argument dump)."""
    model: Optional[ModelArch] = None
    seq_length: Optional[int] = None

    @property
    def steady(self) -> List[Interval]:
        """Intervals after the first (which includes start-up and compilation)."""
        return self.intervals[1:] if len(self.intervals) > 1 else self.intervals

    def summary(self) -> Dict[str, float]:
        steady = self.steady
        return {"median_tflops_per_gpu": median(i.tflops_per_gpu for i in steady),
                "median_mfu": median(i.mfu for i in steady),
                "disagreements": sum(i.disagrees for i in self.intervals)}

    def to_json(self) -> Dict:
        return {"world_size": self.world_size, "world_size_source": self.world_size_source,
                "peak_tflops": self.peak_tflops, "convention": self.convention,
                "convention_label": CONVENTIONS[self.convention], "summary": self.summary(),
                "intervals": [asdict(i) for i in self.intervals],
                "model_from": self.model_from, "seq_length": self.seq_length,
                "model": asdict(self.model) if self.model is not None else None}


def read_log(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FoldingError(f"log file {path} does not exist")
    return p.read_text(errors="replace")


# ----------------------------------------------------------------------------- argument dump


def argument_dumps(text: str) -> List[Dict[str, str]]:
    """Every ``_print_args`` block of a log, as {argument name: value as printed}.

    Lines inside a block that are not argument lines (another rank's output) are skipped; a
    block cut off before its end line keeps what it has."""
    dumps: List[Dict[str, str]] = []
    current: Optional[Dict[str, str]] = None
    prefix = ""
    for line in text.splitlines():
        line = line.rstrip("\r")
        if current is None:
            begin = ARGS_BEGIN.match(line)
            if begin:
                prefix, current = begin.group("prefix"), {}
                dumps.append(current)
            continue
        if ARGS_END.search(line):
            current = None
            continue
        if not line.startswith(prefix):
            continue
        arg = ARG_LINE.match(line[len(prefix):])
        if arg:
            current[arg.group("name")] = arg.group("value")
    return dumps


def _literal(raw: str) -> Any:
    """A printed value back as Python: None, True, 1e-05, [1, 0, 1]; otherwise the text."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def _convert(name: str, raw: str, hint: Any) -> Any:
    """The printed value of argument ``name`` as the type of the ModelArch field."""
    if _optional(hint):
        if raw == "None":
            return None
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    if hint is str:
        return raw
    value = _literal(raw)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = _is_int(value)
    elif hint is float:
        ok = _is_int(value) or isinstance(value, float)
        value = float(value) if ok else value
    else:  # Union[int, List[int]]: --moe-layer-freq
        ok = _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    if not ok:
        expected = {bool: "True or False", int: "an integer", float: "a number"}.get(
            hint, "an integer or a list of integers")
        raise FoldingError(f"the log's argument {name} = {raw!r} is not {expected}")
    return value


def model_from_arguments(arguments: Mapping[str, str], vocab_size: Optional[int] = None) -> ModelArch:
    """The ModelArch of a Megatron argument dump ({name: value as printed}).

    Every field is read from the argument of its own name (``ARGUMENT_ALIASES`` for
    norm_epsilon), with these exceptions: ``num_query_groups`` only counts with
    ``group_query_attention`` and the MLA sizes only with ``multi_latent_attention`` (Megatron
    ignores them otherwise; they become None); ``kv_channels``, ``moe_ffn_hidden_size`` and
    ``max_position_embeddings`` become None where validate_args filled in the default that None
    stands for; ``vocab_size`` is the parameter when given (the tokenizer's size, from
    Megatron's "> padded vocab" line: the dump is printed before the tokenizer is built), else
    the argument. A field the dump lacks (an older Megatron) takes its "off" value: None, False,
    else ModelArch's default.
    """
    missing = [n for n in REQUIRED_ARGUMENTS if n not in arguments]
    if missing:
        raise FoldingError(f"the log's argument dump has no {missing[0]}")
    for name, off in UNCOVERED_ARGUMENTS.items():
        if name in arguments and _literal(arguments[name]) != off:
            raise FoldingError(f"the log's model sets {name} = {arguments[name]}, which folding's "
                               f"FLOPs model does not cover")
    hints = typing.get_type_hints(ModelArch)
    values: Dict[str, Any] = {}
    for f in dataclasses.fields(ModelArch):
        name = next((n for n in ARGUMENT_ALIASES.get(f.name, (f.name,)) if n in arguments), None)
        if name is not None:
            hint = Optional[int] if f.name == "vocab_size" else hints[f.name]
            values[f.name] = _convert(name, arguments[name], hint)
        elif f.default is dataclasses.MISSING:
            if f.name != "vocab_size":
                raise FoldingError(f"the log's argument dump has no {f.name}")
        else:
            values[f.name] = (None if _optional(hints[f.name])
                              else False if hints[f.name] is bool else f.default)
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    if values.get("vocab_size") is None:
        raise FoldingError("the log gives no vocabulary size: its argument dump has vocab_size "
                           "None and there is no Megatron '> padded vocab' line")
    if not _convert("group_query_attention", arguments.get("group_query_attention", "False"), bool):
        values["num_query_groups"] = None
    if not values["multi_latent_attention"]:
        values.update(dict.fromkeys(MLA_FIELDS))
    if values.get("kv_channels") == values["hidden_size"] // values["num_attention_heads"]:
        values["kv_channels"] = None
    if values.get("moe_ffn_hidden_size") == values["ffn_hidden_size"]:
        values["moe_ffn_hidden_size"] = None
    if values.get("max_position_embeddings") == _convert("seq_length", arguments["seq_length"], int):
        values["max_position_embeddings"] = None
    model = ModelArch(**values)
    model.moe_layer_pattern()  # a --moe-layer-freq list of the wrong length is refused here
    return model


def run_from_log(text: str) -> Optional[LoggedRun]:
    """Model, sequence length, global batch size, world size and TP from the log's argument
    dump; None when the log has none. Several dumps (restarts appended to one log) must agree."""
    dumps = argument_dumps(text)
    if not dumps:
        return None
    padded = PADDED_VOCAB.search(text)
    vocab = int(padded.group(1)) if padded else None
    runs = []
    for arguments in dumps:
        def number(name, hint=Optional[int]):
            return _convert(name, arguments[name], hint) if name in arguments else None
        runs.append(LoggedRun(model=model_from_arguments(arguments, vocab),
                              seq_length=number("seq_length", int),
                              global_batch_size=number("global_batch_size"),
                              world_size=number("world_size"),
                              tp=number("tensor_model_parallel_size", int)))
    if any(r != runs[0] for r in runs[1:]):
        raise FoldingError(f"the log holds {len(runs)} argument dumps that describe different "
                           f"runs; split the log or pass --recipe")
    return runs[0]


# ----------------------------------------------------------------------------- iteration lines


@dataclass(frozen=True)
class IterationMetrics:
    """One iteration line of Megatron's training loop."""

    iteration: int
    train_iters: int
    metrics: Dict[str, float]
    """Every ``name: value`` field in printed order, under the name as printed ("lm loss",
    "load_balancing_loss", "elapsed time per iteration (ms)", "grad norm", ...). Counts
    (consumed samples, global batch size) are floats too."""

    def losses(self) -> Dict[str, float]:
        """The fields whose name ends in "loss": lm loss, the MoE auxiliary losses, MTP and
        indexer losses (the rule Megatron's MoE tracker uses to put a metric among the losses);
        "loss scale" is not one."""
        return {k: v for k, v in self.metrics.items() if k.lower().endswith("loss")}


def iteration_metrics(text: str) -> List[IterationMetrics]:
    """Every iteration line of a Megatron log, in the log's order, with all its fields as floats.

    A launcher's prefix before the line ("[default7]:", "0: ") is ignored. A field whose value is
    not a number is left out; so are losses Megatron did not print (it prints an averaged loss
    only when it is >= 0, so a NaN loss is absent, not NaN). An iteration printed twice (a run
    resumed into the same log) appears twice: the caller decides which counts.
    """
    lines = []
    for line in text.splitlines():
        counter = ITERATION.search(line)
        if not counter:
            continue
        metrics: Dict[str, float] = {}
        for field in line[counter.end():].split("|"):
            match = FIELD.match(field)
            if not match or not match.group("name"):
                continue
            try:
                metrics[match.group("name")] = float(match.group("value"))
            except ValueError:
                continue
        lines.append(IterationMetrics(int(counter.group(1)), int(counter.group(2)), metrics))
    return lines


# ----------------------------------------------------------------------------- intervals


def parse_mfu(text: str, recipe: Optional[Recipe], peak_tflops: float,
              world_size: Optional[int] = None, convention: str = "megatron",
              tolerance: float = 0.01) -> MfuReport:
    """Every interval line of a Megatron log, with our TFLOP/s/GPU and MFU.

    The model, sequence length and TP come from ``recipe`` when given, else from the log's
    argument dump (an error when it has none). The world size comes from ``world_size``, else
    the log's "using world size" line, else its argument dump, else the recipe's folding.
    ``tolerance`` is the relative difference (beyond the printed rounding) at which Megatron's
    throughput is flagged.
    """
    if recipe is None:
        logged = run_from_log(text)
    else:  # the recipe's model wins; the dump may still give the world size
        try:
            logged = run_from_log(text)
        except FoldingError:
            logged = None
    if recipe is not None:
        model, seq_length, tp = recipe.model, recipe.training.seq_length, recipe.folding.tp
        default_batch, model_from = recipe.training.global_batch_size, "recipe"
    elif logged is not None:
        model, seq_length, tp = logged.model, logged.seq_length, logged.tp
        default_batch, model_from = logged.global_batch_size, "log"
    else:
        raise FoldingError("the log has no Megatron argument dump ('---- arguments ----' block, "
                           "printed at start-up) to read the model from: pass --recipe")
    if world_size is not None:
        source = "--world-size"
    else:
        found = WORLD_SIZE.search(text)
        if found:
            world_size, source = int(found.group(1)), "log"
        elif logged is not None and logged.world_size:
            world_size, source = logged.world_size, "log arguments"
        elif recipe is not None:
            world_size, source = recipe.folding.world_size, "recipe"
        else:
            raise FoldingError("the log gives no world size: pass --world-size")
    flops_cache: Dict[int, int] = {}
    intervals = []
    for line in iteration_metrics(text):
        ms = line.metrics.get(ELAPSED_MS)
        if ms is None:
            continue
        batch = (int(line.metrics[GLOBAL_BATCH]) if GLOBAL_BATCH in line.metrics
                 else default_batch)
        if batch is None:
            raise FoldingError("the log's iteration lines and arguments give no global batch size")
        if batch not in flops_cache:
            flops_cache[batch] = training_flops(model, seq_length, batch, tp, convention)
        if not ms > 0:  # also NaN
            continue
        ours = flops_cache[batch] / (ms / 1000 * 1e12 * world_size)
        theirs = line.metrics.get(THROUGHPUT)
        disagrees = theirs is not None and abs(theirs - ours) > PRINTED_ROUNDING + tolerance * ours
        intervals.append(Interval(iteration=line.iteration, elapsed_ms=ms,
                                  global_batch_size=batch, tflops_per_gpu=ours,
                                  mfu=ours / peak_tflops, megatron_tflops_per_gpu=theirs,
                                  disagrees=disagrees))
    if not intervals:
        raise FoldingError("no Megatron iteration lines (with 'elapsed time per iteration (ms)') "
                           "in the log")
    return MfuReport(intervals, world_size, source, peak_tflops, convention, model_from, model,
                     seq_length)
