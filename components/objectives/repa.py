"""REPA: flow matching + alignment of projected student features to a frozen external encoder.

L = L_gen + weight * mean_tokens (1 - cos(head(h_student^(l)), f_enc(clean input)))
with f_enc the encoder's patch features of the CLEAN input, resized to the
student's token grid. The term is logged as "rep" (1 - cos, so it is >= 0; REPA's
"negative cosine" differs only by the constant 1).

The encoder sees images, the batch holds tokens: `encoder_input` maps clean tokens
(B, N, P) to the encoder's input images. The platform sets it to the tokenizer's
`decode` (constructor argument or attribute assignment before the first call).

The encoder is kept outside the module tree on purpose: it is frozen, so it has no
place in the optimizer or in checkpoints (DINOv2-B would add 350 MB to each); it
is moved to the batch's device on use.

The encoder's no-grad forward needs nothing from the student's, so on a CPU with spare
intra-op threads it can run on a second thread beside it (encoder_thread, off by default;
teacher_thread.py).

Draw order from the generator: t (B,), eps (B, N, P), label-dropout uniforms (B,)
(the same as FlowMatchingObjective, so both see identical noise for one seed).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.components.core import Batch, LossTerms
from selfflow.components.objectives.common import (
    check_generator,
    check_model_matches,
    check_num_classes,
    check_probability,
    cosine_alignment_loss,
    draw_noise,
    drop_labels,
    flow_matching_loss,
    resolve_layer,
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
from selfflow.components.schedules.dual import TimeDistribution


def resize_token_grid(features: torch.Tensor, source: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
    """(B, prod(source), C) features on a 1-D, 2-D or 3-D grid -> (B, prod(target), C), interpolated on the grid."""
    source, target = tuple(source), tuple(target)
    if features.dim() != 3 or features.shape[1] != math.prod(source):
        raise ValueError(f"features {tuple(features.shape)} do not lie on the grid {source}")
    if source == target:
        return features
    if len(source) != len(target) or len(source) not in (1, 2, 3):
        raise ValueError(f"cannot resize a token grid {source} to {target}: need two 1-D, 2-D or 3-D grids")
    batch, _, channels = features.shape
    maps = features.transpose(1, 2).reshape(batch, channels, *source).float()
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(source)]
    antialias = len(source) == 2 and any(t < s for s, t in zip(source, target))  # average when shrinking
    if len(source) == 3 and all(t <= s for s, t in zip(source, target)):
        resized = F.adaptive_avg_pool3d(maps, target)  # shrinking a clip grid: average what each cell covers
    else:
        resized = F.interpolate(maps, size=target, mode=mode, align_corners=False, antialias=antialias)
    return resized.reshape(batch, channels, -1).transpose(1, 2).to(features.dtype)


class REPAObjective(nn.Module):
    """REPA baseline; its only parameters are the projector head's.

    encoder: frozen PatchEncoder (`grid`, `feature_dim`, `encode_patches`); frozen here too.
    hidden_dim, depth: the backbone's. student_layer: depth ratio (float) or block index (int).
    weight: the "rep" weight (REPA: 0.5). head_kind / head_hidden_width: see ProjectorHead
    (REPA: three layers, width 2048).
    encoder_input: clean tokens (B, N, P) -> encoder images; the platform sets tokenizer.decode.
    grid: the student's token grid; None takes `model.grid` at call time.
    encoder_thread: "never" (default), "always" or "auto": run the encoder's forward on a second thread
        while the student's runs (teacher_thread.py; "auto": CPU with > 1 intra-op thread).
    encoder_precision: "float32" (REPA as written) or "bfloat16": the encoder's forward (the decode
        to images included) under bfloat16 autocast, its features cast back to the tokens' dtype
        (precision.py). A cheaper, rounded target for a large encoder (DINOv2); a no-op under the
        trainer's own autocast.
    """

    def __init__(
        self,
        time_dist: TimeDistribution,
        encoder: nn.Module,
        *,
        hidden_dim: int,
        depth: int,
        student_layer: float | int = 0.3,
        weight: float = 0.5,
        head_kind: str = "repa",
        head_hidden_width: int | None = None,
        label_dropout: float = 0.1,
        num_classes: int = 0,
        encoder_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        grid: tuple[int, ...] | None = None,
        encoder_thread: str = "never",
        encoder_precision: str = "float32",
    ) -> None:
        super().__init__()
        if not callable(getattr(time_dist, "sample", None)):
            raise TypeError(f"time_dist must have sample(shape, generator), got {type(time_dist).__name__}")
        for name in ("encode_patches", "grid", "feature_dim"):
            if not hasattr(encoder, name):
                raise TypeError(f"encoder must have {name} (a PatchEncoder), got {type(encoder).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if encoder_input is not None and not callable(encoder_input):
            raise TypeError(f"encoder_input must be callable (tokens -> images), got {encoder_input!r}")
        if isinstance(encoder, nn.Module):
            encoder.requires_grad_(False)
            encoder.eval()
        object.__setattr__(self, "encoder", encoder)  # not a submodule: see the module docstring
        self.time_dist = time_dist
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.student_layer = resolve_layer(student_layer, depth, "student_layer")
        self.weight = float(weight)
        self.label_dropout = check_probability("label_dropout", label_dropout)
        self.num_classes = check_num_classes(num_classes)
        self.encoder_input = encoder_input
        self.grid = tuple(grid) if grid is not None else None
        self.encoder_thread = check_teacher_thread_mode(encoder_thread, "encoder_thread")
        self.encoder_precision = check_target_precision(encoder_precision, "encoder_precision")
        self.path = LinearPath()
        self.head = ProjectorHead(hidden_dim, int(encoder.feature_dim), head_kind, head_hidden_width)

    def extra_repr(self) -> str:
        return (f"student_layer={self.student_layer}, weight={self.weight}, "
                f"encoder={type(self.encoder).__name__}(grid={tuple(self.encoder.grid)}), "
                f"encoder_thread={self.encoder_thread!r}, encoder_precision={self.encoder_precision!r}")

    def _student_grid(self, model: nn.Module, num_tokens: int) -> tuple[int, ...]:
        grid = self.grid or getattr(model, "grid", None)
        if grid is None:
            raise ValueError("REPAObjective needs the student's token grid: set grid= or use a model with .grid")
        grid = tuple(grid)
        if math.prod(grid) != num_tokens:
            raise ValueError(f"student grid {grid} has {math.prod(grid)} tokens but the batch has {num_tokens}")
        return grid

    def _check_encoder_input(self) -> None:
        if self.encoder_input is None:
            raise ValueError("REPAObjective.encoder_input is not set: the platform must set it to the "
                             "tokenizer's decode (clean tokens -> encoder images)")

    def target_features(self, x0: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Encoder patch features of the clean tokens, on the student's grid, without gradients."""
        self._check_encoder_input()
        check_target_device(self.encoder_precision, x0.device, "encoder_precision")
        if isinstance(self.encoder, nn.Module):
            reference = next(iter(self.encoder.parameters()), None)
            if reference is not None and reference.device != x0.device:
                self.encoder.to(x0.device)
        with torch.no_grad(), target_precision(self.encoder_precision, x0.device.type) as lowered:
            features = self.encoder.encode_patches(self.encoder_input(x0.detach()))
        if lowered:
            features = features.to(x0.dtype)
        return resize_token_grid(features, tuple(self.encoder.grid), grid).detach()

    def forward(self, batch: Batch, model: nn.Module, teacher: nn.Module | None,
                generator: torch.Generator) -> LossTerms:
        del teacher  # REPA's target is the external encoder
        check_generator(generator)
        check_model_matches(model, self.hidden_dim, self.depth, self.num_classes)
        x0 = batch.x0
        if x0.dim() != 3:
            raise ValueError(f"batch.x0 must be tokens (B, N, P), got {tuple(x0.shape)}")
        grid = self._student_grid(model, x0.shape[1])
        t = self.time_dist.sample((x0.shape[0],), generator).to(device=x0.device, dtype=torch.float32)
        eps = draw_noise(x0, generator)
        cond = drop_labels(batch.cond, self.label_dropout, self.num_classes, generator)
        self._check_encoder_input()  # before the thread starts: the errors belong to this call
        check_target_device(self.encoder_precision, x0.device, "encoder_precision")
        pending_target = start_teacher(lambda: self.target_features(x0, grid), self.encoder_thread, x0.device)

        l = self.student_layer
        with waits_for_teacher_on_error(pending_target):
            student = model(self.path.interpolate(x0, eps, t), t, cond, return_layers=(l,))
        projected = self.head(student.hidden[l])
        rep = cosine_alignment_loss(projected, pending_target.result().to(projected.dtype))
        return LossTerms(
            terms={"flow": flow_matching_loss(student.velocity, self.path.velocity_target(x0, eps)), "rep": rep},
            weights={"flow": 1.0, "rep": self.weight},
            # The mean cosine is 1 - the loss: no second pass over the features.
            diagnostics={"t_mean": t.mean().detach(), "rep_cosine": 1.0 - rep.detach()},
        )
