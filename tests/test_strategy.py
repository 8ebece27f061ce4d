"""MQSPStrategy end to end: multi-process Trainer runs (scripts in a subprocess) against single-process
Hugging Face references on the full sequences, resume at another SP size, LightningCLI, bad configurations.

Each Trainer run happens once per module (fixtures) and several tests read its results.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_mqsp
from lightning_mqsp import MQSPStrategy

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from reference import relative_error  # noqa: E402
from single_process_training import dp_batches, reference_run  # noqa: E402
from tiny_lm import build_model, make_samples  # noqa: E402
from train_mqsp import FINISHED  # noqa: E402

REPO = Path(__file__).parent.parent
TRAIN_SAMPLES, BATCH_SIZE, EPOCHS = 8, 2, 2  # as in scripts/train_mqsp.py: 2 steps an epoch at dp=2
RTOL = 1e-5
ATOL = 1e-8  # floor for tensors that are zero up to rounding (e.g. key biases' gradients, ~1e-12)
RUN_TIMEOUT_S = 240


def launch(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a Trainer script in a fresh process (the popen launcher re-runs argv: not pytest's); its stderr."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stderr[-6000:]}"
    return proc.stderr


def run_script(script: str, *args: str, out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``launch`` a script that writes one result to ``out``, and load it."""
    out.mkdir(parents=True, exist_ok=True)
    stderr = launch(script, *args, env=env)
    return torch.load(out / "result.pt", weights_only=False) | {"stderr": stderr}


def assert_tensors_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str = "model.") -> None:
    assert {prefix + name for name in expected} == set(actual)
    errors = {name: relative_error(actual[prefix + name], value, floor=ATOL / RTOL) for name, value in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: relative error {errors[worst]:.2e} > {RTOL}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """SP=2 x DP=2 on 4 processes for each model, which also validates and predicts. One launch trains the three in
    turn: each process's imports take 13 s on a slow 2-core host, half the time of three launches."""
    out = tmp_path_factory.mktemp("runs")
    kinds = ("bert", "gpt2", "llama")
    stderr = launch("train_mqsp.py", str(out), "--model", *kinds, "--devices", "4", "--sp", "2", "--epochs", str(EPOCHS),
                    "--validate", "--predict")
    # Each model's messages: those before the line the script writes when it has finished that model.
    messages = re.split(rf"^{FINISHED} \w+$", stderr, flags=re.MULTILINE)[: len(kinds)]
    folders = {kind: out / "mqsp" / kind for kind in kinds}
    return {kind: torch.load(folders[kind] / "result.pt", weights_only=False) | {"stderr": said, "out": folders[kind]}
            for kind, said in zip(kinds, messages, strict=True)}


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    return {kind: reference_run(kind, TRAIN_SAMPLES, dp_size=2, batch_size=BATCH_SIZE, epochs=EPOCHS) for kind in ("bert", "gpt2", "llama")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_loss_and_gradients_match_single_process(kind: str, runs: dict, references: dict) -> None:
    run, ref = runs[kind], references[kind]
    losses = torch.tensor(run["losses"])  # [step, world rank]
    # The two ranks of each sequence-parallel group hold the same full-sequence loss...
    torch.testing.assert_close(losses[:, 0], losses[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(losses[:, 2], losses[:, 3], rtol=0, atol=0)
    # ...and the data-parallel mean (what sync_dist logs) is the single-process loss at every step.
    expected = torch.tensor(ref["losses"])
    torch.testing.assert_close(losses[:, ::2].mean(dim=1), expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(run["logged"]), expected, rtol=RTOL, atol=0)
    assert_tensors_match(run["first_grads"], ref["first_grads"])
    assert_tensors_match(run["params"], ref["params"])


@pytest.mark.timeout(600)
def test_padding_was_added_and_changes_nothing(runs: dict, references: dict) -> None:
    # Length 30 does not split into 2 x 2 zigzag chunks: the strategy padded to 32 and said so, once per process;
    # half the samples carry their own padding too. The exact match above covers both; here, that padding happened.
    stderr = runs["bert"]["stderr"]
    assert "padding sequences of length 30 to 32" in stderr
    assert stderr.count("padding sequences of length 30 to 32") <= 4 * 2  # once per process per stage (fit, validate)
    assert any((s["attention_mask"] == 0).any() for s in make_samples("bert", TRAIN_SAMPLES))


@pytest.mark.timeout(600)
def test_validation_metrics_are_full_sequence(runs: dict) -> None:
    metrics = runs["bert"]["validate"]
    model = trained_plain_model(runs["bert"]["out"])
    samples = make_samples("bert", 4, seed=2)
    with torch.no_grad():
        # Validation is not shuffled: data-parallel rank r loads samples r, r+2 (one batch each here).
        per_rank_loss = [model(**collate(samples[rank::2])).loss for rank in range(2)]
        everything = collate(samples)
        valid = everything["labels"] != -100
        token_nll = F.cross_entropy(model(**everything).logits[valid], everything["labels"][valid], reduction="none")
    # self.log(..., sync_dist=True): the mean over ranks of each rank's full-sequence loss.
    assert metrics["val_loss"] == pytest.approx(torch.stack(per_rank_loss).mean().item(), rel=RTOL)
    # A torchmetrics MeanMetric over tokens: every validation token counted exactly once across dp x sp ranks.
    assert metrics["val_token_nll"] == pytest.approx(token_nll.mean().item(), rel=RTOL)


def trained_plain_model(out: Path) -> torch.nn.Module:
    """A plain Hugging Face BERT (SDPA attention, no strategy) loaded from the run's last checkpoint: same keys."""
    checkpoint = torch.load(out / "checkpoints" / "epoch=1-step=4.ckpt", weights_only=False)
    model = build_model("bert")
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}, strict=True)
    return model


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@pytest.mark.timeout(600)
def test_predictions_are_gathered_and_checkpoint_loads_into_plain_model(runs: dict) -> None:
    """predict_outputs: each rank's own shard by default; the full sequences on each group's first rank alone, or on
    every rank; the values those of the plain model loaded from the checkpoint."""
    run = runs["bert"]
    plain = trained_plain_model(run["out"])
    batch = collate(make_samples("bert", 4, seed=2)[0::2])  # data-parallel rank 0's prediction samples
    with torch.no_grad():
        expected = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full, shard = (2, 30, 97), (2, 16, 97)  # 30 tokens padded to 32: zigzag chunks 0 and 3 of 8 tokens on SP rank 0
    held = run["predictions_held"]
    assert held["shard"] == [[shard]] * 4
    assert held["all"] == [[full]] * 4
    assert held["first_rank"] == [[full], [None], [full], [None]]  # SP groups (0, 1) and (2, 3)
    for mode in ("all", "first_rank"):
        assert len(run["predictions"][mode]) == 1
        torch.testing.assert_close(run["predictions"][mode][0]["logits"], expected, rtol=RTOL, atol=1e-5)
    own = run["predictions"]["shard"][0]["logits"]
    torch.testing.assert_close(own[:, :8], expected[:, :8], rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(own[:, 8:14], expected[:, 24:30], rtol=RTOL, atol=1e-5)  # 30 and 31 are padding


def test_bad_predict_outputs_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"predict_outputs must be one of \('shard', 'first_rank', 'all'\), got 'rank0'"):
        MQSPStrategy(predict_outputs="rank0")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def resumed(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SP=2 x DP=2 BERT checkpoint after epoch 1, resumed on 2 processes at SP=1 x DP=2 (MQSP) and under plain DDP,
    one launch."""
    out = tmp_path_factory.mktemp("resumed")
    ckpt = runs["bert"]["out"] / "checkpoints" / "epoch=0-step=2.ckpt"
    launch("train_mqsp.py", str(out), "--model", "bert", "--devices", "2", "--sp", "1", "--epochs", str(EPOCHS),
           "--resume", str(ckpt), "--strategy", "mqsp", "ddp")
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["mqsp", "ddp"])
def test_resume_at_another_sequence_parallel_size(strategy: str, runs: dict, resumed: Path) -> None:
    """The SP=2 x DP=2 checkpoint after epoch 1 resumes at SP=1 x DP=2 (MQSP) and under plain DDP on the same loss curve."""
    result = torch.load(resumed / strategy / "bert" / "result.pt", weights_only=False)
    original = torch.tensor(runs["bert"]["logged"])
    torch.testing.assert_close(torch.tensor(result["logged"]), original[2:], rtol=RTOL, atol=0)
    assert_tensors_match(result["params"], {k.removeprefix("model."): v for k, v in runs["bert"]["params"].items()})


CLI_CONFIG = """
trainer:
  accelerator: cpu
  devices: 2
  max_steps: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  strategy: {strategy}
model:
  kind: bert
"""
CLASS_PATH = """
    class_path: lightning_mqsp.MQSPStrategy
    init_args:
      sequence_parallel_size: 2
      layout: contiguous"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("strategy", "layout"), [(CLASS_PATH, "contiguous"), ("mqsp", "zigzag")], ids=["class_path", "name"])
def test_lightning_cli(strategy: str, layout: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG.format(strategy=strategy))
    result = run_script("cli_mqsp.py", "fit", "--config", str(config), out=tmp_path, env={"MQSP_TEST_OUT": str(tmp_path)})
    assert (result["strategy"], result["sequence_parallel_size"], result["layout"]) == ("MQSPStrategy", 2, layout)
    model = build_model("bert")
    with torch.no_grad():
        expected = model(**dp_batches(make_samples("bert", 4), 1, BATCH_SIZE)[0][0]).loss.item()
    assert result["loss"] == pytest.approx(expected, rel=RTOL)


def test_registered_by_import() -> None:
    assert "mqsp" in StrategyRegistry
    assert StrategyRegistry["mqsp"]["strategy"] is MQSPStrategy
    assert lightning_mqsp.MQSPStrategy is MQSPStrategy


@pytest.mark.parametrize(("size", "devices", "message"), [
    (3, 4, "world size 4 .* is not divisible by sequence_parallel_size=3: choose a sequence_parallel_size that divides 4"),
    (8, 4, r"sequence_parallel_size=8 is larger than the world of 4 processes .*lower sequence_parallel_size to at most 4"),
])
def test_bad_sizes_fail_when_the_trainer_is_built(size: int, devices: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(strategy=MQSPStrategy(sequence_parallel_size=size), accelerator="cpu", devices=devices)


def test_bad_layout_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        MQSPStrategy(layout="striped")  # type: ignore[arg-type]


@pytest.mark.timeout(600)
def test_sampler_is_keyed_by_data_parallel_rank(runs: dict) -> None:
    # Global ranks 0, 1 form sequence-parallel group 0 (data-parallel rank 0), ranks 2, 3 group 1: each group's two
    # ranks load the same samples, from a sampler over the 2 data-parallel replicas.
    assert runs["bert"]["samplers"] == [[0, 2], [0, 2], [1, 2], [1, 2]]


def test_default_sequence_parallel_size_is_one_node() -> None:
    strategy = MQSPStrategy(sequence_parallel_size=2, parallel_devices=[torch.device("cpu")] * 4)
    assert (strategy.sequence_parallel_size, strategy.num_processes) == (2, 4)
    assert MQSPStrategy(parallel_devices=[torch.device("cpu")] * 4).sequence_parallel_size == 4


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("mode", "names"), [
    ("raise", "rank 1 failed first: RuntimeError: rank 1 broke on purpose"),
    ("exit", "the process of a peer rank is gone"),
    ("hang", "did not reach this collective within the group's timeout"),
])
def test_a_failing_rank_ends_every_rank_with_a_named_error(mode: str, names: str) -> None:
    """Rank 1 raises, dies or hangs in its second step while rank 0 waits in an attention collective: the run
    ends within the sequence-parallel timeout (5 s here) and rank 0's error names mqsp_attention and the cause."""
    timeout_s = 5
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "failing_rank.py"), mode, str(timeout_s)], cwd=REPO, capture_output=True, text=True,
        timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "CollectiveError: mqsp_attention: the query gather" in line]
    assert errors and names in errors[0], proc.stderr[-3000:]
    assert time.monotonic() - started < 60  # process start-up included; the wait itself is bounded by the 5 s timeout


@pytest.mark.timeout(180)
def test_a_failed_rank_that_lingers_ends_its_peers_long_before_the_timeout() -> None:
    """Rank 1 reports a failure and then hangs, its process and connections alive (a teardown stuck after an
    out-of-memory error, say): on NCCL, and here on gloo, rank 0's collective would wait for the whole
    sequence-parallel timeout (120 s here). The watchdog sees the report within a second, ends the launched
    processes after its grace period, and rank 0 raises a CollectiveError that names rank 1 and why."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "failing_rank.py"), "linger", "120"], cwd=REPO, capture_output=True, text=True,
        timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "CollectiveError: mqsp_attention" in line]
    assert errors and "rank 1 failed first: RuntimeError: rank 1 broke on purpose" in errors[0], proc.stderr[-3000:]
    assert elapsed < 75, f"{elapsed:.0f} s: the run waited for the timeout"  # start-up (~20-40 s on 2 cores) + ~6 s


RECIPE_PRECISIONS = ("32-true", "bf16-mixed")


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both precisions' runs of scripts/train_recipe.py, one launch (as the `runs` above)."""
    out = tmp_path_factory.mktemp("recipe")
    launch("train_recipe.py", str(out), "--packed", "--checkpointing", "--precision", *RECIPE_PRECISIONS)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", RECIPE_PRECISIONS)
def test_long_context_recipe_matches_single_process(precision: str, recipe_runs: Path) -> None:
    """A tiny Llama on packed documents with activation checkpointing, the model's own `labels` loss and a per-step
    metric over the whole sequence, at SP=2, against the same training in one process (scripts/train_recipe.py)."""
    result = torch.load(recipe_runs / precision / "result.pt", weights_only=False)
    mqsp, single = result["mqsp"], result["single"]
    gradients = {k.removeprefix("model."): v for k, v in mqsp["gradients"].items()}
    if precision == "32-true":
        torch.testing.assert_close(torch.tensor(mqsp["losses"]), torch.tensor(single["losses"]), rtol=RTOL, atol=0)
        torch.testing.assert_close(torch.tensor(mqsp["metrics"]), torch.tensor(single["metrics"]), rtol=RTOL, atol=0)
        assert_tensors_match(mqsp["gradients"], {k.removeprefix("model."): v for k, v in single["gradients"].items()})
        return
    # bf16-mixed: no further from exact fp32 training than one process's own bf16-mixed run is (x2, see
    # tests/test_adapters_huggingface_families.py for why), on the loss, the metric and every gradient.
    exact = result["single_fp32"]
    for key in ("losses", "metrics"):
        ours = relative_error(torch.tensor(mqsp[key]), torch.tensor(exact[key]))
        theirs = relative_error(torch.tensor(single[key]), torch.tensor(exact[key]))
        assert ours <= 2 * theirs + 1e-3, (key, ours, theirs)
    exact_gradients = {k.removeprefix("model."): v for k, v in exact["gradients"].items()}
    single_gradients = {k.removeprefix("model."): v for k, v in single["gradients"].items()}
    ours = max(relative_error(gradients[k], exact_gradients[k], floor=ATOL / RTOL) for k in exact_gradients)
    theirs = max(relative_error(single_gradients[k], exact_gradients[k], floor=ATOL / RTOL) for k in exact_gradients)
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)


@pytest.mark.timeout(300)
def test_two_nodes_keep_sequence_parallelism_inside_a_node(references: dict, tmp_path: Path) -> None:
    """Two launchers with num_nodes=2 (node ranks 0 and 1) on this machine, as torchrun or SLURM would start them:
    the default sequence-parallel group is the two devices of a node, data parallelism spans the nodes, and the
    run trains as one process would (the second step's loss)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [subprocess.Popen([sys.executable, str(SCRIPTS / "two_nodes.py"), str(tmp_path)], cwd=REPO, env={**env, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-3000:] for _, err in outputs)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    groups = {g["global_rank"]: g for g in result["groups"]}
    assert [groups[r]["node"] for r in range(4)] == [0, 0, 1, 1]
    assert [groups[r]["sequence_parallel"] for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [groups[r]["data_parallel"] for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert result["loss"] == pytest.approx(references["bert"]["losses"][1], rel=RTOL)


@pytest.mark.parametrize("groups", [0, 1.5, True])
def test_bad_attention_head_groups_fail_at_construction(groups: object) -> None:
    """A head-group count that does not divide a layer's key/value heads is refused by the attention on every rank
    (tests/test_validation.py); what is not a positive int is refused here, before any rank starts."""
    with pytest.raises(ValueError, match="attention_head_groups must be a positive int"):
        MQSPStrategy(attention_head_groups=groups)  # type: ignore[arg-type]


def test_the_strategy_hands_head_groups_and_query_offload_to_the_attention() -> None:
    context = MQSPStrategy(attention_head_groups=2, offload_activations=True).sequence_parallel
    assert (context.head_groups, context.offload_queries) == (2, True)
    assert (MQSPStrategy().sequence_parallel.head_groups, MQSPStrategy().sequence_parallel.offload_queries) == (1, False)
