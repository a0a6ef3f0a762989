"""Smoke tests of the benchmark harness at minimal sizes. No timing assertions: only that the
pieces count, fit, record and render what they should."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import run as bench
from bench import workloads as setup
from bench.core import (
    ResultsLog,
    Section,
    Table,
    Target,
    Timing,
    fit_line,
    fit_power_law,
    interleaved,
    paired_ratio,
    paired_ratio_interval,
)
from bench.flops import count_flops
from bench.report import format_cell, render_report, render_table

# ---- FLOP counting -------------------------------------------------------------------------------


def test_count_flops_of_a_known_matmul():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    total, per_op = count_flops(lambda: a @ b)
    assert total == 2 * 5 * 7 * 3
    assert sum(per_op.values()) == total


def test_count_flops_of_a_linear_forward_and_backward():
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(10, 6, requires_grad=True)
    total, _ = count_flops(lambda: layer(x).sum().backward())
    # forward 2*10*6*4; backward: grad wrt input and wrt weight, each the same size
    assert total == 3 * 2 * 10 * 6 * 4


def test_count_flops_sees_the_cpu_fused_attention_kernel():
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q = torch.randn(2, 3, 8, 4, requires_grad=True)
    forward, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    shape = tuple(q.shape)
    assert forward == sdpa_flop_count(shape, shape, shape) == 2 * (2 * 2 * 3 * 8 * 8 * 4)
    both, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    assert both == forward + sdpa_backward_flop_count(shape, shape, shape, shape)


def test_recorded_matmuls_replay_the_same_ops_shapes_and_layouts():
    from bench.flops import TensorSpec, record_matmuls, replay_seconds

    layer = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8, requires_grad=True)
    calls = record_matmuls(lambda: layer(x).sum().backward())
    aten = torch.ops.aten
    assert [call.op.overloadpacket for call in calls] == [aten.addmm, aten.mm, aten.mm]
    bias, inputs, weight_t = calls[0].args
    assert bias == TensorSpec((4,), (1,), torch.float32) and inputs == TensorSpec((16, 8), (8, 1), torch.float32)
    assert weight_t == TensorSpec((8, 4), (1, 8), torch.float32)  # the transposed view, as the forward saw it
    once, _ = count_flops(lambda: layer(x).sum().backward())
    replayed, per_op = count_flops(lambda: replay_seconds(calls, repeats=2))
    assert replayed == 3 * once  # warm-up + 2 timed runs of the same matmuls
    assert set(per_op) == {"aten.addmm", "aten.mm"}
    assert replay_seconds(calls, repeats=1) > 0
    with pytest.raises(ValueError, match="repeats"):
        replay_seconds(calls, repeats=0)


# ---- timing and fits -----------------------------------------------------------------------------


def test_interleaved_calls_every_variant_and_alternates_the_order():
    calls: list[str] = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          repeats=3, warmup=1, inner=2)
    assert set(timings) == {"a", "b"} and all(len(t.samples) == 3 for t in timings.values())
    # warm-up a b, then rounds: a a b b | b b a a | a a b b
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]


def test_interleaved_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="at least one variant"):
        interleaved({}, repeats=1)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    slow = Timing([2.0, 30.0, 4.0])
    fast = Timing([1.0, 10.0, 4.0])
    assert paired_ratio(slow, fast) == 2.0  # ratios 2, 3, 1 -> median 2
    assert Timing([1.0, 3.0, 2.0]).median == 2.0 and Timing([1.0, 3.0, 2.0]).minimum == 1.0
    with pytest.raises(ValueError, match="equal"):
        paired_ratio(Timing([1.0]), Timing([1.0, 2.0]))


def test_paired_ratio_interval_is_a_bootstrap_of_the_median_over_rounds():
    # Two rounds with ratios 1 and 3: a resample's median is 1, 2 or 3 with odds 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are the extremes.
    assert paired_ratio_interval(Timing([1.0, 6.0]), Timing([1.0, 2.0])) == (1.0, 3.0)
    steady = paired_ratio_interval(Timing([2.0] * 9), Timing([1.0] * 9))
    assert steady == (2.0, 2.0)
    numerator = Timing([1.2, 1.3, 1.25, 1.4, 1.1, 1.27, 1.22, 1.31])
    denominator = Timing([1.0] * 8)
    low, high = paired_ratio_interval(numerator, denominator)
    assert low <= paired_ratio(numerator, denominator) <= high and low < high
    assert (low, high) == paired_ratio_interval(numerator, denominator)  # seeded
    narrow = paired_ratio_interval(numerator, denominator, confidence=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    with pytest.raises(ValueError, match="confidence"):
        paired_ratio_interval(numerator, denominator, confidence=1.0)
    with pytest.raises(ValueError, match="equal"):
        paired_ratio_interval(Timing([1.0]), Timing([1.0, 2.0]))


def test_power_law_and_line_fits_recover_known_parameters():
    xs = [16.0, 64.0, 256.0, 1024.0]
    exponent, scale = fit_power_law(xs, [3.0 * x**1.5 for x in xs])
    assert exponent == pytest.approx(1.5) and scale == pytest.approx(3.0)
    slope, intercept = fit_line([1.0, 2.0, 4.0], [5.0, 7.0, 11.0])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(3.0)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0.0, 1.0], [1.0, 2.0])


# ---- targets, results file, report ---------------------------------------------------------------


def test_targets_know_their_direction_and_nan_is_not_met():
    assert Target("a", 1.2, 1.25, "<=").met and not Target("a", 1.3, 1.25, "<=").met
    assert Target("b", 12.0, 10.0, ">=").met and not Target("b", 9.0, 10.0, ">=").met
    assert not Target("c", math.nan, 1.0, "<=").met
    with pytest.raises(ValueError, match="op"):
        Target("d", 1.0, 1.0, "<")


def test_a_target_whose_interval_crosses_the_goal_is_within_noise():
    clear = Target("a", 1.1, 1.25, "<=", interval=(1.05, 1.2))
    assert clear.met and not clear.within_noise and clear.verdict == "met"
    edge = Target("a", 1.24, 1.25, "<=", interval=(1.2, 1.3))
    assert edge.met and edge.within_noise and edge.verdict == "met, within noise"
    over = Target("a", 1.27, 1.25, "<=", interval=(1.2, 1.3))
    assert over.verdict == "NOT met, within noise"
    assert Target("a", 1.4, 1.25, "<=", interval=(1.3, 1.5)).verdict == "NOT met"
    assert Target("b", 12.0, 10.0, ">=", interval=(9.0, 13.0)).verdict == "met, within noise"
    assert Target("c", 1.0, 1.25, "<=").verdict == "met"
    with pytest.raises(ValueError, match="interval"):
        Target("d", 1.0, 1.25, "<=", interval=(1.2, 1.1))


def test_results_log_appends_one_json_line_per_measurement(tmp_path):
    path = tmp_path / "bench" / "results.jsonl"
    info = {"run_id": "r1", "git_commit": "abc", "git_dirty": False, "quick": True}
    log = ResultsLog(path, info)
    log.record("objective", "selfflow_over_fm", 1.2, "ratio", config="digits")
    ResultsLog(path, info).record("data", "loader_samples_per_s", 1e5, "samples/s", workers=0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["metric"] for line in lines] == ["selfflow_over_fm", "loader_samples_per_s"]
    assert lines[0]["git_commit"] == "abc" and lines[0]["config"] == "digits" and "timestamp" in lines[0]


def test_report_renders_tables_targets_and_machine():
    assert format_cell(None) == "-" and format_cell(float("nan")) == "-"
    assert format_cell(1234.5) == "1,234" and format_cell(0.01234) == "0.0123" and format_cell("a|b") == "a\\|b"
    with pytest.raises(ValueError, match="cells"):
        Table(["a", "b"], [[1]])
    table = Table(["config", "ratio"], [["digits", 1.2]], title="T")
    assert "| config | ratio |" in render_table(table) and "| digits | 1.2 |" in render_table(table)
    section = Section("objective", "Objective cost", "cmd --only objective", "what it means",
                      tables=[table], targets=[Target("SF / FM", 1.3, 1.25, "<=")])
    machine = {"cpu": "Test CPU", "logical_cpus": 2, "torch": "x", "torch_threads": 2}
    text = render_report([section], machine, {"command": "bench --quick", "git_commit": "abc", "quick": True}, 60.0)
    assert "Test CPU" in text and "## 1. Objective cost" in text and "cmd --only objective" in text
    assert "| 1 | SF / FM | 1.3 | - | <= 1.25 | **no** | cpu_shared | - |" in text
    noisy = Section("objective", "Objective cost", "cmd", "meaning",
                    targets=[Target("SF / FM", 1.24, 1.25, "<=", interval=(1.2, 1.3))])
    text = render_report([noisy], machine, {"command": "bench", "git_commit": "abc"}, 60.0)
    assert "| 1 | SF / FM | 1.24 | 1.2-1.3 | <= 1.25 | yes, within noise | cpu_shared | - |" in text
    assert "SF / FM: 1.24 (target <= 1.25, 95% interval 1.2-1.3) -> **met, within noise** [setting: cpu_shared]" in text
    stock = Section("settings", "Host settings", "cmd", "meaning", targets=[
        Target("SF / FM, stock", 1.39, 1.25, "<=", setting="stock", absolute="FM 700 samples/s")])
    text = render_report([stock], machine, {"command": "bench"}, 1.0)
    assert "| 1 | SF / FM, stock | 1.39 | - | <= 1.25 | **no** | stock | FM 700 samples/s |" in text
    assert "bfloat16 instructions unknown" in text
    for flags, shown in ((["avx512_bf16"], "bfloat16 instructions: avx512_bf16"), ([], "matmuls are emulated")):
        assert shown in render_report([noisy], {**machine, "cpu_bfloat16": flags}, {"command": "bench"}, 1.0)


def test_main_writes_the_report_and_results(tmp_path, monkeypatch):
    def fake_item(name, ctx):
        ctx.results.record(name, "value", 1.0, "")
        return Section(name, f"title {name}", "cmd", "meaning", tables=[Table(["x"], [[1]])])

    monkeypatch.setattr(bench, "run_item", fake_item)
    monkeypatch.setattr("bench.sampling.start_background_training", lambda ctx: None)  # no real model training
    out, results, history = tmp_path / "BENCH.md", tmp_path / "results.jsonl", tmp_path / "runs" / "history.jsonl"
    files = ["--results", str(results), "--history", str(history), "--cache", str(tmp_path / "cache")]
    assert bench.main(["--quick", "--only", "data,objective", "--out", str(out), *files]) == 0
    text = out.read_text()
    assert text.index("title objective") < text.index("title data")  # items run in the order
    metrics = [json.loads(line)["item"] for line in history.read_text().splitlines()]
    assert metrics == ["machine", "objective", "data", "run"]
    assert not results.exists()  # only a full run rewrites the committed file
    for _ in range(2):
        assert bench.main(files) == 0  # every item, full sizes (faked): the committed file holds the last run
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["item"] for r in kept] == ["machine", *bench.RUN_ORDER, "run"] and len({r["run_id"] for r in kept}) == 1
    assert len(history.read_text().splitlines()) == 4 + 2 * len(kept)
    with pytest.raises(SystemExit):
        bench.parse_items("objective,nonsense")


# ---- configurations ------------------------------------------------------------------------------


def test_bench_configs_build_through_gin_with_the_requested_shape(tmp_path):
    config = setup.digits(objective="selfflow", batch_size=4, data_shape=(1, 16, 16), hidden_dim=32)
    assert config.num_tokens == 64 and config.key() == setup.digits(
        objective="selfflow", batch_size=4, data_shape=(1, 16, 16), hidden_dim=32).key()
    trainer = setup.build_trainer(config, scratch=tmp_path)
    model = trainer.experiment.model
    assert (model.hidden_dim, model.depth, model.num_tokens) == (32, 6, 64)
    assert type(trainer.experiment.objective).__name__ == "SelfFlowObjective"
    raw = setup.synthetic_batch(config)
    assert raw["x"].shape == (4, 1, 16, 16) and raw["y"].shape == (4,)
    logs = trainer.train_step(raw)
    assert math.isfinite(logs["loss/total"])
    with pytest.raises(ValueError, match="objective"):
        setup.BenchConfig(name="x", objective="nope")


def test_hand_written_loop_trains_the_same_model(tmp_path):
    from bench.overhead import HandWrittenLoop

    config = setup.digits(objective="fm", batch_size=4, hidden_dim=32)
    trainer = setup.build_trainer(config, scratch=tmp_path)
    loop = HandWrittenLoop(trainer)
    before = [p.detach().clone() for p in loop.model.parameters()]
    loop.step(setup.synthetic_batch(config))
    changed = any(not torch.equal(a, b) for a, b in zip(before, loop.model.parameters()))
    assert changed and loop.model is trainer.experiment.model and loop.optimizer is not trainer.optimizer


def test_extra_flop_budget_matches_the_teacher_and_head_formulas(tmp_path):
    from bench.objective import captured_teacher_call, extra_flop_budget, teacher_forward_flops

    B, N, P, D = 4, 64, 4, 32  # 1x16x16 images, 2x2 patches
    base = setup.digits(batch_size=B, data_shape=(1, 16, 16), hidden_dim=D)
    trainers = {name: setup.build_trainer(config, scratch=tmp_path) for name, config in {
        "fm": base.with_(objective="fm"), "selfflow": base.with_(objective="selfflow"),
        "dts_only": base.with_(objective="selfflow", extra=("SelfFlowObjective.gamma = 0.0",))}.items()}
    raw = setup.synthetic_batch(base)
    with captured_teacher_call(trainers["selfflow"]) as call:
        flops = {name: count_flops(lambda t=trainer: t.train_step(raw))[0] for name, trainer in trainers.items()}
    teacher = teacher_forward_flops(trainers["selfflow"], call)
    k = trainers["selfflow"].experiment.objective.teacher_layer
    assert k == 4  # round(0.7 * 6)
    # No-grad forward to block k, 2 FLOPs per multiply-add: patch projection, time MLP (256 -> D -> D),
    # then per block adaLN (D -> 6D, one row per sample), qkv, attention (QK^T and AV), out projection, MLP.
    per_block = 2 * B * D * 6 * D + 2 * B * N * (3 * D * D + D * D + 8 * D * D) + 4 * B * N * N * D
    assert teacher == 2 * B * N * P * D + 2 * B * (256 * D + D * D) + k * per_block
    budget = extra_flop_budget(flops, teacher)
    fm = flops["fm"]
    assert budget["teacher"] == pytest.approx(teacher / fm)
    # The head Linear(D, 2D) -> SiLU -> Linear(2D, D) on every token: forward 8 B N D^2, backward twice that.
    assert budget["head"] == pytest.approx(24 * B * N * D * D / fm)
    assert 0 < budget["modulation"] < budget["teacher"]
    assert 1 + sum(budget.values()) == pytest.approx(flops["selfflow"] / fm)
    with pytest.raises(RuntimeError, match="never called its teacher"):
        with captured_teacher_call(trainers["fm"]) as unused:
            trainers["fm"].train_step(raw)
        teacher_forward_flops(trainers["fm"], unused)


# ---- the data-path fix: decoded samples replayed from memory -------------------------------------


def test_decoded_sample_cache_replays_exactly_the_streamed_batches(digits_root, monkeypatch):
    from selfflow.platform.data import loader as shard_loader

    def batches(cache_limit: int):
        monkeypatch.setattr(shard_loader, "DECODED_CACHE_BYTES", cache_limit)
        dataset = shard_loader.ShardDataset(digits_root, batch_size=128, seed=3, split="train")
        stream = shard_loader.make_loader(dataset)
        taken = [next(stream) for _ in range(dataset.batches_per_epoch(0, 0) + 3)]  # epoch 1 replays the cache
        return taken, dataset._reader._decoded

    cached, decoded = batches(2**30)
    streamed, nothing = batches(0)
    assert nothing is None and len(decoded) == len(shard_loader.read_index(digits_root, "train").shard_paths)
    assert len(cached) == len(streamed)
    for a, b in zip(cached, streamed):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


@pytest.mark.slow  # starts a child Python that imports the platform: ~10-35 s here
def test_step_worker_runs_steps_in_a_child_and_reports_its_peak(tmp_path):
    from bench.procs import StepWorker

    config = setup.digits(objective="fm", batch_size=2, hidden_dim=16)
    worker = StepWorker(config, {"SELFFLOW_ALLOCATOR": "default", "OMP_WAIT_POLICY": None}, threads=1,
                        scratch=str(tmp_path))
    worker()
    worker.send_step()  # the split form (bench/studies/openmp_policy.py steps two children at once)
    worker.wait_step()
    peak = worker.close()
    assert peak is not None and peak > 10


def test_round_worker_steps_its_configs_interleaved_in_one_child(tmp_path):
    from bench.procs import RoundWorker

    configs = [setup.digits(objective=o, batch_size=2, hidden_dim=16) for o in ("fm", "selfflow")]
    worker = RoundWorker(configs, {"OMP_WAIT_POLICY": None}, threads=1, scratch=str(tmp_path))
    try:
        seconds = [worker(), worker()]
    finally:
        worker.close()
    assert all(len(round_) == 2 and all(s > 0 for s in round_) for round_ in seconds)


def test_compute_item_reuses_step_measurements_of_item_one(tmp_path, monkeypatch):
    from bench import compute as bench_compute
    from bench.core import BenchContext

    measured = setup.digits(objective="fm")
    ctx = BenchContext(quick=True, results=ResultsLog(None, {}), cache_dir=tmp_path, command="test", machine={},
                       log=lambda message: None)
    ctx.step_measurements[measured.key()] = (3e9, Timing([0.5, 0.25, 0.3]))

    def no_training(*args, **kwargs):
        raise AssertionError("a config item 1 measured must not be built and timed again")

    monkeypatch.setattr(setup, "build_trainer", no_training)
    replayed = []
    monkeypatch.setattr(bench_compute, "matmuls_alone_seconds",
                        lambda ctx, config, trainer, repeats: replayed.append(config) or 0.2)
    (row,) = bench_compute.efficiency_rows(ctx, [measured], peak=20e9, repeats=2)
    # median 0.3 s -> 10 GFLOP/s achieved, half of the 20 GFLOP/s peak; the matmuls alone take 0.2 s:
    # 15 GFLOP/s, 0.75 of the peak, 2/3 of the step
    assert row[1:8] == pytest.approx([3.0, 300.0, 10.0, 0.5, 200.0, 0.75, 2 / 3])
    assert row[8] == "item 1" and replayed == [measured]


def test_matmuls_alone_replays_a_recorded_training_step(tmp_path):
    from bench import compute as bench_compute
    from bench.core import BenchContext

    ctx = BenchContext(quick=True, results=ResultsLog(None, {}), cache_dir=tmp_path, command="test", machine={},
                       log=lambda message: None)
    config = setup.digits(objective="selfflow", batch_size=2, hidden_dim=16)
    assert bench_compute.matmuls_alone_seconds(ctx, config, repeats=1) > 0


def test_a_failed_background_training_is_reported_with_its_exit_code_and_log(tmp_path, monkeypatch):
    from bench import sampling as bench_sampling
    from bench.core import BenchContext

    ctx = BenchContext(quick=True, results=ResultsLog(None, {}), cache_dir=tmp_path, command="test", machine={},
                       log=lambda message: None)
    monkeypatch.setattr(bench_sampling, "_TRAIN_CHILD", "import sys; print('boom: no data'); sys.exit(3)")
    assert bench_sampling.start_background_training(ctx)
    with pytest.raises(RuntimeError, match=r"exit 3\): boom: no data \(log: .*\.log\)"):
        bench_sampling.trained_model(ctx, bench_sampling.model_steps(ctx))
    assert not ctx.background


def test_the_heun_target_reads_fds_averaged_over_sample_sets():
    from bench.sampling import SamplerSpec, heun_target_table

    uniform, shifted = SamplerSpec("Heun ODE", 1.0), SamplerSpec("Heun ODE", 2.0)
    budgets = [4, 8, 16, 32]
    sets = [
        (4.0, {uniform: dict(zip(budgets, [10.0, 5.0, 4.6, 4.5])), shifted: dict(zip(budgets, [20.0, 8.0, 4.2, 4.3]))}),
        (3.0, {uniform: dict(zip(budgets, [9.0, 4.0, 3.0, 3.1])), shifted: dict(zip(budgets, [20.0, 6.0, 3.7, 3.1]))}),
    ]
    table, nfe, spec, best_ratio = heun_target_table(sets, [uniform, shifted], budgets, (1, 2))
    # Set 1 alone: 4.6 / 4.0 = 1.15 at 16 -> out. Means: reference 3.5 (10%: 3.85); uniform 3.8 at budget 16
    # (Heun: 15 NFE) -> in; shifted 3.95 at 16, 3.7 at 32 -> in at 31 NFE. The fewer NFE wins.
    assert (nfe, spec) == (15, uniform)
    assert best_ratio == pytest.approx(3.7 / 3.5)
    mean_rows = [row for row in table.rows if row[0] == "mean of 2"]
    assert [row[2] for row in mean_rows] == [uniform.label, shifted.label]
    assert mean_rows[0][3:] == pytest.approx([9.5 / 3.5, 4.5 / 3.5, 3.8 / 3.5, 3.8 / 3.5])
    assert table.rows[0][3:] == pytest.approx([2.5, 1.25, 1.15, 1.125])


def test_the_heun_target_is_unmet_when_no_mean_comes_within_ten_percent():
    from bench.sampling import SamplerSpec, heun_target_table

    uniform = SamplerSpec("Heun ODE", 1.0)
    sets = [(4.0, {uniform: {16: 4.5, 32: 4.6}}), (4.0, {uniform: {16: 4.5, 32: 4.5}})]
    _, nfe, spec, best_ratio = heun_target_table(sets, [uniform], [16, 32], (1, 2))
    assert nfe is None and spec == uniform and best_ratio == pytest.approx(4.5 / 4.0)
