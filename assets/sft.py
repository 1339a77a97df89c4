"""SFT: the seeded mix of decontaminated rows, and the checkpoint trained on it in its own process."""

from typing import Any

import dagster as dg

from assets.automation import GPU_STAGE
from assets.base_model import BASE_MODEL_ID
from assets.metadata import (
    TRAINING_OWNERS,
    checkpoint_metadata,
    config_hash,
    heldout_effect_metadata,
    image,
    samples,
    table_schema,
)
from resources import ComputeLauncher, TuluStorage
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.mixing.config import load_mix_config
from tulu_pipeline.mixing.publish import build_sft_mix
from tulu_pipeline.mixing.sample import MIX_CODE_VERSION
from tulu_pipeline.plots import histogram_png, markdown_table
from tulu_pipeline.templates.lineage import lineage_hashes
from tulu_pipeline.training.sft_plan import record_trained_on, sft_checkpoint_plan
from tulu_pipeline.training.sft import SFT_CODE_VERSION


class SFTMixConfig(dg.Config):
    mix: str = "cpu_demo"
    """a packaged preset (cpu_demo, tulu3_style) or the path of a mix YAML file"""


@dg.asset(group_name="sft", kinds={"parquet"}, owners=TRAINING_OWNERS, code_version=MIX_CODE_VERSION,
          deps=["decontaminated_prompts", "base_model"],
          description="The SFT mix: a seeded, deterministic sample of decontaminated rows per source (fractions or "
          "exact counts), with a held-out slice. Refuses to read a decontaminated set whose blocking checks failed.")
def sft_mix(context: dg.AssetExecutionContext, config: SFTMixConfig, storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    result = build_sft_mix(store, load_mix_config(config.mix), context.run.run_id,
                           tokenizer_dir=store.path("models", BASE_MODEL_ID))
    per_source = [{"source": s, "rows": n, "tokens": result.tokens_per_source.get(s, 0)}
                  for s, n in sorted(result.rows_per_source.items())]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.dataset.rows,
            "dagster/column_schema": table_schema(ROW_SCHEMA),
            "path": dg.MetadataValue.path(result.dataset.path),
            "mix_hash": result.version,
            "config_hash": config_hash(result.mix.canonical()),
            "mix_name": result.mix.name,
            "seed": result.mix.seed,
            "heldout_rows": len(result.heldout_ids),
            "rows_and_tokens_per_source": dg.MetadataValue.md(markdown_table(per_source, ["source", "rows", "tokens"])),
            "input_versions": dg.MetadataValue.json(result.inputs),
            "template_lineage": dg.MetadataValue.json(lineage_hashes(result.template_lineage)),
            "samples": samples(result.samples, ["row_id", "source", "messages"]),
            "token_length_histogram": image(store, f"reports/sft_mix/{result.version}/token_lengths.png",
                                            histogram_png(result.token_lengths, "sft_mix: tokens per row", "tokens")),
        },
        data_version=dg.DataVersion(result.version),
    )


class SFTCheckpointConfig(dg.Config):
    preset: str = "cpu_demo"
    """a named training preset: cpu_demo (CPU, minutes) or tulu3_8b (the published recipe)"""
    overrides: dict[str, Any] = {}
    """fields of SFTTrainingConfig to change, e.g. {"max_steps": 20}"""


@dg.asset(group_name="sft", kinds={"pytorch", "safetensors"}, owners=TRAINING_OWNERS, code_version=SFT_CODE_VERSION,
          deps=[sft_mix, "base_model"], **GPU_STAGE,
          description="Supervised fine-tuning of the base model on sft_mix (Tülu chat template, assistant-only "
          "loss), run by the compute launcher in its own process; resumes from its last saved step.")
def sft_checkpoint(context: dg.AssetExecutionContext, config: SFTCheckpointConfig, storage: TuluStorage,
                   launcher: ComputeLauncher) -> dg.MaterializeResult:
    store = storage.store()
    plan = sft_checkpoint_plan(store, config.preset, config.overrides, base_model_dir=f"models/{BASE_MODEL_ID}")
    invocation = launcher.run(context, "tulu_pipeline.training.sft_job", extras=plan.extras)
    curve = f"{plan.checkpoint_dir}/loss_curve.png"
    metadata, manifest = checkpoint_metadata(store, plan.checkpoint_id, plan.checkpoint_dir,
                                             invocation.get_materialize_result().metadata or {},
                                             plots={"loss_curve": (curve, curve)}, mix_hash=plan.mix_version)
    metadata["trained_rows"] = record_trained_on(store, plan, manifest, context.run.run_id)
    metadata.update(heldout_effect_metadata(manifest["metrics"].get("heldout_effect")))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(plan.version))


sft_assets = [sft_mix, sft_checkpoint]
