"""Objectives: losses re-derived from the formulas with replayed generator draws, and their wiring."""
from __future__ import annotations

import copy
import multiprocessing
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from selfflow.components.backbones.dit import DiT
from selfflow.components.core import Batch
from selfflow.components.encoders.digit_encoder import DigitEncoder
from selfflow.components.objectives import (
    FlowMatchingObjective,
    ProjectorHead,
    REPAObjective,
    SelfFlowObjective,
    SRAObjective,
    resize_token_grid,
    resolve_layer,
)
from selfflow.components.objectives.common import (
    cosine_alignment_loss,
    drop_labels,
    l1_alignment_loss,
    smooth_l1_alignment_loss,
)
from selfflow.components.objectives.teacher_thread import start_teacher, uses_teacher_thread
from selfflow.components.schedules.dual import DualTimestepScheduler
from selfflow.components.schedules.timesteps import LogitNormalTime, UniformTime

torch.set_num_threads(1)

B, GRID, P, HIDDEN, DEPTH, CLASSES = 6, (4, 4), 4, 32, 4, 10
N = GRID[0] * GRID[1]
STUDENT_LAYER, TEACHER_LAYER = 1, 3  # round(0.3 * 4), round(0.7 * 4)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    # adaLN-Zero starts with zero gates and output: give every weight a value so losses are informative.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny_dit(seed: int = 0, num_classes: int = CLASSES) -> DiT:
    return randomised(DiT(P, GRID, HIDDEN, DEPTH, num_heads=2, num_classes=num_classes), seed)


def make_batch(seed: int = 1, conditional: bool = True) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, N, P, generator=generator)
    cond = torch.randint(CLASSES, (B,), generator=generator) if conditional else None
    return Batch(x0=x0, cond=cond)


class BackboneWrapper(nn.Module):
    """Wraps a backbone and shows the attributes the objectives check (depth, width, classes, grid)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.depth, self.hidden_dim = model.depth, model.hidden_dim
        self.num_classes, self.grid = model.num_classes, model.grid


class Recorder(BackboneWrapper):
    """Wraps a backbone and logs every call (who, t, cond, keyword arguments) in a shared list."""

    def __init__(self, model: nn.Module, name: str, log: list) -> None:
        super().__init__(model)
        self.name, self.log = name, log

    def forward(self, x, t, cond, **kwargs):
        self.log.append({"who": self.name, "x": x.detach().clone(), "t": t.detach().clone(),
                         "cond": None if cond is None else cond.clone(), **kwargs})
        return self.model(x, t, cond, **kwargs)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(t.shape + (1,) * (x0.dim() - t.dim()))
    return (1 - t) * x0 + t * eps


def replay_dropout(labels: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(labels.shape, generator=generator) < probability, CLASSES, labels)


def selfflow(**kwargs) -> SelfFlowObjective:
    kwargs.setdefault("time_dist", UniformTime())
    return SelfFlowObjective(hidden_dim=HIDDEN, depth=DEPTH, num_classes=CLASSES, **kwargs)


# ----- helpers ----------------------------------------------------------------------------------


def test_resolve_layer_ratios_and_indices() -> None:
    assert (resolve_layer(0.3, 28), resolve_layer(0.7, 28)) == (8, 20)
    assert (resolve_layer(0.3, DEPTH), resolve_layer(0.7, DEPTH)) == (STUDENT_LAYER, TEACHER_LAYER)
    assert resolve_layer(0.05, 4) == 1 and resolve_layer(1.0, 4) == 4  # clamped to 1..depth
    assert resolve_layer(3, 4) == 3
    for bad in (0, 5, 0.0, 1.5, -0.2):
        with pytest.raises(ValueError):
            resolve_layer(bad, 4)
    with pytest.raises(TypeError):
        resolve_layer(True, 4)


def test_alignment_losses_match_formulas() -> None:
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(cosine_alignment_loss(a, b), (1 - cos).mean())
    torch.testing.assert_close(cosine_alignment_loss(a, 3 * a), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(l1_alignment_loss(a, b), (a - b).abs().mean())
    d = (a - b).abs()
    torch.testing.assert_close(smooth_l1_alignment_loss(a, b), torch.where(d < 1, 0.5 * d**2, d - 0.5).mean())


def test_label_dropout_uses_the_generator_and_the_null_class() -> None:
    labels = torch.arange(CLASSES).repeat(100)
    dropped = drop_labels(labels, 0.3, CLASSES, torch.Generator().manual_seed(0))
    replay = replay_dropout(labels, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, replay)
    assert abs((dropped == CLASSES).float().mean().item() - 0.3) < 0.05
    assert torch.equal(dropped[dropped != CLASSES], labels[dropped != CLASSES])
    assert drop_labels(None, 0.3, 0, torch.Generator()) is None
    assert torch.equal(drop_labels(labels, 0.0, CLASSES, torch.Generator()), labels)


def test_projector_heads() -> None:
    two = ProjectorHead(8, 5)
    assert [type(m) for m in two.mlp] == [nn.Linear, nn.SiLU, nn.Linear]
    assert two.mlp[0].out_features == 16 and two(torch.zeros(2, 3, 8)).shape == (2, 3, 5)
    repa = ProjectorHead(8, 5, kind="repa", hidden_width=12)
    assert [type(m) for m in repa.mlp] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert repa.mlp[2].in_features == repa.mlp[2].out_features == 12
    assert ProjectorHead(8, 5, kind="repa").hidden_width == 2048
    with pytest.raises(ValueError, match="kind"):
        ProjectorHead(8, 5, kind="three_layer")


# ----- vanilla flow matching --------------------------------------------------------------------


def test_flow_matching_loss_equals_rederivation() -> None:
    model, batch = tiny_dit(), make_batch()
    dist = LogitNormalTime(0.2, 1.0)
    objective = FlowMatchingObjective(dist, label_dropout=0.5, num_classes=CLASSES)
    terms = objective(batch, model, None, torch.Generator().manual_seed(11))

    replay = torch.Generator().manual_seed(11)
    t = dist.sample((B,), replay)
    eps = torch.randn(B, N, P, generator=replay)
    cond = replay_dropout(batch.cond, 0.5, replay)
    assert (cond == CLASSES).any() and (cond != CLASSES).any()
    with torch.no_grad():
        velocity = model(interpolate(batch.x0, eps, t), t, cond).velocity
    expected = ((velocity - (eps - batch.x0)) ** 2).mean()
    torch.testing.assert_close(terms.terms["flow"], expected)
    assert terms.weights == {"flow": 1.0}
    torch.testing.assert_close(terms.diagnostics["t_mean"], t.mean())
    assert list(objective.parameters()) == []


def test_flow_matching_unconditional_and_mismatch() -> None:
    model = tiny_dit(num_classes=0)
    objective = FlowMatchingObjective(UniformTime(), num_classes=0)
    terms = objective(make_batch(conditional=False), model, None, torch.Generator().manual_seed(0))
    assert terms.total().ndim == 0 and terms.total() > 0
    with pytest.raises(ValueError, match="num_classes"):
        FlowMatchingObjective(UniformTime(), num_classes=CLASSES)(make_batch(), model, None, torch.Generator())


# ----- Self-Flow --------------------------------------------------------------------------------


def test_selfflow_loss_equals_rederivation() -> None:
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    objective = selfflow(label_dropout=0.5)
    terms = objective(batch, student, teacher, torch.Generator().manual_seed(21))

    replay = torch.Generator().manual_seed(21)
    t, s = torch.rand(B, generator=replay), torch.rand(B, generator=replay)  # UniformTime draws
    mask = torch.rand(B, N, generator=replay) < 0.25
    eps = torch.randn(B, N, P, generator=replay)
    cond = replay_dropout(batch.cond, 0.5, replay)
    tau = torch.where(mask, s[:, None], t[:, None])
    t_min = torch.minimum(t, s)
    assert mask.any() and (t < s).any() and (t > s).any()
    with torch.no_grad():
        target_features = teacher(interpolate(batch.x0, eps, t_min), t_min, cond,
                                  return_layers=(TEACHER_LAYER,)).hidden[TEACHER_LAYER]
        out = student(interpolate(batch.x0, eps, tau), tau, cond, return_layers=(STUDENT_LAYER,))
        projected = objective.head(out.hidden[STUDENT_LAYER])
    flow = ((out.velocity - (eps - batch.x0)) ** 2).mean()
    cos = F.cosine_similarity(projected, target_features, dim=-1)
    rep = (1 - cos).mean()
    torch.testing.assert_close(terms.terms["flow"], flow)
    torch.testing.assert_close(terms.terms["rep"], rep)
    assert terms.weights == {"flow": 1.0, "rep": 0.8}
    torch.testing.assert_close(terms.total(), flow + 0.8 * rep)
    torch.testing.assert_close(terms.diagnostics["rep_cosine"], cos.mean())
    torch.testing.assert_close(terms.diagnostics["masked_fraction"], mask.float().mean())
    torch.testing.assert_close(terms.diagnostics["t_s_gap"], (t - s).abs().mean())
    torch.testing.assert_close(terms.diagnostics["teacher_gap"], (tau - t_min[:, None]).mean())


def test_no_gradient_reaches_the_teacher_and_only_the_head_is_trained() -> None:
    student, teacher = tiny_dit(0), tiny_dit(5)
    objective = selfflow()
    assert {id(p) for p in objective.parameters()} == {id(p) for p in objective.head.parameters()}
    assert len(list(objective.parameters())) == 4
    before = copy.deepcopy(teacher.state_dict())
    objective(make_batch(), student, teacher, torch.Generator().manual_seed(0)).total().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # never touched
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is not None for p in objective.head.parameters())
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_teacher_runs_first_with_early_exit_and_same_labels() -> None:
    log: list = []
    student, teacher = Recorder(tiny_dit(0), "student", log), Recorder(tiny_dit(5), "teacher", log)
    # On the main thread, so that the call order is defined (a second thread runs it beside the student).
    selfflow(label_dropout=0.5, teacher_thread="never")(make_batch(), student, teacher,
                                                         torch.Generator().manual_seed(2))
    assert [call["who"] for call in log] == ["teacher", "student"]
    teacher_call, student_call = log
    assert teacher_call["stop_at"] == TEACHER_LAYER and TEACHER_LAYER in teacher_call["return_layers"]
    assert student_call.get("stop_at") is None and student_call["return_layers"] == (STUDENT_LAYER,)
    assert torch.equal(teacher_call["cond"], student_call["cond"])
    assert (teacher_call["cond"] == CLASSES).any()  # dropout happened, identically for both
    assert teacher_call["t"].shape == (B,) and student_call["t"].shape == (B, N)
    assert (teacher_call["t"][:, None] <= student_call["t"]).all()

    log.clear()
    selfflow(early_exit=False, teacher_thread="never")(make_batch(), student, teacher, torch.Generator().manual_seed(2))
    assert log[0]["who"] == "teacher" and log[0]["stop_at"] is None


def test_early_exit_gives_the_same_loss() -> None:
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    early = selfflow()
    late = selfflow(early_exit=False)
    late.load_state_dict(early.state_dict())
    a = early(batch, student, teacher, torch.Generator().manual_seed(4))
    b = late(batch, student, teacher, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.terms["rep"], b.terms["rep"])


def test_gamma_zero_never_calls_the_teacher() -> None:
    log: list = []
    student, teacher = Recorder(tiny_dit(0), "student", log), Recorder(tiny_dit(5), "teacher", log)
    objective = selfflow(gamma=0.0)
    terms = objective(make_batch(), student, teacher, torch.Generator().manual_seed(0))
    assert [call["who"] for call in log] == ["student"]
    assert set(terms.terms) == {"flow"} and list(objective.parameters()) == []
    assert log[0]["t"].shape == (B, N)  # still dual-timestep noise
    objective(make_batch(), student, None, torch.Generator().manual_seed(0))  # no teacher needed


def test_missing_teacher_and_wrong_backbone_raise() -> None:
    with pytest.raises(ValueError, match="teacher"):
        selfflow()(make_batch(), tiny_dit(), None, torch.Generator())
    with pytest.raises(ValueError, match="depth"):
        SelfFlowObjective(UniformTime(), hidden_dim=HIDDEN, depth=6, num_classes=CLASSES)(
            make_batch(), tiny_dit(), tiny_dit(), torch.Generator())
    with pytest.raises(ValueError, match="exactly one"):
        SelfFlowObjective(UniformTime(), DualTimestepScheduler(UniformTime()), hidden_dim=HIDDEN, depth=DEPTH)
    with pytest.raises(ValueError, match="attention_separation"):
        selfflow(attention_separation="teacher")


def test_inference_with_scalar_t_does_not_involve_the_projector() -> None:
    student, batch = tiny_dit(0), make_batch()
    objective = selfflow()
    t = torch.full((B,), 0.5)
    with torch.no_grad():
        before = student(batch.x0, t, batch.cond).velocity
        for parameter in objective.head.parameters():
            parameter.add_(1.0)
        after = student(batch.x0, t, batch.cond).velocity
    assert torch.equal(before, after)
    head_ids = {id(p) for p in objective.head.parameters()}
    assert head_ids.isdisjoint(id(p) for p in student.parameters())
    assert not any(key.startswith("head") for key in student.state_dict())


@pytest.mark.parametrize("separation", ["none", "student", "both"])
def test_attention_separation_passes_group_ids(separation: str) -> None:
    log: list = []
    student, teacher = Recorder(tiny_dit(0), "student", log), Recorder(tiny_dit(5), "teacher", log)
    objective = selfflow(attention_separation=separation)
    terms = objective(make_batch(), student, teacher, torch.Generator().manual_seed(9))
    assert torch.isfinite(terms.total())
    replay = torch.Generator().manual_seed(9)
    torch.rand(2 * B, generator=replay)
    groups = (torch.rand(B, N, generator=replay) < 0.25).long()
    calls = {call["who"]: call for call in log}  # in either order: the teacher may run on a second thread
    teacher_call, student_call = calls["teacher"], calls["student"]
    if separation == "none":
        assert student_call["attn_groups"] is None and teacher_call["attn_groups"] is None
    else:
        assert torch.equal(student_call["attn_groups"], groups)
        if separation == "both":
            assert torch.equal(teacher_call["attn_groups"], groups)
        else:
            assert teacher_call["attn_groups"] is None


def test_attention_separation_changes_the_student_output() -> None:
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    torch.manual_seed(0)  # identical heads
    plain = selfflow()(batch, student, teacher, torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    separated = selfflow(attention_separation="student")(batch, student, teacher, torch.Generator().manual_seed(9))
    assert torch.isfinite(separated.total())
    assert not torch.allclose(plain.terms["flow"], separated.terms["flow"])
    torch.testing.assert_close(plain.diagnostics["masked_fraction"], separated.diagnostics["masked_fraction"])


def test_rep_loss_variants() -> None:
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    torch.manual_seed(0)
    cosine = selfflow()(batch, student, teacher, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    l1 = selfflow(rep_loss="l1")(batch, student, teacher, torch.Generator().manual_seed(1))
    torch.testing.assert_close(cosine.terms["flow"], l1.terms["flow"])
    torch.testing.assert_close(cosine.diagnostics["rep_cosine"], l1.diagnostics["rep_cosine"])
    assert not torch.allclose(cosine.terms["rep"], l1.terms["rep"])
    with pytest.raises(ValueError, match="alignment loss"):
        selfflow(rep_loss="l2")


# ----- the teacher on a second thread -----------------------------------------------------------


def run_with_teacher_thread(mode: str, threads: int) -> tuple:
    """(loss terms, student and head gradients, sorted [(thread name, intra-op threads) per forward],
    threads after the call) of one Self-Flow loss + backward at `threads` intra-op threads."""
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    seen: list = []
    for model in (student, teacher):
        model.register_forward_hook(
            lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads())))
    objective = selfflow(teacher_thread=mode)
    objective.load_state_dict(randomised(selfflow(), 3).state_dict())  # one head for every mode
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        terms = objective(batch, student, teacher, torch.Generator().manual_seed(13))
        terms.total().backward()
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    grads = [p.grad for p in [*student.parameters(), *objective.head.parameters()]]
    assert all(p.grad is None for p in teacher.parameters())
    return terms, grads, sorted(seen), threads_after


@pytest.mark.parametrize("threads", [1, 2])
def test_teacher_thread_gives_bitwise_the_same_loss_and_gradients(threads: int) -> None:
    main = threading.main_thread().name
    inline = run_with_teacher_thread("never", threads)
    assert inline[2] == [(main, threads), (main, threads)]
    beside = run_with_teacher_thread("always", threads)
    # The student on the caller's thread, the teacher on the worker, both with the caller's threads.
    assert beside[2][0] == (main, threads)
    assert beside[2][1][0].startswith("selfflow-teacher") and beside[2][1][1] == threads
    assert beside[3] == threads
    for name in ("flow", "rep"):
        assert torch.equal(inline[0].terms[name], beside[0].terms[name])
    assert all(torch.equal(x, y) for x, y in zip(inline[1], beside[1]))


def test_auto_uses_the_thread_only_on_a_cpu_with_spare_threads(monkeypatch) -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert uses_teacher_thread("auto", cpu) and not uses_teacher_thread("auto", meta)
        # The decision reads the real thread count, never the environment.
        for policy in ("ACTIVE", "PASSIVE", ""):
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            assert uses_teacher_thread("auto", cpu)
        assert uses_teacher_thread("always", meta) and not uses_teacher_thread("never", cpu)
        # A dispatch mode (here a FLOP counter) would not see the worker's ops: inline, in every mode.
        with FlopCounterMode(display=False):
            assert not uses_teacher_thread("always", cpu) and not uses_teacher_thread("auto", cpu)
        torch.set_num_threads(1)  # a one-thread run keeps to one core
        assert not uses_teacher_thread("auto", cpu) and uses_teacher_thread("always", cpu)
    finally:
        torch.set_num_threads(previous)
    assert selfflow().teacher_thread == "never"  # off unless a config opts in (train/cpu_shared.gin)
    with pytest.raises(ValueError, match="teacher_thread must be one of"):
        selfflow(teacher_thread="yes")


def test_flop_count_includes_the_teacher_in_every_mode() -> None:
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    counts = []
    for mode in ("never", "always"):
        with FlopCounterMode(display=False) as counter:
            selfflow(teacher_thread=mode)(batch, student, teacher, torch.Generator().manual_seed(0))
        counts.append(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        selfflow(gamma=0.0)(batch, student, teacher, torch.Generator().manual_seed(0))
    assert counts[0] == counts[1] > counter.get_total_flops()


def test_the_worker_carries_autocast_and_the_thread_count() -> None:
    cpu = torch.device("cpu")
    previous = torch.get_num_threads()
    try:
        for threads in (3, 1, 2):
            torch.set_num_threads(threads)
            seen = start_teacher(lambda: torch.tensor(torch.get_num_threads()), "always", cpu).result()
            assert int(seen) == threads and torch.get_num_threads() == threads
        with torch.autocast("cpu", dtype=torch.bfloat16):
            product = start_teacher(lambda: torch.ones(4, 4) @ torch.ones(4, 4), "always", cpu).result()
        assert product.dtype == torch.bfloat16
        assert start_teacher(lambda: torch.ones(4, 4) @ torch.ones(4, 4), "always", cpu).result().dtype == torch.float32
    finally:
        torch.set_num_threads(previous)


def rep_with_teacher_precision(precision: str, mode: str = "never", autocast: bool = False) -> tuple:
    """(loss terms, (prediction dtype, target dtype) as the alignment loss sees them)."""
    student, teacher, batch = tiny_dit(0), tiny_dit(5), make_batch()
    objective = selfflow(teacher_precision=precision, teacher_thread=mode)
    objective.load_state_dict(randomised(selfflow(), 3).state_dict())
    seen: list = []
    alignment = objective.alignment
    objective.alignment = lambda prediction, target: (seen.append((prediction.dtype, target.dtype)),
                                                      alignment(prediction, target))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = objective(batch, student, teacher, torch.Generator().manual_seed(7))
    return terms, seen[0]


def test_a_bfloat16_teacher_gives_a_rounded_float32_target_on_either_thread() -> None:
    exact, exact_dtypes = rep_with_teacher_precision("float32")
    assert exact_dtypes == (torch.float32, torch.float32)
    for mode in ("never", "always"):
        rounded, dtypes = rep_with_teacher_precision("bfloat16", mode)
        assert dtypes == (torch.float32, torch.float32)
        assert torch.equal(rounded.terms["flow"], exact.terms["flow"])  # the student is untouched
        # Rounded (so the worker ran under the autocast too), but only slightly.
        assert not torch.equal(rounded.terms["rep"], exact.terms["rep"])
        torch.testing.assert_close(rounded.terms["rep"], exact.terms["rep"], rtol=2e-2, atol=2e-3)
    assert torch.equal(rep_with_teacher_precision("bfloat16", "always")[0].terms["rep"],
                       rep_with_teacher_precision("bfloat16", "never")[0].terms["rep"])


def test_under_the_trainers_autocast_the_teacher_precision_changes_nothing() -> None:
    exact, exact_dtypes = rep_with_teacher_precision("float32", autocast=True)
    rounded, dtypes = rep_with_teacher_precision("bfloat16", autocast=True)
    assert dtypes == exact_dtypes and torch.equal(rounded.terms["rep"], exact.terms["rep"])
    assert not torch.equal(exact.terms["rep"], rep_with_teacher_precision("float32")[0].terms["rep"])


def test_a_bad_teacher_precision_names_itself() -> None:
    with pytest.raises(ValueError, match="teacher_precision must be one of"):
        selfflow(teacher_precision="float16")
    objective = selfflow(teacher_precision="bfloat16")
    with pytest.raises(ValueError, match="teacher_precision 'bfloat16' runs on"):
        objective._start_teacher_features(tiny_dit(5), torch.zeros(B, N, P, device="meta"),
                                          torch.zeros(B, N, P, device="meta"), torch.zeros(B, device="meta"),
                                          None, None)


class SlowTeacher(BackboneWrapper):
    """A teacher that signals when it starts, takes a while, and notes when it is done."""

    def __init__(self, model: nn.Module, started: threading.Event, done: list) -> None:
        super().__init__(model)
        self.started, self.done = started, done

    def forward(self, *args, **kwargs):
        self.started.set()
        time.sleep(0.3)
        output = self.model(*args, **kwargs)
        self.done.append(True)
        return output


class StudentFailingOnceTheTeacherRuns(BackboneWrapper):
    def __init__(self, model: nn.Module, teacher_started: threading.Event) -> None:
        super().__init__(model)
        self.teacher_started = teacher_started

    def forward(self, *args, **kwargs):
        assert self.teacher_started.wait(timeout=30)
        raise RuntimeError("student failed")


def test_a_failing_student_waits_for_the_teacher_and_raises_its_own_error() -> None:
    started, done = threading.Event(), []
    with pytest.raises(RuntimeError, match="student failed"):
        selfflow(teacher_thread="always")(make_batch(), StudentFailingOnceTheTeacherRuns(tiny_dit(0), started),
                                          SlowTeacher(tiny_dit(5), started, done), torch.Generator().manual_seed(0))
    assert done == [True]  # the error waited for the running teacher forward


def test_teacher_errors_reach_the_caller() -> None:
    def broken() -> torch.Tensor:
        raise ValueError("teacher broke")

    with pytest.raises(ValueError, match="teacher broke"):
        start_teacher(broken, "always", torch.device("cpu")).result()


def _forked_child_uses_the_worker(queue) -> None:
    queue.put(int(start_teacher(lambda: torch.tensor(7), "always", torch.device("cpu")).result()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_gets_its_own_worker() -> None:
    start_teacher(lambda: torch.zeros(()), "always", torch.device("cpu")).result()  # the parent's worker exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_child_uses_the_worker, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child waited on its parent's worker thread")
    assert child.exitcode == 0 and queue.get(timeout=5) == 7


# ----- SRA --------------------------------------------------------------------------------------


def test_sra_teacher_time_is_within_gap_of_t() -> None:
    log: list = []
    student, teacher = Recorder(tiny_dit(0), "student", log), Recorder(tiny_dit(5), "teacher", log)
    objective = SRAObjective(UniformTime(), hidden_dim=HIDDEN, depth=DEPTH, num_classes=CLASSES)
    for seed in range(5):
        objective(make_batch(), student, teacher, torch.Generator().manual_seed(seed))
    teacher_t = torch.cat([call["t"] for call in log if call["who"] == "teacher"])
    student_t = torch.cat([call["t"] for call in log if call["who"] == "student"])
    assert student_t.shape == (5 * B, N)
    assert (student_t == student_t[:, :1]).all()  # mask off: one level per sample
    t = student_t[:, 0]
    gap = t - teacher_t
    assert (gap >= 0).all() and (gap <= 0.2 + 1e-6).all() and (teacher_t >= 0).all()
    assert gap.max() > 0.05
    assert objective.scheduler.mask_ratio == 0.0 and objective.scheduler.teacher_time == "sra"


# ----- REPA -------------------------------------------------------------------------------------


def tokens_to_images(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 16, 4) patch-2 tokens of 8x8 images -> (B, 1, 8, 8) in [0, 1] (test stand-in for decode)."""
    images = F.fold(tokens.transpose(1, 2), output_size=(8, 8), kernel_size=2, stride=2)
    return torch.sigmoid(images)


def test_repa_term_uses_the_clean_input_and_the_encoder_gets_no_gradient() -> None:
    model, batch = tiny_dit(0), make_batch()
    encoder = DigitEncoder("small", seed=3)
    seen: list[torch.Tensor] = []

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.clone())
        return tokens_to_images(tokens)

    objective = REPAObjective(UniformTime(), encoder, hidden_dim=HIDDEN, depth=DEPTH, num_classes=CLASSES,
                              head_hidden_width=16, encoder_input=decode)
    assert all(not p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert {id(p) for p in objective.parameters()} == {id(p) for p in objective.head.parameters()}
    assert not any(key.startswith("encoder") for key in objective.state_dict())

    terms = objective(batch, model, None, torch.Generator().manual_seed(13))
    terms.total().backward()
    assert len(seen) == 1 and torch.equal(seen[0], batch.x0)  # the clean tokens, not x_t
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in objective.head.parameters())

    replay = torch.Generator().manual_seed(13)
    t = torch.rand(B, generator=replay)
    eps = torch.randn(B, N, P, generator=replay)
    cond = replay_dropout(batch.cond, 0.1, replay)
    with torch.no_grad():
        features = encoder.encode_patches(tokens_to_images(batch.x0))  # grids match: 4x4
        out = model(interpolate(batch.x0, eps, t), t, cond, return_layers=(STUDENT_LAYER,))
        projected = objective.head(out.hidden[STUDENT_LAYER])
    torch.testing.assert_close(terms.terms["flow"], ((out.velocity - (eps - batch.x0)) ** 2).mean())
    torch.testing.assert_close(terms.terms["rep"], (1 - F.cosine_similarity(projected, features, dim=-1)).mean())
    assert terms.weights == {"flow": 1.0, "rep": 0.5}


def test_repa_and_flow_matching_share_their_noise() -> None:
    model, batch = tiny_dit(0), make_batch()
    repa = REPAObjective(UniformTime(), DigitEncoder("small"), hidden_dim=HIDDEN, depth=DEPTH,
                         num_classes=CLASSES, head_hidden_width=16, encoder_input=tokens_to_images)
    plain = FlowMatchingObjective(UniformTime(), num_classes=CLASSES)
    a = repa(batch, model, None, torch.Generator().manual_seed(5)).terms["flow"]
    b = plain(batch, model, None, torch.Generator().manual_seed(5)).terms["flow"]
    torch.testing.assert_close(a, b)


def test_repa_needs_encoder_input_and_matching_grid() -> None:
    objective = REPAObjective(UniformTime(), DigitEncoder("small"), hidden_dim=HIDDEN, depth=DEPTH,
                              num_classes=CLASSES, head_hidden_width=16)
    with pytest.raises(ValueError, match="encoder_input"):
        objective(make_batch(), tiny_dit(), None, torch.Generator())
    objective.encoder_input = tokens_to_images
    assert torch.isfinite(objective(make_batch(), tiny_dit(), None, torch.Generator()).total())
    objective.grid = (3, 3)  # 9 tokens, the batch has 16
    with pytest.raises(ValueError, match="grid"):
        objective(make_batch(), tiny_dit(), None, torch.Generator())


def run_repa_with_encoder_thread(mode: str, threads: int) -> tuple:
    """(loss terms, student and head gradients, names of the threads the encoder ran on)."""
    model, batch = tiny_dit(0), make_batch()
    threads_seen: list[str] = []

    def decode(tokens: torch.Tensor) -> torch.Tensor:  # runs right before the encoder, on its thread
        threads_seen.append(threading.current_thread().name)
        return tokens_to_images(tokens)

    objective = REPAObjective(UniformTime(), DigitEncoder("small", seed=3), hidden_dim=HIDDEN, depth=DEPTH,
                              num_classes=CLASSES, head_hidden_width=16, encoder_input=decode, encoder_thread=mode)
    randomised(objective.head, 3)  # the same head in every mode
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        terms = objective(batch, model, None, torch.Generator().manual_seed(13))
        terms.total().backward()
    finally:
        torch.set_num_threads(previous)
    grads = [p.grad for p in [*model.parameters(), *objective.head.parameters()]]
    return terms, grads, threads_seen


def test_repa_encoder_thread_gives_bitwise_the_same_loss_and_gradients() -> None:
    inline = run_repa_with_encoder_thread("never", 2)
    beside = run_repa_with_encoder_thread("always", 2)
    assert inline[2] == [threading.main_thread().name] and len(beside[2]) == 1
    assert beside[2][0].startswith("selfflow-teacher")
    for name in ("flow", "rep"):
        assert torch.equal(inline[0].terms[name], beside[0].terms[name])
    assert all(torch.equal(x, y) for x, y in zip(inline[1], beside[1]))
    with pytest.raises(ValueError, match="encoder_thread must be one of"):
        REPAObjective(UniformTime(), DigitEncoder("small"), hidden_dim=HIDDEN, depth=DEPTH, encoder_thread="on")


def repa_with_encoder_precision(precision: str, mode: str = "never", autocast: bool = False) -> tuple:
    """(loss terms, dtype of the encoder's output as the objective received it)."""
    received: list[torch.dtype] = []

    class RecordingEncoder(DigitEncoder):
        def encode_patches(self, images):
            features = super().encode_patches(images)
            received.append(features.dtype)
            return features

    objective = REPAObjective(UniformTime(), RecordingEncoder("small", seed=3), hidden_dim=HIDDEN, depth=DEPTH,
                              num_classes=CLASSES, head_hidden_width=16, encoder_input=tokens_to_images,
                              encoder_thread=mode, encoder_precision=precision)
    randomised(objective.head, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = objective(make_batch(), tiny_dit(0), None, torch.Generator().manual_seed(13))
    return terms, received[0]


def test_a_bfloat16_encoder_gives_a_rounded_target_on_either_thread() -> None:
    exact, exact_dtype = repa_with_encoder_precision("float32")
    assert exact_dtype == torch.float32 and exact.terms["rep"].dtype == torch.float32
    for mode in ("never", "always"):
        rounded, dtype = repa_with_encoder_precision("bfloat16", mode)
        assert dtype == torch.bfloat16  # the encoder ran under the autocast, on the worker too
        assert rounded.terms["rep"].dtype == torch.float32
        assert torch.equal(rounded.terms["flow"], exact.terms["flow"])  # the student is untouched
        assert not torch.equal(rounded.terms["rep"], exact.terms["rep"])
        torch.testing.assert_close(rounded.terms["rep"], exact.terms["rep"], rtol=2e-2, atol=2e-3)
    # Under the trainer's own autocast the encoder is lowered either way: the setting changes nothing.
    under_float32, dtype_float32 = repa_with_encoder_precision("float32", autocast=True)
    under_bfloat16, dtype_bfloat16 = repa_with_encoder_precision("bfloat16", autocast=True)
    assert dtype_float32 == dtype_bfloat16 == torch.bfloat16
    assert torch.equal(under_float32.terms["rep"], under_bfloat16.terms["rep"])


def test_a_bad_encoder_precision_names_itself() -> None:
    def build(precision):
        return REPAObjective(UniformTime(), DigitEncoder("small"), hidden_dim=HIDDEN, depth=DEPTH,
                             num_classes=CLASSES, head_hidden_width=16, encoder_input=tokens_to_images,
                             encoder_precision=precision)

    with pytest.raises(ValueError, match="encoder_precision must be one of"):
        build("float16")
    with pytest.raises(ValueError, match="encoder_precision 'bfloat16' runs on"):
        build("bfloat16").target_features(torch.zeros(B, N, P, device="meta"), (4, 4))


def test_repa_failing_student_waits_for_the_encoder_and_raises_its_own_error() -> None:
    started, done = threading.Event(), []

    class SlowEncoder(DigitEncoder):
        def encode_patches(self, images):
            started.set()
            time.sleep(0.3)
            features = super().encode_patches(images)
            done.append(True)
            return features

    objective = REPAObjective(UniformTime(), SlowEncoder("small", seed=3), hidden_dim=HIDDEN, depth=DEPTH,
                              num_classes=CLASSES, head_hidden_width=16, encoder_input=tokens_to_images,
                              encoder_thread="always")
    with pytest.raises(RuntimeError, match="student failed"):
        objective(make_batch(), StudentFailingOnceTheTeacherRuns(tiny_dit(0), started), None,
                  torch.Generator().manual_seed(0))
    assert done == [True]


def test_resize_token_grid() -> None:
    features = torch.randn(2, 16, 3)
    assert torch.equal(resize_token_grid(features, (4, 4), (4, 4)), features)
    constant = torch.ones(2, 16, 3) * torch.tensor([1.0, -2.0, 0.5])
    for target in ((2, 2), (8, 8), (3, 5)):
        resized = resize_token_grid(constant, (4, 4), target)
        assert resized.shape == (2, target[0] * target[1], 3)
        torch.testing.assert_close(resized, constant[:, :1].expand_as(resized))
    # 2x2 average pooling of a 4x4 map: antialiased shrinking averages the patches it covers.
    ramp = torch.arange(16.0).view(1, 16, 1)
    pooled = resize_token_grid(ramp, (4, 4), (2, 2)).flatten()
    assert pooled[0] < pooled[1] < pooled[2] < pooled[3]
    with pytest.raises(ValueError, match="grid"):
        resize_token_grid(features, (4, 4), (16,))
