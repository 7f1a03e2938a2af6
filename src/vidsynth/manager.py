"""ModelManager: checkpoint files -> modules on the chosen device and dtype (DiffSynth-compatible surface)."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .checkpoints import Checkpoint, CheckpointInfo, Component, identify
from .errors import CheckpointError, ConfigError

VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}
CONTROLNET_EXAMPLES = {"sd15": "e.g. control_v11p_sd15_lineart.pth",
                       "sdxl": "e.g. xinsir's diffusion_pytorch_model_promax.safetensors"}
logger = logging.getLogger(__name__)


def build_component(ckpt: Checkpoint, component: Component, *, dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """Build the module of ``component`` on the meta device and fill it from the file, strictly."""
    with torch.device("meta"):
        module = _constructor(component)(component.config)
    expected = module.state_dict()
    stored = {k[len(component.prefix):] for k in ckpt.shapes if k.startswith(component.prefix)}
    # some SD 1.5 files drop the constant position_ids buffer: rebuilt below
    filled = {k for k in expected if k.endswith("position_ids") and k not in stored}
    missing = sorted(set(expected) - stored - filled)
    unexpected = sorted(stored - set(expected))
    if missing or unexpected:  # checked on the key sets, before any tensor is read
        raise CheckpointError(
            f"{ckpt.path}: the {component.name} weights under {component.prefix or 'the top level'!r} do not match the "
            f"model read off their shapes: {len(missing)} missing ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}), {len(unexpected)} unexpected ({', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''})")
    state = ckpt.state_dict(component.prefix, dtype=dtype, device=device)
    for key in filled:
        state[key] = torch.arange(expected[key].shape[-1], device=device).expand(expected[key].shape)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{ckpt.path}: {component.name} weights do not fit: {err}") from None
    return module.eval().requires_grad_(False)


def _constructor(component: Component):
    if component.name == "unet":
        from .models.unet import UNetModel
        return UNetModel
    if component.name == "vae":
        from .models.vae import AutoencoderKL
        return AutoencoderKL
    if component.name in ("text_encoder", "text_encoder_2"):
        from .models.text import CLIPTextModel, OpenCLIPTextModel
        return OpenCLIPTextModel if component.config.layout == "open_clip" else CLIPTextModel
    if component.name == "motion_modules":
        from .models.motion import MotionModuleSet
        return MotionModuleSet
    if component.name == "image_encoder":
        from .models.vision import CLIPVisionModelWithProjection
        return CLIPVisionModelWithProjection
    if component.name == "ip_adapter":
        from .ip_adapter import IPAdapter
        return IPAdapter
    if component.name == "sparsectrl":
        from .models.sparsectrl import SparseControlNet
        return SparseControlNet
    if component.name == "controlnet":
        from .models.controlnet import build_controlnet
        return build_controlnet
    raise CheckpointError(f"no model class for component {component.name!r}")


class ModelManager:
    """Loads checkpoint files as they are and holds the resulting modules.

    ``ModelManager(torch_dtype=torch.float16, device="cuda").load_models([base_file, motion_module_file])``
    """

    def __init__(self, torch_dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                 file_path_list: Iterable[str | Path] = ()):
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ConfigError(f"torch_dtype must be a floating-point torch dtype such as torch.float16, torch.bfloat16 "
                              f"or torch.float32, got {torch_dtype!r}")
        self.torch_dtype = torch_dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but CUDA is not available here; use device='cpu' "
                              "(with torch_dtype=torch.float32) or install a CUDA build of PyTorch")
        self.models: dict[str, nn.Module] = {}
        self.infos: dict[str, CheckpointInfo] = {}
        self.family: str | None = None
        self.loras: list = []
        self.controlnets: dict[Path, nn.Module] = {}  # by resolved file path: several can be loaded at once
        self.textual_inversions: list[Path] = []
        self.load_models(list(file_path_list))

    # ------------------------------------------------------------------------------------------------ loading
    def load_models(self, file_path_list: Iterable[str | Path], *, motion_version: str | None = None) -> None:
        for path in file_path_list:
            self.load_model(path, motion_version=motion_version)

    def load_model(self, path: str | Path, *, motion_version: str | None = None) -> CheckpointInfo:
        ckpt = Checkpoint(path)
        info = identify(ckpt, motion_version=motion_version)
        if info.kind.startswith("lora") or info.kind in ("motion_lora", "domain_adapter"):
            self.load_lora(ckpt)  # the file is open already: not read a second time
            return info
        self._check_image_prompt(info)
        self._check_family(info)
        self._detach_loras_of({c.name for c in info.components if c.name in self.models})
        for component in info.components:
            family = info.family or self.family or "sd15"
            module = build_component(ckpt, component, dtype=self._dtype_for(component, family), device=self.device)
            if component.name == "vae":
                module.scaling_factor = VAE_SCALING[family]
            if component.name == "controlnet":
                self.controlnets[Path(path).resolve()] = module
                continue
            self.models[component.name] = module
            self.infos[component.name] = info
        if info.family and info.kind != "motion_module":
            self.family = info.family
        return info

    def _detach_loras_of(self, replaced: set[str]) -> None:
        """LoRAs on a model about to be replaced would keep hooks on the old one: take them off, and say so."""
        for lora in [lora for lora in self.loras if any(layer.target.component in replaced for layer in lora.layers)]:
            self.remove_lora(lora)
            logger.warning("removed LoRA %s: the %s it was applied to was replaced; load it again if still wanted",
                           lora.name, "/".join(sorted(replaced)))

    def _dtype_for(self, component: Component, family: str) -> torch.dtype:
        # the SDXL VAE overflows in float16 (black / NaN frames); at 84M parameters float32 costs little
        if component.name == "vae" and family == "sdxl" and self.torch_dtype == torch.float16:
            return torch.float32
        return self.torch_dtype

    def _check_image_prompt(self, info: CheckpointInfo) -> None:
        """IP-Adapter vs UNet (base) and vs image encoder (embedding width), whichever arrives second; before any
        tensor is read."""
        from .ip_adapter import check_base, check_image_encoder

        def held(name: str, file_info: CheckpointInfo | None = None):
            info_ = file_info if file_info is not None else self.infos.get(name)
            component = info_ and info_.component(name)
            return (component.config, info_.path) if component else (None, None)

        adapter, adapter_path = held("ip_adapter", info if info.kind == "ip_adapter" else None)
        if adapter is None:
            return
        unet, _ = held("unet", info if info.component("unet") else None)
        if unet is not None:
            check_base(adapter, unet, str(adapter_path))
        encoder, encoder_path = held("image_encoder", info if info.kind == "image_encoder" else None)
        if encoder is not None:
            check_image_encoder(adapter, encoder, str(adapter_path), str(encoder_path))

    def _check_family(self, info: CheckpointInfo) -> None:
        if info.kind == "motion_module" and self.family and info.family != self.family:
            raise ConfigError(f"{info.path}: a motion module for {info.family} cannot drive the {self.family} model "
                              f"already loaded; load a {self.family} motion module")
        if info.kind == "controlnet" and self.family and info.family != self.family:
            raise ConfigError(f"{info.path}: this is a {info.family} ControlNet and cannot control the "
                              f"{self.family} UNet loaded; use a {self.family} ControlNet "
                              f"({CONTROLNET_EXAMPLES[self.family]})")
        if info.kind != "motion_module" and self.family and info.family and info.family != self.family:
            raise ConfigError(f"{info.path}: a {info.family} model cannot join the {self.family} models this "
                              "ModelManager holds (their text encoders, VAE scale and UNet differ); use a new "
                              "ModelManager for it")
        base_family = self.infos.get("motion_modules") and self.infos["motion_modules"].family
        if info.kind != "motion_module" and base_family and info.family and info.family != base_family:
            raise ConfigError(f"{info.path}: a {info.family} model does not fit the {base_family} motion module "
                              "already loaded")

    def load_textual_inversions(self, paths) -> list[Path]:
        """Embedding files (or folders of them) that every pipeline made from this manager loads, each as the word
        of its file name (DiffSynth's call; see vidsynth.textual_inversion). Each file is read once here to check it."""
        from .textual_inversion import embedding_files, read_embedding
        files = embedding_files(paths)
        for file in files:
            read_embedding(file)
        self.textual_inversions += [f for f in files if f not in self.textual_inversions]
        return files

    def load_lora(self, path: str | Path | Checkpoint, lora_alpha: float = 1.0, *, merge: bool = False):
        """Attach a LoRA / MotionLoRA / domain adapter to the loaded models; the handle is also kept in ``self.loras``.
        Run-time mode by default (alpha changeable, weights untouched); ``merge=True`` folds it into the weights."""
        from .lora import attach_lora
        lora = attach_lora(self, path, lora_alpha)
        if merge:
            lora.merge()
        self.loras.append(lora)
        return lora

    def _lora(self, which):
        """A loaded LoRA by handle, index in ``self.loras`` or file name (stem)."""
        if isinstance(which, int):
            return self.loras[which]
        found = [lora for lora in self.loras if lora is which or lora.name == which]
        if not found:
            raise ConfigError(f"no loaded LoRA {which!r}; loaded: {[lora.name for lora in self.loras]}")
        return found[0]

    def set_lora_alpha(self, which, alpha: float) -> None:
        self._lora(which).alpha = alpha

    def remove_lora(self, which) -> None:
        """Take a LoRA off the models (unmerged first if merged); the base weights need no reloading."""
        lora = self._lora(which)
        lora.remove()
        self.loras.remove(lora)

    # ---------------------------------------------------------------------------------------------- accessors
    def fetch_model(self, name: str) -> nn.Module | None:
        return self.models.get(name)

    def fetch_controlnet(self, path: str | Path) -> nn.Module:
        """The ControlNet loaded from ``path``, loading it now if it was not yet."""
        key = Path(path).resolve()
        if key not in self.controlnets:
            kind = identify(Checkpoint(path)).kind
            if kind != "controlnet":
                raise ConfigError(f"{path}: not a ControlNet (recognised as {kind}); pass a ControlNet file")
            self.load_model(path)
        return self.controlnets[key]

    unet = property(lambda self: self.models.get("unet"))
    vae = property(lambda self: self.models.get("vae"))
    text_encoder = property(lambda self: self.models.get("text_encoder"))
    text_encoder_2 = property(lambda self: self.models.get("text_encoder_2"))
    motion_modules = property(lambda self: self.models.get("motion_modules"))
    image_encoder = property(lambda self: self.models.get("image_encoder"))
    ip_adapter = property(lambda self: self.models.get("ip_adapter"))
    sparsectrl = property(lambda self: self.models.get("sparsectrl"))

    def __repr__(self) -> str:
        held = ", ".join(f"{name}<-{info.path.name}" for name, info in self.infos.items())
        return f"ModelManager({self.device}, {self.torch_dtype}, family={self.family}, [{held}])"
