"""audit_report: the data bill of the latest checkpoint, read from the row ledger."""

import dagster as dg

from assets.metadata import TRAINED_CHECKPOINT_ASSETS, TRAINING_OWNERS, latest_checkpoint_id
from resources import TuluStorage
from tulu_pipeline.audit.reports import bill_markdown, checkpoint_bill


@dg.asset(group_name="audit", kinds={"json"}, owners=TRAINING_OWNERS, code_version="1", deps=TRAINED_CHECKPOINT_ASSETS,
          description="The data bill of the newest checkpoint (RLVR, else DPO, else SFT; a later stage's bill includes "
          "the checkpoint it started from): sources and row counts, licenses (non-commercial flagged), "
          "decontamination status, mix/config hashes and code versions.",
          check_specs=[dg.AssetCheckSpec("bill_consistent", asset="audit_report",
                                         description="ledger, manifest and registry agree on the checkpoint's rows")])
def audit_report(context: dg.AssetExecutionContext, storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    # the last stage of the recipe that has a checkpoint
    checkpoint_id = next((c for c in (latest_checkpoint_id(context.instance, key)
                                      for key in reversed(TRAINED_CHECKPOINT_ASSETS)) if c is not None), None)
    if checkpoint_id is None:
        raise RuntimeError(f"none of {TRAINED_CHECKPOINT_ASSETS} has been materialized yet")
    bill = checkpoint_bill(store, checkpoint_id)
    markdown = bill_markdown(bill)
    base = f"reports/audit/{checkpoint_id}"
    store.write_json(f"{base}/bill.json", bill)
    store.write_bytes(f"{base}/bill.md", markdown.encode())
    checks = bill["checks"]
    return dg.MaterializeResult(
        metadata={
            "checkpoint_id": checkpoint_id,
            "data_bill": dg.MetadataValue.md(markdown),
            "non_commercial_sources": dg.MetadataValue.json(bill["non_commercial_sources"]),
            "commercial_use_ok": bill["commercial_use_ok"],
            "path": dg.MetadataValue.path(store.uri(f"{base}/bill.json")),
        },
        check_results=[dg.AssetCheckResult(
            check_name="bill_consistent", passed=all(v is not False for v in checks.values()),
            metadata={"checks": dg.MetadataValue.json(checks)})],
    )
