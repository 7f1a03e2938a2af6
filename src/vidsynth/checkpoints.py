"""Open checkpoint files lazily and safely, and say what they hold.

A ``.safetensors`` header is checked by the ``safetensors`` package itself (its Rust parser: 100 MB header limit,
typed non-negative shapes and offsets, no gaps or overlaps, data exactly covering the file, bounded JSON nesting);
the tensors are then read with ``readinto`` into tensors made for them, not memory-mapped (a mapping charges the
touched file pages to the process). ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` go through
``torch.load(weights_only=True)``, memory-mapped where the file is a zip, which refuses pickles that would run code.
Only shapes are read to identify a file; tensors are read one at a time when a model is built, straight into the
target dtype/device.
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, VidsynthError
from .runtime import libc

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "module", "model")


class Checkpoint:
    """A checkpoint file opened for reading: key -> shape without loading, tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file; check the path (`vidsynth download --list` lists the "
                                  "models it can download)")
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{self.path}: the file is empty (an interrupted download?); download it again")
        self._header: dict[str, dict] | None = None
        self._chunk: torch.Tensor | None = None  # staging buffer for dtype conversion, made on first use
        self._tensors: dict[str, torch.Tensor] | None = None
        self._mapped = False  # the pickle's tensors are pages of a private mapping of the file
        if _looks_like_safetensors(self.path):
            self.format = "safetensors"
            self._header, self._data_start = _read_safetensors_header(self.path)
            self.shapes = {k: tuple(v["shape"]) for k, v in self._header.items()}
        else:
            self.format = "pickle"
            self._tensors, self._mapped = _load_pickle(self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def dtype(self, key: str) -> torch.dtype:
        if self._header is not None:
            return _SAFETENSORS_DTYPES[self._header[key]["dtype"]]
        return self._tensors[key].dtype

    def main_dtype(self) -> torch.dtype:
        """The dtype most floating-point values of the file are stored in."""
        counts: dict[torch.dtype, int] = {}
        for key, shape in self.shapes.items():
            dtype = self.dtype(key)
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + _numel(shape)
        return max(counts, key=counts.get) if counts else torch.float32

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, floating-point ones converted to ``dtype`` when given."""
        if self._tensors is not None:
            t = self._tensors[key]
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        entry = self._header[key]
        stored = _SAFETENSORS_DTYPES[entry["dtype"]]
        target = dtype if dtype is not None and stored.is_floating_point else stored
        # read() rather than mapping the file: the page cache is not charged to this process, so loading costs the
        # weights' size in memory and no more. A conversion goes through one reused chunk buffer, straight into the
        # result, so the stored copy of a tensor is never held whole.
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=target)
        flat = out.view(-1).view(torch.uint8) if target == stored else out.view(-1)
        if target != stored and self._chunk is None:
            self._chunk = torch.empty(1 << 24, dtype=torch.uint8)  # 16 MiB
        step = len(self._chunk) // stored.itemsize * stored.itemsize if target != stored else end - begin
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            for offset in range(0, end - begin, max(step, 1)):
                size = min(step, end - begin - offset)
                sink = flat[offset:offset + size] if target == stored else self._chunk[:size]
                if f.readinto(sink.numpy()) != size:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is cut short; the file is truncated, "
                                          "download it again")
                if target != stored:
                    first = offset // stored.itemsize
                    flat[first:first + size // stored.itemsize].copy_(sink.view(stored))
        return out

    def state_dict(self, prefix: str = "", *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` with the prefix removed, floating ones cast to ``dtype``, on ``device``."""
        return dict(self.iter_tensors(prefix, dtype=dtype, device=device))

    def iter_tensors(self, prefix: str = "", *, dtype=None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.shapes:
            if key.startswith(prefix):
                t = self.tensor(key, dtype).to(device)
                if self._mapped and t.data_ptr() != self._tensors[key].data_ptr():
                    # the stored copy is done with: its pages would otherwise stay charged to the process until the
                    # file is closed (a float32 motion module adds 1.7 GiB to the peak of a bfloat16 load)
                    _release_file_pages(self._tensors[key])
                yield key[len(prefix):], t

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.shapes)} tensors)"


_SAFETENSORS_DTYPES = {
    name: getattr(torch, torch_name) for name, torch_name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu"}.items() if hasattr(torch, torch_name)}

# what the safetensors parser's refusals mean for the user
_SAFETENSORS_REASONS = {
    "incomplete metadata": "the tensor data is shorter or longer than the header says: the file is truncated "
                           "(an interrupted download?) or has bytes appended; download it again",
    "header too large": "its header claims more than the 100 MB safetensors allows: it is corrupt or not a "
                        ".safetensors file",
    "header too small": "it is too short to hold a header: truncated or not a .safetensors file; download it again",
    "invalid header length": "its header length does not fit the file: truncated or not a .safetensors file; "
                             "download it again",
}


def _read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The header of a safetensors file, checked by the safetensors package: every tensor's bytes lie inside the
    data, in order, without gaps or overlaps, so a truncated or lying file is caught here, before any tensor is read.
    Offsets are not part of safe_open's API, so the checked header is parsed once more for them."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        detail = str(err).removeprefix("Error while deserializing header: ")
        reason = next((v for k, v in _SAFETENSORS_REASONS.items() if detail.lower().startswith(k)), None)
        raise CheckpointError(f"{path}: not a readable .safetensors file: "
                              f"{reason or f'corrupt header ({detail})'}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} is stored as {entry['dtype']}, a type this PyTorch "
                                  f"({torch.__version__}) cannot hold; convert the file to a supported dtype")
    return header, 8 + n


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state`` as a .safetensors file at exactly ``path``, one tensor at a time. safetensors' own save_file
    writes through a temporary of its own (.tmpXXXXXX beside the file), which a killed writer leaves behind and
    nothing can tell from a user's file; an atomic writer here owns its temporary's name instead."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for key, t in state.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for t in state.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return True
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"


def _load_pickle(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The file's tensors, and whether they are memory-mapped (a private mapping: writes never reach the file)."""
    mapped = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to unpickle: the file asks to run code or build objects that are not plain tensors "
            f"({first}). Only weight files are loaded; if you trust the file, convert it to .safetensors first") from None
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "expected .safetensors or a PyTorch .ckpt/.pt/.pth file. It may be truncated or corrupt: download it again"
        ) from None
    return _flatten_state_dict(obj, path), mapped


@functools.cache
def _madvise():
    c = libc()
    if c is None or not hasattr(mmap, "MADV_DONTNEED") or not hasattr(c, "madvise"):
        return None
    fn = c.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _release_file_pages(t: torch.Tensor) -> None:
    """Drop the resident pages wholly inside ``t``, a tensor on a private, never-written mapping of a file: the
    kernel reads them from the file again if they are touched (Linux MADV_DONTNEED), so the data stay valid."""
    madvise = _madvise()
    if madvise is None:
        return
    page = mmap.PAGESIZE
    begin = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > begin:
        madvise(begin, end - begin, mmap.MADV_DONTNEED)


def _flatten_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:  # a dict of dicts of tensors (the IP-Adapter .bin files): keys become "outer.inner"
        tensors = {f"{k}.{name}": v for k, inner in obj.items() if isinstance(k, str) and isinstance(inner, Mapping)
                   for name, v in inner.items() if isinstance(name, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors (top-level keys: {sorted(map(str, obj))[:10]})")
    return tensors


# --------------------------------------------------------------------------------------------- identification

@dataclass
class Component:
    """One model inside a file: which part, the key prefix it lives under, its configuration."""
    name: str           # "unet" | "vae" | "text_encoder" | "text_encoder_2" | "motion_modules" | "lora" | "controlnet"
    prefix: str
    config: object = None


@dataclass
class CheckpointInfo:
    path: Path
    kind: str                         # "sd15" | "sdxl" | "unet" | "vae" | "text_encoder" | "motion_module" | LoRA kinds
    family: str | None                # "sd15" | "sdxl" | None
    components: list[Component] = field(default_factory=list)
    num_tensors: int = 0
    dtype: torch.dtype | None = None
    notes: list[str] = field(default_factory=list)

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "family": self.family, "tensors": self.num_tensors,
                "dtype": str(self.dtype).replace("torch.", ""), "notes": self.notes,
                "components": {c.name: {"prefix": c.prefix, "config": _config_dict(c.config)} for c in self.components}}


def _config_dict(config) -> dict | None:
    if config is None:
        return None
    from dataclasses import asdict, is_dataclass
    return asdict(config) if is_dataclass(config) else dict(vars(config))


SUPPORTED_KINDS = ("SD 1.5 single file (UNet + VAE + CLIP-L)", "SDXL base single file", "UNet alone (LDM layout)",
                   "VAE alone (LDM layout)", "CLIP text encoder alone", "AnimateDiff motion module (v1/v2/v3, SDXL beta, "
                   "AnimateLCM, Lightning)", "AnimateDiff MotionLoRA", "AnimateDiff v3 domain adapter", "kohya LoRA",
                   "diffusers/peft LoRA", "IP-Adapter (ip-adapter_sd15 / ip-adapter_sdxl)",
                   "CLIP image encoder (IP-Adapter's ViT-H / ViT-bigG)",
                   "ControlNet (SD 1.5 cldm .pth, SDXL diffusers layout incl. union)",
                   "SparseCtrl (v3_sd15_sparsectrl_rgb / _scribble)")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD15_TEXT = "cond_stage_model.transformer."
SDXL_TEXT_L = "conditioner.embedders.0.transformer."
SDXL_TEXT_G = "conditioner.embedders.1.model."


def strip(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _naming_the_file(read_configs):
    """The configuration readers see shapes, not files: give each of their refusals the file's path, here, once.
    Python errors from shapes no reader expected (an empty shape, a missing sibling key) become ours too."""
    @functools.wraps(read_configs)
    def wrapper(ckpt: Checkpoint, **kwargs):
        try:
            return read_configs(ckpt, **kwargs)
        except VidsynthError as err:
            if str(ckpt.path) in str(err) or ckpt.path.name in str(err):
                raise
            raise type(err)(f"{ckpt.path}: {err}") from None
        except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError, OverflowError) as err:
            raise CheckpointError(f"{ckpt.path}: its tensor shapes do not form a model vidsynth knows "
                                  f"({type(err).__name__}: {err}); the file is corrupt or an unsupported variant"
                                  ) from None
    return wrapper


@_naming_the_file
def identify(ckpt: Checkpoint, *, motion_version: str | None = None) -> CheckpointInfo:
    """Say what ``ckpt`` holds, with each component's configuration read off the tensor shapes."""
    shapes = ckpt.shapes
    info = CheckpointInfo(ckpt.path, kind="", family=None, num_tensors=len(shapes), dtype=ckpt.main_dtype())
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731

    if _identify_image_conditions(ckpt, info):
        return info
    lora_kind = lora_kind_of(keys)
    if lora_kind:
        info.kind = lora_kind
        info.family = _lora_family(shapes, lora_kind)
        info.components.append(Component("lora", ""))
        return info
    controlnet = _controlnet_component(shapes, ckpt.path)
    if controlnet:
        info.kind, info.family = "controlnet", controlnet.config.family
        info.components.append(controlnet)
        return info
    if any(".motion_modules." in k for k in keys) and not has(UNET):
        from .models.motion import MotionConfig
        config = MotionConfig.from_state_dict(shapes, filename=ckpt.path.name, version=motion_version)
        info.kind, info.family = "motion_module", config.base_family
        info.components.append(Component("motion_modules", "", config))
        info.notes.append(config.version_reason)
        return info
    if has(UNET) or has("input_blocks.") and has("output_blocks."):
        prefix = UNET if has(UNET) else ""
        unet_config = _unet_config(strip(shapes, prefix), ckpt.path)
        info.components.append(Component("unet", prefix, unet_config))
        info.family = unet_config.family
        info.kind = unet_config.family if prefix else "unet"
        if has(VAE):
            info.components.append(Component("vae", VAE, _vae_config(strip(shapes, VAE))))
        for name, text_prefix in (("text_encoder", SD15_TEXT), ("text_encoder", SDXL_TEXT_L),
                                  ("text_encoder_2", SDXL_TEXT_G)):
            if has(text_prefix):
                info.components.append(Component(name, text_prefix, _text_config(strip(shapes, text_prefix))))
        return info
    vae_prefix = VAE if has(VAE) else ""
    if has(vae_prefix + "encoder.conv_in.") and has(vae_prefix + "decoder.conv_out."):
        if has(vae_prefix + "encoder.down_blocks."):
            raise CheckpointError(f"{ckpt.path}: recognised as a VAE in the diffusers layout, not supported yet; "
                                  "use the single-file (LDM) VAE file, e.g. vae-ft-mse-840000-ema-pruned.safetensors")
        info.kind = "vae"
        info.components.append(Component("vae", vae_prefix, _vae_config(strip(shapes, vae_prefix))))
        return info
    for prefix in ("", SD15_TEXT, "cond_stage_model.", "text_encoder."):
        if has(prefix + "text_model.encoder.layers."):
            info.kind = "text_encoder"
            info.components.append(Component("text_encoder", prefix, _text_config(strip(shapes, prefix))))
            return info
    raise CheckpointError(_unknown_message(ckpt))


def _identify_image_conditions(ckpt: Checkpoint, info: CheckpointInfo) -> bool:
    """IP-Adapter (``image_proj.*`` + ``ip_adapter.*``), CLIP image encoders (``vision_model.*``) and SparseCtrl
    (``controlnet_cond_embedding`` with ``down_blocks.*.motion_modules``; before ControlNets, whose keys it shares):
    fill ``info``."""
    keys = ckpt.shapes.keys()
    if any(k.startswith("controlnet_cond_embedding.") for k in keys) and any(".motion_modules." in k for k in keys):
        from .models.sparsectrl import SparseCtrlConfig
        try:
            config = SparseCtrlConfig.from_state_dict(ckpt.shapes)
        except CheckpointError as err:
            raise CheckpointError(f"{ckpt.path}: {err}") from None
        info.kind, info.family = "sparsectrl", config.unet.family
        info.components.append(Component("sparsectrl", "", config))
        return True
    if any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys):
        from .ip_adapter import IPAdapterConfig
        config = IPAdapterConfig.from_state_dict(ckpt.shapes, str(ckpt.path))
        info.kind, info.family = "ip_adapter", config.family
        info.components.append(Component("ip_adapter", "", config))
        return True
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        from .models.vision import VisionEncoderConfig
        info.kind = "image_encoder"
        info.components.append(Component("image_encoder", "", VisionEncoderConfig.from_state_dict(ckpt.shapes)))
        return True
    return False


def _unknown_message(ckpt: Checkpoint) -> str:
    prefixes: dict[str, int] = {}
    for key in ckpt.shapes:
        head = ".".join(key.split(".")[:2]) if key.count(".") > 1 else key.split(".")[0]
        prefixes[head] = prefixes.get(head, 0) + 1
    found = ", ".join(f"{p} ({n})" for p, n in sorted(prefixes.items(), key=lambda kv: -kv[1])[:12])
    return (f"{ckpt.path}: unknown checkpoint: {len(ckpt.shapes)} tensors under key prefixes {found}. "
            f"Supported kinds: {'; '.join(SUPPORTED_KINDS)}.")


def _unet_config(shapes, path):
    from .models.unet import UNetConfig

    config = UNetConfig.from_state_dict(shapes)
    if config.in_channels == 9:
        raise CheckpointError(f"{path}: recognised as an inpainting UNet (9 input channels), not supported yet")
    if config.family not in ("sd15", "sdxl"):
        names = {"sd2": "Stable Diffusion 2.x", "sdxl_refiner": "the SDXL refiner"}
        raise CheckpointError(f"{path}: recognised as {names.get(config.family, config.family)} "
                              f"(context width {config.context_dim}), not supported yet; SD 1.5 and SDXL are")
    return config


def _controlnet_component(shapes, path) -> Component | None:
    """ControlNets: the original cldm layout (``control_model.input_hint_block``) and diffusers' (SDXL, union)."""
    if any(k.startswith("control_model.input_hint_block.") for k in shapes):
        prefix = "control_model."
    elif "input_hint_block.0.weight" in shapes or "controlnet_cond_embedding.conv_in.weight" in shapes:
        prefix = ""
    else:
        return None
    from .models.controlnet import ControlNetConfig

    config = ControlNetConfig.from_state_dict(strip(shapes, prefix))
    if config.family not in ("sd15", "sdxl"):
        raise CheckpointError(f"{path}: recognised as a ControlNet for {config.family} (context width "
                              f"{config.unet.context_dim}), not supported; SD 1.5 and SDXL ControlNets are")
    return Component("controlnet", prefix, config)


def _vae_config(shapes):
    from .models.vae import VAEConfig
    return VAEConfig.from_state_dict(shapes)


def _text_config(shapes):
    from .models.text import TextEncoderConfig
    return TextEncoderConfig.from_state_dict(shapes)


def lora_kind_of(keys) -> str | None:
    for key in keys:
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            return "lora_kohya"
        if "_lora.down.weight" in key or "_lora.up.weight" in key:
            return "motion_lora" if ".motion_modules." in key else "domain_adapter"
        if ".lora_A." in key or ".lora.down." in key or ".lora_down.weight" in key:
            return "lora_diffusers"
    return None


def _lora_family(shapes, kind: str) -> str | None:
    if kind == "motion_lora":
        return "sd15" if any(k.startswith("up_blocks.3.") for k in shapes) else "sdxl"
    # cross-attention key projections reveal the context width: 768 for SD 1.5, 2048 for SDXL
    widths = {s[-1] for k, s in shapes.items() if "attn2" in k and "to_k" in k and len(s) == 2 and s[-1] >= 768}
    if 2048 in widths:
        return "sdxl"
    if 768 in widths:
        return "sd15"
    return None


def load_checkpoint(path: str | Path, *, motion_version: str | None = None) -> tuple[Checkpoint, CheckpointInfo]:
    ckpt = Checkpoint(path)
    return ckpt, identify(ckpt, motion_version=motion_version)
