"""LoRA files -> low-rank updates on the loaded modules, applied at run time or merged into the weights.

Formats: the AnimateDiff v3 domain adapter and MotionLoRAs (``<attn>.processor.to_q_lora.down.weight``), kohya / A1111
(``lora_unet_<path with _>.lora_down.weight`` + ``.alpha``; ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``; LoCon convs)
and diffusers / peft (``unet.<path>.lora_A.weight``, ``.lora.down.weight``). Every layer name resolves through one
name map per model, generated from its block structure: it knows each module under its own (LDM / AnimateDiff /
open_clip) name and under the diffusers / Hugging Face name the file formats use.

Update of a weight W [out, in(, k, k)] by a pair down [r, in(, k, k)], up [out, r(, 1, 1)]:
``W + alpha * scale * up @ down``, ``scale = .alpha / r`` where the file stores ``.alpha`` (kohya, some diffusers
files), else 1 (the AnimateDiff loader adds ``alpha * up @ down`` without rank division).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import Checkpoint, lora_kind_of
from .errors import CheckpointError, ConfigError

LORA_KINDS = ("lora_kohya", "lora_diffusers", "motion_lora", "domain_adapter")

# (pattern of a file key, what it is): the module path is group 1
_KEY_FORMS = (
    (re.compile(r"(.+)\.lora_down\.weight"), "down"), (re.compile(r"(.+)\.lora_up\.weight"), "up"),
    (re.compile(r"(.+)\.lora_A(?:\.default)?\.weight"), "down"), (re.compile(r"(.+)\.lora_B(?:\.default)?\.weight"), "up"),
    (re.compile(r"(.+)\.lora\.down\.weight"), "down"), (re.compile(r"(.+)\.lora\.up\.weight"), "up"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
)
# attention-processor form (AnimateDiff adapter / MotionLoRA, old diffusers): <attn>.processor.to_q_lora.down.weight
_PROCESSOR_FORM = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


# ------------------------------------------------------------------------------------------------------ name map

@dataclass(frozen=True)
class Target:
    """Where a LoRA pair goes: ``component`` module ``name``; ``rows`` = a row block of a fused projection."""
    component: str
    name: str
    rows: tuple[int, int] | None = None

    def __str__(self) -> str:
        rows = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else ""
        return f"{self.component}.{self.name}{rows}"


_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_block_map(config) -> dict[str, str]:
    """diffusers block path -> LDM block path, generated from a :class:`UNetConfig`'s level structure."""
    nrb, levels, depth = config.num_res_blocks, len(config.channel_mult), config.transformer_depth
    blocks = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    for i in range(levels):
        for j in range(nrb):
            n = 1 + i * (nrb + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if depth[i]:
                blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < levels - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (nrb + 1)}.0.op"
    for i, level in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            n = i * (nrb + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if depth[level]:
                blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if level:
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if depth[level] else 1}.conv"
    return blocks


def _weighted(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def unet_name_map(unet: nn.Module) -> dict[str, str]:
    """Every Linear/Conv2d of ``unet``, by its LDM name and by its diffusers name -> LDM name."""
    ldm_to_diffusers = {ldm: d for d, ldm in unet_block_map(unet.config).items()}
    names = {}
    for name in _weighted(unet):
        names[name] = name
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # longest block prefix that the map knows
            head, tail = ".".join(parts[:cut]), ".".join(parts[cut:])
            if head in ldm_to_diffusers:
                if ldm_to_diffusers[head].split(".")[-2:-1] == ["resnets"]:
                    tail = _RESNET_NAMES.get(tail, tail)
                names[".".join(filter(None, (ldm_to_diffusers[head], tail)))] = name
                break
    return names


def motion_name_map(motion: nn.Module) -> dict[str, str]:
    """AnimateDiff names and diffusers' MotionAdapter names (no ``temporal_transformer``, ``attn1``/``attn2``)."""
    names = {}
    for name in _weighted(motion):
        names[name] = name
        diffusers = name.replace(".temporal_transformer.", ".").replace("attention_blocks.0.", "attn1.")
        names[diffusers.replace("attention_blocks.1.", "attn2.")] = name
    return names


def text_name_map(encoder: nn.Module) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Hugging Face CLIP names -> (module, rows); open_clip's fused ``attn.in_proj_weight`` is split in q/k/v rows."""
    names: dict[str, tuple[str, tuple[int, int] | None]] = {name: (name, None) for name in _weighted(encoder)}
    if encoder.config.layout == "open_clip":
        width = encoder.config.width
        for i in range(encoder.config.layers):
            hf, ours = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                names[f"{hf}self_attn.{proj}"] = (f"{ours}attn", (j * width, (j + 1) * width))
            names[f"{hf}self_attn.out_proj"] = (f"{ours}attn.out_proj", None)
            names[f"{hf}mlp.fc1"] = (f"{ours}mlp.c_fc", None)
            names[f"{hf}mlp.fc2"] = (f"{ours}mlp.c_proj", None)
    return names


class NameMap:
    """Resolves a LoRA file's layer names against the loaded models: dotted names, and kohya's ``_`` spelling by
    lookup in the set of known names (module names contain ``_`` themselves, so they are never parsed)."""

    def __init__(self, models: Mapping[str, nn.Module]):
        self.dotted: dict[str, dict[str, Target]] = {}
        for component, model in models.items():
            if component == "unet":
                table = {k: (v, None) for k, v in unet_name_map(model).items()}
            elif component == "motion_modules":
                table = {k: (v, None) for k, v in motion_name_map(model).items()}
            elif component in ("text_encoder", "text_encoder_2"):
                table = text_name_map(model)
            else:
                continue
            self.dotted[component] = {k: Target(component, name, rows) for k, (name, rows) in table.items()}
        self.underscored = {c: {k.replace(".", "_"): t for k, t in table.items()} for c, table in self.dotted.items()}

    def resolve(self, name: str) -> Target | None:
        for prefix, component in _KOHYA_PREFIXES.items():
            if name.startswith(prefix):
                return self.underscored.get(component, {}).get(name[len(prefix):])
        component = "unet"
        for prefix, named in _DIFFUSERS_PREFIXES.items():
            if name.startswith(prefix):
                component, name = named, name[len(prefix):]
                break
        if component == "unet" and ".motion_modules." in name:
            component = "motion_modules"
        return self.dotted.get(component, {}).get(name)


# ------------------------------------------------------------------------------------------------- reading files

@dataclass
class _Pair:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def read_pairs(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, _Pair], list[str]]:
    """Group a LoRA state dict into ``{layer name: (down, up, alpha)}``; keys of no known form come back apart."""
    pairs: dict[str, _Pair] = {}
    unknown = []
    for key, tensor in state.items():
        if m := _PROCESSOR_FORM.fullmatch(key):
            proj = "to_out.0" if m[2] == "to_out" else m[2]
            setattr(pairs.setdefault(f"{m[1]}.{proj}", _Pair()), m[3], tensor)
            continue
        for pattern, role in _KEY_FORMS:
            if m := pattern.fullmatch(key):
                pair = pairs.setdefault(m[1], _Pair())
                if role == "alpha":
                    pair.alpha = float(tensor.item()) if tensor.numel() == 1 and not tensor.is_complex() else None
                else:
                    setattr(pair, role, tensor)
                break
        else:
            unknown.append(key)
    return pairs, unknown


# ---------------------------------------------------------------------------------------------- applying updates

class LoRALayer:
    """One low-rank pair on one module: ``scale * up @ down`` (``scale`` from the file; the LoRA's alpha on top)."""

    def __init__(self, lora: "LoRA", target: Target, module: nn.Module, down: torch.Tensor, up: torch.Tensor,
                 scale: float):
        self.lora, self.target, self.module, self.scale = lora, target, module, scale
        weight = self.weight
        self.down = down.to(device=weight.device, dtype=weight.dtype)
        self.up = up.to(device=weight.device, dtype=weight.dtype)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.in_proj_weight if self.target.rows else self.module.weight

    @property
    def factor(self) -> float:
        return self.lora.alpha * self.scale

    def delta(self) -> torch.Tensor:
        """``up @ down`` in the shape of the weight (rows) it updates, computed in float32."""
        update = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return update.reshape(update.shape[0], *self.down.shape[1:])

    def runtime(self, x: torch.Tensor) -> torch.Tensor:
        """``up(down(x))``: a kxk conv then a 1x1 conv for Conv2d targets (LoCon), two matmuls for Linear ones."""
        if isinstance(self.module, nn.Conv2d):
            m = self.module
            return F.conv2d(F.conv2d(x, self.down, None, m.stride, m.padding, m.dilation), self.up)
        return F.linear(F.linear(x, self.down), self.up)

    def add_to_weight(self, factor: float) -> None:
        with torch.no_grad():
            weight = self.weight.data
            rows = slice(*self.target.rows) if self.target.rows else slice(None)
            weight[rows] = (weight[rows].float() + factor * self.delta().to(weight.device)).to(weight.dtype)


class _Site:
    """The LoRA layers on one module and the hooks that add their run-time updates."""

    def __init__(self, module: nn.Module, fused: bool):
        self.module, self.layers = module, []
        if fused:  # the fused projection is used inside forward: swap in W + updates for the call only
            self.saved: torch.Tensor | None = None
            self.handles = [module.register_forward_pre_hook(self._swap_in),
                            module.register_forward_hook(self._swap_out, always_call=True)]
        else:
            self.handles = [module.register_forward_hook(self._add)]

    def active(self) -> list[LoRALayer]:
        return [layer for layer in self.layers if not layer.lora.merged and layer.lora.alpha != 0]

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        for layer in self.active():
            output = output + layer.factor * layer.runtime(args[0])
        return output

    def _swap_in(self, module: nn.Module, args: tuple) -> None:
        active = self.active()
        if not active:
            return
        self.saved = module.in_proj_weight.data
        weight = self.saved.clone()
        for layer in active:
            rows = slice(*layer.target.rows)
            weight[rows] = weight[rows] + (layer.factor * layer.delta()).to(weight.dtype)
        module.in_proj_weight.data = weight

    def _swap_out(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.saved is not None:
            module.in_proj_weight.data, self.saved = self.saved, None

    @staticmethod
    def of(module: nn.Module, fused: bool) -> "_Site":
        site = module.__dict__.get("_lora_site")
        if site is None:
            site = module.__dict__["_lora_site"] = _Site(module, fused)
        return site

    def detach(self, layer: LoRALayer) -> None:
        self.layers.remove(layer)
        if not self.layers:
            for handle in self.handles:
                handle.remove()
            del self.module.__dict__["_lora_site"]


class LoRA:
    """A loaded LoRA: its layers sit on the models' modules; ``alpha`` (settable) scales all of them.

    Run-time mode (default): each module's output gets ``+ alpha * scale * up(down(x))``; the weights stay untouched.
    ``merge()`` folds ``alpha * scale * up @ down`` into the weights instead (faster); ``unmerge()`` takes it out."""

    def __init__(self, path: Path, kind: str, alpha: float):
        self.path, self.kind, self._alpha = path, kind, float(alpha)
        self.layers: list[LoRALayer] = []
        self.merged = False
        self.removed = False

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def targets(self) -> list[str]:
        """The modules (``component.module[rows]``) this LoRA updates."""
        return [str(layer.target) for layer in self.layers]

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._check_attached()
        if self.merged:
            for layer in self.layers:
                layer.add_to_weight((float(value) - self._alpha) * layer.scale)
        self._alpha = float(value)

    def merge(self) -> None:
        self._check_attached()
        if not self.merged:
            for layer in self.layers:
                layer.add_to_weight(layer.factor)
            self.merged = True

    def unmerge(self) -> None:
        self._check_attached()
        if self.merged:
            for layer in self.layers:
                layer.add_to_weight(-layer.factor)
            self.merged = False

    def remove(self) -> None:
        """Take the LoRA off the models (unmerging it first if merged)."""
        if self.removed:
            return
        self.unmerge()
        for layer in self.layers:
            _Site.of(layer.module, bool(layer.target.rows)).detach(layer)
        self.removed = True

    def _check_attached(self) -> None:
        if self.removed:
            raise ConfigError(f"LoRA {self.name!r} was removed; load it again to use it")

    def __repr__(self) -> str:
        mode = "removed" if self.removed else "merged" if self.merged else "runtime"
        return f"LoRA({self.name!r}, {self.kind}, alpha={self._alpha}, {len(self.layers)} layers, {mode})"


def _listing(items: list[str], limit: int = 5) -> str:
    return f"{len(items)} ({', '.join(items[:limit])}{' ...' if len(items) > limit else ''})"


def _check_shapes(module: nn.Module, target: Target, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why ``down``/``up`` do not fit ``module`` (None when they do). 1x1-conv-shaped pairs fit Linear layers."""
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or not down.shape[0]:
        return (f"{target}: down {list(down.shape)} / up {list(up.shape)} are not a rank >= 1 pair of matrices or "
                "kernels")
    if not (down.is_floating_point() and up.is_floating_point()):
        return f"{target}: down / up are stored as {down.dtype} / {up.dtype}, not floating point"
    rank = down.shape[0]
    if isinstance(module, nn.Conv2d):
        want_down = (rank, module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, rank, 1, 1)
    elif target.rows:
        want_down, want_up = (rank, module.in_proj_weight.shape[1]), (target.rows[1] - target.rows[0], rank)
    else:
        want_down, want_up = (rank, module.in_features), (module.out_features, rank)
    squeeze = (lambda s: s[:2] if s[2:] == (1, 1) else s) if not isinstance(module, nn.Conv2d) else (lambda s: s)
    if squeeze(tuple(down.shape)) != want_down or squeeze(tuple(up.shape)) != want_up:
        return f"{target}: down {list(down.shape)} / up {list(up.shape)}, the layer needs {list(want_down)} / {list(want_up)}"
    return None


def build_lora(models: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], *, path: str | Path = "<dict>",
               kind: str | None = None, alpha: float = 1.0) -> LoRA:
    """Attach the LoRA in ``state`` to ``models`` (component name -> module) in run-time mode. Every layer of the
    file must resolve to a module of matching shape, or nothing is attached and a CheckpointError says what failed."""
    path = Path(path)
    kind = kind or lora_kind_of(state.keys())
    if kind not in LORA_KINDS:
        raise CheckpointError(f"{path}: not a LoRA file (no lora_down/lora_up, lora_A/lora_B or *_lora.down keys)")
    pairs, unknown = read_pairs(state)
    names = NameMap(models)
    lora = LoRA(path, kind, alpha)
    placed: list[tuple[Target, nn.Module, _Pair]] = []
    unmatched, incomplete, misfit = [], [], []
    for name, pair in pairs.items():
        if pair.down is None or pair.up is None:
            incomplete.append(name)
            continue
        target = names.resolve(name)
        if target is None:
            unmatched.append(name)
            continue
        module = models[target.component].get_submodule(target.name)
        if pair.alpha is not None and not math.isfinite(pair.alpha):
            misfit.append(f"{target}: alpha {pair.alpha} is not a finite number")
        elif problem := _check_shapes(module, target, pair.down, pair.up):
            misfit.append(problem)
        else:
            placed.append((target, module, pair))
    if unknown or unmatched or incomplete or misfit or not placed:
        loaded = ", ".join(f"{c} ({type(m).__name__})" for c, m in models.items()) or "none"
        problems = [f"{_listing(unmatched)} layer names match no module of the loaded models" if unmatched else "",
                    f"{_listing(misfit, 3)} shapes do not fit" if misfit else "",
                    f"{_listing(unknown)} keys of no LoRA form" if unknown else "",
                    f"{_listing(incomplete)} layers lack their down or up half" if incomplete else "",
                    "no layers" if not pairs else ""]
        raise CheckpointError(
            f"{path}: this {kind} LoRA does not fit the loaded models [{loaded}]: "
            f"{'; '.join(p for p in problems if p)} (of {len(pairs)} layers). A LoRA for another base (SD 1.5 vs SDXL) "
            f"or motion-module version, or one whose text-encoder / UNet is not loaded, is refused rather than "
            f"partly applied; load the matching base models first.")
    for target, module, pair in placed:
        rank = pair.down.shape[0]
        scale = pair.alpha / rank if pair.alpha is not None else 1.0
        down, up = pair.down, pair.up
        if not isinstance(module, nn.Conv2d):
            down, up = down.flatten(1), up.flatten(1)
        layer = LoRALayer(lora, target, module, down, up, scale)
        lora.layers.append(layer)
        _Site.of(module, bool(target.rows)).layers.append(layer)
    return lora


def attach_lora(manager, source: str | Path | Checkpoint, lora_alpha: float = 1.0) -> LoRA:
    """Read the LoRA file (a path, or one already open) and attach it to ``manager.models`` (run-time mode,
    ``alpha = lora_alpha``)."""
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    return build_lora(manager.models, ckpt.state_dict(), path=ckpt.path, kind=lora_kind_of(ckpt.keys()),
                      alpha=lora_alpha)
