"""Template lineage checks on the checkpoints: trained with the chat template, tokenizer and label masking
of the data they consumed (blocking), and `checkpoint_diff`: the latest two checkpoints of a lineage compared."""

from collections.abc import Iterable

import dagster as dg

from assets.metadata import TRAINED_CHECKPOINT_ASSETS, latest_checkpoint_id
from resources import TuluStorage
from tulu_pipeline.audit.diff import checkpoint_diff as tulu_diff
from tulu_pipeline.audit.diff import diff_markdown
from tulu_pipeline.audit.template_checks import check_checkpoint_lineage

TEMPLATE_CHECK = "template_lineage_matches_parent"


def _template_check(key: dg.AssetKey) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=key, name=TEMPLATE_CHECK, blocking=True,
                    description="the checkpoint was trained with the chat template, tokenizer and label-masking rule "
                    "its mix / reference log-probs / start checkpoint were tokenized with")
    def template_check(context: dg.AssetCheckExecutionContext, storage: TuluStorage) -> dg.AssetCheckResult:
        checkpoint_id = latest_checkpoint_id(context.instance, key)
        if checkpoint_id is None:
            return dg.AssetCheckResult(passed=False, metadata={"reason": "no materialization with a checkpoint_id yet"})
        result = check_checkpoint_lineage(storage.store(), checkpoint_id)
        return dg.AssetCheckResult(
            passed=result["passed"], severity=dg.AssetCheckSeverity.ERROR, description=result["description"],
            metadata={"checkpoint_id": checkpoint_id, "template_lineage": dg.MetadataValue.json(result["lineage"]),
                      "parents": dg.MetadataValue.json(result["parents"])})

    return template_check


def build_template_checks(checkpoint_keys: Iterable[dg.AssetKey]) -> list[dg.AssetChecksDefinition]:
    """Per checkpoint asset, a blocking check: its template lineage equals every tokenized parent's."""
    return [_template_check(key) for key in checkpoint_keys]


@dg.asset(group_name="audit", kinds={"json"}, code_version="1", deps=TRAINED_CHECKPOINT_ASSETS,
          description="For each checkpoint asset (SFT, DPO, RLVR) with two checkpoints or more, `tulu diff` of its "
          "latest two: rows added and removed per source, decisions, licenses, decontamination, hyperparameters, "
          "code, and eval deltas with paired intervals and flipped items.")
def checkpoint_diff(context: dg.AssetExecutionContext, storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    reports: dict[str, str] = {}
    markdown = []
    for key in TRAINED_CHECKPOINT_ASSETS:
        ids: list[str] = []
        for record in context.instance.fetch_materializations(dg.AssetKey(key), limit=20).records:
            value = record.asset_materialization.metadata.get("checkpoint_id")
            checkpoint_id = getattr(value, "value", value)
            if checkpoint_id and checkpoint_id not in ids:
                ids.append(checkpoint_id)
        if len(ids) < 2:
            continue
        newer, older = ids[0], ids[1]
        diff = tulu_diff(store, older, newer)
        text = diff_markdown(diff)
        base = f"reports/diff/{older}__{newer}"
        store.write_json(f"{base}/diff.json", diff)
        store.write_bytes(f"{base}/diff.md", text.encode())
        reports[key] = store.uri(f"{base}/diff.json")
        markdown.append(text)
    return dg.MaterializeResult(metadata={
        "pairs": len(reports), "reports": dg.MetadataValue.json(reports),
        "diff": dg.MetadataValue.md("\n\n".join(markdown) or "No checkpoint asset has two checkpoints yet.")})
