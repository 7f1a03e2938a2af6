"""Checkpoint fuzzing: small files with the real key names, mutated, loaded the way users load them.

Contract per file: ``ModelManager.load_model`` (LoRAs: onto a manager holding the tiny base models) loads it, or
raises a ``VidsynthError`` whose message names the file; within seconds and bounded memory; no pickle runs code.
Anything else is an *escape*. Cases are numbered and each is reproducible from ``(seed, case)`` alone; a worker
process runs them (it may crash: the parent records the crash and restarts after that case).

``python tests/checkpoint_fuzz.py --cases 300`` or ``benchmarks/fuzz.py --cases 10000``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))
from _measure import current_rss, peak_rss, reset_peak_rss  # noqa: E402  (benchmarks' RSS readers)
CASE_SECONDS = 10          # a case using more CPU time than this is an escape (the contract says "within seconds");
                           # CPU time, not wall time, so a busy shared machine does not fail a case
CASE_MEMORY = 512 << 20    # peak RSS growth above this during one case is an escape (the seeds are < 10 MB)


# ------------------------------------------------------------------------------------------------------- seeds

class Seed:
    """A valid file: its tensors (to rebuild mutated variants), its format and whether it is a LoRA."""

    def __init__(self, name: str, tensors: dict, fmt: str, wrapper: str | None = None, lora: bool = False):
        self.name, self.tensors, self.format, self.wrapper, self.lora = name, tensors, fmt, wrapper, lora
        self.suffix = ".safetensors" if fmt == "safetensors" else ".ckpt"
        self.data = encode(tensors, fmt, wrapper)


def encode(tensors: dict, fmt: str, wrapper: str | None = None, legacy: bool = False) -> bytes:
    import torch
    from safetensors.torch import save

    if fmt == "safetensors":
        return save(tensors)
    buffer = io.BytesIO()
    torch.save({wrapper: tensors} if wrapper else tensors, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def make_seeds() -> list[Seed]:
    """Tiny models in the real layouts (every SD 1.5 / AnimateDiff key name, small channels), their LoRAs."""
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from tiny_models import CLIP_L, randomise, tiny_motion, tiny_text_encoder, tiny_unet
    from vidsynth.lora import unet_name_map
    from vidsynth.models.vae import AutoencoderKL, VAEConfig

    half = lambda state, prefix="": {prefix + k: v.half().contiguous() for k, v in state.items()}  # noqa: E731
    unet, text = tiny_unet(), tiny_text_encoder(CLIP_L)
    # 32 channels: a file's VAE is read with SD's 32 norm groups
    vae = randomise(lambda: AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)), 1)
    sd15 = (half(unet.state_dict(), "model.diffusion_model.") | half(vae.state_dict(), "first_stage_model.")
            | half(text.state_dict(), "cond_stage_model.transformer."))
    sd15 = {k: v.long() if k.endswith("position_ids") else v for k, v in sd15.items()}
    motion = tiny_motion(unet, "v2")
    g = torch.Generator().manual_seed(0)
    motion_lora = {}
    for name, module in motion.named_modules():
        if isinstance(module, nn.Linear) and ".attention_blocks." in name and ".to_" in name:
            stem = name.replace(".to_out.0", ".to_out").rsplit(".", 1)
            stem = f"{stem[0]}.processor.{stem[1]}_lora"
            motion_lora[f"{stem}.down.weight"] = torch.randn(4, module.in_features, generator=g).half()
            motion_lora[f"{stem}.up.weight"] = torch.randn(module.out_features, 4, generator=g).half()
    names = unet_name_map(unet)
    kohya = {}
    for diffusers_name, ldm in names.items():
        if diffusers_name == ldm or not diffusers_name.endswith(("to_q", "to_k", "to_out.0", "proj_in", "conv1")):
            continue
        module = unet.get_submodule(ldm)
        key = "lora_unet_" + diffusers_name.replace(".", "_")
        if isinstance(module, nn.Conv2d):
            down = torch.randn(4, module.in_channels, *module.kernel_size, generator=g)
            up = torch.randn(module.out_channels, 4, 1, 1, generator=g)
        else:
            down, up = torch.randn(4, module.in_features, generator=g), torch.randn(module.out_features, 4, generator=g)
        kohya |= {f"{key}.lora_down.weight": down.half(), f"{key}.lora_up.weight": up.half(),
                  f"{key}.alpha": torch.tensor(2.0)}
    return [Seed("v1-5-tiny", sd15, "safetensors"), Seed("v1-5-tiny", sd15, "pickle", wrapper="state_dict"),
            Seed("mm_sd_v15_v2-tiny", half(motion.state_dict()), "pickle"),
            Seed("mm_sd_v15_v2-tiny", half(motion.state_dict()), "safetensors"),
            Seed("v2_lora_ZoomIn-tiny", motion_lora, "pickle", lora=True),
            Seed("kohya-tiny", kohya, "safetensors", lora=True)]


# --------------------------------------------------------------------------------------------------- mutations

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def m_truncate(rng, seed):
    cut = rng.choice([rng.randrange(len(seed.data)), rng.randrange(min(len(seed.data), 4096)),
                      len(seed.data) - rng.randrange(1, 512)])
    return seed.data[:max(cut, 0)]


def m_byte_flip(rng, seed):
    data = bytearray(seed.data)
    span = len(data)
    if seed.format == "safetensors" and rng.random() < 0.6:
        span = min(span, 8 + int.from_bytes(data[:8], "little"))  # the header
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_header_length(rng, seed):
    n = int.from_bytes(seed.data[:8], "little")
    lie = rng.choice([0, 1, 2, 7, n - 1, n + 1, n - rng.randrange(1, n), n + rng.randrange(1, 1 << 20),
                      len(seed.data), 100_000_001, 1 << 31, 1 << 63, (1 << 64) - 1])
    return struct.pack("<Q", lie % (1 << 64)) + seed.data[8:]


_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3",
           "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "f16", "Q4", "", 16, None]
_SHAPE_LIES = [[-1], [-4, 4], [1 << 40], [1 << 62, 1 << 62], [(1 << 64) - 1], [2.0], ["4"], [[4]], [None], [True],
               [], [0], [1] * 40, "4", None, {}, 7]
_OFFSET_LIES = ["reverse", "overlap", "beyond", [-8, 0], [0], [0, 1, 2], ["0", "8"], [0.0, 8.0], None, [1 << 64, 0]]


def m_json_field(rng, seed):
    header, body = split_safetensors(seed.data)
    keys = [k for k in header if k != "__metadata__"]
    entry = header[rng.choice(keys)]
    field = rng.choice(["shape", "dtype", "data_offsets", "drop", "entry", "metadata"])
    if field == "shape":
        entry["shape"] = rng.choice(_SHAPE_LIES)
    elif field == "dtype":
        entry["dtype"] = rng.choice(_DTYPES)
    elif field == "data_offsets":
        lie = rng.choice(_OFFSET_LIES)
        begin, end = entry["data_offsets"]
        if lie == "reverse":
            lie = [end, begin]
        elif lie == "overlap":
            other = header[rng.choice(keys)]["data_offsets"]
            lie = [other[0], other[0] + end - begin]
        elif lie == "beyond":
            lie = [len(body) + begin, len(body) + end]
        entry["data_offsets"] = lie
    elif field == "drop":
        del entry[rng.choice(list(entry))]
    elif field == "entry":
        header[rng.choice(keys)] = rng.choice([[], "F16", None, 3, {"dtype": "F16"}])
    else:
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"a": {"b": "c"}}, None])
    return join_safetensors(header, body)


def m_nested_json(rng, seed):
    header, body = split_safetensors(seed.data)
    depth = rng.choice([200, 1000, 50_000, 500_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    nested = opener * depth + closer * depth
    if rng.random() < 0.5:
        return join_safetensors(None, body, raw=nested)
    text = json.dumps(header).encode()
    return join_safetensors(None, body, raw=text[:-1] + b', "__metadata__": ' + nested + b"}")


def _scramble(rng, tensors):
    import torch

    shapes = [tuple(t.shape) for t in tensors.values()]
    out = {}
    for key, t in tensors.items():
        shape = list(t.shape)
        how = rng.random()
        if how < 0.25:
            shape = list(rng.choice(shapes))                                   # another key's shape
        elif how < 0.4 and len(shape) > 1:
            rng.shuffle(shape)                                                 # dimensions permuted
        elif how < 0.55 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 7, 9])     # one dimension changed
        elif how < 0.65:
            shape = shape[:-1] if shape and rng.random() < 0.5 else shape + [1]  # rank changed
        if rng.random() < 0.9 and how >= 0.65:
            out[key] = t
            continue
        numel = 1
        for s in shape:
            numel *= s
        out[key] = torch.zeros(shape, dtype=t.dtype) if numel <= 1 << 22 else t
    return out


def m_scrambled_shapes(rng, seed):
    return encode(_scramble(rng, seed.tensors), seed.format, seed.wrapper)


def m_keys(rng, seed):
    import torch

    tensors = dict(seed.tensors)
    keys = list(tensors)
    for _ in range(rng.randint(1, 6)):
        key = rng.choice(keys)
        how = rng.randrange(5)
        if how == 0 and key in tensors:
            del tensors[key]
        elif how == 1 and key in tensors:
            parts = key.split(".")
            i = rng.randrange(len(parts))
            parts[i] = rng.choice(["999", "-1", "", "x" * 300, parts[i] + "_"])
            tensors[".".join(parts)] = tensors.pop(key)
        elif how == 2:
            tensors[rng.choice(["", "model.", "state_dict."]) + key] = (tensors[key] if key in tensors
                                                                          else torch.zeros(1)).clone()
        elif how == 3:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(key.split(".")[0])} or tensors
        else:
            tensors[f"junk.{rng.randrange(1000)}.weight"] = torch.zeros(rng.randrange(1, 5))
    return encode(tensors, seed.format, seed.wrapper)


def m_non_dict(rng, seed):
    import torch

    t = next(iter(seed.tensors.values()))
    if seed.format == "safetensors":
        return join_safetensors(None, b"", raw=rng.choice([b"{}", b'{"__metadata__": {"a": "b"}}', b"[]", b"null",
                                                           b'"text"', b"12"]))
    payload = rng.choice([[t, t], (t,), t, 7, None, "weights", {"state_dict": {}}, {1: t, 2.5: t},
                          {"state_dict": {"model": {"x": 3}}}, {"state_dict": [t]}, {"a": {"b": {"c": t}}},
                          {"model": t}, b"\x00" * 8, {"x": (t, t)}])
    buffer = io.BytesIO()
    torch.save(payload, buffer, _use_new_zipfile_serialization=rng.random() < 0.5)
    return buffer.getvalue()


class _RunsCode:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def m_hostile_pickle(rng, seed, marker: Path):
    import builtins
    import torch

    command = f"touch {marker}"
    payload = rng.choice([
        _RunsCode(os.system, (command,)),
        _RunsCode(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        _RunsCode(builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        _RunsCode(subprocess.call, (["touch", str(marker)],)),
        _RunsCode(builtins.__import__, ("os",)),
        _RunsCode(Path.touch, (marker,)),
    ])
    where = rng.randrange(4)
    obj = ({"state_dict": seed.tensors, "payload": payload} if where == 0 else
           {"state_dict": {**seed.tensors, "extra": payload}} if where == 1 else
           [payload, seed.tensors] if where == 2 else payload)
    style = rng.randrange(3)
    if style == 2:  # a bare pickle with a weight-file name, no torch framing
        return pickle.dumps(obj, protocol=rng.randrange(0, pickle.HIGHEST_PROTOCOL + 1))
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=style == 0)
    return buffer.getvalue()


def m_legacy_pickle(rng, seed):
    data = encode(seed.tensors, "pickle", seed.wrapper, legacy=True)
    if rng.random() < 0.3:
        return data
    data = bytearray(data)
    if rng.random() < 0.5:
        return bytes(data[:rng.randrange(len(data))])
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_zip_structure(rng, seed):
    source = zipfile.ZipFile(io.BytesIO(seed.data))
    members = [(info.filename, source.read(info)) for info in source.infolist()]
    how = rng.randrange(7)
    if how == 0:
        members.pop(rng.randrange(len(members)))                                  # a record missing
    elif how == 1:
        i = rng.randrange(len(members))
        members[i] = (members[i][0], members[i][1][:rng.randrange(len(members[i][1]) + 1)])  # a record cut
    elif how == 2:
        members.append(rng.choice(members))                                      # a record twice
    elif how == 3:
        members = [(name.replace("/", "_other/", 1), data) for name, data in members]  # two archive folders
    elif how == 4:
        i = rng.randrange(len(members))
        data = bytearray(members[i][1])
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        members[i] = (members[i][0], bytes(data))                               # one record's bytes flipped
    elif how == 5:
        pkl = next(i for i, (name, _) in enumerate(members) if name.endswith("data.pkl"))
        members[pkl] = (members[pkl][0], members[pkl][1][:rng.randrange(len(members[pkl][1]))])
    compression = zipfile.ZIP_DEFLATED if how == 6 or rng.random() < 0.2 else zipfile.ZIP_STORED
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as out:
        for name, data in members:
            out.writestr(name, data)
    return buffer.getvalue()


FAMILIES = {  # name -> (mutation, formats it applies to)
    "truncate": (m_truncate, ("safetensors", "pickle")),
    "byte_flip": (m_byte_flip, ("safetensors", "pickle")),
    "header_length": (m_header_length, ("safetensors",)),
    "json_field": (m_json_field, ("safetensors",)),
    "nested_json": (m_nested_json, ("safetensors",)),
    "scrambled_shapes": (m_scrambled_shapes, ("safetensors", "pickle")),
    "keys": (m_keys, ("safetensors", "pickle")),
    "non_dict": (m_non_dict, ("safetensors", "pickle")),
    "hostile_pickle": (m_hostile_pickle, ("pickle",)),
    "legacy_pickle": (m_legacy_pickle, ("pickle",)),
    "zip_structure": (m_zip_structure, ("pickle",)),
}


def make_case(seeds: list[Seed], fuzz_seed: int, case: int, marker: Path) -> tuple[str, Seed, bytes, str]:
    """Case ``case`` of run ``fuzz_seed``: the first ``len(seeds)`` cases are the seeds themselves (they must load)."""
    if case < len(seeds):
        return "seed", seeds[case], seeds[case].data, seeds[case].suffix
    rng = random.Random(f"{fuzz_seed}:{case}")
    family = rng.choice(sorted(FAMILIES))
    mutate, formats = FAMILIES[family]
    seed = rng.choice([s for s in seeds if s.format in formats])
    data = mutate(rng, seed, marker) if family == "hostile_pickle" else mutate(rng, seed)
    suffix = seed.suffix if rng.random() < 0.9 else rng.choice([".bin", ".pt", ".pth", ".sft", ""])
    return family, seed, data, suffix


# ------------------------------------------------------------------------------------------------------ checking

class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def check(path: Path, seed: Seed, lora_base) -> tuple[str, str]:
    """("loaded" | "refused" | "escape", detail) for one file."""
    import torch
    from vidsynth.checkpoints import load_checkpoint
    from vidsynth.errors import VidsynthError
    from vidsynth.manager import ModelManager

    try:
        _, info = load_checkpoint(path)
        json.dumps(info.describe())  # what `vidsynth inspect --json` prints
        if info.component("lora"):
            lora = lora_base.load_lora(path)
            lora_base.remove_lora(lora)
        else:
            ModelManager(torch_dtype=torch.float32, device="cpu").load_model(path)
        return "loaded", info.kind
    except VidsynthError as err:
        if str(path) not in str(err) and path.name not in str(err):
            return "escape", f"message does not name the file: {type(err).__name__}: {err}"
        if any(word in str(err) for word in ("MemoryError", "DefaultCPUAllocator", "not enough memory")):
            return "escape", f"tried to allocate unbounded memory: {err}"
        return "refused", f"{type(err).__name__}: {str(err)[:300]}"
    except _Timeout:
        return "escape", f"no answer within {CASE_SECONDS * 6} s"
    except BaseException as err:  # noqa: BLE001 - everything else is what the fuzz looks for
        if isinstance(err, KeyboardInterrupt):
            raise
        return "escape", f"{type(err).__module__}.{type(err).__name__}: {str(err)[:300]}"


def worker(fuzz_seed: int, start: int, stop: int, workdir: Path) -> None:
    """Runs cases [start, stop) and prints one JSON line per case."""
    import torch
    from vidsynth.manager import ModelManager

    torch.set_num_threads(1)
    # a guard for the shared machine, not the measure: the measure is the per-case peak RSS below
    with open("/proc/self/status") as status:
        virtual = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft = virtual + (6 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (soft, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    seeds = make_seeds()
    base = {}
    for s in seeds:
        if not s.lora and s.format == "safetensors":
            base[s.name] = workdir / f"{s.name}{s.suffix}"
            base[s.name].write_bytes(s.data)
    lora_base = ModelManager(torch_dtype=torch.float32, device="cpu")
    lora_base.load_models([base["v1-5-tiny"], base["mm_sd_v15_v2-tiny"]])
    can_reset = reset_peak_rss()
    for case in range(start, stop):
        marker = workdir / f"pwned-{case}"
        try:
            family, seed, data, suffix = make_case(seeds, fuzz_seed, case, marker)
        except Exception as err:  # noqa: BLE001 - a broken mutation is the harness's fault: reported apart
            print(json.dumps({"case": case, "family": "?", "seed": "?", "file": "?", "outcome": "harness",
                              "detail": f"making the case failed: {err!r}", "seconds": 0, "rss_mib": 0}), flush=True)
            continue
        path = workdir / f"case{case}-{seed.name}{suffix}"
        path.write_bytes(data)
        before = current_rss()
        if can_reset:
            reset_peak_rss()
        began, cpu_began = time.monotonic(), time.process_time()
        signal.alarm(CASE_SECONDS * 6)  # wall clock: a hang
        try:
            outcome, detail = check(path, seed, lora_base)
        finally:
            signal.alarm(0)
        elapsed, cpu = time.monotonic() - began, time.process_time() - cpu_began
        grown = peak_rss() - before if can_reset else 0
        if marker.exists():
            outcome, detail = "escape", f"a pickle ran code (wrote {marker.name}); {detail}"
        elif cpu > CASE_SECONDS:
            outcome, detail = "escape", f"took {cpu:.1f} s of CPU ({elapsed:.1f} s wall); {detail}"
        elif grown > CASE_MEMORY:
            outcome, detail = "escape", f"peak RSS grew {grown >> 20} MiB; {detail}"
        elif family == "seed" and outcome != "loaded":
            outcome, detail = "escape", f"an unmutated seed does not load: {detail}"
        path.unlink()
        print(json.dumps({"case": case, "family": family, "seed": seed.name + seed.suffix, "file": path.name,
                          "outcome": outcome, "detail": detail, "seconds": round(elapsed, 3),
                          "cpu_seconds": round(cpu, 3), "rss_mib": grown >> 20}), flush=True)


def fuzz(cases: int, fuzz_seed: int = 0, *, log=None, first: int = 0) -> list[dict]:
    """The results of cases [first, cases); worker processes are restarted past a case that crashed one."""
    results: list[dict] = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix="vidsynth-fuzz-") as workdir:
        start = first
        while start < cases:
            cmd = [sys.executable, str(Path(__file__)), "--worker", "--seed", str(fuzz_seed), "--start", str(start),
                   "--stop", str(cases), "--workdir", workdir]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for line in proc.stdout:
                if line.startswith("{"):
                    result = json.loads(line)
                    results.append(result)
                    start = result["case"] + 1
                    if log:
                        log(result)
            stderr = proc.stderr.read()
            proc.wait()
            if start < cases:  # the worker died on case `start`
                if proc.returncode and start == first and not results:
                    raise RuntimeError(f"fuzz worker failed to start:\n{stderr[-3000:]}")
                results.append({"case": start, "family": "?", "seed": "?", "file": "?", "outcome": "escape",
                                "detail": f"the process died (exit {proc.returncode}): {stderr[-500:]}",
                                "seconds": 0, "rss_mib": 0})
                if log:
                    log(results[-1])
                start += 1
    return results


def summary(results: list[dict]) -> str:
    table = Counter((r["family"], r["outcome"]) for r in results)
    families = sorted({r["family"] for r in results})
    lines = [f"{'family':18s} {'cases':>6s} {'loaded':>7s} {'refused':>8s} {'escapes':>8s}"]
    for family in families:
        counts = [table[(family, o)] for o in ("loaded", "refused", "escape")]
        lines.append(f"{family:18s} {sum(counts):6d} {counts[0]:7d} {counts[1]:8d} {counts[2]:8d}")
    slowest = max(results, key=lambda r: r.get("cpu_seconds", r["seconds"]))
    biggest = max(results, key=lambda r: r["rss_mib"])
    lines.append(f"{len(results)} cases; slowest {slowest.get('cpu_seconds', 0):.2f} s CPU, {slowest['seconds']:.2f} s "
                 f"wall (case {slowest['case']}), "
                 f"largest peak-RSS growth {biggest['rss_mib']} MiB (case {biggest['case']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="resume a run at this case")
    parser.add_argument("--log", type=Path, help="append every case's result to this JSON-lines file as it comes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seed, args.start, args.stop, args.workdir)
        return 0
    began = time.monotonic()
    log = None
    if args.log:
        sink = open(args.log, "a")
        log = lambda result: print(json.dumps(result), file=sink, flush=True)  # noqa: E731
    results = fuzz(args.cases, args.seed, log=log, first=args.first)
    print(summary(results))
    print(f"{time.monotonic() - began:.0f} s")
    escapes = [r for r in results if r["outcome"] in ("escape", "harness")]
    for r in escapes:
        print(f"ESCAPE case {r['case']} [{r['family']}] {r['seed']}: {r['detail']}")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
