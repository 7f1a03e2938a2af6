"""Preset models and ``download_models``: Hugging Face (huggingface_hub) first, ModelScope (plain HTTP) as fallback.

The presets are data (``data/presets.yaml``). Every file is fetched under a temporary name and renamed to its final
path only once it is complete and verified (size, and sha256 where the table or the server states one); a file
already at its final path is not fetched again. Connection failures surface in seconds with the URL that failed.
"""
from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import yaml
from tqdm.auto import tqdm

from .errors import ConfigError, VidsynthError

logger = logging.getLogger(__name__)

SOURCES = ("HuggingFace", "ModelScope")
DEFAULT_REVISION = {"HuggingFace": "main", "ModelScope": "master"}
TIMEOUT_S = 10.0  # connect and per-read timeout: an offline machine fails in seconds, not minutes
RESUME_TRIES = 5  # consecutive resumes that bring no new bytes before a transfer is given up
CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_KEYS = {"path", "size", "sha256", "approx_size", *SOURCES}
_PRESET_KEYS = {"about", "aliases", "files", "include"}
PRESETS_ENV = "VIDSYNTH_PRESETS"
DEFAULT_MODELS_DIR = "models"
MODELS_DIR_ENV = "VIDSYNTH_MODELS_DIR"


@dataclass(frozen=True)
class Remote:
    source: str
    repo: str
    file: str
    revision: str


@dataclass(frozen=True)
class PresetFile:
    path: str  # under models_dir, '/'-separated
    remotes: tuple[Remote, ...]
    size: int | None = None  # exact bytes, where published
    sha256: str | None = None
    approx_size: int | None = None  # for listings only

    def remote(self, source: str) -> Remote | None:
        return next((r for r in self.remotes if r.source == source), None)


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    files: tuple[PresetFile, ...]
    aliases: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(f.size or f.approx_size or 0 for f in self.files)

    @property
    def size_is_exact(self) -> bool:
        return all(f.size for f in self.files)


class _SourceFailed(Exception):
    """One source could not deliver one file; the message names the URL and why."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")


# ---------------------------------------------------------------------------------------------------- the table


def parse_presets(table: Any) -> dict[str, Preset]:
    """Check a preset table (the YAML's structure) and return its presets keyed by name and by alias."""
    entries = table.get("presets") if isinstance(table, Mapping) else None
    if not isinstance(entries, Mapping) or not entries:
        raise ConfigError("the preset table needs a non-empty 'presets' mapping")
    for name, entry in entries.items():
        if not isinstance(entry, Mapping) or set(entry) - _PRESET_KEYS or not entry.get("about"):
            raise ConfigError(f"preset {name!r}: needs 'about'; allowed keys are {sorted(_PRESET_KEYS)}")
    own = {name: tuple(_parse_file(name, raw) for raw in entry.get("files") or ()) for name, entry in entries.items()}
    result: dict[str, Preset] = {}
    for name, entry in entries.items():
        included = list(entry.get("include") or ())
        if missing := [n for n in included if n not in own]:
            raise ConfigError(f"preset {name!r} includes unknown presets {missing}")
        files = own[name] + tuple(f for n in included for f in own[n])
        if not files:
            raise ConfigError(f"preset {name!r} has no files")
        preset = Preset(str(name), str(entry["about"]), files, tuple(map(str, entry.get("aliases") or ())))
        for key in (preset.name, *preset.aliases):
            if key in result:
                raise ConfigError(f"preset name {key!r} is used twice in the preset table")
            result[key] = preset
    return result


def _parse_file(preset: str, raw: Any) -> PresetFile:
    path = raw.get("path") if isinstance(raw, Mapping) else None
    where = f"preset {preset!r}, file {path!r}"
    pure = PurePosixPath(path) if isinstance(path, str) else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or "\\" in path or str(pure) != path:
        raise ConfigError(f"{where}: 'path' must be a plain relative path like 'AnimateDiff/x.ckpt'")
    if unknown := set(raw) - _FILE_KEYS:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_FILE_KEYS)})")
    remotes = []
    for source in SOURCES:
        spec = raw.get(source)
        if spec is None:
            continue
        spec = {"repo": spec} if isinstance(spec, str) else spec
        repo = spec.get("repo") if isinstance(spec, Mapping) else None
        if not isinstance(repo, str) or repo.count("/") != 1 or "" in repo.split("/"):
            raise ConfigError(f"{where}: {source} needs a repo like 'owner/name', got {spec!r}")
        revision = spec.get("revision") or DEFAULT_REVISION[source]
        remotes.append(Remote(source, repo, spec.get("file") or pure.name, revision))
    if not remotes:
        raise ConfigError(f"{where}: no source (one of {SOURCES})")
    for key in ("size", "approx_size"):
        if raw.get(key) is not None and (not isinstance(raw[key], int) or raw[key] <= 0):
            raise ConfigError(f"{where}: {key} must be a positive number of bytes")
    sha = raw.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise ConfigError(f"{where}: sha256 must be 64 lower-case hex digits")
    return PresetFile(path, tuple(remotes), raw.get("size"), sha, raw.get("approx_size"))


def presets() -> dict[str, Preset]:
    """The presets, keyed by name and by alias (DiffSynth-Studio's names are aliases): the shipped table, or the one
    the environment variable VIDSYNTH_PRESETS names (a mirror's or your own, in the same format)."""
    return _load_presets(os.environ.get(PRESETS_ENV) or None)


@cache
def _load_presets(path: str | None) -> dict[str, Preset]:
    if path is None:
        text = resources.files("vidsynth").joinpath("data/presets.yaml").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{PRESETS_ENV}={path}: cannot read the preset table ({e.strerror or e}); "
                              f"fix the path or unset {PRESETS_ENV}") from None
    return parse_presets(yaml.safe_load(text))


def resolve(names: Sequence[str]) -> list[Preset]:
    """Presets for names or aliases (case-insensitive), in order, without repeats; unknown names list close matches."""
    table = presets()
    lower = {key.lower(): key for key in table}
    chosen: list[Preset] = []
    for name in names:
        key = name if name in table else lower.get(name.lower())
        if key is None:
            close = [lower[k] for k in difflib.get_close_matches(name.lower(), lower, n=5, cutoff=0.5)]
            hint = f"did you mean {', '.join(close)}?" if close else "see `vidsynth download --list`"
            raise ConfigError(f"unknown model preset {name!r}: {hint}")
        if table[key] not in chosen:
            chosen.append(table[key])
    return chosen


# ---------------------------------------------------------------------------------------------------- downloading


def download_models(
    names: Sequence[str],
    models_dir: str | Path = "models",
    sources: Sequence[str] = SOURCES,
    *,
    progress: bool = True,
) -> list[Path]:
    """Fetch the files of the named presets into ``models_dir`` and return their local paths.

    Sources are tried in the given order for each file; a failing one is reported and the next one tried."""
    names = [names] if isinstance(names, str) else list(names)
    known = {s.lower(): s for s in SOURCES}
    if bad := [s for s in sources if s.lower() not in known]:
        raise ConfigError(f"unknown download sources {bad}: use some of {SOURCES}")
    order = [known[s.lower()] for s in sources]
    root = Path(models_dir).expanduser()
    paths: list[Path] = []
    for preset in resolve(names):
        for file in preset.files:
            target = root / file.path
            if target not in paths:
                _fetch(file, target, order, progress)
                paths.append(target)
    return paths


def _fetch(file: PresetFile, target: Path, sources: list[str], progress: bool) -> None:
    if target.is_file():
        # downloads only ever reach the final name complete, so a file there is the user's own copy: keep it
        if file.size is not None and target.stat().st_size != file.size:
            logger.warning("%s has %d bytes where the published file has %d; using it as it is (delete it to "
                           "download the published one)", target, target.stat().st_size, file.size)
        return
    remotes = [r for r in map(file.remote, sources) if r is not None]
    if not remotes:
        offered = [r.source for r in file.remotes]
        raise ConfigError(f"{file.path} is not available from {sources}; its sources are {offered}")
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for i, remote in enumerate(remotes):
        try:
            _FETCHERS[remote.source](remote, file, target, progress)
            return
        except _SourceFailed as e:
            failures.append(f"{remote.source}: {e}")
            then = f"; trying {remotes[i + 1].source}" if i + 1 < len(remotes) else ""
            logger.warning("%s could not deliver %s (%s)%s", remote.source, file.path, e, then)
    by_hand = "\n  ".join(download_url(r) for r in remotes)
    raise VidsynthError(
        f"could not download {file.path}:\n  " + "\n  ".join(failures)
        + "\nCheck the connection (or HF_ENDPOINT / HF_TOKEN / MODELSCOPE_ENDPOINT), or download the file by hand from"
        f"\n  {by_hand}\nand put it at {target.resolve()}"
    )


def download_url(remote: Remote) -> str:
    """The URL a browser or curl can fetch the file from."""
    if remote.source == "HuggingFace":
        from huggingface_hub import hf_hub_url

        return hf_hub_url(remote.repo, remote.file, revision=remote.revision, endpoint=_hf_endpoint())
    query = f"Revision={quote(remote.revision, safe='')}&FilePath={quote(remote.file, safe='')}"
    return f"{_modelscope_repo_api(remote)}?{query}"


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now, not at import


def _modelscope_repo_api(remote: Remote) -> str:
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    endpoint = (os.environ.get("MODELSCOPE_ENDPOINT") or f"https://{domain}").rstrip("/")
    return f"{endpoint}/api/v1/models/{remote.repo}/repo"


def _from_huggingface(remote: Remote, file: PresetFile, target: Path, progress: bool) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download

    endpoint, url = _hf_endpoint(), download_url(remote)
    if constants.is_offline_mode():
        raise _SourceFailed(url, "HF_HUB_OFFLINE is set")
    # Our own metadata call first: no retries and a short timeout (hf_hub_download retries for a minute when
    # offline), and it gives the sha256 of LFS files (their etag) to verify against.
    try:
        meta = get_hf_file_metadata(url, timeout=TIMEOUT_S, endpoint=endpoint)
    except Exception as e:  # connection, HTTP status, gated or missing repo: this source cannot serve the file
        raise _SourceFailed(url, _reason(e)) from e
    size = _agree(url, "size", file.size, meta.size)
    sha = _agree(url, "sha256", file.sha256, meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None)
    stage = target.with_name(f".{target.name}.hf")  # hf_hub_download's local_dir, on the target's volume
    try:
        try:
            staged = hf_hub_download(
                remote.repo, remote.file, revision=meta.commit_hash or remote.revision, local_dir=stage,
                endpoint=endpoint, etag_timeout=TIMEOUT_S, tqdm_class=None if progress else _SilentBar,
            )
        except Exception as e:  # same boundary as above
            raise _SourceFailed(url, _reason(e)) from e
        _install(Path(staged), target, size, sha, url, progress)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _from_modelscope(remote: Remote, file: PresetFile, target: Path, progress: bool) -> None:
    listing_url = f"{_modelscope_repo_api(remote)}/files?Revision={quote(remote.revision, safe='')}&Recursive=True"
    url = download_url(remote)
    try:
        with _open(listing_url) as response:
            listing = json.load(response)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise _SourceFailed(listing_url, _reason(e)) from e
    data = listing.get("Data") if isinstance(listing, dict) else None
    entries = (data.get("Files") if isinstance(data, dict) else None) or []
    entry = next((f for f in entries if isinstance(f, dict) and f.get("Path") == remote.file), None)
    if entry is None:
        raise _SourceFailed(listing_url, f"{remote.file} is not in the repository listing")
    size = _agree(url, "size", file.size, entry.get("Size") or None)
    stated = str(entry.get("Sha256") or "").lower()
    sha = _agree(url, "sha256", file.sha256, stated if _SHA256.fullmatch(stated) else None)
    part = target.with_name(target.name + ".part")  # kept across runs: the next run resumes from it
    _http_download(url, part, size, progress)
    _install(part, target, size, sha, url, progress)


_FETCHERS = {"HuggingFace": _from_huggingface, "ModelScope": _from_modelscope}


def _http_download(url: str, part: Path, size: int | None, progress: bool) -> None:
    """GET ``url`` into ``part``, resuming (HTTP Range) from the bytes it already holds, and again whenever the
    connection breaks off mid-transfer, as long as resumed requests keep bringing bytes."""
    stalls = 0
    with _bytes_bar(size, part.name.removesuffix(".part"), progress) as bar:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have >= size:
                if have == size:
                    return
                part.unlink()  # longer than the file: not a prefix of it
                have = 0
            bar.reset(total=size)
            bar.update(have)
            try:
                response = _open(url, {"Range": f"bytes={have}-"} if have else None)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have and stalls < RESUME_TRIES:  # the partial file does not fit the remote one
                    part.unlink()
                    stalls += 1
                    continue
                raise _SourceFailed(url, _reason(e)) from e
            except (OSError, http.client.HTTPException) as e:  # no answer at all: offline, refused, DNS
                raise _SourceFailed(url, _reason(e)) from e
            got, cut = 0, None
            with response, open(part, "ab" if have and response.status == 206 else "wb") as out:
                if have and response.status != 206:  # the server ignored Range: it sends the whole file
                    bar.reset(total=size)
                expected = response.headers.get("Content-Length")
                try:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:
                    cut = e
            if cut is None and (expected is None or got == int(expected)):
                return
            stalls = 0 if got else stalls + 1
            if stalls > RESUME_TRIES:
                raise _SourceFailed(url, f"the transfer keeps breaking off ({_reason(cut) if cut else 'short body'})")
            logger.info("connection to %s broke off after %d bytes; resuming", url, got)
            time.sleep(0.2 * stalls)


def _install(src: Path, target: Path, size: int | None, sha256: str | None, url: str, progress: bool) -> None:
    """Rename a finished download to its final name after checking it; one that fails the check is deleted."""
    actual = src.stat().st_size
    problem = None
    if size is not None and actual != size:
        problem = f"{actual} bytes instead of {size}"
    elif sha256 and (digest := _sha256(src, progress)) != sha256:
        problem = f"sha256 {digest} instead of {sha256}"
    if problem:
        src.unlink(missing_ok=True)
        raise _SourceFailed(url, f"corrupted download ({problem}); it was deleted")
    os.replace(src, target)


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bytes_bar(path.stat().st_size, f"verify {path.name}", progress) as bar:
        while chunk := f.read(CHUNK * 8):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bytes_bar(total: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


def _agree(url: str, what: str, table: Any, server: Any) -> Any:
    if table is not None and server is not None and table != server:
        raise _SourceFailed(url, f"the server states {what} {server}, the preset table {table}")
    return table if table is not None else server


def _open(url: str, headers: Mapping[str, str] | None = None):
    request = urllib.request.Request(url, headers={"User-Agent": "vidsynth", **(headers or {})})
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class _SilentBar(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- model arguments


def default_models_dir() -> Path:
    """Where presets land when no folder is named: $VIDSYNTH_MODELS_DIR, else ./models (as `vidsynth download`)."""
    return Path(os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR).expanduser()


def find_preset(name: str) -> Preset | None:
    """The preset ``name`` (or alias, any case) names, or None."""
    table = presets()
    if name in table:
        return table[name]
    return {key.lower(): preset for key, preset in table.items()}.get(name.lower())


def locate_models(specs: Sequence[str | os.PathLike], models_dir: str | os.PathLike | None = None, *,
                  download: bool = True, progress: bool = True, what: str = "this run") -> list[Path]:
    """Each spec, a file path or a preset name, as a local file: existing files as they are; presets as their (first)
    file under ``models_dir``, downloaded first where missing. If anything cannot be had, one error names every
    missing file and the `vidsynth download` command that fetches them; nothing is loaded before that."""
    root = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    paths: list[Path] = []
    missing: dict[str, Preset] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            paths.append(path)
            continue
        preset = find_preset(str(spec))
        if preset is None:
            if path.exists():
                raise ConfigError(f"{spec}: is a folder, not a model file; name the checkpoint file inside it")
            close = difflib.get_close_matches(str(spec).lower(), [k.lower() for k in presets()], n=3, cutoff=0.6)
            hint = f" (did you mean the preset {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{spec}: no such file, and no model preset of that name{hint}; give the path of a "
                              "checkpoint file or a preset name from `vidsynth download --list`")
        paths.append(root / preset.files[0].path)
        if not paths[-1].is_file():
            missing[preset.name] = preset
    if not missing:
        return paths
    problem = "they are not in the models folder"
    if download:
        try:
            download_models(list(missing), root, progress=progress)
            return paths
        except VidsynthError as e:  # its first lines say which file and each source's failure; the rest is below
            reason = str(e).split("\nCheck the connection")[0].replace("\n", "\n    ")
            problem = f"downloading them failed ({reason})"
    listing = "\n  ".join(f"{(root / p.files[0].path).resolve()}  (preset {name})" for name, p in missing.items())
    raise VidsynthError(f"{what} needs these model files, and {problem}:\n  {listing}\nFetch them once with\n  "
                        f"vidsynth download {' '.join(missing)} --models-dir {root}\nwhere the network reaches Hugging "
                        "Face or ModelScope (or HF_ENDPOINT), put your own copies at those paths, or name local files "
                        "(--base FILE --motion FILE).")


# ---------------------------------------------------------------------------------------------------- CLI


def format_presets() -> str:
    """The table `vidsynth download --list` prints: name, size, what it is for, aliases."""
    unique = list(dict.fromkeys(presets().values()))
    width = max(len(p.name) for p in unique)
    lines = []
    for p in unique:
        size = _human(p.size) if p.size_is_exact else f"~{_human(p.size)}"
        also = f" (also: {', '.join(p.aliases)})" if p.aliases else ""
        lines.append(f"{p.name:<{width}}  {size:>9}  {p.about}{also}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def run_cli(names: list[str], list_only: bool, models_dir: str) -> int:
    """`vidsynth download NAME...` and `vidsynth download --list`; returns the exit code."""
    if list_only:
        print(format_presets())
        return 0
    if not names:
        print("error: name at least one preset to download; `vidsynth download --list` shows them", file=sys.stderr)
        return 2
    try:
        for path in download_models(names, models_dir):
            print(path)
    except VidsynthError as e:  # bad input (an unknown name, a broken preset table) is 2 as in the other commands
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0
