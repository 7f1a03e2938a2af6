"""What the UNet is conditioned on, and how one context window takes its share."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """Per-clip conditioning. ``context`` is (n_cond, tokens, dim) when every frame shares it, or
    (n_cond, num_frames, tokens, dim) per frame (prompt travel); ``y`` (SDXL's pooled text + time ids) likewise
    (n_cond, adm) or (n_cond, num_frames, adm). Under classifier-free guidance n_cond = 2: index 0 is the negative
    (unconditional) clip, 1 the positive one."""

    context: torch.Tensor
    y: torch.Tensor | None = None
    _shared: dict[int, tuple] = field(default_factory=dict, repr=False)

    @property
    def n_cond(self) -> int:
        return self.context.shape[0]

    @property
    def per_frame(self) -> bool:
        return self.context.ndim == 4

    def with_tokens(self, tokens: torch.Tensor) -> "Conditioning":
        """Extra tokens appended on the token axis (image-prompt tokens): ``tokens`` (n_cond, n, dim)."""
        if self.per_frame:
            tokens = tokens[:, None].expand(-1, self.context.shape[1], -1, -1)
        return Conditioning(torch.cat([self.context, tokens.to(self.context.dtype)], dim=-2), self.y)

    def window(self, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's (n_cond * len(frames), tokens, dim) context and y for one window, clip-major (every frame of
        clip 0, then clip 1). Shared conditioning is repeated once per window length and kept."""
        if not self.per_frame:
            length = len(frames)
            if length not in self._shared:
                self._shared[length] = (self.context.repeat_interleave(length, dim=0),
                                        None if self.y is None else self.y.repeat_interleave(length, dim=0))
            return self._shared[length]
        index = torch.as_tensor(frames, device=self.context.device)
        context = self.context[:, index].flatten(0, 1)
        if self.y is None:
            return context, None
        return context, (self.y[:, index].flatten(0, 1) if self.y.ndim == 3
                         else self.y.repeat_interleave(len(frames), dim=0))
