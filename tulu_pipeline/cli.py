"""The `tulu` command: inspect sources, prepare the base model, trace and audit rows, set up the instance.

It runs without Dagster: everything here reads the registry and TULU_HOME directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tulu_pipeline import settings


def _store(args: argparse.Namespace):
    from tulu_pipeline.storage import Store

    return Store(args.home or settings.tulu_home())


def cmd_trace(args: argparse.Namespace) -> int:
    from tulu_pipeline.provenance.ledger import Ledger
    from tulu_pipeline.provenance.trace import render_tree

    result = Ledger(_store(args)).trace(args.row_id)
    if args.tree:
        print(render_tree(result))
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    if not result["found"]:
        print(f"tulu trace: no ledger events for row {args.row_id!r} under {args.home or settings.tulu_home()}",
              file=sys.stderr)
        return 1
    return 0


def _emit(args: argparse.Namespace, data: dict, markdown) -> None:
    if getattr(args, "markdown", False):
        print(markdown(data))
    else:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def cmd_audit_eval(args: argparse.Namespace) -> int:
    from tulu_pipeline.audit.reports import eval_audit, eval_audit_markdown

    audit = eval_audit(_store(args), args.benchmark, args.item_id)
    _emit(args, audit, eval_audit_markdown)
    if not audit["registered_benchmark"] and not audit["rows"]:
        print(f"tulu audit eval: {args.benchmark!r} is not a registered benchmark and no overlap with it is recorded",
              file=sys.stderr)
    # exit 1 when any overlapping row reached a checkpoint: usable as a CI gate
    return 1 if audit["checkpoints_exposed"] else 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from tulu_pipeline.audit.reports import bill_markdown, checkpoint_bill

    _emit(args, checkpoint_bill(_store(args), args.checkpoint_id), bill_markdown)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from tulu_pipeline.audit.diff import checkpoint_diff, diff_markdown

    diff = checkpoint_diff(_store(args), args.checkpoint_a, args.checkpoint_b)
    if args.json:
        print(json.dumps(diff, indent=2, sort_keys=True, default=str))
    else:
        print(diff_markdown(diff))
    return 0


def cmd_audit_licenses(args: argparse.Namespace) -> int:
    from tulu_pipeline.audit.reports import license_audit, licenses_markdown

    _emit(args, license_audit(_store(args), args.dataset, args.version), licenses_markdown)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from tulu_pipeline.audit.reproduce import reproduce_plan, write_reproduction

    store = _store(args)
    plan = reproduce_plan(store, args.checkpoint_id)
    if not args.dry_run:
        plan["written"] = write_reproduction(store, plan)
    print(json.dumps(plan, indent=2, ensure_ascii=False, default=str))
    if not plan["identical"]:
        failed = sorted(k for k, v in plan["verified"].items() if v is False)
        print(f"tulu reproduce: the rebuilt inputs differ from the checkpoint's manifest: {failed}", file=sys.stderr)
        return 1
    return 0


def cmd_ledger_compact(args: argparse.Namespace) -> int:
    from tulu_pipeline.provenance.compaction import compact

    print(json.dumps(compact(_store(args), buckets=args.buckets, memory_limit=args.memory_limit), indent=2))
    return 0


def cmd_ledger_status(args: argparse.Namespace) -> int:
    from tulu_pipeline.provenance.compaction import compaction_status

    print(json.dumps(compaction_status(_store(args)), indent=2))
    return 0


def cmd_rows(args: argparse.Namespace) -> int:
    """Print rows of a published dataset as JSON lines (the latest version unless --version)."""
    store = _store(args)
    shown = 0
    for row in store.iter_rows(args.dataset, args.version):
        if shown >= args.limit:
            break
        print(json.dumps(row if args.full else {k: row[k] for k in ("row_id", "source", "source_key")},
                         ensure_ascii=False, default=str))
        shown += 1
    return 0


def cmd_decontam(args: argparse.Namespace) -> int:
    from tulu_pipeline.curation.decontaminate import DecontamConfig
    from tulu_pipeline.curation.files import decontaminate_file

    config = DecontamConfig(ngram=args.ngram, threshold=args.threshold, rule=args.rule, short_items=args.short_items,
                            include_response=args.include_response)
    report = decontaminate_file(Path(args.train), Path(args.out), config, evals=args.evals, skip_bad=args.skip_bad)
    print(json.dumps({k: report[k] for k in ("rows_in", "rows_clean", "rows_quarantined", "bad_lines")}))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tulu_pipeline.rewards.cli import run_verify

    return run_verify(args.task, Path(args.input), mode=args.mode)


def cmd_sources_list(args: argparse.Namespace) -> int:
    from tulu_pipeline.data.registry import registry

    rows = [spec.table_row() for spec in registry()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':44} {'role':15} {'suite':7} {'rows':>6}  license")
    for row in rows:
        print(f"{row['id']:44} {row['role']:15} {row['suite'] or '':7} {row['rows']:>6}  {row['license']}")
    return 0


def cmd_sources_verify(args: argparse.Namespace) -> int:
    from tulu_pipeline.data.registry import RegistryError, registry, verify_file

    failures = 0
    root = Path(args.data_dir) if args.data_dir else None
    for spec in registry():
        try:
            verify_file(spec, root)
            print(f"ok       {spec.path}")
        except RegistryError as exc:
            failures += 1
            print(f"FAILED   {exc}", file=sys.stderr)
    return 1 if failures else 0


def cmd_sources_fetch(args: argparse.Namespace) -> int:
    from tulu_pipeline.data.registry import fetch_source, get_source

    root = Path(args.data_dir) if args.data_dir else None
    for source_id in args.source_ids:
        spec = get_source(source_id)
        if spec.local_path(root).exists() and not args.force:
            print(f"present  {spec.local_path(root)}")
            continue
        print(f"fetched  {fetch_source(spec, root)}")
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from tulu_pipeline.models.base_model import prepare_base_model

    target = args.out or str(Path(_store(args).path("models", "base_model")))
    info = prepare_base_model(target)
    print(json.dumps({"path": str(info.path), "parameter_count": info.parameter_count,
                      "weights_sha256": info.weights_sha256, "sample_generation": info.sample_generation}, indent=2))
    return 0


def _training_config(stage: str, preset: str):
    from tulu_pipeline.training.dpo_config import dpo_config
    from tulu_pipeline.training.rlvr_config import rlvr_training_config
    from tulu_pipeline.training.sft_config import sft_config

    return {"sft": sft_config, "dpo": dpo_config, "rlvr": rlvr_training_config}[stage](preset)


def cmd_plan(args: argparse.Namespace) -> int:
    from tulu_pipeline.training.memory_plan import fits, plan_run, plan_table, refusal_message

    plan = plan_run(args.model, args.stage, _training_config(args.stage, args.preset), gpus=args.gpus,
                    gpu_memory_gb=args.gpu_memory_gb, nodes=args.nodes, preset=args.preset, strategy=args.sharding,
                    offload=args.offload, checkpointing=args.checkpointing, precision=args.precision,
                    micro_batch=args.micro_batch, lora_r=args.lora, mfu=args.mfu, peak_tflops=args.peak_tflops)
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan_table(plan))
    if not fits(plan):
        print(f"tulu plan: {refusal_message(plan)}", file=sys.stderr)
        return 2
    return 0


def cmd_instance(args: argparse.Namespace) -> int:
    """Write $DAGSTER_HOME/dagster.yaml from the repo's SQLite or Postgres template."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or Path(settings.tulu_home()) / "dagster")
    backend = args.storage or os.environ.get("TULU_DAGSTER_STORAGE", "sqlite")
    templates = {"sqlite": "dagster.yaml", "postgres": "dagster.postgres.yaml"}
    if backend not in templates:
        print(f"tulu instance: storage must be one of {sorted(templates)}, got {backend!r}", file=sys.stderr)
        return 2
    template = settings.repo_root() / templates[backend]
    dagster_home.mkdir(parents=True, exist_ok=True)
    tmp = dagster_home / "dagster.yaml.tmp"
    shutil.copyfile(template, tmp)
    tmp.replace(dagster_home / "dagster.yaml")
    print(f"DAGSTER_HOME={dagster_home} ({backend} storage, from {template.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tulu", description=__doc__)
    parser.add_argument("--home", help="TULU_HOME (fsspec URL or path); default $TULU_HOME or <repo>/.tulu")
    sub = parser.add_subparsers(dest="command", required=True)

    trace = sub.add_parser("trace", help="print what the row ledger knows about a row: JSON, or a tree with --tree")
    trace.add_argument("row_id")
    trace.add_argument("--tree", action="store_true", help="a readable tree per stage instead of JSON")
    trace.set_defaults(func=cmd_trace)

    audit = sub.add_parser("audit", help="benchmark exposure, checkpoint data bills, dataset licenses")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_eval = audit_sub.add_parser("eval", help="training rows that overlapped a benchmark (or one item), where "
                                      "each was stopped, and whether any reached a checkpoint (exit 1 if so)")
    audit_eval.add_argument("benchmark", help="benchmark name, e.g. gsm8k, math, humaneval")
    audit_eval.add_argument("item_id", nargs="?", help="an eval id (e.g. test/precalculus/24307.json) or eval row id")
    audit_checkpoint = audit_sub.add_parser("checkpoint", help="the data bill of a checkpoint: sources, licenses, "
                                            "decontamination, hashes, code versions")
    audit_checkpoint.add_argument("checkpoint_id")
    audit_licenses = audit_sub.add_parser("licenses", help="rows per license of a published dataset")
    audit_licenses.add_argument("dataset", help="e.g. sft_mix, decontaminated_prompts, raw/code_alpaca")
    audit_licenses.add_argument("--version", help="dataset version (default: the latest)")
    for parser_, func in ((audit_eval, cmd_audit_eval), (audit_checkpoint, cmd_audit_checkpoint),
                          (audit_licenses, cmd_audit_licenses)):
        parser_.add_argument("--markdown", action="store_true", help="markdown instead of JSON")
        parser_.set_defaults(func=func)

    diff = sub.add_parser("diff", help="what changed between two checkpoints: rows added/removed per source, "
                          "differing decisions, licenses, decontamination, hyperparameters, code, eval deltas "
                          "with paired intervals and flipped items (markdown; --json for JSON)")
    diff.add_argument("checkpoint_a")
    diff.add_argument("checkpoint_b")
    diff.add_argument("--json", action="store_true", help="JSON instead of markdown")
    diff.set_defaults(func=cmd_diff)

    reproduce = sub.add_parser("reproduce", help="rebuild a checkpoint's configs and data versions from its manifest "
                               "and verify the rebuilt mix has the same row ids")
    reproduce.add_argument("checkpoint_id")
    reproduce.add_argument("--dry-run", action="store_true", help="print the plan only; write nothing (default "
                           "writes reports/reproduce/<checkpoint>/{plan.json,mix.yaml,run_config.yaml})")
    reproduce.set_defaults(func=cmd_reproduce)

    ledger = sub.add_parser("ledger", help="the row ledger's storage")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    compact = ledger_sub.add_parser("compact", help="fold every per-run event file into a bucketed generation "
                                    "(fast traces on large ledgers)")
    compact.add_argument("--buckets", type=int, default=64)
    compact.add_argument("--memory-limit", default="512MB", help="DuckDB memory limit; it spills beyond it")
    compact.set_defaults(func=cmd_ledger_compact)
    ledger_status = ledger_sub.add_parser("status", help="the current generation and what is not compacted yet")
    ledger_status.set_defaults(func=cmd_ledger_status)

    rows = sub.add_parser("rows", help="print rows of a dataset (e.g. raw/gsm8k_train, decontaminated_prompts)")
    rows.add_argument("dataset")
    rows.add_argument("--limit", type=int, default=10)
    rows.add_argument("--version", help="dataset version (default: the latest)")
    rows.add_argument("--full", action="store_true", help="whole rows, not just ids and locations")
    rows.set_defaults(func=cmd_rows)

    decontam = sub.add_parser("decontam", help="decontaminate a JSONL file against eval benchmarks")
    decontam.add_argument("--train", required=True, help="JSONL: {id, messages} or {id, prompt[, response]}")
    decontam.add_argument("--evals", help="a directory of JSONL files, or benchmark/source/suite names "
                          "separated by commas (default: every bundled eval benchmark)")
    decontam.add_argument("--ngram", type=int, default=8)
    decontam.add_argument("--threshold", type=float, default=0.5)
    decontam.add_argument("--rule", choices=["token_coverage", "ngram_share"], default="token_coverage",
                          help="token_coverage: share of an item's tokens inside matching n-grams, flagged above "
                          "the threshold (Tülu 3); ngram_share: share of its distinct n-grams, at or above")
    decontam.add_argument("--short-items", choices=["share", "anywhere", "ignore"], default="share",
                          help="items shorter than --ngram tokens: count only when most of the row or a turn "
                          "(share), wherever contained (anywhere), or never (ignore)")
    decontam.add_argument("--include-response", action="store_true", help="match assistant turns too")
    decontam.add_argument("--skip-bad", action="store_true", help="quarantine malformed lines instead of stopping")
    decontam.add_argument("--out", required=True, help="directory for clean.jsonl, quarantine.jsonl, report.json")
    decontam.set_defaults(func=cmd_decontam)

    verify_responses = sub.add_parser("verify", help="score responses with the verifiable-reward verifiers: "
                                      "one JSON line {id, score, ok, reason} per input line")
    verify_responses.add_argument("--task", required=True, choices=["gsm8k", "math", "ifeval"])
    verify_responses.add_argument("--input", required=True, help="JSONL: {id, response, ground_truth} (gsm8k, math) "
                                  "or {id, response, constraints} (ifeval)")
    verify_responses.add_argument("--mode", choices=["strict", "loose"], default="strict", help="IFEval strict or loose")
    verify_responses.set_defaults(func=cmd_verify)

    sources = sub.add_parser("sources", help="the source registry")
    sources_sub = sources.add_subparsers(dest="sources_command", required=True)
    listing = sources_sub.add_parser("list", help="registered sources with role, suite, rows and license")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_sources_list)
    verify = sources_sub.add_parser("verify", help="check every bundle file's sha256 against the manifest")
    verify.add_argument("--data-dir")
    verify.set_defaults(func=cmd_sources_verify)
    fetch = sources_sub.add_parser("fetch", help="download missing source files from their upstream location")
    fetch.add_argument("source_ids", nargs="+")
    fetch.add_argument("--data-dir")
    fetch.add_argument("--force", action="store_true")
    fetch.set_defaults(func=cmd_sources_fetch)

    model = sub.add_parser("model", help="models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF to safetensors")
    prepare.add_argument("--out", help="target directory (default TULU_HOME/models/base_model)")
    prepare.set_defaults(func=cmd_model_prepare)

    plan = sub.add_parser("plan", help="per-GPU memory, tokens per step and step time of a training preset on a "
                          "model and GPUs (table, or --json); exit 2 with what would fit when it does not")
    plan.add_argument("--stage", required=True, choices=["sft", "dpo", "rlvr"])
    plan.add_argument("--preset", default="cpu_demo", help="a preset of the stage's config, e.g. cpu_demo, tulu3_8b")
    plan.add_argument("--model", required=True, help="a shipped config (tiny-llama, smollm2-135m, llama-3.1-8b), "
                      "a config.json or a model directory")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    plan.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of each GPU (GiB)")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--sharding", choices=["none", "fsdp"], help="default: fsdp on more than one GPU")
    plan.add_argument("--offload", action="store_true", help="FSDP with master weights, gradients and optimizer "
                      "state in CPU memory")
    plan.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                      help="activation checkpointing (default: the preset's gradient_checkpointing)")
    plan.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    plan.add_argument("--micro-batch", type=int, help="per-device micro-batch (default: the preset's, split over "
                      "the GPUs as at launch)")
    plan.add_argument("--lora", type=int, metavar="R", help="LoRA rank instead of full fine-tuning (SFT)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the step time")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100 SXM: 989)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)

    instance = sub.add_parser("instance", help="write $DAGSTER_HOME/dagster.yaml (sqlite or postgres)")
    instance.add_argument("--storage", choices=["sqlite", "postgres"])
    instance.set_defaults(func=cmd_instance)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"tulu {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
