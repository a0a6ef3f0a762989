"""One DiT trunk shared by several modalities (image, audio, video tokens in one model).

The transformer blocks, the timestep and label embedders and every adaLN layer are shared.
Each modality has its own input projection, position embedding (its own grid) and output
layer, and a learned modality embedding added to the conditioning vector, so the shared
modulation knows which kind of token it is shaping.

A batch holds one modality, recognised by its token layout (N, P): samplers and objectives
call the model exactly as a single-modality DiT, so every objective, sampler and probe works
unchanged. The layouts must therefore differ between modalities; the constructor checks it.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
from torch import nn

from selfflow.components.backbones.dit import DiT, FinalLayer, TokenRoute
from selfflow.components.backbones.embeddings import sincos_position_embedding

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def modality_layouts(layouts: Mapping[str, tuple[int, Sequence[int]]]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Validated {name: (token dim P, grid)} in sorted name order; the token counts N = prod(grid)
    and dims together must tell the modalities apart."""
    if not layouts:
        raise ValueError("layouts must name at least one modality")
    checked: dict[str, tuple[int, tuple[int, ...]]] = {}
    seen: dict[tuple[int, int], str] = {}
    for name in sorted(layouts):
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"modality name {name!r} must be lowercase letters, digits and _ (e.g. 'audio')")
        in_dim, grid = layouts[name]
        grid = tuple(int(side) for side in grid)
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1 or not grid or min(grid) < 1:
            raise ValueError(f"modality {name!r}: layout must be (token dim >= 1, grid of positive sides), "
                             f"got {layouts[name]!r}")
        key = (math.prod(grid), in_dim)
        if key in seen:
            raise ValueError(f"modalities {seen[key]!r} and {name!r} both give {key[0]} tokens of dim {key[1]}: "
                             "the model tells modalities apart by token layout, so they must differ")
        seen[key] = name
        checked[name] = (in_dim, grid)
    return checked


class MultiModalDiT(DiT):
    """DiT whose input projection, position embedding and output layer are chosen per modality.

    layouts: {modality name: (token dim P, token grid)}, e.g. {'image': (4, (4, 4)),
    'audio': (80, (64,))}. Everything else is DiT's. With one modality and a zero modality
    embedding it computes exactly what a DiT with the same weights computes.
    """

    def __init__(
        self,
        layouts: Mapping[str, tuple[int, Sequence[int]]],
        hidden_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        gathered_modulation: bool = True,
        qk_norm: bool = False,
        mlp_activation: str = "gelu_tanh",
        attention_kernel: str = "sdpa",
    ) -> None:
        checked = modality_layouts(layouts)
        first_dim, first_grid = next(iter(checked.values()))
        super().__init__(first_dim, first_grid, hidden_dim, depth, num_heads, mlp_ratio=mlp_ratio,
                         num_classes=num_classes, gathered_modulation=gathered_modulation, qk_norm=qk_norm,
                         mlp_activation=mlp_activation, attention_kernel=attention_kernel)
        # The single-layout layers DiT built are replaced by one set per modality.
        del self.input_projection, self.final_layer, self.position_embedding
        # DiT's single-layout attributes would name the first modality only: here they name none.
        self.in_dim = self.grid = self.num_tokens = None
        self.modalities = tuple(checked)
        self.layouts = checked
        self.input_projections = nn.ModuleDict({name: nn.Linear(dim, hidden_dim) for name, (dim, _) in checked.items()})
        self.final_layers = nn.ModuleDict({name: FinalLayer(hidden_dim, dim) for name, (dim, _) in checked.items()})
        for name, (_, grid) in checked.items():
            self.register_buffer(f"position_embedding_{name}", sincos_position_embedding(grid, hidden_dim),
                                 persistent=False)
        self.modality_embedding = nn.Embedding(len(checked), hidden_dim)
        self._by_layout = {(math.prod(grid), dim): name for name, (dim, grid) in checked.items()}
        self.reset_parameters()

    def final_layers_all(self) -> list[FinalLayer]:
        # Called from DiT.__init__ (through reset_parameters) before the per-modality layers exist.
        if "final_layers" not in self._modules:
            return super().final_layers_all()
        return list(self.final_layers.values())

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if "modality_embedding" in self._modules:
            nn.init.normal_(self.modality_embedding.weight, std=0.02, generator=generator)

    def modality_of(self, x: torch.Tensor) -> str:
        """The modality whose token layout x (B, N, P) has."""
        name = self._by_layout.get(tuple(x.shape[1:])) if x.dim() == 3 else None
        if name is None:
            known = ", ".join(f"{n}: (B, {math.prod(g)}, {d})" for n, (d, g) in self.layouts.items())
            raise ValueError(f"x of shape {tuple(x.shape)} matches no modality of this model ({known})")
        return name

    def route(self, x: torch.Tensor) -> TokenRoute:
        name = self.modality_of(x)
        index = self.modalities.index(name)
        return TokenRoute(
            num_tokens=x.shape[1],
            input_projection=self.input_projections[name],
            position_embedding=getattr(self, f"position_embedding_{name}"),
            final_layer=self.final_layers[name],
            condition_offset=self.modality_embedding.weight[index],
        )
