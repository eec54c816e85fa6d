"""``--folding-replace-interval`` inside Megatron's own training loop (``folding megatron``):
experts re-placed between two steps with Megatron's distributed optimizer (and its unsharded
one), exactly.

The reference is the same run without re-placement. Exactness: per-step losses within 1e-5
relative, and the final checkpoints (model, main parameters and Adam moments, experts named by
what they are) within 1e-4 per tensor. A run whose moves leave Adam's moments behind must fail
that check, or the check proves nothing.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_loop import (SCRIPT, checkpoint_tensors, largest_relative_difference,
                           largest_tensor_difference, launch, losses, needs_megatron_training,
                           refusal, train)

pytestmark = [pytest.mark.megatron]

# TP1 PP1 DP4 | ETP1 EP2 EDP2: two experts per rank, and the distributed optimizer shards each
# expert's main parameters and moments over two expert-data-parallel ranks.
DISTRIBUTED = ["--expert-tensor-parallel-size", "1", "--use-distributed-optimizer",
               "--dist-ckpt-optim-fully-reshardable", "--folding-dispatcher"]
FOLDING = ["--expert-model-parallel-size", "2", *DISTRIBUTED]
FOLDINGS = {  # ranks and flags
    "dp4_etp1-ep2-edp2": (4, FOLDING),
    # bf16: the model's parameters in bf16, the optimizer's fp32 main parameters beside them,
    # both moved with the moments
    "dp4_etp1-ep2-edp2_bf16": (4, ["--bf16", *FOLDING]),
    # Megatron's other optimizer, unsharded: each rank keeps whole moments for its slots
    "dp4_etp1-ep2-edp2_unsharded": (4, ["--expert-model-parallel-size", "2",
                                        "--expert-tensor-parallel-size", "1",
                                        "--folding-dispatcher"]),
    # two pipeline stages, each with its own EP group and two of the four MoE layers
    "pp2-dp2_etp1-ep2": (4, ["--pipeline-model-parallel-size", "2", *FOLDING]),
    # the folding on 8 ranks: TP1 PP2 DP4 | ETP1 EP4, with 8 experts (two per rank,
    # so that a placement can put a pair together)
    "pp2-dp4_etp1-ep4": (8, ["--pipeline-model-parallel-size", "2", "--num-experts", "8",
                             "--expert-model-parallel-size", "4", *DISTRIBUTED]),
}
# Every 4 steps, any slot may move, applied whatever it saves, one step after the solve starts
# (repeatable): moves at the boundaries after steps 5, 9, 13 and 17.
REPLACE = ["--folding-replace-interval", "4", "--folding-replace-max-moved", "1",
           "--folding-replace-always", "--folding-replace-apply-after", "1"]


def _long():
    if not os.environ.get("FOLDING_LONG_TESTS"):
        pytest.skip("several 4-rank runs of Megatron's loop on 2 cores: set FOLDING_LONG_TESTS=1 "
                    "(make test-long)")
    needs_megatron_training()


def _applied(run) -> list:
    return [line for line in run["plugin"] if "re-placement at step" in line and "applied at" in line]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FOLDINGS))
def test_re_placement_in_megatrons_loop_trains_exactly_and_resumes(name, tmp_path):
    _long()
    ranks, folding = FOLDINGS[name]
    reference = train(ranks, *folding, "--save", str(tmp_path / "reference"), "--save-interval",
                      "10")
    replaced = train(ranks, *folding, *REPLACE, "--save", str(tmp_path / "replaced"),
                     "--save-interval", "10")
    applied = _applied(replaced)
    assert len(applied) >= 3, replaced["plugin"]
    assert not any(" 0 slots" in line for line in applied)
    difference = largest_relative_difference(losses(reference), losses(replaced), range(1, 21))
    print(f"{name}: lm loss, iterations 1-20: largest relative difference {difference:.2e}")
    assert difference <= 1e-5, f"lm loss differs by {difference:.2e} (relative)"
    # The final model, main parameters and Adam moments, expert by expert.
    final = "iter_0000020"
    differences = largest_tensor_difference(
        checkpoint_tensors(tmp_path / "replaced" / final, tmp_path),
        checkpoint_tensors(tmp_path / "reference" / final, tmp_path))
    assert any(".experts." in k and "exp_avg_sq" in k for k in differences)
    if "--use-distributed-optimizer" in folding:  # fp32 main parameters beside the model's
        assert any(k.startswith("optimizer.state.param.") and ".experts." in k
                   for k in differences)
    worst = max(differences, key=differences.get)
    print(f"final state, {len(differences)} tensors: largest difference {differences[worst]:.2e} "
          f"({worst})")
    assert differences[worst] <= 1e-4, f"{worst} differs by {differences[worst]:.2e}"
    # The placement and the statistics travel with the checkpoint...
    saved = json.loads((tmp_path / "replaced" / final / "folding_replacement.json").read_text())
    assert set(saved) == {"placement", "routing_statistics"}
    assert not (tmp_path / "reference" / final / "folding_replacement.json").exists()
    # ...and a resume from iteration 10 starts from them and trains as the uninterrupted run
    # (Megatron logs the second iteration after a resume as the mean of two: 12 is left out).
    resumed = train(ranks, *folding, *REPLACE, "--load", str(tmp_path / "replaced"), "--ckpt-step",
                    "10")
    assert any("resuming with the placement and routing statistics saved at iteration 10" in line
               for line in resumed["plugin"]), resumed["plugin"]
    later = [i for i in range(11, 21) if i != 12]
    difference = largest_relative_difference(losses(replaced), losses(resumed), later)
    print(f"resumed at 10, iterations {later}: largest relative difference {difference:.2e}")
    assert difference <= 1e-5, f"resumed: lm loss differs by {difference:.2e} (relative)"


LEFT_BEHIND = """\
import runpy
from folding.megatron import replacement

# Moves parameters only: Adam's moments (and main parameters) stay on the slot.
replacement.MegatronTrainer._state_keys = lambda self, param: ()
runpy.run_path({script!r}, run_name="__main__")
"""


EXIT_AT = ["--exit-interval", "8"]  # same schedule as 20 iterations, stops after 8


@pytest.fixture(scope="module")
def eight_iterations():
    """The folding without re-placement, 8 iterations of the 20-iteration schedule."""
    _long()
    return train(4, *FOLDING, *EXIT_AT)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_moves_that_leave_adams_moments_behind_are_caught(tmp_path, eight_iterations):
    """The check above has teeth: the same re-placement with the moments left on their slots
    trains differently from the third step after the first move on."""
    script = tmp_path / "left_behind.py"
    script.write_text(LEFT_BEHIND.format(script=str(SCRIPT)))
    exit_at, reference = EXIT_AT, eight_iterations
    done = launch(4, _flags(*FOLDING, *REPLACE, *exit_at), script=script)
    left = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    left["stderr"] = done.stderr
    assert _applied(left), left["plugin"]
    assert largest_relative_difference(losses(reference), losses(left), range(1, 7)) <= 1e-5
    caught = largest_relative_difference(losses(reference), losses(left), range(7, 9))
    print(f"moments left behind: iterations 7-8 differ by {caught:.2e} (relative)")
    assert caught > 1e-5


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_re_placement_that_does_not_pay_is_skipped_and_logged(eight_iterations):
    """Without ``--folding-replace-always`` the verdict weighs the move: over 4 steps of 512
    tokens a better placement of this model saves a few kB, while each expert moved costs
    about 300 kB on each of 2 expert-data-parallel ranks. Both attempts are skipped, said so
    in a line, and training is the run without re-placement, to the last digit: the one
    solved after step 4 is judged one step later, the one solved after step 8 is still in
    flight when the loop stops there (``--exit-interval``) and is judged then."""
    run = train(4, *FOLDING, "--folding-replace-interval", "4", "--folding-replace-max-moved",
                "1", "--folding-replace-apply-after", "1", *EXIT_AT)
    attempts = [line for line in run["plugin"] if "re-placement at step" in line]
    assert len(attempts) == 2 and not _applied(run), run["plugin"]
    for line in attempts:
        assert "skipped (predicted saving does not cover the bytes moved)" in line, line
        assert " 0 slots" not in line  # a candidate was found and weighed
    difference = largest_relative_difference(losses(eight_iterations), losses(run), range(1, 9))
    assert difference == 0.0, f"lm loss differs by {difference:.2e} (relative)"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_solve_in_flight_when_megatron_stops_on_time_is_reported():
    """``--exit-duration-in-mins`` stops the loop after whichever step passes the minute, a
    stop no step knows in advance: the solve started after step 1 (never switched to, it waits
    100000 steps) is still judged and reported in a line before Megatron exits. Without the
    wrap of ``checkpoint_and_decide_exit`` the run ends with no line for it."""
    _long()
    run = train(4, *FOLDING, "--folding-replace-interval", "1", "--folding-replace-max-moved",
                "1", "--folding-replace-always", "--folding-replace-apply-after", "100000",
                "--exit-duration-in-mins", "1", iterations=100000)
    assert run["exit_status"] == 0, run["stderr"][-3000:]
    assert 1 < len(run["iterations"]) < 100000
    attempts = [line for line in run["plugin"] if "re-placement at step" in line]
    assert len(attempts) == 1 and "re-placement at step 1:" in attempts[0], run["plugin"]
    assert "skipped (" in attempts[0] and not _applied(run), attempts[0]


def _flags(*flags):
    from megatron_loop import MODEL, TRAINING

    return MODEL + TRAINING + ["--train-iters", "20"] + list(flags)


@pytest.mark.parametrize("flags, named", [
    (["--folding-dispatcher", "--folding-replace-interval", "0"],
     "--folding-replace-interval must be a positive number of steps, not 0"),
    (["--folding-dispatcher", "--folding-replace-interval", "5", "--folding-replace-max-moved",
      "-0.1"], "--folding-replace-max-moved is a share of the slots in [0, 1], not -0.1"),
])
def test_a_bad_re_placement_setting_is_refused_in_one_line_before_any_rank_starts(flags, named,
                                                                                 cli):
    needs_megatron_training()
    code, out, err = refusal(cli, 4, _flags("--expert-model-parallel-size", "4", *flags))
    assert code == 2, err[-2000:]
    assert err.strip().splitlines() == [f"folding megatron: error: {named}"]
    assert "iteration" not in out


@pytest.mark.parametrize("flags, named", [
    (["--folding-replace-interval", "5"], "needs --folding-dispatcher"),
    (["--folding-dispatcher", "--folding-replace-interval", "5", "--folding-replace-max-moved",
      "1.5"], "not 1.5"),
    (["--folding-dispatcher", "--folding-replace-interval", "5",
      "--folding-replace-apply-after", "0"], "--folding-replace-apply-after must be a positive"),
    (["--folding-dispatcher", "--folding-replace-interval", "5", "--bf16"],
     "needs --use-distributed-optimizer"),
    (["--folding-dispatcher", "--folding-replace-interval", "5", "--use-distributed-optimizer",
      "--save", "ckpt", "--save-interval", "5"], "needs --dist-ckpt-optim-fully-reshardable"),
])
def test_what_re_placement_cannot_run_with_is_named(flags, named, monkeypatch):
    """The same check, in this process (Megatron's parse and validation, then the plugin's)."""
    needs_megatron_training()
    from folding.errors import FoldingError
    from folding.megatron.cpu_runtime import cpu_runtime
    from folding.megatron.launcher import with_cpu_flags
    from folding.megatron.training_hooks import check_arguments, validated_arguments

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with cpu_runtime(training=True):
        args = validated_arguments(with_cpu_flags(_flags("--expert-model-parallel-size", "4",
                                                         *flags)), world_size=4)
    with pytest.raises(FoldingError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_arguments(args)
