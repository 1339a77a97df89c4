"""The benchmarks, their suites and configs, and the seeded items each evaluation runs on.

Suites come from the same source registry decontamination uses (``sources.yaml``: role ``eval``,
``suite`` dev/unseen, ``benchmark``), so a benchmark can only be evaluated if it was also a
decontamination target. The one exception is ``safety`` (HH-RLHF harmless prompts, a *training* pool
in the registry): it is evaluated, and its score is always marked possibly contaminated.

MATH-500 is read from its bundle file; where that file is absent, a seeded 500-item subset of the MATH
test set stands in (`MATH500_FALLBACK`), and the items say so (their source is ``math_test``).

Items are chosen by a seeded hash of their row id (``sha256(seed:row_id)``), so the same config gives
the same items on every machine, and a larger sample contains every smaller one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tulu_pipeline.data.loaders import iter_source_rows
from tulu_pipeline.data.registry import get_source, registry
from tulu_pipeline.evaluation.scoring import split_answers
from tulu_pipeline.hashing import json_hash

Messages = list[dict[str, str]]

# how each registry benchmark is scored (benchmarks of the registry without one are not evaluated yet:
# self_instruct_user_oriented and tulu1_human_eval). The open-ended sets without reference outputs are judged
# against the parent checkpoint's outputs on the same items ("pairwise_vs_parent"); MT-Bench on its first
# turn only (a second turn needs the model's own first answer in the prompt, a protocol not built yet).
KIND_OF = {
    "gsm8k": "verified", "math500": "verified", "math": "verified", "ifeval": "ifeval",
    "humaneval": "humaneval", "mbpp": "mbpp", "alpaca_eval": "winrate", "bbh": "exact_match",
    "truthfulqa": "mc1", "truthfulqa_2025": "mc1", "safety": "refusal",
    "mt_bench": "pairwise_vs_parent", "vicuna_bench": "pairwise_vs_parent", "koala": "pairwise_vs_parent",
    "wizardlm_testset": "pairwise_vs_parent",
}
# the kinds scored by the judge's pairwise preference, both orders (`scoring.score_swapped_preference`)
PAIRWISE_KINDS = ("winrate", "pairwise_vs_parent")
VERIFIER_TASK = {"gsm8k": "gsm8k", "math500": "math", "math": "math"}
# exemplars for few-shot prompts: a training file, or the benchmark's own first items (then excluded)
FEW_SHOT_SOURCE = {"gsm8k": "gsm8k_train", "math500": "math_train", "math": "math_train"}
SAME_FILE_FEW_SHOT = {"bbh", "mbpp"}
SAFETY_SOURCE = "hh_rlhf_harmless"
# MATH-500 without its file: a seeded 500-item subset of the MATH test set (itself a registry target)
MATH500_FALLBACK = ("math_test", 500, 500)  # source, items, seed
# the metric a benchmark's headline number is (for tables)
METRIC_OF = {
    "verified": "accuracy", "ifeval": "prompt-level strict accuracy", "humaneval": "pass@1", "mbpp": "pass@1",
    "winrate": "win rate vs reference", "exact_match": "exact match", "mc1": "MC1 accuracy", "refusal": "refusal rate",
    "pairwise_vs_parent": "win rate vs parent",
}


@dataclass(frozen=True)
class Benchmark:
    """One evaluated benchmark: its suite, how it is scored and the registry sources holding its items."""

    name: str
    suite: str
    kind: str
    sources: tuple[str, ...]
    decontamination_target: bool

    @property
    def metric(self) -> str:
        return METRIC_OF[self.kind]


class BenchmarkConfig(BaseModel):
    """How one benchmark is run. Defaults are the small CPU configuration; `benchmark_config(name, "full")`
    gives the published-size one."""

    model_config = ConfigDict(extra="forbid")
    sample_size: int | None = Field(default=8, ge=1)
    """items evaluated (seeded choice); None = every item"""
    few_shot: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    """0 = greedy (pass@1 and exact match are reported for greedy decoding)"""
    seed: int = 1234
    bootstrap_resamples: int = Field(default=1000, ge=0)
    sandbox_wall_s: float = Field(default=10.0, gt=0)
    sandbox_cpu_s: int = Field(default=5, ge=1)
    sandbox_memory_mb: int = Field(default=512, ge=64)

    def digest(self) -> str:
        return json_hash(self.model_dump(mode="json"))


Preset = Literal["cpu", "full"]
# The CPU preset's stated budget: a generated benchmark decodes at most this many tokens per checkpoint (items x
# max_new_tokens). Decoding is batched, so a benchmark costs its tokens rather than its items: shorter answers
# buy more items (8 at 128 tokens, 4 at 256 for code, 16 at 64 for BBH). The judged open-ended sets are bounded
# by their judge passes instead (4 per item, each reading both answers), so they name their own size.
CPU_DECODE_BUDGET = 1024
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "humaneval": {"max_new_tokens": 256}, "mbpp": {"max_new_tokens": 256},
        "bbh": {"few_shot": 3, "max_new_tokens": 64},
        "alpaca_eval": {"max_new_tokens": 128}, "safety": {"max_new_tokens": 96},
        "truthfulqa": {"sample_size": 16}, "truthfulqa_2025": {"sample_size": 16},
        # judged against the parent: each item costs two generations (this checkpoint's, and its parent's in
        # the parent's own evaluation) and four judge passes; a few short answers keep the CPU run small
        **{name: {"sample_size": 3, "max_new_tokens": 48}
           for name in ("mt_bench", "vicuna_bench", "koala", "wizardlm_testset")},
    },
    "full": {
        "*": {"sample_size": None, "max_new_tokens": 1024},
        "gsm8k": {"few_shot": 8}, "math500": {"few_shot": 4, "max_new_tokens": 2048},
        "math": {"few_shot": 4, "max_new_tokens": 2048, "sample_size": 5000},
        "bbh": {"few_shot": 3, "max_new_tokens": 512}, "mbpp": {"few_shot": 3, "max_new_tokens": 512},
        "humaneval": {"max_new_tokens": 512}, "alpaca_eval": {"max_new_tokens": 2048},
        "safety": {"max_new_tokens": 512},
    },
}


def benchmark_config(name: str, preset: Preset = "cpu", **overrides: Any) -> BenchmarkConfig:
    """A benchmark's config: the preset's values for it, then ``overrides``; on the CPU preset a generated
    benchmark without a set size gets as many items as `CPU_DECODE_BUDGET` allows at its answer length."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown eval preset {preset!r}; expected one of {sorted(_PRESETS)}")
    values = {**_PRESETS[preset].get("*", {}), **_PRESETS[preset].get(name, {}), **overrides}
    if preset == "cpu" and "sample_size" not in values and KIND_OF.get(name, "") != "mc1":
        max_new_tokens = values.get("max_new_tokens", BenchmarkConfig.model_fields["max_new_tokens"].default)
        values["sample_size"] = max(1, CPU_DECODE_BUDGET // max_new_tokens)
    return BenchmarkConfig(**values)


@lru_cache(maxsize=1)
def benchmarks() -> dict[str, Benchmark]:
    """Every evaluated benchmark, dev suite first, from the source registry (plus ``safety``)."""
    grouped: dict[str, list[Any]] = {}
    for spec in registry():
        if spec.role == "eval" and spec.benchmark in KIND_OF:
            grouped.setdefault(spec.benchmark, []).append(spec)
    found = {name: Benchmark(name, specs[0].suite, KIND_OF[name], tuple(s.id for s in specs), True)
             for name, specs in grouped.items()}
    found["safety"] = Benchmark("safety", "dev", "refusal", (SAFETY_SOURCE,), False)
    order = {"dev": 0, "unseen": 1}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[1].suite, 2), kv[0])))


def get_benchmark(name: str) -> Benchmark:
    try:
        return benchmarks()[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(benchmarks())}") from None


def suite(name: str) -> list[str]:
    """The benchmarks of a suite (``dev`` or ``unseen``)."""
    names = [b.name for b in benchmarks().values() if b.suite == name]
    if not names:
        raise ValueError(f"no benchmarks in suite {name!r}; suites are {sorted({b.suite for b in benchmarks().values()})}")
    return names


# ---------------------------------------------------------------------------------------------
# items
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSample:
    """One item to evaluate: its ids (``item_id`` is the registry row id, the one decontamination and
    the ledger use), the chat prompt sent to the model, and what scoring needs from the source row."""

    item_id: str
    eval_id: str
    benchmark: str
    source: str
    prompt: Messages
    reference: dict[str, Any] = field(default_factory=dict)


def rank_key(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def _rows(source_id: str, root: Path | None) -> list[dict[str, Any]]:
    return list(iter_source_rows(get_source(source_id), root))


def _source_rows(benchmark: str, source_id: str, root: Path | None) -> tuple[str, list[dict[str, Any]]]:
    """A benchmark source's rows; MATH-500 falls back to `MATH500_FALLBACK` when its file is absent."""
    if benchmark == "math500" and not get_source(source_id).local_path(root).exists():
        fallback, items, seed = MATH500_FALLBACK
        rows = sorted(_rows(fallback, root), key=lambda r: rank_key(seed, r["row_id"]))[:items]
        return fallback, rows
    return source_id, _rows(source_id, root)


def _user(row: dict[str, Any]) -> str:
    return "\n\n".join(m["content"] for m in row["messages"] if m["role"] == "user")


def _assistant(row: dict[str, Any]) -> str:
    return "\n\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")


def _extra(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["extra"]) if row.get("extra") else {}


MATH_INSTRUCTION = "Solve the problem step by step. Put your final answer within \\boxed{}."
GSM8K_INSTRUCTION = "Solve the problem step by step. End with \"The answer is N.\" where N is the final number."
BBH_INSTRUCTION = "Answer the question. End your reply with \"So the answer is <answer>.\""
CODE_INSTRUCTION = "Reply with the complete Python code in one ```python code block."


def _first_user(row: dict[str, Any]) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def _question(benchmark: Benchmark, row: dict[str, Any]) -> str:
    """The user turn for one item (exemplars use the same form)."""
    if benchmark.kind == "pairwise_vs_parent":
        return _first_user(row)  # MT-Bench: the first of its two turns
    if benchmark.kind == "verified":
        instruction = GSM8K_INSTRUCTION if VERIFIER_TASK[benchmark.name] == "gsm8k" else MATH_INSTRUCTION
        return f"{_user(row)}\n\n{instruction}"
    if benchmark.kind == "exact_match":
        return f"{_user(row)}\n\n{BBH_INSTRUCTION}"
    if benchmark.kind == "humaneval":
        return f"Complete the following Python function.\n\n```python\n{_user(row)}```\n\n{CODE_INSTRUCTION}"
    if benchmark.kind == "mbpp":
        tests = "\n".join(_extra(row).get("test_list") or [])
        return f"{_user(row)}\nYour code should pass these tests:\n\n{tests}\n\n{CODE_INSTRUCTION}"
    return _user(row)


def _exemplar_answer(benchmark: Benchmark, row: dict[str, Any]) -> str:
    if benchmark.kind == "exact_match":
        return f"So the answer is {row['ground_truth']}."
    if benchmark.kind == "mbpp":
        return f"```python\n{_assistant(row)}\n```"
    if benchmark.kind == "verified" and VERIFIER_TASK[benchmark.name] == "gsm8k":
        return _assistant(row).replace("####", "The answer is") + "."
    return _assistant(row)


def _reference(benchmark: Benchmark, row: dict[str, Any]) -> dict[str, Any]:
    extra = _extra(row)
    if benchmark.kind in ("verified", "exact_match"):
        return {"ground_truth": row.get("ground_truth")}
    if benchmark.kind == "ifeval":
        return {"constraints": json.loads(row["constraints"])}
    if benchmark.kind == "humaneval":
        return {"prompt": _user(row), "test": extra["test"], "entry_point": extra["entry_point"]}
    if benchmark.kind == "mbpp":
        return {"test_list": extra.get("test_list") or [], "test_setup_code": extra.get("test_setup_code") or ""}
    if benchmark.kind == "winrate":
        return {"reference_output": _assistant(row), "reference_generator": extra.get("generator")}
    if benchmark.kind == "pairwise_vs_parent":
        return {"category": extra.get("category") or extra.get("Skill"),
                "turns": sum(m["role"] == "user" for m in row["messages"])}
    if benchmark.kind == "mc1":
        best = _assistant(row)
        wrong = split_answers(extra.get("Incorrect Answers"))
        if extra.get("Best Incorrect Answer") and extra["Best Incorrect Answer"] not in wrong:
            wrong.insert(0, extra["Best Incorrect Answer"])
        return {"choices": [best] + [w for w in wrong if w != best], "correct": 0}
    return {}


def load_samples(name: str, config: BenchmarkConfig, root: Path | None = None) -> list[EvalSample]:
    """The items a run of ``name`` evaluates under ``config``, each with its full chat prompt."""
    benchmark = get_benchmark(name)
    pool: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = []  # (source, row, exemplar rows)
    for source in benchmark.sources:
        source, rows = _source_rows(name, source, root)
        exemplars: list[dict[str, Any]] = []
        if config.few_shot and benchmark.name in SAME_FILE_FEW_SHOT:
            exemplars, rows = rows[: config.few_shot], rows[config.few_shot:]
        elif config.few_shot and benchmark.name in FEW_SHOT_SOURCE:
            exemplars = _rows(FEW_SHOT_SOURCE[benchmark.name], root)[: config.few_shot]
        if benchmark.kind == "refusal":  # the prompt is the transcript up to its last human turn
            rows = [r for r in rows if r["messages"] and r["messages"][-1]["role"] == "user"]
        if benchmark.kind == "mc1":
            rows = [r for r in rows if len(_reference(benchmark, r)["choices"]) >= 2]
        pool.extend((source, row, exemplars) for row in rows)
    pool.sort(key=lambda entry: rank_key(config.seed, entry[1]["row_id"]))
    if config.sample_size is not None:
        pool = pool[: config.sample_size]
    samples = []
    for source, row, exemplars in pool:
        prompt: Messages = []
        for example in exemplars:
            prompt += [{"role": "user", "content": _question(benchmark, example)},
                       {"role": "assistant", "content": _exemplar_answer(benchmark, example)}]
        if benchmark.kind == "refusal":
            prompt += [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        else:
            prompt.append({"role": "user", "content": _question(benchmark, row)})
        samples.append(EvalSample(item_id=row["row_id"], eval_id=str(row.get("eval_id") or row["row_id"]),
                                  benchmark=name, source=source, prompt=prompt,
                                  reference=_reference(benchmark, row)))
    return samples
