"""diffusers-style ``enable_free_noise`` / ``enable_free_init`` for users coming from diffusers: thin aliases that set
the defaults of later calls which do not pass ``free_noise=`` / ``free_init=`` (``False`` turns them off for one
call). The options themselves are call arguments (see README, "Long videos")."""
from __future__ import annotations

from .free_init import FreeInit
from .free_noise import FreeNoise


class DiffusersLongVideoAliases:
    _free_noise_default: dict | None = None
    _free_init_default: dict | None = None
    _prompt_interpolation_default = None

    def enable_free_noise(self, context_length: int | None = 16, context_stride: int = 4,
                          weighting_scheme: str = "pyramid", noise_type: str = "shuffle_context",
                          prompt_interpolation_callback=None) -> None:
        options = dict(context_length=context_length, context_stride=context_stride,
                       weighting_scheme=weighting_scheme, noise_type=noise_type)
        native = self.motion_modules.config.pe_length if self.motion_modules is not None else 16
        FreeNoise.parse(options, native)  # refuse bad options now, as diffusers does
        self._free_noise_default = options
        self._prompt_interpolation_default = prompt_interpolation_callback

    def disable_free_noise(self) -> None:
        self._free_noise_default = None
        self._prompt_interpolation_default = None

    def enable_free_init(self, num_iters: int = 3, use_fast_sampling: bool = False, method: str = "butterworth",
                         order: int = 4, spatial_stop_frequency: float = 0.25,
                         temporal_stop_frequency: float = 0.25) -> None:
        options = dict(num_iters=num_iters, use_fast_sampling=use_fast_sampling, method=method, order=order,
                       spatial_stop_frequency=spatial_stop_frequency, temporal_stop_frequency=temporal_stop_frequency)
        FreeInit.parse(options)
        self._free_init_default = options

    def disable_free_init(self) -> None:
        self._free_init_default = None

    @property
    def free_noise_enabled(self) -> bool:
        return self._free_noise_default is not None

    @property
    def free_init_enabled(self) -> bool:
        return self._free_init_default is not None
