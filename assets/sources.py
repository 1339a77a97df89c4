"""raw/<source>: one asset per registered dataset file, generated from the source registry."""


from typing import Literal

import dagster as dg

from assets.automation import TRANSIENT_RETRY, final_on_bad_data, source_freshness_policy
from assets.metadata import DATA_OWNERS, config_hash, image, samples, table_schema
from resources import DataBundle, TuluStorage
from tulu_pipeline.data.ingest import LOADER_VERSION, ingest_source
from tulu_pipeline.data.registry import SourceSpec, fetch_source, registry
from tulu_pipeline.data.schema import ROW_SCHEMA
from tulu_pipeline.plots import histogram_png


class RawSourceConfig(dg.Config):
    on_error: Literal["raise", "quarantine"] = "raise"
    """raise: stop at the first bad record, naming file and line; quarantine: set it aside with its reason."""



def build_raw_source_asset(spec: SourceSpec) -> dg.AssetsDefinition:
    key = dg.AssetKey(["raw", spec.id])
    tags = {"role": spec.role, **({"suite": spec.suite} if spec.suite else {})}

    @dg.asset(
        key=key,
        group_name="sources",
        kinds={"parquet"},
        owners=DATA_OWNERS,
        tags=tags,
        code_version=LOADER_VERSION,
        deps=[dg.AssetKey(["source_file", spec.id])],
        retry_policy=TRANSIENT_RETRY,
        freshness_policy=source_freshness_policy(),
        description=f"{spec.path} ({spec.role}{', ' + spec.suite + ' suite' if spec.suite else ''}): "
        f"{spec.rows} rows, {spec.license}. Upstream: {spec.upstream_repo}@{spec.upstream_commit[:10]}.",
        metadata={"source_path": spec.path, "license": spec.license, "sha256": spec.sha256},
        check_specs=[
            dg.AssetCheckSpec("row_count_matches_manifest", asset=key, blocking=True,
                              description="rows loaded (plus quarantined) equal MANIFEST.json's count"),
            dg.AssetCheckSpec("unique_row_ids", asset=key, blocking=True,
                              description="no two rows share a row_id"),
        ],
    )
    def raw_source(context: dg.AssetExecutionContext, config: RawSourceConfig,
                   storage: TuluStorage, data_bundle: DataBundle) -> dg.MaterializeResult:
        store = storage.store()
        root = data_bundle.path()
        if data_bundle.download_missing and not spec.local_path(root).exists():
            context.log.info(f"downloading {spec.path} from {spec.upstream_url}")
            fetch_source(spec, root)
        with final_on_bad_data():
            result = ingest_source(spec, store, context.run.run_id, root=root, on_error=config.on_error)
        histogram = image(store, f"reports/raw/{spec.id}/{result.version}/lengths.png",
                          histogram_png(result.text_lengths, f"{spec.id}: text length", "characters"))
        loaded = result.dataset.rows + len(result.quarantined)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.dataset.rows,
                "dagster/column_schema": table_schema(ROW_SCHEMA),
                "path": dg.MetadataValue.path(result.dataset.path),
                "version": result.version,
                "config_hash": config_hash({"mapping": spec.mapping.model_dump(), "records": spec.records,
                                            "on_error": config.on_error}),
                "license": spec.license,
                "non_commercial": spec.is_non_commercial,
                "file_sha256": spec.sha256,
                "quarantined": len(result.quarantined),
                "quarantine_path": dg.MetadataValue.path(result.quarantine_path or ""),
                "ledger_events": result.ledger_events,
                "samples": samples(result.samples, ["row_id", "source_key", "messages", "ground_truth", "eval_id"]),
                "length_histogram": histogram,
            },
            data_version=dg.DataVersion(result.version),
            check_results=[
                dg.AssetCheckResult(
                    check_name="row_count_matches_manifest", passed=loaded == spec.rows,
                    metadata={"expected": spec.rows, "loaded": result.dataset.rows, "quarantined": len(result.quarantined)},
                ),
                dg.AssetCheckResult(
                    check_name="unique_row_ids", passed=result.duplicate_row_ids == 0,
                    metadata={"duplicates": result.duplicate_row_ids},
                ),
            ],
        )

    return raw_source


raw_source_assets = [build_raw_source_asset(spec) for spec in registry()]
