"""audit_report: the data bill of the latest checkpoint, read from the row ledger."""

import dagster as dg

from assets.metadata import TRAINING_OWNERS
from resources import TuluStorage
from tulu_pipeline.provenance.audit import bill_markdown, checkpoint_bill

AUDITED_CHECKPOINTS = ["sft_checkpoint", "dpo_checkpoint", "rlvr_checkpoint"]


@dg.asset(group_name="audit", kinds={"json"}, owners=TRAINING_OWNERS, code_version="1", deps=AUDITED_CHECKPOINTS,
          description="The data bill of the newest checkpoint (RLVR, else DPO, else SFT; a later stage's bill includes "
          "the checkpoint it started from): sources and row counts, licenses (non-commercial flagged), "
          "decontamination status, mix/config hashes and code versions.",
          check_specs=[dg.AssetCheckSpec("bill_consistent", asset="audit_report",
                                         description="ledger, manifest and registry agree on the checkpoint's rows")])
def audit_report(context: dg.AssetExecutionContext, storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    event = None
    for key in reversed(AUDITED_CHECKPOINTS):  # the last stage of the recipe that has a checkpoint
        event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
        if event is not None and event.asset_materialization is not None:
            break
    if event is None or event.asset_materialization is None:
        raise RuntimeError(f"none of {AUDITED_CHECKPOINTS} has been materialized yet")
    checkpoint_id = event.asset_materialization.metadata["checkpoint_id"].value
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
