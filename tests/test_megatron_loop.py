"""Megatron's own training loop (``megatron.training.pretrain``) with the plugin put in by
``folding megatron``, on CPU ranks: the folded dispatcher against Megatron's alltoall dispatcher,
refusals before any rank starts, and a failed rank stopping every rank.

The reference is Megatron itself: the same script and flags without ``--folding-*``.
"""

from __future__ import annotations

import pytest

from megatron_loop import largest_relative_difference, launch, losses, needs_megatron_training, train

pytestmark = [pytest.mark.megatron]

FOLDED = ["--folding-check-mesh", "--folding-dispatcher", "--folding-gpus-per-node", "2"]

FOLDINGS = {
    # attention TP2 with sequence parallel, DP2; MoE ETP1 EP4 over the same 4 ranks
    "tp2-sp-dp2_etp1-ep4": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1"],
    # two pipeline stages, DP2; MoE EP2 inside each stage
    "pp2-dp2_etp1-ep2": ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                         "--expert-tensor-parallel-size", "1"],
}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FOLDINGS))
def test_the_folded_dispatcher_trains_as_megatrons_alltoall_dispatcher(name):
    needs_megatron_training()
    megatron = train(4, *FOLDINGS[name])
    folded = train(4, *FOLDINGS[name], *FOLDED)
    assert any("dispatch through FoldedMoELayer" in line for line in folded["plugin"])
    assert any("process groups equal the folded mesh" in line for line in folded["plugin"])
    assert megatron["plugin"] == []
    iterations = range(1, 21)
    difference = largest_relative_difference(losses(megatron), losses(folded), iterations)
    assert difference <= 1e-5, f"{name}: lm loss differs by {difference:.2e} (relative)"
    aux = largest_relative_difference(losses(megatron, "load_balancing_loss"),
                                      losses(folded, "load_balancing_loss"), iterations)
    assert aux <= 1e-5


def test_a_bad_folding_is_refused_in_one_line_before_any_rank_starts():
    needs_megatron_training()
    from megatron_loop import MODEL, TRAINING

    done = launch(4, MODEL + TRAINING + ["--train-iters", "2", "--pipeline-model-parallel-size", "2",
                                         "--expert-model-parallel-size", "4", *FOLDED])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "folding megatron: error: invalid folding: ETP*EP*EDP*PP = world_size: world_size=4 is "
        "not divisible by ETP=1 x EP=4 x PP=2 = 8"]
    assert "iteration" not in done.stdout


@pytest.mark.parametrize("flags, named", [
    (["--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap"],
     "--moe-shared-expert-overlap"),
    (["--moe-token-dispatcher-type", "flex"], "flex"),
    (["--folding-placement", "placement.json"], "--folding-placement needs --folding-dispatcher"),
])
def test_a_flag_the_folded_dispatcher_cannot_train_with_is_named(flags, named, tmp_path):
    needs_megatron_training()
    from megatron_loop import MODEL, TRAINING

    dispatcher = [] if "--folding-placement" in flags else ["--folding-dispatcher"]
    done = launch(4, MODEL + TRAINING + ["--train-iters", "2", "--expert-model-parallel-size", "4",
                                         *dispatcher, *flags])
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folding megatron: error:") and named in lines[0]


@pytest.mark.multiprocess
def test_a_failed_rank_stops_every_rank_and_is_named():
    needs_megatron_training()
    result = train(4, *FOLDINGS["pp2-dp2_etp1-ep2"], *FOLDED, iterations=6,
                   env={"FAIL_RANK": "2", "FAIL_ITERATION": "3"})
    assert result["exit_status"] != 0
    assert result["failed_rank"] == 2
    assert "RuntimeError: injected failure on rank 2" in result["reason"]
    assert "rank 2 failed" in result["stderr"]
    assert max(line["iteration"] for line in result["iterations"]) < 6
