"""``folding mfu`` on Megatron logs whose throughput figures Megatron computed.

With a recipe: tests/data/megatron_sample.log is a Megatron-format log of the mixtral-8x22b recipe on 128 GPUs;
the "throughput per GPU" figures on it were computed with megatron.training's
num_floating_point_operations (megatron-core 0.19.2) on the arguments pretrain_gpt.py parses from
``folding flags --recipe mixtral-8x22b``, then printed with one decimal as Megatron does. The
lines for iterations 90 and 100 carry figures 4/3 too high, as a Megatron build that counted the
recomputed forward pass would print them. Our recomputation must agree with Megatron's figure to
the printed rounding on every other line and flag those two.

Without a recipe (the model read from the log's argument dump): see "model from the log" below;
its megatron-marked tests run Megatron's own parser, _print_args and
num_floating_point_operations, and skip on megatron-core 0.16.1.

Iteration lines (``iteration_metrics``): lines built with training_log's own format strings,
every field read back as the float Megatron printed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import re
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import pytest

from folding.cost.flops import training_flops
from folding.cost.mfu_log import ELAPSED_MS, iteration_metrics, parse_mfu, read_log, run_from_log
from folding.errors import FoldingError
from folding.megatron.flags import recipe_flags
from folding.recipe import list_recipes, load_recipe

LOG = Path(__file__).parent / "data" / "megatron_sample.log"
PEAK = 989.4


def printed_lines():
    text = LOG.read_text()
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"iteration\s+(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+) \| "
        r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)", text)]


def test_recomputed_throughput_matches_megatrons_printed_figures():
    report = parse_mfu(read_log(str(LOG)), load_recipe("mixtral-8x22b"), PEAK)
    assert report.world_size == 128 and report.world_size_source == "log"
    lines = printed_lines()
    assert [i.iteration for i in report.intervals] == [it for it, _, _ in lines]
    for interval, (iteration, ms, printed) in zip(report.intervals, lines):
        assert interval.elapsed_ms == ms
        assert interval.megatron_tflops_per_gpu == printed
        if iteration < 90:
            assert abs(interval.tflops_per_gpu - printed) <= 0.05
            assert not interval.disagrees
        else:
            assert interval.disagrees
        assert interval.mfu == pytest.approx(interval.tflops_per_gpu / PEAK)


def test_the_wrong_recipe_disagrees_everywhere():
    report = parse_mfu(read_log(str(LOG)), load_recipe("qwen2-57b-a14b"), PEAK)
    assert all(i.disagrees for i in report.intervals)


def test_a_different_world_size_disagrees_and_the_override_wins():
    report = parse_mfu(read_log(str(LOG)), load_recipe("mixtral-8x22b"), PEAK, world_size=64)
    assert report.world_size_source == "--world-size"
    assert all(i.disagrees for i in report.intervals)


def test_summary_skips_the_first_interval():
    report = parse_mfu(read_log(str(LOG)), load_recipe("mixtral-8x22b"), PEAK)
    steady = sorted(i.tflops_per_gpu for i in report.intervals[1:])
    assert report.summary()["median_tflops_per_gpu"] == pytest.approx(
        (steady[4] + steady[5]) / 2)
    assert report.summary()["disagreements"] == 2


def test_other_conventions_are_labelled_and_differ():
    recipe = load_recipe("mixtral-8x22b")
    megatron = parse_mfu(read_log(str(LOG)), recipe, PEAK)
    palm = parse_mfu(read_log(str(LOG)), recipe, PEAK, convention="palm")
    assert palm.to_json()["convention_label"].startswith("PaLM")
    assert palm.intervals[3].tflops_per_gpu != megatron.intervals[3].tflops_per_gpu



def test_cli_json_and_png(tmp_path, cli):
    png = tmp_path / "mfu.png"
    code, out, err = cli("mfu", str(LOG), "--recipe", "mixtral-8x22b", "--json",
                             "--png", str(png))
    assert code == 0, err
    data = json.loads(out)
    assert data["summary"]["disagreements"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("mfu", str(LOG), "--recipe", "mixtral-8x22b", "--peak-tflops", "1000")
    assert code == 0 and "DISAGREES" in out and "peak 1000" in out


def test_cli_errors_are_one_line(tmp_path, cli):
    code, _, err = cli("mfu", str(tmp_path / "nope.log"), "--recipe", "mixtral-8x22b")
    assert code == 2 and err.count("\n") == 1
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    code, _, err = cli("mfu", str(empty), "--recipe", "mixtral-8x22b")
    assert code == 2 and "no Megatron iteration lines" in err


# ----------------------------------------------------------------------------- model from the log
#
# tests/data/megatron_args_sample.log was written by tests/data/make_megatron_args_log.py with
# megatron.training alone: Megatron's parse_args/validate_args on hand-written Mixtral-like flags
# (the argument dump is validate_args' own _print_args), its vocabulary padding line, and
# throughput figures from its num_floating_point_operations. Without --recipe the model comes
# from that dump; the figures must match Megatron's everywhere.

ARGS_LOG = Path(__file__).parent / "data" / "megatron_args_sample.log"
GENERATOR = Path(__file__).parent / "data" / "make_megatron_args_log.py"


def test_model_from_the_logs_argument_dump_matches_megatrons_figures():
    report = parse_mfu(read_log(str(ARGS_LOG)), None, PEAK)
    assert report.model_from == "log" and report.seq_length == 4096
    assert (report.world_size, report.world_size_source) == (64, "log")
    m = report.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels,
            m.ffn_hidden_size, m.moe_ffn_hidden_size, m.num_experts, m.moe_router_topk,
            m.moe_layer_freq, m.swiglu, m.vocab_size, m.make_vocab_size_divisible_by,
            m.norm_epsilon, m.rotary_base, m.multi_latent_attention, m.mtp_num_layers) == (
        32, 4096, 32, 8, None, 14336, None, 8, 2, 1, True, 32000, 128, 1e-5, 1000000, False, None)
    assert [i.global_batch_size for i in report.intervals] == [128, 128, 256, 256, 256, 256, 256]
    for interval in report.intervals:
        assert abs(interval.tflops_per_gpu - interval.megatron_tflops_per_gpu) <= 0.05
        assert not interval.disagrees
    logged = run_from_log(read_log(str(ARGS_LOG)))
    assert (logged.tp, logged.global_batch_size, logged.world_size) == (4, 256, 64)


def test_a_changed_dump_disagrees():
    """The comparison can fail: the same log with top-k 3 in its dump."""
    text = read_log(str(ARGS_LOG))
    changed = re.sub(r"^(  moe_router_topk \.+ )2$", r"\g<1>3", text, flags=re.M)
    assert changed != text
    assert all(i.disagrees for i in parse_mfu(changed, None, PEAK).intervals)


def test_recipe_overrides_the_logs_model(cli):
    code, out, err = cli("mfu", str(ARGS_LOG), "--recipe", "qwen2-57b-a14b", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["recipe"], data["model_from"]) == ("qwen2-57b-a14b", "recipe")
    assert data["model"]["num_experts"] == 64 and data["summary"]["disagreements"] == 7
    code, out, err = cli("mfu", str(ARGS_LOG), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["recipe"], data["model_from"], data["world_size"]) == (None, "log", 64)
    assert data["model"]["num_query_groups"] == 8 and data["summary"]["disagreements"] == 0
    code, out, _ = cli("mfu", str(ARGS_LOG), "--gpu", "b200")
    assert code == 0 and "model from the log's arguments (32 layers" in out and "peak 2250" in out


def test_no_dump_and_no_recipe_is_a_one_line_error(cli):
    code, _, err = cli("mfu", str(LOG))
    assert code == 2 and err.count("\n") == 1
    assert "no Megatron argument dump" in err and "--recipe" in err


DUMP = """\
[default0]:------------------------ arguments ------------------------
[default0]:  a_very_long_argument_name_of_fifty_characters_xyz  None
[default0]:  ffn_hidden_size ................................. 1408
[default0]:  global_batch_size ............................... 8
[default1]:some other rank's line
[default0]:  hidden_size ..................................... 512
[default0]:  layernorm_epsilon ............................... 1e-06
[default0]:  moe_layer_freq .................................. [0, 1, 1, 1]
[default0]:  moe_shared_expert_intermediate_size ............. 704
[default0]:  normalization ................................... RMSNorm
[default0]:  num_attention_heads ............................. 8
[default0]:  num_experts ..................................... 16
[default0]:  num_layers ...................................... 4
[default0]:  num_query_groups ................................ 2
[default0]:  group_query_attention ........................... True
[default0]:  seq_length ...................................... 1024
[default0]:  swiglu .......................................... True
[default0]:  tensor_model_parallel_size ...................... 2
[default0]:  vocab_size ...................................... 32000
[default0]:  world_size ...................................... 16
[default0]:-------------------- end of arguments ---------------------
[default0]: [2025-03-01 10:00:00.000000] iteration       10/     100 | elapsed time per iteration (ms): 100.0 | global batch size:     8 |
"""


def test_dump_parsing_prefixes_types_and_absent_arguments():
    from folding.cost.mfu_log import argument_dumps

    (dump,) = argument_dumps(DUMP)
    assert dump["a_very_long_argument_name_of_fifty_characters_xyz"] == "None"
    assert "some" not in " ".join(dump)
    run = run_from_log(DUMP)
    m = run.model
    assert (m.moe_layer_freq, m.norm_epsilon, m.num_query_groups, m.normalization,
            m.moe_shared_expert_intermediate_size, m.kv_channels) == (
        [0, 1, 1, 1], 1e-6, 2, "RMSNorm", 704, None)
    # absent from this dump: "off" values, not ModelArch's defaults for features
    assert (m.mtp_num_layers, m.multi_latent_attention, m.moe_ffn_hidden_size, m.add_bias_linear) == (
        None, False, None, False)
    assert (run.seq_length, run.global_batch_size, run.world_size, run.tp) == (1024, 8, 16, 2)
    report = parse_mfu(DUMP, None, PEAK)
    assert report.world_size_source == "log arguments"
    assert report.intervals[0].tflops_per_gpu == pytest.approx(
        training_flops(m, 1024, 8, 2) / (0.1 * 1e12 * 16))


@pytest.mark.parametrize("change, message", [
    (("  vocab_size ...................................... 32000",
      "  vocab_size ...................................... None"), "no vocabulary size"),
    (("[0, 1, 1, 1]", "[0, 1, 1]"), "moe_layer_freq lists 3 layers"),
    (("  swiglu .......................................... True\n", ""), "has no swiglu"),
    (("  num_layers ...................................... 4",
      "  num_layers ...................................... four"),
     "num_layers = 'four' is not an integer"),
    (("  world_size",
      "  hybrid_layer_pattern ............................ M*M*\n[default0]:  world_size"),
     "hybrid_layer_pattern = M\\*M\\*, which folding's FLOPs model does not cover"),
])
def test_dump_errors_name_the_problem(change, message):
    text = DUMP.replace(*change)
    assert text != DUMP
    with pytest.raises(FoldingError, match=message):
        parse_mfu(text, None, PEAK)


def test_padded_vocab_line_gives_the_tokenizers_size_and_restarts_must_agree():
    padded = (DUMP.replace("32000", "None")
              + " > padded vocab (size: 32001) with 255 dummy tokens (new size: 32256)\n")
    assert run_from_log(padded).model.vocab_size == 32001
    assert run_from_log(DUMP + DUMP) == run_from_log(DUMP)
    with pytest.raises(FoldingError, match="2 argument dumps that describe different runs"):
        run_from_log(DUMP + DUMP.replace("[0, 1, 1, 1]", "[1, 1, 1, 1]"))


# ----------------------------------------------------------------------------- against Megatron


def _generator():
    spec = importlib.util.spec_from_file_location("make_megatron_args_log", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def megatron_log():
    """tests/data/make_megatron_args_log.py and megatron.training's FLOPs count; skipped without
    megatron.training (megatron-core 0.16.1)."""
    training = pytest.importorskip(
        "megatron.training.training",
        reason="megatron.training is not installed (megatron-core 0.16.1's wheel has no "
               "megatron/training; the megatron-core 0.19.2 job runs this)")
    return _generator(), training.num_floating_point_operations


# Sizes num_floating_point_operations multiplies: as Fractions it runs the same code exactly
# (its causal "/ 2" makes a float otherwise), as in tests/test_flops_megatron.py.
SIZE_ARGUMENTS = ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                  "ffn_hidden_size", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                  "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                  "padded_vocab_size", "seq_length")


def megatron_exact_flops(flops_fn, args, batch: int) -> Fraction:
    exact = copy.copy(args)
    for name in SIZE_ARGUMENTS:
        if getattr(exact, name, None) is not None:
            setattr(exact, name, Fraction(getattr(exact, name)))
    return Fraction(flops_fn(exact, Fraction(batch)))


def common(*flags):
    return ["--micro-batch-size", "1", "--train-iters", "100", "--lr", "1e-4", "--bf16",
            "--disable-bias-linear", "--normalization", "RMSNorm", "--position-embedding-type",
            "rope", "--untie-embeddings-and-output-weights", "--log-throughput", *flags]


# (flags, world size, tokenizer vocabulary or None for --vocab-size)
MEGATRON_CASES = {
    "mixtral-like (GQA, SwiGLU, top-2)": (None, None, None),  # the generator's own flags
    "shared experts and a --moe-layer-freq pattern (Qwen2-MoE-like)": (common(
        "--num-layers", "12", "--hidden-size", "2048", "--ffn-hidden-size", "5632",
        "--num-attention-heads", "16", "--group-query-attention", "--num-query-groups", "4",
        "--kv-channels", "192", "--swiglu", "--add-qkv-bias", "--num-experts", "60",
        "--moe-router-topk", "4", "--moe-ffn-hidden-size", "1408",
        "--moe-shared-expert-intermediate-size", "5632", "--moe-shared-expert-gate",
        "--moe-layer-freq", "([0]*2+[1]*10)", "--seq-length", "2048",
        "--max-position-embeddings", "32768", "--global-batch-size", "64",
        "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4",
        "--sequence-parallel", "--vocab-size", "151643"), 16, None),
    "MLA, MTP and --moe-layer-freq 2 without SwiGLU (DeepSeek-like)": (common(
        "--num-layers", "6", "--hidden-size", "1024", "--ffn-hidden-size", "2816",
        "--num-attention-heads", "16", "--multi-latent-attention", "--q-lora-rank", "384",
        "--kv-lora-rank", "256", "--qk-head-dim", "64", "--qk-pos-emb-head-dim", "32",
        "--v-head-dim", "64", "--num-experts", "32", "--moe-router-topk", "6",
        "--moe-ffn-hidden-size", "512", "--moe-shared-expert-intermediate-size", "1024",
        "--moe-layer-freq", "2", "--mtp-num-layers", "1", "--seq-length", "1024",
        "--max-position-embeddings", "1024", "--global-batch-size", "32",
        "--tensor-model-parallel-size", "1", "--expert-model-parallel-size", "8"),
        8, 129280),
}


@pytest.mark.megatron
@pytest.mark.parametrize("case", MEGATRON_CASES)
def test_flops_from_the_dump_alone_equal_megatrons(case, megatron_log):
    generator, flops_fn = megatron_log
    flags, world, vocab = MEGATRON_CASES[case]
    if flags is None:
        flags, world, vocab = (generator.MIXTRAL_LIKE, generator.MIXTRAL_LIKE_WORLD_SIZE,
                               generator.MIXTRAL_LIKE_TOKENIZER_VOCAB)
    args, startup = generator.megatron_run(flags, world, vocab)
    logged = run_from_log(startup)
    assert (logged.seq_length, logged.global_batch_size, logged.world_size, logged.tp) == (
        args.seq_length, args.global_batch_size, args.world_size, args.tensor_model_parallel_size)
    for batch in (1, args.global_batch_size):
        ours = training_flops(logged.model, logged.seq_length, batch, logged.tp)
        assert megatron_exact_flops(flops_fn, args, batch) == ours
        assert flops_fn(copy.copy(args), batch) == pytest.approx(ours, rel=1e-12)
    # The comparison can fail: one model fact changed in the dump.
    wrong = run_from_log(re.sub(r"^(  moe_router_topk \.+ )(\d+)$",
                                lambda m: m.group(1) + str(int(m.group(2)) + 1), startup, flags=re.M))
    assert training_flops(wrong.model, logged.seq_length, 8, logged.tp) != megatron_exact_flops(
        flops_fn, args, 8)


@pytest.mark.megatron
def test_num_experts_alone_does_not_change_megatrons_count(megatron_log):
    """Megatron does not count the router: a dump with 16 experts instead of 8 gives the same
    FLOPs in its convention and different ones in the router convention."""
    generator, flops_fn = megatron_log
    args, startup = generator.megatron_run(generator.MIXTRAL_LIKE, 64, 32000)
    changed = run_from_log(re.sub(r"^(  num_experts \.+ )8$", r"\g<1>16", startup, flags=re.M))
    logged = run_from_log(startup)
    assert changed.model.num_experts == 16
    assert training_flops(changed.model, 4096, 256, 4) == megatron_exact_flops(flops_fn, args, 256)
    assert (training_flops(changed.model, 4096, 256, 4, "router")
            != training_flops(logged.model, 4096, 256, 4, "router"))


@pytest.mark.megatron
@pytest.mark.parametrize("name", [n for n in list_recipes()  # folded ones have no Megatron flags
                                  if load_recipe(n).training.moe_token_dispatcher_type != "folded"])
def test_recipe_flags_read_back_from_megatrons_dump(name, megatron_log):
    """A recipe's pretrain_gpt flags through Megatron's parser and _print_args, read back: the
    same ModelArch, run shape and FLOPs as the --recipe path."""
    generator, flops_fn = megatron_log
    recipe = load_recipe(name)
    args, startup = generator.megatron_run(recipe_flags(recipe), recipe.folding.world_size)
    logged = run_from_log(startup)
    assert logged.model == recipe.model
    t, f = recipe.training, recipe.folding
    assert (logged.seq_length, logged.global_batch_size, logged.world_size, logged.tp) == (
        t.seq_length, t.global_batch_size, f.world_size, f.tp)
    lines = startup + " iteration       10/     100 | elapsed time per iteration (ms): 5000.0 |\n"
    from_log = parse_mfu(lines, None, PEAK)
    from_recipe = parse_mfu(lines, recipe, PEAK)
    assert from_log.intervals == from_recipe.intervals and from_log.model_from == "log"
    assert megatron_exact_flops(flops_fn, args, t.global_batch_size) == training_flops(
        recipe.model, t.seq_length, t.global_batch_size, f.tp)


@pytest.mark.megatron
def test_every_modelarch_field_survives_megatrons_parser(megatron_log):
    """Features no shipped recipe turns on, through the same round trip."""
    generator, _ = megatron_log
    recipe = load_recipe("tiny-moe")
    model = dataclasses.replace(
        recipe.model, kv_channels=32, moe_shared_expert_intermediate_size=256,
        moe_shared_expert_gate=True, moe_layer_freq=[0, 1, 0, 1], moe_router_pre_softmax=True,
        moe_router_topk_scaling_factor=1.5, add_bias_linear=True, add_qkv_bias=True,
        qk_layernorm=True, untie_embeddings_and_output_weights=False, norm_epsilon=1e-6,
        rotary_base=500000, max_position_embeddings=512, swiglu=False, vocab_size=1000,
        make_vocab_size_divisible_by=64, attention_dropout=0.1, hidden_dropout=0.05,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.001,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_num_groups=2, moe_router_group_topk=1, mtp_num_layers=1)
    changed = dataclasses.replace(recipe, model=model)
    _, startup = generator.megatron_run(recipe_flags(changed), recipe.folding.world_size)
    assert run_from_log(startup).model == model


@pytest.mark.megatron
def test_the_committed_log_is_what_the_generator_makes(megatron_log):
    generator, _ = megatron_log
    fresh = generator.make_log()
    committed = read_log(str(ARGS_LOG))
    assert run_from_log(fresh) == run_from_log(committed)
    assert parse_mfu(fresh, None, PEAK).intervals == parse_mfu(committed, None, PEAK).intervals


# ----------------------------------------------------------------------------- hardware profiles


def test_every_profile_names_a_source_for_every_datasheet_figure():
    from folding.cost.hardware import PROFILES, get_profile

    figures = ("peak_tflops", "peak_fp8_tflops", "memory_gb", "hbm_gbps", "nvlink_gbps",
               "network_gbps")
    assert {"a100-sxm-80gb", "h100-sxm", "h200-sxm", "b200", "gb200-nvl72"} <= set(PROFILES)
    for profile in PROFILES.values():
        assert set(figures) <= set(profile.sources), profile.name
    h100 = get_profile("h100-sxm")
    assert (h100.peak_tflops, h100.memory_gb, h100.hbm_gbps, h100.nvlink_gbps,
            h100.network_gbps) == (989.4, 80.0, 3350.0, 450.0, 50.0)
    assert get_profile("a100-sxm-80gb").peak_fp8_tflops is None
    for name in ("h100-sxm", "h200-sxm", "b200", "gb200-nvl72"):
        assert get_profile(name).peak_fp8_tflops == pytest.approx(2 * get_profile(name).peak_tflops,
                                                                  rel=1e-3)


def test_a_recipe_overrides_a_dump_folding_cannot_read():
    hybrid = DUMP.replace("  world_size", "  hybrid_layer_pattern ............................ M*M*\n"
                                          "[default0]:  world_size")
    report = parse_mfu(hybrid, load_recipe("tiny-moe"), PEAK)
    assert report.model_from == "recipe" and report.world_size_source == "recipe"


# ----------------------------------------------------------------------------- iteration lines
#
# iteration_metrics reads every field of training_log's line. The lines below are built with
# training_log's own format strings (megatron/training/training.py, megatron-core 0.19.2), field
# by field and in its order; the MoE tracker's console metrics use MoEMetricsTracker._format's
# "{:.2f}" (its losses join total_loss_dict and print as "{:.6E}").


def megatron_iteration_line(iteration, train_iters, *, consumed, elapsed_s, lr, batch, losses,
                            throughput=None, moe_console=None, loss_scale=1.0, grad_norm=None,
                            num_zeros=None, params_norm=None, skipped=0, nans=0):
    log_string = f" [{datetime(2026, 12, 6, 5, 0, 0, 123456).strftime('%Y-%m-%d %H:%M:%S.%f')}]"
    log_string += ' iteration {:8d}/{:8d} |'.format(iteration, train_iters)
    log_string += ' consumed samples: {:12d} |'.format(consumed)
    log_string += ' elapsed time per iteration (ms): {:.1f} |'.format(elapsed_s * 1000.0)
    if throughput is not None:
        log_string += f' throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |'
    log_string += f' learning rate: {lr:.6E} |'
    log_string += f' global batch size: {batch:5d} |'
    for key, avg in losses.items():
        if avg >= 0.0:
            log_string += ' {}: {:.6E} |'.format(key, avg)
    log_string += "".join(f" {k}: {v:.2f} |" for k, v in (moe_console or {}).items())
    log_string += f' loss scale: {loss_scale:.1f} |'
    if grad_norm is not None:
        log_string += f' grad norm: {grad_norm:.3f} |'
    if num_zeros is not None:
        log_string += f' num zeros: {num_zeros} |'
    if params_norm is not None:
        log_string += f' params norm: {params_norm:.3f} |'
    log_string += ' number of skipped iterations: {:3d} |'.format(skipped)
    log_string += ' number of nan iterations: {:3d} |'.format(nans)
    return log_string


def printed(value, spec):
    return float(format(value, spec))


def test_iteration_metrics_reads_every_field_of_megatrons_line():
    losses = {"lm loss": 5.5821134, "load_balancing_loss": 1.0123456, "z_loss": 3.2e-05,
              "mtp_1 loss": 6.25}
    line = megatron_iteration_line(
        3, 20, consumed=24, elapsed_s=0.41234, throughput=12.34, lr=1e-4, batch=8,
        losses=losses, moe_console={"load_balancing_loss_p50": 1.004}, loss_scale=65536.0,
        grad_norm=3.2104, num_zeros=17, params_norm=271.8281)
    text = "\n".join([
        "[default0]:  train_iters ..................................... 20",
        "[default7]:" + line,
        "[default7]: [Rank 7] (after 3 iterations) memory (MB) | allocated: 1024.5 | reserved: 2048.0",
        "[default0]:saving checkpoint at iteration      20 to /ckpt in torch_dist format",
        "[default7]: validation loss at iteration 20 | lm loss value: 5.400000E+00 | lm loss PPL: "
        "2.214064E+02 |",
    ])
    (it,) = iteration_metrics(text)
    assert (it.iteration, it.train_iters) == (3, 20)
    assert list(it.metrics) == [
        "consumed samples", ELAPSED_MS, "throughput per GPU (TFLOP/s/GPU)", "learning rate",
        "global batch size", "lm loss", "load_balancing_loss", "z_loss", "mtp_1 loss",
        "load_balancing_loss_p50", "loss scale", "grad norm", "num zeros", "params norm",
        "number of skipped iterations", "number of nan iterations"]
    assert it.metrics == {
        "consumed samples": 24.0, ELAPSED_MS: 412.3, "throughput per GPU (TFLOP/s/GPU)": 12.3,
        "learning rate": 1e-4, "global batch size": 8.0,
        **{k: printed(v, ".6E") for k, v in losses.items()},
        "load_balancing_loss_p50": 1.0, "loss scale": 65536.0, "grad norm": 3.21,
        "num zeros": 17.0, "params norm": 271.828, "number of skipped iterations": 0.0,
        "number of nan iterations": 0.0}
    assert it.losses() == {k: printed(v, ".6E") for k, v in losses.items()}


def test_unprinted_and_non_finite_values():
    """Megatron prints an averaged loss only when it is >= 0 (a NaN average fails that test and
    is left out); an inf loss prints as INF and a NaN grad norm as nan."""
    line = megatron_iteration_line(
        7, 20, consumed=56, elapsed_s=0.5, lr=2.5e-5, batch=8,
        losses={"lm loss": math.inf, "load_balancing_loss": math.nan}, grad_norm=math.nan,
        skipped=1, nans=1)
    assert "lm loss: INF |" in line and "load_balancing_loss" not in line
    (it,) = iteration_metrics(line + " odd field: n/a |")
    assert it.losses() == {"lm loss": math.inf}
    assert math.isnan(it.metrics["grad norm"]) and "odd field" not in it.metrics
    assert it.metrics["number of nan iterations"] == 1.0


def test_every_line_in_order_and_a_resumed_iteration_twice():
    lines = [megatron_iteration_line(i, 4, consumed=8 * i, elapsed_s=0.1 * i, lr=1e-4, batch=8,
                                     losses={"lm loss": 6.0 - i}) for i in (1, 2, 3, 2, 3, 4)]
    found = iteration_metrics("\n".join(lines))
    assert [i.iteration for i in found] == [1, 2, 3, 2, 3, 4]
    assert [i.losses()["lm loss"] for i in found] == [5.0, 4.0, 3.0, 4.0, 3.0, 2.0]
    assert iteration_metrics("no iteration lines\n  iteration 3 of 20\n") == []


def test_parse_mfu_reads_the_same_lines():
    """parse_mfu's elapsed time, batch and Megatron's throughput are iteration_metrics' fields."""
    text = read_log(str(LOG))
    report = parse_mfu(text, load_recipe("mixtral-8x22b"), PEAK)
    lines = iteration_metrics(text)
    assert [(i.iteration, i.elapsed_ms, i.global_batch_size, i.megatron_tflops_per_gpu)
            for i in report.intervals] == [
        (m.iteration, m.metrics[ELAPSED_MS], m.metrics["global batch size"],
         m.metrics["throughput per GPU (TFLOP/s/GPU)"]) for m in lines]
