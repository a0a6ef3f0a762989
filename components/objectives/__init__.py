"""Training objectives: batch + model (+ EMA teacher) + generator -> named loss terms.

FlowMatchingObjective (vanilla), SelfFlowObjective (Dual-Timestep Scheduling + EMA
teacher alignment), SRAObjective (Self-Flow with the mask off and the teacher at
t - U[0, gap]), REPAObjective (alignment to a frozen external encoder).
Each is an nn.Module whose parameters are only its projector head's.
"""
from selfflow.components.objectives.common import (
    ALIGNMENT_LOSSES,
    alignment_loss,
    cosine_alignment_loss,
    draw_noise,
    drop_labels,
    l1_alignment_loss,
    resolve_layer,
    smooth_l1_alignment_loss,
)
from selfflow.components.objectives.flow_matching import FlowMatchingObjective
from selfflow.components.objectives.heads import HEAD_KINDS, ProjectorHead
from selfflow.components.objectives.repa import REPAObjective, resize_token_grid
from selfflow.components.objectives.selfflow import ATTENTION_SEPARATIONS, SelfFlowObjective, SRAObjective

__all__ = [
    "ALIGNMENT_LOSSES", "ATTENTION_SEPARATIONS", "HEAD_KINDS", "FlowMatchingObjective", "ProjectorHead",
    "REPAObjective", "SRAObjective", "SelfFlowObjective", "alignment_loss", "cosine_alignment_loss",
    "draw_noise", "drop_labels", "l1_alignment_loss", "resize_token_grid", "resolve_layer",
    "smooth_l1_alignment_loss",
]
