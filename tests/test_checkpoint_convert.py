"""folding checkpoint convert: full -> torch_dist -> full is bit-exact, the torch_dist directory
loads under other foldings and placements, Megatron-LM resumes from it and its own checkpoint
converts back, and bad input gives one line, exit status 2 and nothing written."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_training_shim  # noqa: F401 - spawned ranks never load conftest

pytestmark = pytest.mark.megatron
pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil")


def _train_and_save(directory: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "folding", "train", "--steps", "2", "--save",
                           str(directory), "--tp", "1", "--ep", "2", "--nproc", "2", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """tiny-moe after two steps of folding train (TP1 EP2 on 2 ranks): weights, Adam moments."""
    directory = tmp_path_factory.mktemp("full") / "ckpt"
    _train_and_save(directory)
    return directory


@pytest.fixture(scope="module")
def converted(full_checkpoint, tmp_path_factory):
    """The full checkpoint as torch_dist, and that converted back, through the command line
    (in-process); with each command's JSON."""
    from folding.cli import main

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, src, dst in (("to torch_dist", full_checkpoint, root / "torch_dist"),
                           ("to full", root / "torch_dist", root / "full")):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["checkpoint", "convert", str(src), str(dst), "--json"])
        assert code == 0
        lines = stdout.getvalue().strip().splitlines()
        assert len(lines) == 1
        out[name] = json.loads(lines[0])
    out["root"] = root
    return out


def _tensors(directory: Path):
    return (torch.load(directory / "model.pt", weights_only=True),
            torch.load(directory / "optimizer.pt", weights_only=True),
            json.loads((directory / "meta.json").read_text()))


@pytest.mark.multiprocess
def test_full_to_torch_dist_to_full_is_bit_exact(full_checkpoint, converted):
    root = converted["root"]
    assert converted["to torch_dist"] == {
        "source": str(full_checkpoint), "destination": str(root / "torch_dist"),
        "source_format": "full", "target_format": "torch_dist", "recipe": "tiny-moe",
        "iteration": 2, "model_tensors": 87, "adam_moments": True}
    assert converted["to full"]["adam_moments"] and converted["to full"]["iteration"] == 2
    # Megatron-LM's layout: the tracker names the iteration directory.
    assert (root / "torch_dist" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (root / "torch_dist" / "iter_0000002" / "metadata.json").exists()
    model, optimizer, meta = _tensors(full_checkpoint)
    model2, optimizer2, meta2 = _tensors(root / "full")
    assert meta2 == meta
    assert model2.keys() == model.keys()
    for name, tensor in model.items():
        assert model2[name].dtype == tensor.dtype and torch.equal(model2[name], tensor), name
    assert optimizer2["step"] == optimizer["step"] == 2
    for field in ("exp_avg", "exp_avg_sq"):
        assert optimizer2[field].keys() == optimizer[field].keys() == model.keys()
        assert all(torch.equal(optimizer2[field][n], t) for n, t in optimizer[field].items())


@pytest.mark.multiprocess
def test_megatrons_common_state_is_what_load_checkpoint_reads(converted):
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(
        str(converted["root"] / "torch_dist" / "iter_0000002"))
    assert common["iteration"] == 2 and common["checkpoint_version"] == 3.0
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (4, 128, 8)
    assert args.consumed_train_samples == 2 * 16  # two steps of global batch 16
    assert args.no_save_optim and args.no_save_rng


def _load_under_foldings(rank, world, directory, expected_file, cases):
    """Each case: Megatron's model under another folding (and placement) loads the torch_dist
    directory; rank 0 rebuilds the full weights from every rank and returns the names that
    differ from ``expected_file`` (tensors stay in the rank: only names travel back)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from folding.layout.weights import named_parameters_of_chunks, unshard
    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy, initialize
    from folding.megatron.model import MoERouting, build_model_chunks
    from folding.placement.placement import Placement
    from folding.recipe import load_recipe

    enable()
    expected = torch.load(expected_file, weights_only=True)
    out = []
    for degrees, rows in cases:
        recipe = load_recipe("tiny-moe", world_size=world, **degrees)
        spec, arch = recipe.folding, recipe.model
        placement = None
        routing = MoERouting(dispatcher="alltoall")
        if rows is not None:
            placement = Placement(arch.num_experts, len(rows), spec.ep, len(rows[0]) // spec.ep,
                                  spec.gpus_per_node, rows).validate()
            routing = MoERouting(dispatcher="folded")
        initialize(spec)
        chunks = build_model_chunks(arch, recipe.training, spec, routing, placement=placement)
        model = chunks[0]
        # As Megatron-LM lays it out: the model under "model", next to the common state.
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
        model.load_state_dict(loaded["model"])
        local = {k: p.detach().clone() for k, p in named_parameters_of_chunks(chunks).items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        full = unshard(gathered, arch, spec, placement=placement)
        out.append(sorted(set(expected) ^ set(full)) +
                   [n for n, t in expected.items() if n in full and not torch.equal(full[n], t)])
        del chunks, model
        destroy()
    return out


@pytest.mark.multiprocess
def test_the_torch_dist_directory_loads_under_other_foldings(full_checkpoint, converted):
    """TP2 with Megatron's dispatcher, and EP2 with the folded one over a permuted placement
    with replicas: the same full weights as the checkpoint the directory came from."""
    from folding.run.launch import run_ranks

    permuted = [[5, 2, 7, 0, 3, 1, 6, 4, 5, 2]] * 4  # EP2 x 5 slots: 8 experts, 2 replicas
    cases = [(dict(tp=2, ep=2, etp=1), None), (dict(tp=1, ep=2, etp=1), permuted)]
    directory = str(converted["root"] / "torch_dist" / "iter_0000002")
    differences = run_ranks(_load_under_foldings, 2, directory,
                            str(full_checkpoint / "model.pt"), cases)[0]
    assert differences == [[], []]


# --------------------------------------------------------------------------- bad input
def _nothing_written(dst: Path) -> None:
    assert not dst.exists()
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def _refused(cli, *args, message):
    code, out, err = cli("checkpoint", "convert", *map(str, args))
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folding checkpoint: error: "), err
    assert message in lines[0], lines[0]


def test_missing_or_foreign_sources_are_refused(cli, tmp_path):
    _refused(cli, tmp_path / "nothing", tmp_path / "dst", message="is not a directory")
    (tmp_path / "empty").mkdir()
    _refused(cli, tmp_path / "empty", tmp_path / "dst", message="is not a checkpoint")
    _nothing_written(tmp_path / "dst")


@pytest.mark.multiprocess
def test_incomplete_and_mismatched_checkpoints_are_refused(cli, full_checkpoint, converted,
                                                           tmp_path):
    dst = tmp_path / "dst"
    partial = tmp_path / "partial"
    shutil.copytree(full_checkpoint, partial)
    (partial / "optimizer.pt").unlink()
    _refused(cli, partial, dst, message="optimizer.pt is missing")
    # A recipe whose model differs (a hidden size of 64) from the checkpoint's.
    other = tmp_path / "other.yaml"
    text = (Path(__file__).parents[1] / "folding" / "recipes" / "tiny-moe.yaml").read_text()
    other.write_text(text.replace("hidden_size: 128", "hidden_size: 64"))
    _refused(cli, full_checkpoint, dst, "--recipe", other, message="the recipe's model needs")
    _refused(cli, converted["root"] / "torch_dist", dst, "--recipe", other,
             message="the recipe's model needs")
    _refused(cli, full_checkpoint, dst, "--to", "full", message="is already a full checkpoint")
    _refused(cli, full_checkpoint, converted["root"] / "full", message="exists")
    _nothing_written(dst)


@pytest.mark.multiprocess
def test_a_failed_save_leaves_nothing_behind(cli, full_checkpoint, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from folding.errors import FoldingError

    def broken(*args, **kwargs):
        raise FoldingError("disk full (injected)")

    monkeypatch.setattr(dist_checkpointing, "save", broken)
    _refused(cli, full_checkpoint, tmp_path / "dst", message="disk full (injected)")
    _nothing_written(tmp_path / "dst")


@pytest.mark.multiprocess
def test_without_psutil_the_writer_is_not_started(cli, full_checkpoint, tmp_path, monkeypatch):
    """megatron-core's writer processes die without psutil and its save then waits forever."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psutil" else find_spec(name, *a))
    _refused(cli, full_checkpoint, tmp_path / "dst", message="needs psutil")
    _nothing_written(tmp_path / "dst")


# --------------------------------------------------------------------------- Megatron-LM
LM_RECIPE = """\
name: megatron-loop-moe
description: the model of tests/megatron_loop.py
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  vocab_size: 256
  ffn_hidden_size: 128
  num_experts: 4
  moe_router_topk: 2
  moe_ffn_hidden_size: 128
  max_position_embeddings: 64
training:
  seq_length: 64
  micro_batch_size: 2
  global_batch_size: 8
  train_iters: 20
  lr: 1.0e-3
  min_lr: 1.0e-4
  lr_warmup_iters: 2
  lr_decay_style: cosine
  weight_decay: 0.01
  clip_grad: 1.0
  precision: fp32
  seed: 1234
folding:
  world_size: 1
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_megatron_lm_resumes_from_a_converted_checkpoint_and_its_own_converts_back(cli, tmp_path):
    """Megatron-LM's training loop (megatron-core 0.19) loads the converted directory on 2 ranks
    with EP2 (--no-load-optim --no-load-rng), continues at the converted iteration, takes one
    step at learning rate 0 and saves; that checkpoint converts back to the same weights."""
    from megatron_loop import needs_megatron_training, train

    from folding.layout.parameters import full_parameters
    from folding.recipe import load_recipe

    needs_megatron_training()
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(LM_RECIPE)
    arch = load_recipe(str(recipe_file)).model
    generator = torch.Generator().manual_seed(7)
    model = {n: torch.randn(s, generator=generator) * 0.02
             for n, s in full_parameters(arch).items()}
    full = tmp_path / "full"
    full.mkdir()
    torch.save(model, full / "model.pt")
    torch.save({"exp_avg": {}, "exp_avg_sq": {}, "step": 0}, full / "optimizer.pt")
    (full / "meta.json").write_text(json.dumps({"recipe": str(recipe_file), "folding": {},
                                                "losses": [], "scheduler": {}, "step": 3}))
    code, _, err = cli("checkpoint", "convert", str(full), str(tmp_path / "torch_dist"))
    assert code == 0, err

    run = train(2, "--load", str(tmp_path / "torch_dist"), "--no-load-optim", "--no-load-rng",
                "--expert-model-parallel-size", "2", "--lr", "0", "--min-lr", "0",
                "--lr-warmup-iters", "0", "--save", str(tmp_path / "megatron"),
                "--save-interval", "1000", iterations=4)
    assert run["exit_status"] == 0, run["stderr"][-3000:]
    assert [line["iteration"] for line in run["iterations"]] == [4]
    assert run["iterations"][0]["consumed samples"] == 4 * 8  # 3 x 8 loaded, then one step
    assert (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").read_text() == "4"

    code, out, err = cli("checkpoint", "convert", str(tmp_path / "megatron"),
                         str(tmp_path / "back"), "--recipe", str(recipe_file), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["iteration"] == 4 and not summary["adam_moments"]
    back, optimizer, meta = _tensors(tmp_path / "back")
    assert optimizer["step"] == 0 and meta["step"] == 4 and meta["scheduler"]["num_steps"] == 4
    assert back.keys() == model.keys()
    wrong = [n for n, t in model.items() if not torch.equal(back[n], t)]
    assert wrong == []
