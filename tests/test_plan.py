"""The planner (lightning_mqsp/plan.py): its analytic memory against the fake-tensor estimator (lightning_mqsp/estimate.py,
the ground truth) at points of several models, recipes, lengths and P; the offload choice against both budgets; the
time model's structure (each part follows the FLOPs or bytes it is made of); the command line's table, JSON, config
and errors. The full recipes' long-sequence points take the estimator minutes each: docs/scaling.md lists them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lightning_mqsp import plan
from lightning_mqsp.estimate import RECIPE_PROBE_LAYERS, Setup, estimate_training_step, extrapolated_memory, quiet
from lightning_mqsp.plan import GB, Budget, Hardware, ModelShape, Point, device_bytes, host_bytes, load_config, step_time

#: The analytic model's goal against the fake-tensor estimate of the device peak.
TOLERANCE = 0.03


def shape(name: str) -> ModelShape:
    return ModelShape.of(*load_config(name))


@pytest.mark.parametrize("model, recipe, world_size, length", [
    ("llama-8b", "sharded", 8, 65536),
    ("mistral-7b", "ddp", 4, 16384),
    ("qwen3-8b", "checkpointed", 2, 32768),
])
def test_the_analytic_memory_matches_the_fake_estimate(model: str, recipe: str, world_size: int, length: int) -> None:
    """Full depth extrapolated from fake runs of 3 and 4 layers, as the estimator's own searches do (checked against
    deeper runs in tests/test_estimate.py); the host memory to 0.1% (it is a few tensors' bytes). The full recipes at the
    long lengths the planner answers for take the estimator minutes a point: docs/scaling.md lists those checks."""
    quiet()
    setup = Setup(model, "mqsp", length, world_size, recipe=recipe, attention_backend="triton", optimizer_foreach=False)
    device, host = extrapolated_memory(setup, RECIPE_PROBE_LAYERS)
    point = Point(recipe, length, world_size)
    assert abs(device_bytes(shape(model), point) / device - 1) <= TOLERANCE, (device_bytes(shape(model), point), device)
    assert host_bytes(shape(model), point) == pytest.approx(host, rel=1e-3, abs=1e6)


@pytest.mark.parametrize("prefetch, queries_on_host", [(True, True), (False, False)])
def test_the_full_recipes_memory_matches_the_fake_estimate_of_three_layers(prefetch: bool, queries_on_host: bool) -> None:
    """A 3-layer Llama-3.1-8B at P = 8 and 1M tokens (131K a rank) against the model of the same 3-layer shape. The
    depth extrapolation of the rows above does not hold for the full recipes, whose peak is a layer's backward
    beside the gradient shards of the layers done (a 32-layer run at 524K: the model +0.6%, the line through 3 and 4
    layers 6% under both: docs/scaling.md)."""
    quiet()
    setup = Setup("llama-8b", "mqsp", 2**20, 8, recipe="full", attention_backend="triton", optimizer_foreach=False,
                  num_layers=3, offload_prefetch=prefetch, offload_queries=queries_on_host)
    measured = estimate_training_step(setup)
    name, config = load_config("llama-8b")
    config.num_hidden_layers = 3
    model, point = ModelShape.of(name, config), Point("full", 2**20, 8, prefetch=prefetch, queries_on_host=queries_on_host)
    assert abs(device_bytes(model, point) / measured.peak_bytes - 1) <= TOLERANCE, (device_bytes(model, point), measured.peak_bytes)
    assert host_bytes(model, point) == pytest.approx(measured.host_peak_bytes, rel=1e-3)


def test_the_fewest_layers_offload_that_fit_the_device_and_the_host_holds_only_theirs() -> None:
    """Each layer kept on the device costs it 2h bytes a token and spares the host as much: the choice is the smallest
    count that fits the device; a host budget below what that count needs makes the planner trade (prefetch, queries
    on the device) for a point that fits both, or none."""
    llama = shape("llama-8b")
    point = Point("full", 4 * 2**20, 8)
    every = replace(point, offloaded_layers=llama.layers)
    budget = Budget(device_bytes(llama, every) + 10 * 2 * llama.hidden * point.tokens, 2**62)
    count = plan.fewest_offloaded_layers(llama, point, budget)
    assert count == llama.layers - 10
    chosen, fewer = (replace(point, offloaded_layers=n) for n in (count, count - 1))
    assert device_bytes(llama, chosen) <= budget.device_bytes < device_bytes(llama, fewer)
    # the queries (2q = 2h for Llama) in backward are as large as the final norm's input at the end of forward
    assert host_bytes(llama, every) - host_bytes(llama, chosen) == 10 * 2 * llama.hidden * point.tokens
    for host in (host_bytes(llama, chosen) - 1, host_bytes(llama, chosen) // 2):
        short = plan.best_point(llama, point, replace(budget, host_bytes=host))
        assert short is None or (device_bytes(llama, short) <= budget.device_bytes and host_bytes(llama, short) <= host)
    assert plan.best_point(llama, point, replace(budget, host_bytes=host_bytes(llama, chosen) // 2)) is None
    longest = plan.longest_point(llama, "full", 8, budget)
    assert longest is not None and plan.best_point(llama, replace(longest, length=longest.length + 8 * 1024), budget) is None


def test_queries_stay_on_the_device_where_that_fits_and_spare_the_host_a_hidden_state() -> None:
    """Kept on the device, the queries cost the host nothing and the device 2q a token at the MLP's and attention's
    backward, not at the rotary embedding's (after attention's backward), about Llama's peak without prefetch: the
    planner keeps them there first, and the host holds one hidden state a token less with some layers' checkpoints on
    the device."""
    llama = shape("llama-8b")
    some = Point("full", 4 * 2**20, 8, offloaded_layers=20, prefetch=False)
    on_device = replace(some, queries_on_host=False)
    assert host_bytes(llama, some) - host_bytes(llama, on_device) == 2 * llama.query_width * some.tokens
    spared = host_bytes(llama, some) - host_bytes(llama, on_device)
    assert 0 <= device_bytes(llama, on_device) - device_bytes(llama, some) < spared / 10  # the attention moment, just over
    best = plan.best_point(llama, Point("full", 4 * 2**20, 8), Budget(80 * GB, 2**62))
    assert best is not None and best.queries_on_host is False and best.prefetch is True


def test_prefetch_is_turned_off_only_where_the_device_needs_it() -> None:
    """The next layer's checkpoint brought back ahead costs the device 2h bytes a token; the planner gives it up only
    when the point fits no other way, and then the copies back add to the step whole."""
    llama = shape("llama-8b")
    point = Point("full", 4 * 2**20, 8)
    every = replace(point, offloaded_layers=llama.layers)
    prefetching, waiting = device_bytes(llama, every), device_bytes(llama, replace(every, prefetch=False))
    assert prefetching - waiting == 2 * llama.hidden * point.tokens
    assert plan.best_point(llama, point, Budget(prefetching, 2**62)) == every
    assert plan.best_point(llama, point, Budget(waiting, 2**62)) == replace(every, prefetch=False)
    assert plan.best_point(llama, point, Budget(waiting - 1, 2**62)) is None
    hardware = Hardware(gpus=8)
    exposed = [step_time(llama, replace(every, prefetch=p), hardware)["parts"]["offload copies (exposed)"] for p in (True, False)]
    assert exposed[1] - exposed[0] == pytest.approx(point.tokens * 2 * llama.hidden * llama.layers / (hardware.pcie_gbps * GB))


def test_the_time_parts_follow_their_flops_and_bytes() -> None:
    """Doubling the length doubles the per-rank linear work at the same P and quadruples attention's; the offload copies
    hide behind the kernels (their own stream) and what exceeds them follows the PCIe bandwidth; the exposed
    communication of P = 16 (two nodes) follows the inter-node one."""
    llama, hardware = shape("llama-8b"), Hardware(gpus=16)
    short, long = (step_time(llama, Point("full", n, 16), hardware)["parts"] for n in (2**20, 2**21))
    assert long["matmuls"] == pytest.approx(2 * short["matmuls"])
    assert long["attention"] == pytest.approx(4 * short["attention"])
    assert short["offload copies (exposed)"] == 0.0
    slow, slower = (step_time(llama, Point("full", 2**20, 16), replace(hardware, pcie_gbps=gbps))["parts"] for gbps in (0.02, 0.01))
    compute = short["matmuls"] + short["attention"]
    assert slow["offload copies (exposed)"] > 0
    assert slower["offload copies (exposed)"] + compute == pytest.approx(2 * (slow["offload copies (exposed)"] + compute))
    slow_link = replace(hardware, inter_node_gbps=1.0, intra_node_gbps=1.0)
    exposed = step_time(llama, Point("full", 2**20, 16), slow_link)
    assert exposed["parts"]["attention communication (exposed)"] > short["attention"]
    assert exposed["dominant"] == "attention communication (exposed)"
    timing = step_time(llama, Point("full", 2**20, 16), hardware)
    assert 0 < timing["mfu"] < 1 and timing["seconds"] == pytest.approx(sum(timing["parts"].values()))


def test_the_command_prints_json_and_writes_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    result = plan.main(["--model", "llama-3.1-8b", "--gpus", "8", "--json", "--write-config", str(config)])
    printed = json.loads(capsys.readouterr().out)
    assert [row["recipe"] for row in printed["recipes"]] == list(plan.RECIPES) == [row["recipe"] for row in result["recipes"]]
    best = max((row for row in printed["recipes"] if "device_gb" in row), key=lambda row: row["length"])
    assert best["device_gb"] <= 80 and best["host_gb"] <= 1900 / 8
    written = yaml.safe_load(config.read_text())
    init = written["trainer"]["strategy"]["init_args"]
    assert written["data"]["seq_len"] == best["length"] and init["sequence_parallel_size"] == 8
    assert init["offload_activation_layers"] == best["offloaded_layers"] and init["micro_q_size"] == best["micro_q_size"]
    assert init["offload_prefetch"] == best["offload_prefetch"] and init["offload_queries"] == best["offload_queries"]


def test_a_local_config_json_is_read_without_a_download(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(load_config("llama-3.2-1b")[1].to_dict()))
    assert shape(str(tmp_path)) == replace(shape("llama-3.2-1b"), name=tmp_path.name)


def test_bad_input_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"built-in shapes are .*llama-3\.1-8b.*or give the path"):
        load_config("llama-9000")
    with pytest.raises(SystemExit):
        plan.main(["--model", "llama-3.1-8b", "--gpus", "8", "--length", "1001"])
    assert "must be a positive multiple of --gpus 8" in capsys.readouterr().err
    plan.main(["--model", "llama-3.1-8b", "--gpus", "8", "--length", str(2**30)])
    assert "does not fit at 1,073,741,824: device" in capsys.readouterr().out
    assert Hardware(gpus=8).budget() == Budget(80 * GB, 1900 * GB // 8)
