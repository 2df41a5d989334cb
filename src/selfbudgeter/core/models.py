"""Loading models and tokenizers: the one place that turns a name or path into (model, tokenizer).

Accepted names: `embedded` (the shipped base model), a local Hugging Face model directory, or a hub id
(read from the local Hugging Face cache when the hub is unreachable). Nothing is ever loaded from a path
that arrives in a network request: the server resolves its model once, at start-up, through this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"


def resolve(name_or_path: str | Path) -> str:
    """The path or hub id to load for `name_or_path`; a missing local path is a UserError."""
    from ..embedded.model import BASE_MODEL_DIR

    name = str(name_or_path)
    if name == EMBEDDED:
        return str(BASE_MODEL_DIR)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist")
    return name  # a hub id


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise UserError(f"cannot load a tokenizer for {name_or_path!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    return tokenizer


def load_model(name_or_path: str | Path, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) ready for generation, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    device = pick_device(device)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(torch_dtype)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype[dtype])
    except OSError as err:
        raise UserError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s (%.1fM parameters) on %s", name_or_path, model.num_parameters() / 1e6, device)
    return model, tokenizer
