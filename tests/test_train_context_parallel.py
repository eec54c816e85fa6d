"""folding train with context parallelism: --cp and --cp-comm-type override the recipe's folding,
sequence lengths that do not split are refused before any rank starts, and the long-context
recipe (tiny-moe-long: CP4 folded against EP8) trains on 2,048-byte sequences."""

import json
import subprocess
import sys

import pytest

from folding.cli import build_parser
from folding.commands.train import options_from_args
from folding.errors import FoldingError
from folding.mesh import FoldingSpec
from folding.recipe import load_recipe
from folding.run.train import TrainOptions

MODEL_FACTS = dict(num_experts=8, num_layers=4, num_attention_heads=8, num_query_groups=4)


def options(*argv) -> TrainOptions:
    return options_from_args(build_parser().parse_args(["train", *argv]))


def one_line_refusal(code, out, err):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- no processes


def test_cp_flags_override_the_recipes_folding():
    o = options("--cp", "2", "--cp-comm-type", "all_gather")
    assert o.folding == {"cp": 2, "cp_comm_type": "all_gather"}
    spec = o.resolve().folding
    # tiny-moe's TP2 and EP4 stay; DP is derived again (8 / (TP2 x CP2) = 2).
    assert spec == FoldingSpec(world_size=8, tp=2, cp=2, ep=4, etp=1, gpus_per_node=4,
                               cp_comm_type="all_gather", **MODEL_FACTS)
    assert spec.describe() == "TP2 CP2 DP2 PP1 | ETP1 EP4 EDP2"
    # The exchange alone, and CP alone (the recipe's p2p stays).
    assert options("--cp-comm-type", "a2a").resolve().folding.cp_comm_type == "a2a"
    assert options("--cp", "4", "--tp", "1", "--ep", "8").resolve().folding.degrees() == dict(
        world_size=8, tp=1, cp=4, dp=2, pp=1, vpp=None, etp=1, ep=8, edp=1, order="tp-cp-ep-dp-pp",
        gpus_per_node=4, sequence_parallel=False, cp_comm_type="p2p")
    # No flags: nothing overridden, the recipe's CP1.
    assert options().folding == {} and options().resolve().folding.cp == 1


def test_long_context_recipe():
    r = TrainOptions(recipe="tiny-moe-long").resolve()
    assert r.training.seq_length >= 2048
    assert (r.model.max_position_embeddings or r.training.seq_length) >= r.training.seq_length
    assert r.folding.describe() == "TP1 CP4 DP2 PP1 | ETP1 EP8 EDP1"
    assert r.folding.cp_comm_type == "p2p"
    # EP folded across CP: one EP group holds the ranks of two CP groups.
    groups = r.folding.rank_groups()
    ep_group = set(groups["moe"]["ep"][0])
    assert sum(1 for g in groups["attention"]["cp"] if set(g) <= ep_group) == 2
    # The same model as tiny-moe, only the sequence is longer.
    tiny = load_recipe("tiny-moe").model
    assert {k: v for k, v in vars(r.model).items() if k != "max_position_embeddings"} == \
        {k: v for k, v in vars(tiny).items() if k != "max_position_embeddings"}
    # Every exchange splits it; a2a too (8 heads and 4 groups over CP4).
    for mode in ("p2p", "all_gather", "a2a"):
        assert TrainOptions(recipe="tiny-moe-long", folding={"cp_comm_type": mode}).resolve()


def test_sequence_that_does_not_split_is_refused(cli, tmp_path):
    # tiny-moe's 128 bytes over CP3: 128 is not divisible by 2 x 3.
    line = one_line_refusal(*cli("train", "--nproc", "6", "--tp", "1", "--cp", "3", "--ep", "2"))
    assert line == ("folding train: error: seq-len=128 is not divisible by 2 x CP = 2 x 3 = 6 "
                    "(Megatron's load-balanced context-parallel split)")
    # With sequence parallel the chunks must split over TP too: 2 x CP x TP.
    recipe = load_recipe("tiny-moe")
    text = recipe.path.read_text().replace("seq_length: 128", "seq_length: 132")
    odd = tmp_path / "odd.yaml"
    odd.write_text(text)
    line = one_line_refusal(*cli("train", "--recipe", str(odd), "--cp", "2"))
    assert "seq-len=132 is not divisible by 2 x CP x TP = 2 x 2 x 2 = 8" in line
    with pytest.raises(FoldingError, match="seq-len=128 is not divisible by 2 x CP"):
        TrainOptions(nproc=6, folding={"tp": 1, "cp": 3, "ep": 2}).resolve()


def test_unknown_comm_type_is_refused(cli):
    line = one_line_refusal(*cli("train", "--cp", "2", "--cp-comm-type", "ring"))
    assert line.startswith("folding train: error: argument --cp-comm-type: invalid choice: 'ring'")
    # The library path refuses it too, in the folding's own words.
    with pytest.raises(FoldingError, match="unknown cp comm type 'ring'; known: p2p, all_gather, a2a"):
        TrainOptions(folding={"cp": 2, "cp_comm_type": "ring"}).resolve()


def test_a2a_needs_groups_divisible_by_cp(cli):
    # tiny-moe at TP2 CP4: 4 query groups / TP2 = 2 per TP rank, not divisible by CP4.
    line = one_line_refusal(*cli("train", "--cp", "4", "--cp-comm-type", "a2a"))
    assert line.startswith("folding train: error: invalid folding: cp comm type a2a needs "
                           "num_query_groups per TP rank divisible by CP")
    # p2p has no such rule.
    assert options("--cp", "4").resolve().folding.describe() == "TP2 CP4 DP1 PP1 | ETP1 EP4 EDP2"


def test_help_names_the_cp_flags(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0 and "--cp CP" in out and "--cp-comm-type {p2p,all_gather,a2a}" in out


# ----------------------------------------------------------------------------- ranks


# On megatron-core 0.19.2 context parallelism without Transformer Engine trains in Megatron's
# own loop (test_megatron_loop), against Megatron without it: this run adds nothing there.
@pytest.mark.megatron
@pytest.mark.primary_only
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_long_context_recipe_trains_with_cp4():
    """8 ranks, CP4 x EP8, 2,048-byte sequences: the loss falls within a few steps (50-90 s on
    2 shared cores, most of it the 8 ranks starting)."""
    proc = subprocess.run([sys.executable, "-m", "folding", "train", "--recipe", "tiny-moe-long",
                           "--cp", "4", "--cp-comm-type", "p2p", "--steps", "5", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["folding"] == "TP1 CP4 DP2 PP1 | ETP1 EP8 EDP1"
    assert out["degrees"]["cp"] == 4 and out["degrees"]["cp_comm_type"] == "p2p"
    assert out["degrees"]["ep"] == 8 and out["world_size"] == 8
    losses = out["losses"]
    assert len(losses) == 5
    assert abs(losses[0] - 5.545) < 0.05  # ln 256: a uniform guess over bytes
    # Measured: 5.534, 5.548, 5.109, 4.832, 4.585 (and 2.58 as the mean of steps 21-30).
    assert losses[-1] < losses[0] - 0.5
    # Each token counted once: 2 sequences of 2,048 bytes a step, not CP times that.
    assert out["tokens_per_s"] * out["train_s"] == pytest.approx(5 * 2 * 2048)
