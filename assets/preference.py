"""Preference data (Tülu 3 DPO data): prompts, on-policy completions from a model pool, judge ratings on four
UltraFeedback aspects, and chosen/rejected pairs with the bundled human preference data, blocking checks."""

import json
from collections import Counter
from typing import Any

import dagster as dg
from pydantic import Field

from assets.automation import GPU_STAGE
from assets.base_model import BASE_MODEL_ID
from assets.curation import EVAL_KEYS
from assets.metadata import TRAINING_OWNERS, config_hash, image, latest_checkpoint_id, samples, table_schema
from resources import ComputeLauncher, TuluStorage
from resources.generation import GenerationResource, JudgeResource
from tulu_pipeline.curation.config import CurationConfig, EvalSelection
from tulu_pipeline.curation.decontaminate import DecontamConfig
from tulu_pipeline.curation.stages import build_eval_index
from tulu_pipeline.generation.base import SamplingParams
from tulu_pipeline.generation.spec import BackendSpec
from tulu_pipeline.plots import histogram_png, markdown_table
from tulu_pipeline.preference.completions import (
    PoolModel,
    completions_version,
    generate_pool,
    latest_sft_checkpoint,
    model_pool,
    publish_completions,
    requests_path,
    write_generation_requests,
)
from tulu_pipeline.preference.judge import judge_identity
from tulu_pipeline.preference.judged_completions import (
    judge_output_path,
    judge_requests_path,
    judged_version,
    publish_judgments,
    verifiable_prompts,
    write_judge_requests,
)
from tulu_pipeline.preference.pairs import (
    PairConfig,
    build_preference_pairs,
    identical_pairs,
    pair_eval_overlaps,
    prompt_mismatches,
    record_pair_checks,
)
from tulu_pipeline.preference.prompts import (
    PREFERENCE_CODE_VERSION,
    PromptSelectionConfig,
    select_preference_prompts,
)
from tulu_pipeline.preference.rubric import ASPECTS, RUBRIC_VERSION, rubric_hash
from tulu_pipeline.preference.schema import (
    COMPLETION_SCHEMA,
    COMPLETIONS_DATASET,
    JUDGED_SCHEMA,
    PAIR_SCHEMA,
    PROMPT_SCHEMA,
    PROMPTS_DATASET,
)

GENERATION_JOB = "tulu_pipeline.generation.job"
JUDGE_JOB = "tulu_pipeline.preference.judge_job"


def _latest(store, name: str) -> str:
    version = store.latest_version(name)
    if version is None:
        raise FileNotFoundError(f"{name} has not been materialized under {store.url}")
    return version


def _reported(invocation: Any) -> dict[str, Any]:
    """The plain values a job reported with its materialization (empty when it reported none)."""
    from dagster_pipes import DagsterPipesError

    if invocation is None:  # a launcher that hands back no invocation (tests)
        return {}
    try:
        metadata = invocation.get_materialize_result().metadata or {}
    except DagsterPipesError:  # the job reported no materialization
        return {}
    return {k: getattr(v, "value", v) for k, v in metadata.items()
            if isinstance(getattr(v, "value", v), (int, float, str, bool))}


def _per_key_table(counts: dict[str, Any], key: str, value: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table([{key: k, value: v} for k, v in sorted(counts.items())], [key, value]))


# ---------------------------------------------------------------------------------------------
class PreferencePromptsConfig(dg.Config):
    size: int = 96
    """prompts to sample (Tülu 3 uses hundreds of thousands; the CPU default is small)"""
    sources: list[str] | None = Field(default_factory=lambda: ["gsm8k_train"])
    """sources to sample from; None: every source of the pool but the human preference sources. The CPU
    default, GSM8K, has a verifier: its pairs (rank_by verified) need no judge and teach the policy something
    a 135M model can learn in minutes"""
    seed: int = 0
    exclude_sft_mix: bool = True
    """leave out every row of the latest sft_mix, held-out rows included"""


@dg.asset(group_name="preference", kinds={"parquet"}, owners=TRAINING_OWNERS, code_version=PREFERENCE_CODE_VERSION,
          deps=["decontaminated_prompts", "sft_mix"],
          description="A seeded sample of decontaminated prompts (cut after the last user turn, reference reply "
          "kept), disjoint from the SFT mix; one selected_for_preference ledger event per row. Refuses a "
          "decontaminated set whose blocking checks failed.")
def preference_prompts(context: dg.AssetExecutionContext, config: PreferencePromptsConfig,
                       storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    selection = PromptSelectionConfig(**config.model_dump())
    result = select_preference_prompts(store, selection, context.run.run_id)
    lengths = [sum(len(m["content"]) for m in r["messages"]) for r in store.iter_rows(PROMPTS_DATASET, result.version)]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.dataset.rows,
            "dagster/column_schema": table_schema(PROMPT_SCHEMA),
            "path": dg.MetadataValue.path(result.dataset.path),
            "version": result.version,
            "config_hash": config_hash(selection),
            "rows_per_source": _per_key_table(result.per_source, "source", "rows"),
            "available_per_source": dg.MetadataValue.json(result.available),
            "excluded_sft_mix_rows": result.excluded_sft_rows,
            "input_versions": dg.MetadataValue.json(result.inputs),
            "samples": samples(result.samples, ["row_id", "source", "messages", "reference_response"]),
            "prompt_length_histogram": image(store, f"reports/{PROMPTS_DATASET}/{result.version}/prompt_chars.png",
                                             histogram_png(lengths, "preference_prompts: characters", "characters")),
        },
        data_version=dg.DataVersion(result.version),
    )


# ---------------------------------------------------------------------------------------------
class PolicyCompletionsConfig(dg.Config):
    samples_per_model: int = 2
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    include_sft: bool = True
    """the on-policy model: the latest sft_checkpoint (or sft_checkpoint_id)"""
    sft_checkpoint_id: str | None = None
    include_base: bool = False
    """the base model as a generator too (Tülu 3's pool is many models; the verified CPU pairs need only the
    policy's own samples and the reference)"""
    include_reference: bool = True
    """the prompt row's own assistant turn, where it has one"""
    extra_models: list[dict[str, Any]] = Field(default_factory=list)
    """more generators, each a BackendSpec as JSON (vLLM, an OpenAI-compatible server)"""


def _sft_checkpoint_id(context: dg.AssetExecutionContext, store, configured: str | None) -> str:
    if configured:
        return latest_sft_checkpoint(store, configured)
    return latest_sft_checkpoint(store, latest_checkpoint_id(context.instance, "sft_checkpoint"))


def pool_models(context: dg.AssetExecutionContext, store, config: PolicyCompletionsConfig,
                generation: GenerationResource) -> list[PoolModel]:
    """The pool `model_pool` builds from this asset's config and the generation resource's backend specs."""
    sft = None
    if config.include_sft:
        checkpoint = _sft_checkpoint_id(context, store, config.sft_checkpoint_id)
        sft = (checkpoint, generation.spec(f"models/{checkpoint}", checkpoint).model_dump(mode="json"))
    base = (BASE_MODEL_ID, generation.spec(f"models/{BASE_MODEL_ID}", BASE_MODEL_ID).model_dump(mode="json")
            ) if config.include_base else None
    extra = [(spec.resolved_model_id, spec.model_dump(mode="json"))
             for spec in map(BackendSpec.model_validate, config.extra_models)]
    return model_pool(sft, base, extra, config.include_reference)


@dg.asset(group_name="preference", kinds={"pytorch", "parquet"}, owners=TRAINING_OWNERS,
          code_version=PREFERENCE_CODE_VERSION, deps=[preference_prompts, "sft_checkpoint", "base_model"],
          **GPU_STAGE,
          description="N completions per preference prompt from each model of the pool (the on-policy SFT "
          "checkpoint, the base model, configured vLLM/HTTP models) plus the reference reply; each model runs "
          "the generation job in its own process. Every completion records model id, sampling params and seed.")
def policy_completions(context: dg.AssetExecutionContext, config: PolicyCompletionsConfig, storage: TuluStorage,
                       launcher: ComputeLauncher, generation: GenerationResource) -> dg.MaterializeResult:
    store = storage.store()
    prompts_version = _latest(store, PROMPTS_DATASET)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                            n=config.samples_per_model, seed=config.seed)
    pool = pool_models(context, store, config, generation)
    version = completions_version(prompts_version, pool, params, config.include_reference)
    requests_rel = requests_path(version)
    count = write_generation_requests(store, prompts_version, requests_rel)
    prompt_ids = [r["row_id"] for r in store.iter_rows(PROMPTS_DATASET, prompts_version)]
    outputs, runs = generate_pool(
        store, version, pool, prompt_ids, params.n, log=context.log.info,
        generate=lambda model, rel: _reported(launcher.run(
            context, GENERATION_JOB, kind="generate", extras={"tulu_home": store.url, "requests": requests_rel,
                                                              "output": rel, "backend": model.backend,
                                                              "params": params.to_json()})))
    result = publish_completions(store, prompts_version, version, outputs, config.include_reference)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.dataset.rows,
            "dagster/column_schema": table_schema(COMPLETION_SCHEMA),
            "path": dg.MetadataValue.path(result.dataset.path),
            "version": result.version,
            "config_hash": config_hash(config),
            "prompts": count,
            "model_pool": dg.MetadataValue.json([{"model_id": m.model_id, "role": m.role, "backend": m.backend}
                                                 for m in pool]),
            "sampling_params": dg.MetadataValue.json(params.to_json()),
            "generation_runs": dg.MetadataValue.json(runs),
            "completions_per_model": _per_key_table(result.per_model, "model_id", "completions"),
            "input_versions": dg.MetadataValue.json({PROMPTS_DATASET: prompts_version}),
            "samples": samples(result.samples, ["prompt_row_id", "model_id", "seed", "text"]),
            "completion_length_histogram": image(store, f"reports/{COMPLETIONS_DATASET}/{version}/lengths.png",
                                                 histogram_png(result.lengths, "policy_completions: characters",
                                                               "characters")),
        },
        data_version=dg.DataVersion(result.version),
    )


# ---------------------------------------------------------------------------------------------
class JudgedCompletionsConfig(dg.Config):
    batch_size: int = 8
    seed: int = 0
    """seed of the API judge's first attempt (retries use other seeds)"""
    temperature: float = 0.0
    retry_temperature: float = 0.7
    max_new_tokens: int = 64
    judge_verifiable: bool = False
    """also rate the completions of prompts a verifier can check (GSM8K, MATH, IFEval constraints); off by
    default: preference_pairs (rank_by verified) pairs those by their verifier"""


@dg.asset(group_name="preference", kinds={"pytorch", "parquet"}, owners=TRAINING_OWNERS,
          code_version=PREFERENCE_CODE_VERSION, deps=[policy_completions, "base_model"], **GPU_STAGE,
          description="1–5 ratings of every completion on helpfulness, honesty, instruction following and "
          "truthfulness (UltraFeedback-style, versioned rubric), by the judge job in its own process: a local "
          "model by constrained log-likelihood choice, or an OpenAI-compatible endpoint with strict parsing, "
          "retries and a quarantine for unparseable judgments. Prompts with a verifier are not judged (their "
          "pairs come from the verifier) unless judge_verifiable is set.")
def judged_completions(context: dg.AssetExecutionContext, config: JudgedCompletionsConfig, storage: TuluStorage,
                       launcher: ComputeLauncher, judge: JudgeResource) -> dg.MaterializeResult:
    store = storage.store()
    completions = _latest(store, COMPLETIONS_DATASET)
    spec = judge.spec()
    judge_id = judge_identity(judge.kind, spec.resolved_model_id)
    settings = {"kind": judge.kind, "judge_id": judge_id, "max_retries": judge.max_retries, "seed": config.seed,
                "temperature": config.temperature, "retry_temperature": config.retry_temperature,
                "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                **({} if config.judge_verifiable else {"skip_verifiable": True})}
    version = judged_version(completions, judge_id, {**settings, "backend": spec.model_dump(mode="json")})
    requests_rel, output_rel = judge_requests_path(version), judge_output_path(version)
    skip = frozenset() if config.judge_verifiable else frozenset(verifiable_prompts(store, completions))
    count = write_judge_requests(store, completions, requests_rel, skip)
    if count:
        judge_run = _reported(launcher.run(context, JUDGE_JOB, kind="generate",
                                           extras={"tulu_home": store.url, "requests": requests_rel,
                                                   "output": output_rel, "backend": spec.model_dump(mode="json"),
                                                   "judge": settings}))
    else:  # every prompt is paired by its verifier: no judge process, no model load
        store.write_jsonl(output_rel, [])
        judge_run = {"skipped": "no completion to judge: every prompt has a verifier"}
    result = publish_judgments(store, completions, version, output_rel, judge_id, context.run.run_id, skip)
    histogram_rows = [{"aspect": a, **{str(r): result.aspect_histograms[a].get(r, 0) for r in range(1, 6)}}
                      for a in ASPECTS]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.dataset.rows,
            "dagster/column_schema": table_schema(JUDGED_SCHEMA),
            "path": dg.MetadataValue.path(result.dataset.path),
            "version": result.version,
            "config_hash": config_hash(settings),
            "judge_id": judge_id,
            "rubric_version": RUBRIC_VERSION,
            "rubric_hash": rubric_hash(),
            "completions": count,
            "quarantined": result.quarantined,
            "judge_run": dg.MetadataValue.json(judge_run),
            "quarantine_path": dg.MetadataValue.path(result.quarantine_path),
            "ratings_per_aspect": dg.MetadataValue.md(markdown_table(histogram_rows, ["aspect", *"12345"])),
            "mean_rating_per_model": dg.MetadataValue.json(result.per_model_mean),
            "input_versions": dg.MetadataValue.json({COMPLETIONS_DATASET: completions}),
            "samples": samples(result.samples, ["prompt_row_id", "model_id", "mean_rating", "ratings", "text"]),
            "mean_rating_histogram": image(store, f"reports/judged_completions/{version}/mean_ratings.png",
                                           histogram_png(result.mean_ratings, "judged_completions: mean rating",
                                                         "mean rating", bins=17)),
        },
        data_version=dg.DataVersion(result.version),
    )


# ---------------------------------------------------------------------------------------------
class PreferencePairsConfig(dg.Config):
    seed: int = 0
    rank_by: str = "verified"
    """rating: mean of the 1-5 ratings (Tülu 3); expected: mean expected rating of the log-likelihood judge
    (breaks the ties a small local judge leaves); auto: expected where the judge gave one, else rating;
    verified: a verified completion against a failing SFT sample where a verifier applies, else auto"""
    heldout_fraction: float = 0.4
    """share of prompts held out for DPO evaluation (by seeded hash of the prompt row id); 0.4 of the CPU
    default's 96 prompts leaves ~36 held-out pairs, enough for a paired interval to exclude zero when a third of
    them flip"""
    human_sources: list[str] = Field(default_factory=list)
    """human preference sources to ingest as pairs (hh_rlhf_harmless, fine_grained_rlhf_qa); none on the CPU
    default: a 135M model does not separate HH-RLHF pairs in a few steps"""
    human_rows_per_source: int | None = 32
    """rows read per human preference source (a seeded sample; None: all)"""
    eval_suites: list[str] = Field(default_factory=lambda: ["dev", "unseen"])
    eval_benchmarks: list[str] | None = None
    """benchmarks the pair texts are checked against (None: every benchmark of the suites)"""
    ngram: int = 8
    threshold: float = 0.5


@dg.asset(group_name="preference", kinds={"parquet"}, owners=TRAINING_OWNERS, code_version=PREFERENCE_CODE_VERSION,
          deps=[judged_completions, "decontaminated_prompts", *EVAL_KEYS],
          check_specs=[
              dg.AssetCheckSpec("chosen_differs_from_rejected", asset="preference_pairs", blocking=True,
                                description="no pair's chosen text equals its rejected text"),
              dg.AssetCheckSpec("same_prompt", asset="preference_pairs", blocking=True,
                                description="chosen and rejected answer the pair's prompt (re-joined to their "
                                "completions or source rows)"),
              dg.AssetCheckSpec("no_eval_overlap", asset="preference_pairs", blocking=True,
                                description="no prompt, chosen or rejected text overlaps an eval item "
                                "(plain reference implementation)"),
          ],
          description="Chosen (best mean rating) / rejected (a seeded random lower-rated completion) pairs per "
          "prompt, ties dropped with a reason; HH-RLHF and FineGrainedRLHF pairs (origin human) from "
          "decontaminated rows; a seeded held-out split; a paired ledger event per prompt row.")
def preference_pairs(context: dg.AssetExecutionContext, config: PreferencePairsConfig, storage: TuluStorage):
    store = storage.store()
    pair_config = PairConfig(seed=config.seed, rank_by=config.rank_by, heldout_fraction=config.heldout_fraction,
                             human_sources=config.human_sources, human_rows_per_source=config.human_rows_per_source)
    decontam = DecontamConfig(ngram=config.ngram, threshold=config.threshold)
    curation = CurationConfig(decontam=decontam, evals=EvalSelection(suites=config.eval_suites,
                                                                     benchmarks=config.eval_benchmarks))
    index, eval_inputs = build_eval_index(store, curation)
    result = build_preference_pairs(store, pair_config, context.run.run_id, index=index, decontam=decontam,
                                    eval_inputs=eval_inputs)
    margins_png = histogram_png(result.rating_margins, "preference_pairs: chosen - rejected mean rating",
                                "rating margin", bins=16)
    origins = Counter(p["origin"] for p in store.iter_rows("preference_pairs", result.version))
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.dataset.rows,
            "dagster/column_schema": table_schema(PAIR_SCHEMA),
            "path": dg.MetadataValue.path(result.dataset.path),
            "version": result.version,
            "config_hash": config_hash(config),
            "counts": dg.MetadataValue.json(result.counts),
            "pairs_per_origin": dg.MetadataValue.json(dict(origins)),
            "dropped_reasons": _per_key_table(result.dropped_reasons, "reason", "prompts"),
            "quarantine_path": dg.MetadataValue.path(result.quarantine.path),
            "input_versions": dg.MetadataValue.json(result.inputs),
            "samples": samples(result.samples, ["pair_id", "origin", "split", "chosen_rating", "rejected_rating",
                                                "chosen", "rejected"]),
            "rating_margin_histogram": image(store, f"reports/preference_pairs/{result.version}/margins.png",
                                             margins_png),
        },
        data_version=dg.DataVersion(result.version),
    )
    identical = identical_pairs(store, result.version)
    mismatched = prompt_mismatches(store, result.version, result.inputs["judged_completions"],
                                   result.inputs["decontaminated_prompts"])
    overlaps = pair_eval_overlaps(store, result.version, index, decontam)
    record_pair_checks(store, result.version, {"chosen_differs_from_rejected": not identical,
                                               "same_prompt": not mismatched, "no_eval_overlap": not overlaps})
    yield dg.AssetCheckResult(check_name="chosen_differs_from_rejected", passed=not identical,
                              metadata={"pair_ids": dg.MetadataValue.json(identical)})
    yield dg.AssetCheckResult(check_name="same_prompt", passed=not mismatched,
                              metadata={"problems": dg.MetadataValue.json(mismatched)})
    yield dg.AssetCheckResult(check_name="no_eval_overlap", passed=not overlaps,
                              metadata={"violations": dg.MetadataValue.json(json.loads(json.dumps(overlaps)))})


preference_assets = [preference_prompts, policy_completions, judged_completions, preference_pairs]
preference_checks: list = []  # the blocking checks are declared on preference_pairs (check_specs)
