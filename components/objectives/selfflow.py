"""Self-Flow: Dual-Timestep Scheduling + alignment to an EMA teacher (and SRA as its special case).

One call (docs/method.md):
  draws from the scheduler: per-token student levels tau_i, the teacher level;
  eps drawn once; label dropout decided once (student and teacher see the same labels);
  teacher (EMA backbone, no grad) sees ALL tokens at the teacher level with the same x0 and eps,
    and starts FIRST, only up to block k when early_exit (its output is only a target; running it
    before the student's graph exists is faster, see docs/performance.md); on a CPU with
    spare intra-op threads it runs on a second thread while the student's forward runs
    (teacher_thread.py);
  student sees x_tau token-wise and returns block l;
  L = L_gen + gamma * L_rep, L_rep = mean_tokens (1 - cos(head(h_s^l), stopgrad(h_t^k))).
Draw order from the generator: the scheduler's draws, eps (B, N, P), label-dropout uniforms (B,).
"""
from __future__ import annotations

import math
from concurrent.futures import Future

import torch
from torch import nn

from selfflow.components.core import Batch, LossTerms
from selfflow.components.objectives.common import (
    alignment_loss,
    check_generator,
    check_model_matches,
    check_num_classes,
    check_probability,
    draw_noise,
    drop_labels,
    flow_matching_loss,
    resolve_layer,
    token_cosine,
)
from selfflow.components.objectives.heads import ProjectorHead
from selfflow.components.objectives.precision import (
    check_target_device,
    check_target_precision,
    target_precision,
)
from selfflow.components.objectives.teacher_thread import (
    check_teacher_thread_mode,
    start_teacher,
    waits_for_teacher_on_error,
)
from selfflow.components.paths.linear import LinearPath
from selfflow.components.schedules.dual import DualTimesteps, DualTimestepScheduler, TimeDistribution

ATTENTION_SEPARATIONS = ("none", "student", "both")


class SelfFlowObjective(nn.Module):
    """Self-Flow objective; its only parameters are the projector head's.

    time_dist / scheduler: give exactly one. The scheduler owns p(t); with only
        time_dist, the default DualTimestepScheduler(time_dist) (R_M = 0.25) is built.
    hidden_dim, depth: the backbone's (checked against model and teacher at call time).
    gamma: weight of the "rep" term; 0 means DTS only: no head, no teacher forward.
    student_layer, teacher_layer: depth ratio (float) or 1-based block index (int).
    head_kind, head_hidden_width: see ProjectorHead.
    rep_loss: "cosine" (the method), "l1" or "smooth_l1" (ablations).
    label_dropout, num_classes: CFG training; the null class is num_classes.
    attention_separation: "none"; "student": the mask's two noise groups may not attend to each
        other in the student; "both": in the teacher too (group ids = mask).
    early_exit: run the teacher only up to block k.
    teacher_thread: "never" (default), "always" or "auto": run the teacher's forward on a second thread,
        at the same time as the student's (teacher_thread.py; "auto": CPU with > 1 intra-op thread).
    teacher_precision: "float32" (the method as written) or "bfloat16": the teacher's forward under
        bfloat16 autocast, its features cast back to the input's dtype. A cheaper target, not the
        same one (how far it moves: bench/studies/teacher_precision.py). Faster only on a CPU or GPU
        with native bfloat16 matmuls (docs/performance.md); where they are emulated it is slower.
        Under the trainer's own bf16 autocast the teacher runs that way whatever this says.
    """

    def __init__(
        self,
        time_dist: TimeDistribution | None = None,
        scheduler: DualTimestepScheduler | None = None,
        *,
        hidden_dim: int,
        depth: int,
        gamma: float = 0.8,
        student_layer: float | int = 0.3,
        teacher_layer: float | int = 0.7,
        head_kind: str = "two_layer",
        head_hidden_width: int | None = None,
        rep_loss: str = "cosine",
        label_dropout: float = 0.1,
        num_classes: int = 0,
        attention_separation: str = "none",
        early_exit: bool = True,
        teacher_thread: str = "never",
        teacher_precision: str = "float32",
    ) -> None:
        super().__init__()
        if (time_dist is None) == (scheduler is None):
            raise ValueError("give SelfFlowObjective exactly one of time_dist or scheduler "
                             "(the scheduler owns p(t))")
        if scheduler is None:
            scheduler = DualTimestepScheduler(time_dist)
        if not callable(getattr(scheduler, "sample", None)):
            raise TypeError(f"scheduler must have sample(batch_size, num_tokens, generator), "
                            f"got {type(scheduler).__name__}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if attention_separation not in ATTENTION_SEPARATIONS:
            raise ValueError(f"attention_separation must be one of {ATTENTION_SEPARATIONS}, "
                             f"got {attention_separation!r}")
        if not isinstance(early_exit, bool):
            raise TypeError(f"early_exit must be a bool, got {early_exit!r}")
        self.scheduler = scheduler
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.gamma = float(gamma)
        self.student_layer = resolve_layer(student_layer, depth, "student_layer")
        self.teacher_layer = resolve_layer(teacher_layer, depth, "teacher_layer")
        self.rep_loss = rep_loss
        self.alignment = alignment_loss(rep_loss)
        self.label_dropout = check_probability("label_dropout", label_dropout)
        self.num_classes = check_num_classes(num_classes)
        self.attention_separation = attention_separation
        self.early_exit = early_exit
        self.teacher_thread = check_teacher_thread_mode(teacher_thread)
        self.teacher_precision = check_target_precision(teacher_precision, "teacher_precision")
        self.path = LinearPath()
        # gamma = 0 trains no head: no unused parameters (DDP would complain) and no teacher.
        self.head = (ProjectorHead(hidden_dim, hidden_dim, head_kind, head_hidden_width)
                     if self.gamma > 0 else None)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, student_layer={self.student_layer}, teacher_layer={self.teacher_layer}, "
                f"rep_loss={self.rep_loss!r}, attention_separation={self.attention_separation!r}, "
                f"early_exit={self.early_exit}, teacher_thread={self.teacher_thread!r}, "
                f"teacher_precision={self.teacher_precision!r}, "
                f"scheduler={self.scheduler!r}")

    def _start_teacher_features(self, teacher: nn.Module | None, x0: torch.Tensor, eps: torch.Tensor,
                                teacher_t: torch.Tensor, cond: torch.Tensor | None,
                                groups: torch.Tensor | None) -> Future:
        """The future of the teacher's block-k features (see teacher_thread.py)."""
        if teacher is None:
            raise ValueError("SelfFlowObjective needs the EMA teacher but got teacher=None "
                             "(gamma=0 runs without one)")
        check_model_matches(teacher, self.hidden_dim, self.depth, self.num_classes, role="teacher")
        k = self.teacher_layer
        device_type = x0.device.type
        check_target_device(self.teacher_precision, x0.device, "teacher_precision")

        def compute() -> torch.Tensor:
            with torch.no_grad(), target_precision(self.teacher_precision, device_type) as lowered:
                output = teacher(
                    self.path.interpolate(x0, eps, teacher_t), teacher_t, cond,
                    return_layers=(k,), stop_at=k if self.early_exit else None,
                    attn_groups=groups if self.attention_separation == "both" else None,
                )
            features = output.hidden[k].detach()
            return features.to(x0.dtype) if lowered else features

        return start_teacher(compute, self.teacher_thread, x0.device)

    def forward(self, batch: Batch, model: nn.Module, teacher: nn.Module | None,
                generator: torch.Generator) -> LossTerms:
        check_generator(generator)
        check_model_matches(model, self.hidden_dim, self.depth, self.num_classes)
        x0 = batch.x0
        if x0.dim() != 3:
            raise ValueError(f"batch.x0 must be tokens (B, N, P), got {tuple(x0.shape)}")
        # A mixture's batch names its modality (per-modality mask ratios); other batches pass nothing.
        by_modality = {"modality": batch.modality} if batch.modality is not None else {}
        draws: DualTimesteps = self.scheduler.sample(x0.shape[0], x0.shape[1], generator,
                                                     **by_modality).to(x0.device)
        eps = draw_noise(x0, generator)
        cond = drop_labels(batch.cond, self.label_dropout, self.num_classes, generator)
        groups = draws.mask.long() if self.attention_separation != "none" else None

        aligning = self.gamma > 0
        pending_target = (self._start_teacher_features(teacher, x0, eps, draws.teacher_t, cond, groups)
                          if aligning else None)

        l = self.student_layer
        with waits_for_teacher_on_error(pending_target):
            student = model(self.path.interpolate(x0, eps, draws.token_t), draws.token_t, cond,
                            return_layers=(l,) if aligning else (), attn_groups=groups)
        terms = {"flow": flow_matching_loss(student.velocity, self.path.velocity_target(x0, eps))}
        weights = {"flow": 1.0}
        diagnostics = {
            "masked_fraction": draws.mask.float().mean(),
            "t_s_gap": (draws.t - draws.s).abs().mean(),
            "t_mean": draws.token_t.float().mean(),
            "teacher_t_mean": draws.teacher_t.float().mean(),
            # How much cleaner the teacher's input is than the student's, averaged over tokens.
            "teacher_gap": (draws.token_t - draws.teacher_t.reshape(x0.shape[0], -1)).float().mean(),
        }
        if aligning:
            target_features = pending_target.result()
            projected = self.head(student.hidden[l])
            terms["rep"] = self.alignment(projected, target_features)
            weights["rep"] = self.gamma
            # With the cosine loss the mean cosine is 1 - the loss: no second pass over the features.
            diagnostics["rep_cosine"] = (1.0 - terms["rep"] if self.rep_loss == "cosine"
                                         else token_cosine(projected.detach(), target_features).float().mean())
        return LossTerms(terms=terms, weights=weights,
                         diagnostics={name: value.detach() for name, value in diagnostics.items()})


class SRAObjective(SelfFlowObjective):
    """SRA = Self-Flow with the mask off and the teacher at t - U[0, sra_gap] (clipped at 0).

    All student tokens share one level t ~ p(t); every other knob is Self-Flow's.
    """

    def __init__(
        self,
        time_dist: TimeDistribution,
        *,
        hidden_dim: int,
        depth: int,
        sra_gap: float = 0.2,
        gamma: float = 0.8,
        student_layer: float | int = 0.3,
        teacher_layer: float | int = 0.7,
        head_kind: str = "two_layer",
        head_hidden_width: int | None = None,
        rep_loss: str = "cosine",
        label_dropout: float = 0.1,
        num_classes: int = 0,
        early_exit: bool = True,
        teacher_thread: str = "never",
        teacher_precision: str = "float32",
    ) -> None:
        scheduler = DualTimestepScheduler(time_dist, mask_ratio=0.0, teacher_time="sra", sra_gap=sra_gap)
        super().__init__(
            scheduler=scheduler, hidden_dim=hidden_dim, depth=depth, gamma=gamma,
            student_layer=student_layer, teacher_layer=teacher_layer, head_kind=head_kind,
            head_hidden_width=head_hidden_width, rep_loss=rep_loss, label_dropout=label_dropout,
            num_classes=num_classes, attention_separation="none", early_exit=early_exit,
            teacher_thread=teacher_thread, teacher_precision=teacher_precision,
        )
