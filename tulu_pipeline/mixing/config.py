"""The mix definition: a YAML file validated into `MixConfig`.

::

    name: cpu_demo
    seed: 123
    heldout_rows: 32          # sampled rows set aside for held-out loss, never trained on
    sources:
      gsm8k_train: {rows: 96}         # exactly 96 rows
      math_train: {fraction: 0.004}   # 0.4% of the available rows (see sample.resolve_counts)
      code_alpaca: 96                 # shorthand: a bare int >= 2 is a row count
      self_instruct_seed: 0.5         # shorthand: a bare float in (0, 1) is a fraction

A quota is ``{rows: N}`` (an int >= 1) or ``{fraction: F}`` (0 < F <= 1). The shorthand exists for
the unambiguous cases only: open-instruct's users fell into its float-vs-int trap (``1`` and ``1.0``
meaning different things), so a bare ``1`` or ``1.0``, a float above 1, zero, negatives, booleans and
text are errors that say what to write instead. Source keys must be registry sources with role
``train``. Every error names its location (``sources.gsm8k_train: ...``); `load_mix_config` adds the
file (``mix file X: sources.gsm8k_train: ...``) and raises `MixConfigError` listing every problem.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_serializer, model_validator,
)

from tulu_pipeline.data.registry import registry

PRESETS_DIR = Path(__file__).resolve().parent / "presets"

_WRITE = "write {rows: N} for N rows or {fraction: F} for a share of the source"


class MixConfigError(ValueError):
    """A mix file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def train_source_ids() -> tuple[str, ...]:
    """Registry ids of every training source (role ``train``), in registry order."""
    return tuple(spec.id for spec in registry() if spec.role == "train")


def _check_train_source(source_id: str) -> str:
    known = train_source_ids()
    if source_id in known:
        return source_id
    roles = {spec.id: spec.role for spec in registry()}
    listing = ", ".join(known)
    if source_id in roles:
        raise ValueError(f"{source_id!r} is a registry source with role {roles[source_id]}, not a training source; "
                         f"known training sources: {listing}")
    raise ValueError(f"unknown training source {source_id!r}; known training sources: {listing}")


TrainSourceId = Annotated[str, AfterValidator(_check_train_source)]


def _show(value: Any) -> str:
    """A value as it would be written in YAML, for messages."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _count_hint(value: float) -> str:
    """What to write when a float above 1 was probably meant as a row count."""
    if value.is_integer():
        return f"for a count write {{rows: {int(value)}}}"
    return f"for a count write a whole number, e.g. {{rows: {math.floor(value + 0.5)}}}"


def _fraction_rule(value: int | float) -> str:
    """Why ``value`` is not a fraction, with what to write instead."""
    rule = "a fraction must be in (0, 1]"
    if math.isnan(value) or math.isinf(value) or value < 0:
        return rule
    if value > 1:
        return f"{rule}; {_count_hint(float(value))}"
    return f"{rule}; to leave the source out, remove it"  # zero


def _text_hint(value: str) -> str:
    """Why text is not a quota, with the likely intended spelling."""
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return f"{value!r} is text, not a number: write {{rows: {int(text)}}}"
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            pass
        else:
            return f"{value!r} is text, not a number: write {{fraction: {share:g}}}"
    try:
        number = float(text)
    except ValueError:
        return f"{value!r} is text, not a quota: {_WRITE}"
    # PyYAML follows YAML 1.1, where a float needs a decimal point: 1e-2 is read as the text '1e-2'.
    return (f"{value!r} is text, not a number (YAML reads exponents without a decimal point, such as 1e-2, "
            f"as text): write {{fraction: {number!r}}}")


def _quota_from_bare(value: Any) -> dict[str, Any]:
    """The shorthand: a bare float in (0, 1) is a fraction, a bare int >= 2 a row count."""
    if value is None:
        raise ValueError(f"no quota given: {_WRITE}")
    if isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a row count or a fraction: {_WRITE}")
    if isinstance(value, int):
        if value == 1:
            raise ValueError("1 is ambiguous: one row or the whole source? write {rows: 1} or {fraction: 1.0}")
        if value == 0:
            raise ValueError("0 is not a quota: a row count must be at least 1; to leave the source out, remove it")
        if value < 0:
            raise ValueError(f"{value} is negative: a row count must be at least 1 and a fraction in (0, 1]")
        return {"rows": value}
    if isinstance(value, float):
        if value == 1.0:
            raise ValueError("1.0 is ambiguous: one row or the whole source? write {rows: 1} or {fraction: 1.0}")
        if 0 < value < 1:
            return {"fraction": value}
        raise ValueError(f"{_show(value)} is not a fraction: {_fraction_rule(value)}")
    if isinstance(value, str):
        raise ValueError(_text_hint(value))
    raise ValueError(f"expected {{rows: N}}, {{fraction: F}}, a fraction in (0, 1) or a row count >= 2, "
                     f"got a {type(value).__name__}")


def _quota_from_mapping(value: dict[Any, Any]) -> dict[str, Any]:
    value = {key: item for key, item in value.items() if item is not None}  # null is absent (model_dump round trip)
    unknown = sorted(str(key) for key in value if key not in ("rows", "fraction"))
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(f"unknown key{plural} {names}: expected {{rows: N}} or {{fraction: F}}")
    if "rows" in value and "fraction" in value:
        raise ValueError("both rows and fraction given: write {rows: N} or {fraction: F}, not both")
    if not value:
        raise ValueError(f"empty quota: {_WRITE}")
    if "rows" in value:
        rows = value["rows"]
        if isinstance(rows, float) and rows.is_integer():
            raise ValueError(f"rows must be a whole number, got {_show(rows)}: write {{rows: {int(rows)}}}")
        if isinstance(rows, bool) or not isinstance(rows, int):
            raise ValueError(f"rows must be a whole number >= 1, got {_show(rows)}")
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}; to leave the source out, remove it")
        return {"rows": rows}
    fraction = value["fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number in (0, 1], got {_show(fraction)}")
    if not 0 < fraction <= 1:  # also rejects nan
        raise ValueError(f"fraction {_show(fraction)} is out of range: {_fraction_rule(fraction)}")
    return {"fraction": float(fraction)}  # {fraction: 1} and {fraction: 1.0} are the same quota


class SourceQuota(BaseModel):
    """How many rows of one source: exactly one of ``rows`` or ``fraction`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rows: int | None = None
    fraction: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> dict[str, Any]:
        if isinstance(value, SourceQuota):
            return value.model_dump()
        if isinstance(value, dict):
            return _quota_from_mapping(value)
        return _quota_from_bare(value)

    @model_serializer
    def _dump(self) -> dict[str, Any]:
        """Only the key that is set: ``{"rows": 96}`` or ``{"fraction": 0.5}``, as it would be written."""
        return {"rows": self.rows} if self.rows is not None else {"fraction": self.fraction}

    def describe(self) -> str:
        """The quota in its explicit YAML spelling, e.g. ``{rows: 96}``."""
        return f"{{rows: {self.rows}}}" if self.rows is not None else f"{{fraction: {self.fraction!r}}}"


class MixConfig(BaseModel):
    """One SFT mix: seed, held-out size and a quota per training source."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: StrictInt = Field(ge=0)
    heldout_rows: StrictInt = Field(default=0, ge=0)
    sources: dict[TrainSourceId, SourceQuota] = Field(min_length=1)

    def canonical(self) -> dict[str, Any]:
        """The config as plain JSON data, independent of key order and of shorthand vs explicit spelling."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["sources"] = dict(sorted(data["sources"].items()))
        return data


def _problem_lines(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"] if part != "[key]")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key; expected name, seed, heldout_rows, sources"
        elif error["type"] == "missing":
            message = "missing (required)"
        lines.append(f"{loc}: {message}" if loc else message)
    return lines


def preset_names() -> list[str]:
    """Names of the packaged mix presets (``presets/<name>.yaml``)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def _resolve_path(path_or_preset_name: str | Path) -> Path:
    if isinstance(path_or_preset_name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", path_or_preset_name) \
            and not path_or_preset_name.endswith((".yaml", ".yml")):
        preset = PRESETS_DIR / f"{path_or_preset_name}.yaml"
        if preset.exists():
            return preset
        if not Path(path_or_preset_name).exists():
            raise MixConfigError([f"unknown mix preset {path_or_preset_name!r}; presets: "
                                  f"{', '.join(preset_names())} (or give the path of a YAML file)"])
    return Path(path_or_preset_name)


def load_mix_config(path_or_preset_name: str | Path) -> MixConfig:
    """A preset by name (``cpu_demo``) or a mix YAML file by path; raises `MixConfigError` naming the file."""
    path = _resolve_path(path_or_preset_name)
    where = f"mix file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixConfigError([f"{where}: not found (presets: {', '.join(preset_names())})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MixConfigError([f"{where}: not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise MixConfigError([f"{where}: expected a mapping with name, seed, heldout_rows and sources"])
    try:
        return MixConfig.model_validate(data)
    except ValidationError as exc:
        raise MixConfigError([f"{where}: {line}" for line in _problem_lines(exc)]) from exc
