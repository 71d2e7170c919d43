"""Model + optimizer state on disk (written by train.py, read by scoring / extraction).

A checkpoint is an HF `save_pretrained` directory (model, or peft adapter) plus the tokenizer,
`trajinf_checkpoint.json` = {"step", "learning_rate", "betas", "eps", "optimizer_step"} and
`optimizer.safetensors` with `exp_avg.NAME` / `exp_avg_sq.NAME` for every trainable parameter
NAME of `model.named_parameters()`. A LoRA model whose base has no `name_or_path` (e.g. a
tiny model built from a config) also gets its base weights in `base/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trajinf.errors import TrajinfError
from trajinf.models.load import resolve_dtype, resolve_model_dir, set_chat_template
from trajinf.models.lora import wrap_lora

META_FILE = "trajinf_checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"


@dataclass
class CheckpointState:
    """Optimizer state of a checkpoint: Adam moments by parameter name (fp32 tensors)."""

    step: int
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    optimizer_step: int
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _optimizer_tensors(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """exp_avg/exp_avg_sq tensors by name, plus meta (betas, eps, optimizer_step)."""
    tensors: dict[str, torch.Tensor] = {}
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    steps = [0]
    first_group = None
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) not in group_of:
            continue
        first_group = first_group or group_of[id(p)]
        state = optimizer.state.get(p, {})
        if "exp_avg" not in state:  # never stepped: zero moments are Adam's initial state
            tensors[f"exp_avg.{name}"] = torch.zeros_like(p, dtype=torch.float32)
            tensors[f"exp_avg_sq.{name}"] = torch.zeros_like(p, dtype=torch.float32)
            continue
        tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().float().cpu().contiguous()
        tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().float().cpu().contiguous()
        steps.append(int(state.get("step", 0)))
    group = first_group or (optimizer.param_groups[0] if optimizer.param_groups else {})
    meta = {
        "betas": [float(b) for b in group.get("betas", (0.9, 0.999))],
        "eps": float(group.get("eps", 1e-8)),
        "optimizer_step": max(steps),
    }
    return tensors, meta


def _base_state_dict(model) -> dict[str, torch.Tensor]:
    """The peft model's base weights under the base model's own names (LoRA layers removed)."""
    base = model.get_base_model()
    out = {}
    for name, t in base.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    return out


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    path: str | Path,
    *,
    step: int,
    learning_rate: float,
) -> None:
    """Write a checkpoint directory atomically (temp dir in the same parent, then rename).

    optimizer: a torch.optim.Adam/AdamW whose state holds exp_avg / exp_avg_sq, or None
    (then no optimizer.safetensors is written and load_checkpoint_state returns None).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if _is_peft(model):
            base_name = model.peft_config[model.active_adapter].base_model_name_or_path
            if not base_name:
                # a base built from a config has no name to reload it by: keep it with the adapter
                base = model.get_base_model()
                base.save_pretrained(tmp / BASE_DIR, state_dict=_base_state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "step": int(step),
            "learning_rate": float(learning_rate),
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "optimizer_step": 0,
        }
        if optimizer is not None:
            tensors, opt_meta = _optimizer_tensors(model, optimizer)
            meta.update(opt_meta)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint_state(path: str | Path) -> CheckpointState | None:
    """Read trajinf_checkpoint.json + optimizer.safetensors; None if either is missing."""
    path = Path(path)
    meta_file, opt_file = path / META_FILE, path / OPTIMIZER_FILE
    if not meta_file.is_file() or not opt_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(opt_file))
        exp_avg = {k[len("exp_avg.") :]: v for k, v in tensors.items() if k.startswith("exp_avg.")}
        exp_avg_sq = {
            k[len("exp_avg_sq.") :]: v for k, v in tensors.items() if k.startswith("exp_avg_sq.")
        }
        return CheckpointState(
            step=int(meta["step"]),
            learning_rate=float(meta["learning_rate"]),
            betas=(float(meta["betas"][0]), float(meta["betas"][1])),
            eps=float(meta["eps"]),
            optimizer_step=int(meta["optimizer_step"]),
            exp_avg=exp_avg,
            exp_avg_sq=exp_avg_sq,
        )
    except (KeyError, ValueError, TypeError, IndexError, OSError) as exc:
        raise TrajinfError(
            f"{meta_file}: bad checkpoint metadata or optimizer state ({exc})"
        ) from exc


def load_model(
    path: str | Path,
    *,
    lora: bool = False,
    lora_rank: int = 8,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    chat_template: str | None = None,
):
    """Load (model, tokenizer) from a checkpoint, a model directory, a ``.gguf`` file, a short
    name (``smollm2-135m``) or a cached hub id (see ``models.load.resolve_model_dir``).

    A directory with adapter_config.json is a peft adapter: its base comes from `base/` if
    present, else from the adapter's base_model_name_or_path, and the adapter is loaded
    trainable. `lora=True` on a plain model wraps it in a fresh LoRA (``models.lora``, rank
    `lora_rank`). ``dtype``: fp32 (default) | bf16 | fp16 weights. ``chat_template``: a name
    (chatml-tools, llama3-tools) or a Jinja file replacing the tokenizer's own template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(path)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    adapter_cfg = path / ADAPTER_CONFIG
    if adapter_cfg.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        base_path = path / BASE_DIR if (path / BASE_DIR).is_dir() else base_name
        if not base_path:
            raise TrajinfError(f"{adapter_cfg}: no base_model_name_or_path and no {BASE_DIR}/ dir")
        base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(base_path)), **kwargs)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
    else:
        if not (path / "config.json").is_file():
            raise TrajinfError(f"{path}: not a model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        if lora:
            model = wrap_lora(model, lora_rank)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, set_chat_template(tokenizer, chat_template)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex of the config JSON and every weight (name, dtype, shape, bytes).

    Tensors above 2^22 elements are hashed on a fixed strided sample of ~2^20 elements plus
    their sum, which keeps 7B-parameter models at a few seconds.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {
            k: v
            for k, v in config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            if flat.numel() > 2**22:
                stride = flat.numel() // 2**20
                h.update(repr(float(flat.double().sum())).encode())
                flat = flat[::stride]
            h.update(flat.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of the tokenizer's vocabulary/merges (backend JSON), chat template and specials."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()
