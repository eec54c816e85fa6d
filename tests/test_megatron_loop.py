"""Megatron's own training loop (``megatron.training.pretrain``) with the plugin put in by
``folding megatron``, on CPU ranks: the folded dispatcher against Megatron's alltoall dispatcher,
refusals before any rank starts, and a failed rank stopping every rank.

The reference is Megatron itself: the same script and flags without ``--folding-*``.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_loop import (indexed_corpus, largest_relative_difference, launch, losses,
                           needs_megatron_training, refusal, train)

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
def test_the_folded_dispatcher_trains_as_megatrons_alltoall_dispatcher(name, tmp_path, cli,
                                                                     monkeypatch):
    needs_megatron_training()
    # The pipeline folding trains on the shipped corpus through Megatron's indexed dataset.
    data = indexed_corpus(tmp_path) if name.startswith("pp2") else None
    megatron = train(4, *FOLDINGS[name], data=data)
    folded = train(4, *FOLDINGS[name], *FOLDED, log=tmp_path / "folded.log", data=data)
    assert any("dispatch through FoldedMoELayer" in line for line in folded["plugin"])
    assert any("process groups equal the folded mesh" in line for line in folded["plugin"])
    assert megatron["plugin"] == []
    iterations = range(1, 21)
    difference = largest_relative_difference(losses(megatron), losses(folded), iterations)
    assert difference <= 1e-5, f"{name}: lm loss differs by {difference:.2e} (relative)"
    aux = largest_relative_difference(losses(megatron, "load_balancing_loss"),
                                      losses(folded, "load_balancing_loss"), iterations)
    assert aux <= 1e-5
    # The log Megatron's loop wrote: `folding mfu` reads the model from its argument dump (no
    # recipe) and recomputes each iteration's FLOPs exactly as Megatron counts them.
    code, out, err = cli("mfu", str(tmp_path / "folded.log"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["recipe"] is None and report["world_size"] == 4
    megatron_flops = _megatrons_flop_count(FOLDINGS[name] + FOLDED, 4, monkeypatch)
    for interval in report["intervals"]:
        recomputed = interval["tflops_per_gpu"] * 1e12 * 4 * interval["elapsed_ms"] / 1e3
        assert recomputed == pytest.approx(megatron_flops, rel=1e-12)
    # ...and a different model would have been noticed: one more layer changes the count.
    assert _megatrons_flop_count(FOLDINGS[name] + FOLDED + ["--num-layers", "6"], 4,
                                 monkeypatch) != pytest.approx(megatron_flops, rel=1e-3)


def _megatrons_flop_count(flags, world_size, monkeypatch) -> float:
    """Megatron's own FLOPs of one iteration (global batch 8) for these flags."""
    from megatron_loop import MODEL, TRAINING

    from folding.megatron.cpu_runtime import cpu_runtime
    from folding.megatron.launcher import with_cpu_flags
    from folding.megatron.training_hooks import validated_arguments

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with cpu_runtime(training=True):
        from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
        from megatron.training.training import num_floating_point_operations

        args = validated_arguments(with_cpu_flags(MODEL + TRAINING + ["--train-iters", "20"] +
                                                  list(flags)), world_size=world_size)
        # Megatron pads the vocabulary when it builds the tokenizer, after validation.
        args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args,
                                                         logging_enabled=False)
        return float(num_floating_point_operations(args, 8))


FOLDINGS_8_RANKS = {
    "tp2-sp-dp4_etp1-ep4-edp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                 "--expert-model-parallel-size", "4",
                                 "--expert-tensor-parallel-size", "1"],
    "pp2-dp4_etp1-ep4": ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size",
                         "4", "--expert-tensor-parallel-size", "1"],
}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FOLDINGS_8_RANKS))
def test_on_8_ranks_the_folded_dispatcher_trains_as_megatrons(name):
    """Too slow for CI on 2 cores (8 ranks, about 3 minutes a folding): `make test-long`."""
    if not os.environ.get("FOLDING_LONG_TESTS"):
        pytest.skip("8 ranks on 2 cores: set FOLDING_LONG_TESTS=1 (make test-long)")
    needs_megatron_training()
    megatron = train(8, *FOLDINGS_8_RANKS[name])
    folded = train(8, *FOLDINGS_8_RANKS[name], *FOLDED)
    assert any("dispatch through FoldedMoELayer" in line for line in folded["plugin"])
    difference = largest_relative_difference(losses(megatron), losses(folded), range(1, 21))
    assert difference <= 1e-5, f"{name}: lm loss differs by {difference:.2e} (relative)"


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
    (["--folding-placement", "{P}"], "--folding-placement needs --folding-dispatcher"),
    (["--folding-dispatcher", "--folding-placement", "{P}", "--use-distributed-optimizer",
      "--save", "{ckpt}", "--save-interval", "5"], "needs --dist-ckpt-optim-fully-reshardable"),
    (["--folding-dispatcher", "--folding-placement", "{P}", "--ckpt-format", "torch",
      "--load", "{ckpt}"], "--ckpt-format torch: that format stores experts by slot"),
])
def test_a_flag_the_folded_dispatcher_cannot_train_with_is_named(flags, named, tmp_path, cli):
    needs_megatron_training()
    from megatron_loop import MODEL, TRAINING

    flags = [f.format(P=_placement(tmp_path, "p", PLACEMENT_P), ckpt=tmp_path / "ckpt")
             for f in flags]
    dispatcher = [] if "--folding-placement" in flags else ["--folding-dispatcher"]
    code, out, err = refusal(cli, 4, MODEL + TRAINING + [
        "--train-iters", "2", "--expert-model-parallel-size", "4", *dispatcher, *flags])
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folding megatron: error:") and named in lines[0]
    assert "iteration" not in out


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


RANK_REPORT = """import json, os, sys, torch
report = dict(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
              threads=torch.get_num_threads(), launcher=os.getppid(),
              command=open("/proc/self/cmdline").read().split("\\0"))
print("rank report", json.dumps(report), flush=True)
"""


@pytest.mark.multiprocess
def test_local_cpu_ranks_are_forks_of_the_checked_launcher(tmp_path):
    """``--cpu --nproc N`` forks each rank from the launcher once its check has imported Megatron
    (no rank imports it again): each rank runs in the launcher's command line, as a child of the
    launcher, with its own rank, one OpenMP thread and its output forwarded."""
    needs_megatron_training()
    from megatron_loop import MODEL, TRAINING

    script, log = tmp_path / "report.py", tmp_path / "ranks.log"
    script.write_text(RANK_REPORT)
    # Without OMP_NUM_THREADS the launcher's OpenMP takes every core, and a fork inherits that.
    done = launch(2, MODEL + TRAINING + ["--train-iters", "2"], script=script, log=log,
                  env={"OMP_NUM_THREADS": None})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = sorted((json.loads(line.split("rank report ", 1)[1])
                      for line in log.read_text().splitlines() if "rank report " in line),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    assert {r["world"] for r in reports} == {2} and {r["threads"] for r in reports} == {1}
    assert len({r["launcher"] for r in reports}) == 1 and reports[0]["launcher"] != os.getpid()
    assert all("--nproc" in r["command"] for r in reports)


# --------------------------------------------------------------------------- placements, checkpoints
TP2_EP4 = FOLDINGS["tp2-sp-dp2_etp1-ep4"]
# Two permutations of the 4 experts of each of the 4 MoE layers over EP4 (one slot per rank).
PLACEMENT_P = [[3, 1, 0, 2], [2, 0, 3, 1], [1, 3, 2, 0], [0, 2, 1, 3]]
PLACEMENT_Q = [[1, 0, 3, 2], [3, 2, 1, 0], [0, 3, 1, 2], [2, 1, 0, 3]]


def _placement(tmp_path, name, layers) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"num_experts": 4, "num_layers": 4, "ep_size": 4,
                                "slots_per_rank": 1, "gpus_per_node": 2, "layers": layers}))
    return str(path)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_permuted_placement_from_megatrons_checkpoint_trains_as_megatron(tmp_path, cli):
    """Both runs load one checkpoint Megatron's own layout wrote after iteration 1, so each
    logical expert starts from the same weights; then 20 iterations each. The checkpoint run
    also writes Megatron's routing trace, which `folding trace import` and `folding place` turn
    into a third placement that trains too."""
    needs_megatron_training()
    checkpoint, traces = tmp_path / "ckpt", tmp_path / "traces"
    first = train(4, *TP2_EP4, "--exit-interval", "1", "--save-interval", "1000", "--save",
                  str(checkpoint), "--moe-routing-trace-path", str(traces), iterations=21)
    assert losses(first) and (checkpoint / "latest_checkpointed_iteration.txt").read_text() == "1"
    megatron = train(4, *TP2_EP4, "--load", str(checkpoint), iterations=21)
    permuted = train(4, *TP2_EP4, "--load", str(checkpoint), "--folding-dispatcher",
                     "--folding-placement", _placement(tmp_path, "p", PLACEMENT_P), iterations=21)
    assert any("p.json" in line for line in permuted["plugin"])
    iterations = range(2, 22)
    assert largest_relative_difference(losses(megatron), losses(permuted), iterations) <= 1e-4

    # Megatron's routing trace -> folding trace import -> folding place -> a run on it.
    code, out, err = cli("trace", "import", *map(str, sorted(traces.glob("*.jsonl"))),
                         "--out", str(tmp_path / "trace.npz"), "--json")
    assert code == 0, err
    imported = json.loads(out)
    assert imported["layers"] == 4 and imported["experts"] == 4 and imported["tokens"] > 0
    code, out, err = cli("place", "--trace", str(tmp_path / "trace.npz"), "--ep-size", "4",
                         "--gpus-per-node", "2", "--time-limit", "5", "--out",
                         str(tmp_path / "placed.json"), "--json")
    assert code == 0, err
    placed = train(4, *TP2_EP4, "--load", str(checkpoint), "--folding-dispatcher",
                   "--folding-placement", str(tmp_path / "placed.json"), "--exit-interval", "4",
                   iterations=21)
    assert largest_relative_difference(losses(megatron), losses(placed), range(2, 5)) <= 1e-4


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_checkpoint_saved_under_a_placement_resumes_under_any_placement_or_folding(tmp_path):
    """Saved at iteration 10 under placement P (EP4, distributed optimizer), resumed (a) under P,
    (b) under Megatron's own dispatcher, (c) under placement Q, (d) under another folding (PP2,
    EP2, TP1): each resumed run equals the uninterrupted one within 1e-4 wherever Megatron's own
    save and resume of that run, (a), is exact, and the resumed runs equal each other."""
    # (On CPU this needs the CPU runtime's three repairs of the distributed optimizer's load
    # without Apex or Transformer Engine; without the per-parameter Adam step, every resumed
    # run drifts from iteration 12 on.)
    needs_megatron_training()
    checkpoint = tmp_path / "ckpt"
    p, q = _placement(tmp_path, "p", PLACEMENT_P), _placement(tmp_path, "q", PLACEMENT_Q)
    # Megatron's default distributed-optimizer checkpoint stores Adam's moments by buffer
    # position; the plugin refuses it with a placement (test above), so the fully reshardable one.
    common = ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]
    uninterrupted = losses(train(4, *TP2_EP4, *common, "--folding-dispatcher", "--folding-placement",
                                 p, "--save", str(checkpoint), "--save-interval", "10",
                                 iterations=14))
    resume = ["--load", str(checkpoint), "--ckpt-step", "10", *common]
    resumed = {
        "a: placement P": train(4, *TP2_EP4, *resume, "--folding-dispatcher",
                                "--folding-placement", p, iterations=14),
        "b: Megatron's dispatcher": train(4, *TP2_EP4, *resume, iterations=14),
        "c: placement Q": train(4, *TP2_EP4, *resume, "--folding-dispatcher",
                                "--folding-placement", q, iterations=14),
        "d: TP1 PP2 DP2 | EP2": train(4, *FOLDINGS["pp2-dp2_etp1-ep2"], *resume,
                                      "--folding-dispatcher", iterations=14),
    }
    resumed = {name: losses(run) for name, run in resumed.items()}
    later = range(11, 15)
    own = resumed["a: placement P"]
    # Megatron's own save and resume of this run is exact except where it reports: the first
    # iteration after a resume is logged without resetting its loss sums, so the second one
    # (12) prints the mean of iterations 11 and 12. Training itself is exact: 13 and 14 agree.
    exact = [i for i in later if own[i] == uninterrupted[i]]
    assert exact == [11, 13, 14], f"Megatron's own resume is exact at {exact}"
    assert own[12] == pytest.approx((uninterrupted[11] + uninterrupted[12]) / 2, abs=2e-6)
    for name, run in resumed.items():
        difference = largest_relative_difference(uninterrupted, run, exact)
        assert difference <= 1e-4, f"{name}: lm loss differs by {difference:.2e} at {exact}"
        # ...and whatever the placement, dispatcher or folding, the same at every iteration.
        assert largest_relative_difference(own, run, later) <= 1e-4, name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_started_per_rank_by_torchrun(tmp_path):
    """Without --nproc each process is one rank of torchrun (env:// rendezvous); a bad folding
    then stops every rank with exit status 2 and rank 0 alone says why."""
    needs_megatron_training()
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from megatron_loop import MODEL, SCRIPT, TRAINING

    torchrun = Path(sys.executable).parent / "torchrun"
    folding = shutil.which("folding", path=str(Path(sys.executable).parent))
    if not torchrun.exists() or folding is None:
        pytest.skip("torchrun or the folding entry point is not installed next to this Python")

    def run(*flags):
        command = [str(torchrun), "--nproc-per-node", "2", "--no-python", folding, "megatron",
                   "--cpu", "--", str(SCRIPT), *MODEL, *TRAINING, "--train-iters", "3",
                   "--expert-model-parallel-size", "2", *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))

    done = run("--folding-check-mesh", "--folding-dispatcher")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dispatch through FoldedMoELayer" in done.stdout
    assert done.stdout.count("iteration        3/       3") == 1
    refused = run("--folding-dispatcher", "--moe-token-dispatcher-type", "flex")
    assert refused.returncode != 0
    lines = [l for l in refused.stderr.splitlines() if l.startswith("folding megatron: error:")]
    assert len(lines) == 1 and "flex" in lines[0]


# Context parallelism without Transformer Engine inside Megatron's loop: the reference is the
# same run without CP (the ranks then hold whole sequences, DP doubles, the global batch stays).
# CI runs the first; `make test-long` all of them.
CONTEXT_PARALLEL = {
    "cp2-p2p_ep4-folded": ["--context-parallel-size", "2", "--cp-comm-type", "p2p", *FOLDED],
    "cp2-all_gather_ep4": ["--context-parallel-size", "2", "--cp-comm-type", "all_gather"],
    "cp2-a2a_ep4": ["--context-parallel-size", "2", "--cp-comm-type", "a2a"],
}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_context_parallel_trains_as_megatron_without_it():
    needs_megatron_training()
    experts = ["--expert-model-parallel-size", "4"]
    reference = losses(train(4, *experts, iterations=10))
    names = sorted(CONTEXT_PARALLEL) if os.environ.get("FOLDING_LONG_TESTS") else \
        ["cp2-p2p_ep4-folded"]
    for name in names:
        run = train(4, *experts, *CONTEXT_PARALLEL[name], iterations=10)
        assert any("run context-parallel over CP=2" in line for line in run["plugin"]), name
        difference = largest_relative_difference(reference, losses(run), range(1, 11))
        assert difference <= 1e-5, f"{name}: lm loss differs by {difference:.2e} (relative)"


@pytest.mark.parametrize("flags, named", [
    (["--cp-comm-type", "ring"], "unknown cp comm type 'ring'"),
    (["--cp-comm-type", "a2a", "--num-query-groups", "1", "--group-query-attention"],
     "cp comm type a2a needs num_query_groups per TP rank divisible by CP"),
])
def test_a_context_parallel_setting_the_plugin_cannot_run_is_refused_in_one_line(flags, named,
                                                                                cli):
    needs_megatron_training()
    from megatron_loop import MODEL, TRAINING

    code, _, err = refusal(cli, 4, MODEL + TRAINING + ["--train-iters", "2",
                                                       "--context-parallel-size", "2", *flags])
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folding megatron: error:") and named in lines[0]
