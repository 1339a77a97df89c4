"""The source registry covers the bundle exactly and carries manifest facts onto every source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tulu_pipeline.data.registry import (
    MANIFEST_FILE, RegistryError, fetch_source, get_source, load_registry, registry, sha256_file, verify_file,
)


def test_packaged_manifest_is_the_bundle_manifest(bundle: Path) -> None:
    assert json.loads(MANIFEST_FILE.read_text()) == json.loads((bundle / "MANIFEST.json").read_text())


def test_every_manifest_file_has_exactly_one_source(bundle: Path) -> None:
    manifest_paths = {e["path"] for e in json.loads((bundle / "MANIFEST.json").read_text())}
    specs = registry()
    assert sorted(s.path for s in specs) == sorted(manifest_paths)
    assert len({s.id for s in specs}) == len(specs)


def test_suites_and_roles() -> None:
    specs = registry()
    evals = [s for s in specs if s.role == "eval"]
    assert {s.suite for s in evals} == {"dev", "unseen"}
    assert all(s.benchmark for s in evals)
    dev = {s.benchmark for s in evals if s.suite == "dev"}
    assert {"gsm8k", "math500", "ifeval", "humaneval", "alpaca_eval", "bbh", "truthfulqa"} <= dev
    train = {s.id for s in specs if s.role == "train"}
    assert train == {"gsm8k_train", "math_train", "self_instruct_seed", "code_alpaca", "hh_rlhf_harmless",
                     "fine_grained_rlhf_qa"}
    assert not any(s.suite for s in specs if s.role != "eval")


def test_licenses_and_non_commercial_flags() -> None:
    non_commercial = {s.id for s in registry() if s.is_non_commercial}
    assert non_commercial == {"code_alpaca", "alpaca_eval", "wizardlm_testset"}
    assert get_source("gsm8k_train").license == "MIT"


def test_upstream_locations() -> None:
    assert get_source("gsm8k_test").upstream_url == (
        "https://raw.githubusercontent.com/openai/grade-school-math/"
        "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl"
    )
    # MATH was concatenated from 12,500 per-problem files: no single file to download.
    assert get_source("math_train").upstream_url is None
    with pytest.raises(RegistryError, match="cannot be downloaded as one file"):
        fetch_source(get_source("math_train"), Path("/nonexistent"))


def test_bundle_files_verify(bundle: Path) -> None:
    for spec in registry():
        assert verify_file(spec, bundle) == bundle / spec.path


def test_wrong_sha256_names_file_and_expected_hash(tmp_path: Path, bundle: Path) -> None:
    spec = get_source("koala")
    target = tmp_path / spec.path
    target.parent.mkdir(parents=True)
    target.write_bytes((bundle / spec.path).read_bytes() + b"\n")
    with pytest.raises(RegistryError) as excinfo:
        verify_file(spec, tmp_path)
    message = str(excinfo.value)
    assert str(target) in message and spec.sha256 in message and "sha256 mismatch" in message


def test_missing_file_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"missing.*tulu sources fetch koala"):
        verify_file(get_source("koala"), tmp_path)


def test_fetch_verifies_before_keeping(tmp_path: Path, bundle: Path) -> None:
    spec = get_source("vicuna_bench")
    good = tmp_path / "mirror" / "question.jsonl"
    good.parent.mkdir()
    good.write_bytes((bundle / spec.path).read_bytes())
    fetched = fetch_source(spec, tmp_path / "data", url=good.as_uri())
    assert sha256_file(fetched) == spec.sha256

    bad = tmp_path / "mirror" / "tampered.jsonl"
    bad.write_bytes(good.read_bytes().replace(b"time management", b"time-management"))
    other = tmp_path / "data2"
    with pytest.raises(RegistryError, match="downloaded bytes have sha256"):
        fetch_source(spec, other, url=bad.as_uri())
    assert not (other / spec.path).exists()
    assert list((other / spec.path).parent.iterdir()) == []  # no partial download left behind


def test_registry_rejects_unknown_manifest_paths(tmp_path: Path) -> None:
    registry_file = tmp_path / "sources.yaml"
    registry_file.write_text(
        "sources:\n  - {id: x, path: train/nope.jsonl, role: train, mapping: {user: q}}\n"
    )
    with pytest.raises(RegistryError, match="not in MANIFEST.json"):
        load_registry(registry_file=registry_file)
