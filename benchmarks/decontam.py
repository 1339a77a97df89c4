"""Decontamination throughput: the fast n-gram path against two baselines, all pinned to one core.

Data: synthetic instruction rows, streamed and deterministic from ``--seed``. Each row is one user
turn of 100-200 words (mean 150) and a 20-60 word assistant turn, the words drawn with a Zipf
distribution (p ~ 1/rank) over the surface vocabulary (whitespace-split, casing and punctuation
kept) of the bundled training sources. Every ``--plant-every``-th row embeds a real eval item in its
user turn, in one of four ways taken in turn: verbatim, upper-cased, punctuation replaced by
spaces, or split across two user turns with an assistant turn between them. Recall is the share of
planted rows whose matches include the planted item, overall and per way of planting (with how many of
the misses are items shorter than n tokens, which the short-item policy lets count only as most of a turn).

Index: every registry source with role ``eval`` (user turns as item text), default config
(8-grams, 50% coverage).

Measured, each in its own process pinned to one core (``os.sched_setaffinity``), so each peak RSS
is its own:

- ``fast``: `Decontaminator` (with a counting sink) over ``--rows`` rows; time excludes generating
  the rows. Also: the part of that time spent in `EvalIndex.match_found`.
- ``reference`` (baseline a): `reference_matches` row by row (plain sets of n-gram tuples with an
  n-gram -> items dict) on the first ``--baseline-rows`` rows of the same stream. Its matches
  must equal the fast path's on those rows (``agrees_with_fast``).
- ``minhash_lsh`` (baseline b): datasketch MinHash (128 permutations) over the rows' 8-gram sets,
  an ``MinHashLSHEnsemble`` (containment threshold = the coverage threshold, 16 partitions) built
  over each chunk of ``--baseline-rows`` rows, queried with every eval item of >= n tokens (the
  containment of the item in the row is the coverage), and exact verification of the candidates.
  Its time includes the chunk's queries, so its rows/s holds for that chunk size. It cannot see
  items shorter than n tokens (they have no n-grams); its recall is reported against the fast
  path's exact matches on the same rows.

Baseline rows/s are measured on the subsample and extrapolate linearly (per-row cost). Ratios are
fast rows/s over baseline rows/s.

    .venv/bin/python benchmarks/decontam.py [--rows 1000000] [--baseline-rows 20000] [--quick]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy stays on one core
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tulu_pipeline.curation.decontaminate import (  # noqa: E402
    DecontamConfig,
    Decontaminator,
    EvalIndex,
    EvalItem,
    reference_matches,
    registry_eval_items,
    tokenize,
    training_text,
    training_turns,
)
from tulu_pipeline.data.loaders import iter_source_rows  # noqa: E402
from tulu_pipeline.data.registry import registry  # noqa: E402
from tulu_pipeline.process_memory import peak_rss_mb, rss_bytes  # noqa: E402

TARGET_ROWS_PER_S = 30_000
DECON_NS_PER_BYTE = 34_000 / 5_800  # allenai/decon: ~34 us per document of ~5.8 KB
ROW_BYTES = (200, 1_000, 5_000, 20_000)
ZIPF_EXPONENT = 1.0
CHUNK_ROWS = 10_000
PLANTING = ("verbatim", "upper-cased", "punctuation->spaces", "split across two user turns")  # in turn


# ---------------------------------------------------------------------------------------------
# synthetic rows
# ---------------------------------------------------------------------------------------------
def training_vocabulary() -> tuple[list[str], np.ndarray]:
    """Surface words of the bundled training sources by frequency, and Zipf probabilities by rank."""
    counts: Counter[str] = Counter()
    for spec in registry():
        if spec.role == "train":
            for row in iter_source_rows(spec):
                for message in row["messages"]:
                    counts.update(message["content"].split())
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    p = 1.0 / np.arange(1, len(words) + 1) ** ZIPF_EXPONENT
    return words, p / p.sum()


class SyntheticRows:
    """A deterministic stream of instruction rows with planted eval items."""

    def __init__(self, seed: int, rows: int, items: list[EvalItem], plant_every: int):
        self.words, self.p = training_vocabulary()
        self.cdf = np.cumsum(self.p)
        self.seed, self.rows, self.plant_every = seed, rows, plant_every
        order = np.random.default_rng(seed + 1).permutation(len(items))
        self.plant_order = [items[i] for i in order]
        self.planted: dict[int, EvalItem] = {}
        self.generation_seconds = 0.0

    def _words(self, rng: np.random.Generator, n: int) -> list[str]:
        idx = np.searchsorted(self.cdf, rng.random(n) * self.cdf[-1], "right")
        return [self.words[i] for i in np.minimum(idx, len(self.words) - 1).tolist()]

    def _plant(self, i: int, rng: np.random.Generator, prefix: str, suffix: str) -> list[dict]:
        k = i // self.plant_every
        item = self.plant_order[k % len(self.plant_order)]
        self.planted[i] = item
        text, way = item.text, k % 4
        if way == 1:
            text = text.upper()
        elif way == 2:
            text = re.sub(r"[^\w\s]", " ", text)
        if way == 3:  # split across two user turns, an assistant turn between
            parts = text.split(" ")
            cut = max(1, len(parts) // 2)
            return [{"role": "user", "content": prefix + " " + " ".join(parts[:cut])},
                    {"role": "assistant", "content": " ".join(self._words(rng, 12))},
                    {"role": "user", "content": " ".join(parts[cut:]) + " " + suffix}]
        return [{"role": "user", "content": f"{prefix} {text} {suffix}"}]

    def chunks(self, limit: int | None = None) -> Iterator[list[dict]]:
        rng = np.random.default_rng(self.seed)
        total = self.rows if limit is None else min(limit, self.rows)
        for lo in range(0, total, CHUNK_ROWS):
            start = time.process_time()
            n = min(CHUNK_ROWS, total - lo)
            user_len = rng.integers(100, 201, n)
            reply_len = rng.integers(20, 61, n)
            words = self._words(rng, int(user_len.sum() + reply_len.sum()))
            chunk, at = [], 0
            for j in range(n):
                i = lo + j
                user = " ".join(words[at:at + user_len[j]])
                at += user_len[j]
                reply = " ".join(words[at:at + reply_len[j]])
                at += reply_len[j]
                if i % self.plant_every == self.plant_every // 2:
                    cut = int(rng.integers(0, 60))
                    tail = user.split(" ")
                    messages = self._plant(i, rng, " ".join(tail[:cut]), " ".join(tail[cut:cut + 40]))
                else:
                    messages = [{"role": "user", "content": user}]
                messages.append({"role": "assistant", "content": reply})
                chunk.append({"row_id": f"synthetic-{i:08d}", "source": "synthetic", "messages": messages})
            self.generation_seconds += time.process_time() - start
            yield chunk


# ---------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------
class CountingSink:
    """A `DecisionSink` that only counts (a `MemorySink` would hold a million events)."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()

    def record(self, row_id, event, decision=None, reason=None, related_ids=(), details=None) -> None:
        self.events[event] += 1

    def record_many(self, row_ids, event, decision=None, details=None) -> None:
        self.events[event] += len(row_ids)


def rss_mb() -> dict[str, float]:
    """Current and peak resident set size of this process, MiB."""
    return {"rss_mb": round((rss_bytes() or 0) / 2**20, 1), "peak_rss_mb": round(peak_rss_mb() or 0.0, 1)}


def load_items() -> list[EvalItem]:
    return registry_eval_items()


def match_signature(matches) -> list[list]:
    return sorted([m.eval_row_id, m.matched_ngrams, m.item_ngrams] for m in matches)


def rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else float("inf")


# ---------------------------------------------------------------------------------------------
# the three parts (each runs in its own pinned process)
# ---------------------------------------------------------------------------------------------
def part_fast(args) -> dict:
    config = DecontamConfig()
    start = time.perf_counter()
    items = load_items()
    index = EvalIndex.build(items, config.ngram, config.min_item_tokens)
    build_s = time.perf_counter() - start
    after_build = rss_mb()
    stream = SyntheticRows(args.seed, args.rows, index.items, args.plant_every)
    sink = CountingSink()
    step = Decontaminator(index, config, sink, batch_size=args.batch_size)
    match_s = 0.0
    inner = index.match_found  # what the streaming step calls

    def timed_match(*args, **kwargs):
        nonlocal match_s
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        match_s += time.perf_counter() - t
        return out

    index.match_found = timed_match

    def rows():
        for chunk in stream.chunks():
            yield from chunk

    wall0, cpu0 = time.perf_counter(), time.process_time()
    kept = sum(1 for _ in step(rows()))
    wall = time.perf_counter() - wall0 - stream.generation_seconds
    cpu = time.process_time() - cpu0 - stream.generation_seconds
    flagged = {int(q["row"]["row_id"].split("-")[1]): q["matches"] for q in step.quarantine}
    found = {i for i, item in stream.planted.items() if any(m.eval_row_id == item.row_id for m in flagged.get(i, ()))}
    hits = len(found)
    unplanted = {i: m for i, m in flagged.items() if i not in stream.planted}
    by_way: dict[str, list[int]] = {}  # way -> [planted, found, missed items shorter than n tokens]
    for i, item in stream.planted.items():
        way = PLANTING[(i // args.plant_every) % len(PLANTING)]
        counts = by_way.setdefault(way, [0, 0, 0])
        counts[0] += 1
        counts[1] += i in found
        counts[2] += i not in found and len(tokenize(item.text)) < config.ngram
    return {
        "rows": args.rows, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
        "rows_per_s": rate(args.rows, wall), "rows_per_s_per_core": rate(args.rows, cpu),
        "us_per_row": round(1e6 * cpu / args.rows, 2),
        "match_found_seconds": round(match_s, 3),
        "step_overhead_seconds": round(wall - match_s, 3),
        "generation_seconds_excluded": round(stream.generation_seconds, 3),
        "index_build_seconds": round(build_s, 3), "index": index.summary(),
        "rss_after_index_build_mb": after_build["rss_mb"], **rss_mb(),
        "kept": kept, "quarantined": len(step.quarantine), "sink_events": dict(sink.events),
        "planted": len(stream.planted), "planted_found": hits,
        "planted_recall": round(hits / len(stream.planted), 6) if stream.planted else None,
        "planted_recall_by_way": {way: {"planted": n, "found": f, "recall": round(f / n, 4), "missed_short_items": s}
                                  for way, (n, f, s) in by_way.items()},
        "unplanted_flagged": len(unplanted),
        "unplanted_examples": [{"row": i, "benchmark": m[0].benchmark, "eval_id": m[0].eval_id,
                                "score": round(m[0].score, 3), "span": m[0].span[:120]}
                               for i, m in sorted(unplanted.items())[:10]],
        "by_benchmark": dict(Counter(m.benchmark for ms in flagged.values() for m in ms)),
        "subsample_matches": {str(i): match_signature(m) for i, m in flagged.items() if i < args.baseline_rows},
        "vocabulary_words": len(stream.words),
    }


def part_reference(args) -> dict:
    config = DecontamConfig()
    items = load_items()
    start = time.perf_counter()
    reference_matches(items, "", config.ngram, config.threshold)  # builds its n-gram dict
    build_s = time.perf_counter() - start
    stream = SyntheticRows(args.seed, args.rows, [i for i in items if tokenize(i.text)], args.plant_every)
    flagged: dict[int, list] = {}
    wall = cpu = 0.0
    for chunk in stream.chunks(args.baseline_rows):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for row in chunk:
            turns = training_turns(row, config.include_response)
            matches = reference_matches(items, "\n".join(turns), config.ngram, config.threshold, config.rule,
                                        config.short_items, turns)
            if matches:
                flagged[int(row["row_id"].split("-")[1])] = matches
        wall += time.perf_counter() - wall0
        cpu += time.process_time() - cpu0
    rows = min(args.baseline_rows, args.rows)
    hits = sum(1 for i, item in stream.planted.items() if any(m.eval_row_id == item.row_id for m in flagged.get(i, ())))
    return {
        "what": "reference_matches: sets of n-gram tuples and an n-gram -> items dict, pure Python, row by row",
        "rows": rows, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
        "rows_per_s": rate(rows, wall), "rows_per_s_per_core": rate(rows, cpu),
        "us_per_row": round(1e6 * cpu / rows, 2),
        "extrapolated_seconds_for_all_rows": round(args.rows * cpu / rows, 1),
        "index_build_seconds": round(build_s, 3), **rss_mb(),
        "planted": len(stream.planted), "planted_found": hits,
        "planted_recall": round(hits / len(stream.planted), 6) if stream.planted else None,
        "subsample_matches": {str(i): match_signature(m) for i, m in flagged.items()},
    }


def part_minhash(args) -> dict:
    from datasketch import MinHash, MinHashLSHEnsemble

    config = DecontamConfig()
    n, t, num_perm = config.ngram, config.threshold, 128

    def shingles(tokens: list[str]) -> set[bytes]:
        return {" ".join(tokens[p:p + n]).encode() for p in range(len(tokens) - n + 1)}

    items = load_items()
    start = time.perf_counter()
    item_sets = [(item, shingles(tokenize(item.text))) for item in items]
    item_sets = [(item, s) for item, s in item_sets if s]  # items shorter than n have no n-grams
    item_hashes = MinHash.bulk([list(s) for _, s in item_sets], num_perm=num_perm)
    build_s = time.perf_counter() - start
    stream = SyntheticRows(args.seed, args.rows, [i for i in items if tokenize(i.text)], args.plant_every)
    flagged: dict[int, list] = {}
    phases = Counter()
    wall = cpu = 0.0
    chunk_rows: list[dict] = []
    for chunk in stream.chunks(args.baseline_rows):
        chunk_rows.extend(chunk)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for lo in range(0, len(chunk_rows), args.baseline_rows):
        part = chunk_rows[lo:lo + args.baseline_rows]
        t0 = time.perf_counter()
        row_sets = [shingles(tokenize(training_text(row, config.include_response))) for row in part]
        keys = [k for k, s in enumerate(row_sets) if s]
        row_hashes = MinHash.bulk([list(row_sets[k]) for k in keys], num_perm=num_perm)
        t1 = time.perf_counter()
        lsh = MinHashLSHEnsemble(threshold=t, num_perm=num_perm, num_part=16)
        lsh.index((k, mh, len(row_sets[k])) for k, mh in zip(keys, row_hashes))
        t2 = time.perf_counter()
        candidates = [(k, j) for j, ((_, s), mh) in enumerate(zip(item_sets, item_hashes))
                      for k in lsh.query(mh, len(s))]
        t3 = time.perf_counter()
        for k, j in candidates:
            item, s = item_sets[j]
            found = len(s & row_sets[k])
            if found / len(s) >= t:
                flagged.setdefault(lo + k, []).append((item.row_id, found, len(s)))
        t4 = time.perf_counter()
        phases.update({"tokenize_and_minhash": t1 - t0, "lsh_index": t2 - t1, "lsh_query": t3 - t2, "verify": t4 - t3})
        phases["candidates"] += len(candidates)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    rows = len(chunk_rows)
    hits = sum(1 for i, item in stream.planted.items() if any(r == item.row_id for r, _, _ in flagged.get(i, ())))
    return {
        "what": ("datasketch MinHash (128 perm) of each row's 8-gram set, MinHashLSHEnsemble over the chunk "
                 f"(containment threshold {t}, 16 partitions), queried with every eval item of >= {n} tokens, "
                 "candidates verified exactly; chunk = the whole subsample"),
        "rows": rows, "chunk_rows": args.baseline_rows, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
        "rows_per_s": rate(rows, wall), "rows_per_s_per_core": rate(rows, cpu),
        "us_per_row": round(1e6 * cpu / rows, 2),
        "extrapolated_seconds_for_all_rows": round(args.rows * cpu / rows, 1),
        "extrapolation": ("linear in rows at this chunk size: every chunk pays the same item queries, so "
                          "bigger chunks amortize them better but hold more MinHashes in memory"),
        "item_minhash_seconds": round(build_s, 3),
        "phases_seconds": {k: round(v, 3) for k, v in phases.items() if k != "candidates"},
        "candidates": phases["candidates"], "items_queried": len(item_sets), **rss_mb(),
        "planted": len(stream.planted), "planted_found": hits,
        "planted_recall": round(hits / len(stream.planted), 6) if stream.planted else None,
        "subsample_matches": {str(i): sorted([list(x) for x in m]) for i, m in flagged.items()},
    }


def part_per_byte(args) -> dict:
    """ns per byte and rows/s of the default rule on rows of several lengths (one user turn each).

    Each length is run through `Decontaminator` twice in this process, on the same rows: with the
    C kernel (``kernel``, what the pipeline uses) and with the kernel switched off (``numpy``, the
    earlier fast path, kept as the fallback); their quarantines and ledger events must be equal.
    Before each timed run: a garbage collection and a short untimed warm-up (so that a collection
    of the index's objects or a first-call cost does not land in one length's figure). The kernel run
    is repeated ``--repeats`` times: ``ns_per_byte`` is the minimum, ``ns_per_byte_median`` the median
    (CPU time, ``time.process_time``); ``loadavg`` is ``os.getloadavg()`` around each length.

    With ``--compare-kernel PATH`` (another build of ``_decon_kernel``, same ABI), ``Scanner.scan``
    alone (tokens, hashes, filter: the kernel part) is timed for both builds alternately on the same
    texts, ``--repeats`` times each, and their candidates must be equal (``scan_ab``).
    """
    import gc

    from tulu_pipeline.curation.decontaminate import _make_scanner

    config = DecontamConfig()
    index = EvalIndex.build(load_items(), config.ngram, config.min_item_tokens)
    scanner = index._scanner
    other = _make_scanner(index, _load_kernel(args.compare_kernel)) if args.compare_kernel else None
    words, p = training_vocabulary()
    cdf = np.cumsum(p)
    rng = np.random.default_rng(args.seed)
    out = {}

    def scan_seconds(sc, texts) -> tuple[float, list]:
        gc.collect()
        found, start, cpu0 = [], 0, time.process_time()
        while start < len(texts):
            *scanned, start = sc.scan(texts, start, len(texts), 1 << 20)
            found.append(scanned)
        return time.process_time() - cpu0, found

    def canonical(found: list) -> list:
        """Each slice's candidates (counts, pos, length, lo, hi) by length, then position: the order
        `EvalIndex` reads them in (a build may emit windows of different lengths interleaved otherwise)."""
        out = []
        for counts, *columns in found:
            arrays = [np.frombuffer(c, np.int64) for c in columns]
            order = np.lexsort((arrays[0], arrays[1]))
            out.append([counts, *(a[order].tobytes() for a in arrays)])
        return out

    def run(rows, use_kernel: bool) -> tuple[float, Decontaminator, list]:
        index._scanner = scanner if use_kernel else None
        try:
            step = Decontaminator(index, config, RecordingSink(), batch_size=args.batch_size)
            for _ in step(iter(rows[:200])):  # warm-up, untimed
                pass
            step = Decontaminator(index, config, RecordingSink(), batch_size=args.batch_size)
            gc.collect()
            cpu0 = time.process_time()
            kept = sum(1 for _ in step(iter(rows)))
            return time.process_time() - cpu0, step, kept
        finally:
            index._scanner = scanner

    for length in ROW_BYTES:
        texts, size = [], 0
        while size < args.bytes_per_length:  # words drawn as in `SyntheticRows`, cut to ``length`` bytes
            idx = np.minimum(np.searchsorted(cdf, rng.random(length // 4) * cdf[-1], "right"), len(words) - 1)
            text = " ".join(words[i] for i in idx.tolist()).encode()[:length].decode("utf-8", "ignore")
            texts.append(text)
            size += len(text.encode())
        rows = [{"row_id": f"r{k}", "source": "synthetic", "messages": [{"role": "user", "content": t}]}
                for k, t in enumerate(texts)]
        load_before = os.getloadavg()
        numpy_cpu, numpy_step, numpy_kept = run(rows, use_kernel=False)
        runs = [run(rows, use_kernel=scanner is not None) for _ in range(args.repeats)]
        cpus = [r[0] for r in runs]
        cpu, step, kept = min(runs, key=lambda r: r[0])
        same = (kept == numpy_kept and step.sink.events == numpy_step.sink.events
                and [(q["row"]["row_id"], q["matches"]) for q in step.quarantine]
                == [(q["row"]["row_id"], q["matches"]) for q in numpy_step.quarantine])
        same = same and all(r[2] == kept and r[1].sink.events == step.sink.events for r in runs)
        out[str(length)] = {"rows": len(rows), "bytes": size, "cpu_seconds": round(cpu, 3),
                            "ns_per_byte": round(1e9 * cpu / size, 2),
                            "ns_per_byte_median": round(1e9 * float(np.median(cpus)) / size, 2),
                            "rows_per_s_per_core": rate(len(rows), cpu),
                            "numpy_cpu_seconds": round(numpy_cpu, 3),
                            "numpy_ns_per_byte": round(1e9 * numpy_cpu / size, 2),
                            "numpy_rows_per_s_per_core": rate(len(rows), numpy_cpu),
                            "speedup_over_numpy": round(numpy_cpu / cpu, 2) if cpu > 0 else None,
                            "results_equal_to_numpy": same,
                            "ascii_rows_share": round(sum(t.isascii() for t in texts) / len(texts), 3),
                            "quarantined": len(rows) - kept}
        if other is not None and scanner is not None:
            times: dict[str, list[float]] = {"this": [], "compare": []}
            found = {}
            for _ in range(args.repeats):
                for name, sc in (("compare", other), ("this", scanner)):
                    seconds, found[name] = scan_seconds(sc, texts)
                    times[name].append(seconds)
            out[str(length)]["scan_ab"] = {
                **{name: {"min_ns_per_byte": round(1e9 * min(v) / size, 2),
                          "median_ns_per_byte": round(1e9 * float(np.median(v)) / size, 2)} for name, v in times.items()},
                "candidates_equal": canonical(found["this"]) == canonical(found["compare"])}
        out[str(length)]["loadavg"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    return {"what": "Decontaminator, default config (token_coverage, short items by share), every bundled "
                    "benchmark, exhaustive (no sampling, no hit cap); ns_per_byte with the C kernel (CPU time, "
                    f"min of {args.repeats}; ns_per_byte_median the median), numpy_ns_per_byte with the numpy "
                    "path, same rows, same process, one core; loadavg: os.getloadavg() before and after each "
                    "length (1, 5, 15 min)",
            "kernel": scanner is not None, "repeats": args.repeats,
            "compare_kernel": args.compare_kernel, "by_row_bytes": out, **rss_mb()}


def _load_kernel(path: str):
    """Another build of the kernel module (a .so file), loaded beside the installed one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_decon_kernel", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare-kernel: {path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingSink:
    """A `DecisionSink` keeping (row_id, event, decision, reason) per event, a run of `record_many` events as one
    entry with a tuple of row ids (enough to compare two runs with the same batches)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def record(self, row_id, event, decision=None, reason=None, related_ids=(), details=None) -> None:
        self.events.append((row_id, event, decision, reason))

    def record_many(self, row_ids, event, decision=None, details=None) -> None:
        self.events.append((tuple(row_ids), event, decision, None))  # a run of events: one object


PARTS = {"fast": part_fast, "reference": part_reference, "minhash_lsh": part_minhash, "per_byte": part_per_byte}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def run_part(name: str, args, core: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_path = tmp.name
    cmd = [sys.executable, __file__, "--part", name, "--core", str(core), "--result", result_path,
           "--rows", str(args.rows), "--baseline-rows", str(args.baseline_rows), "--seed", str(args.seed),
           "--plant-every", str(args.plant_every), "--batch-size", str(args.batch_size),
           "--bytes-per-length", str(args.bytes_per_length), "--repeats", str(args.repeats)]
    if args.compare_kernel:
        cmd += ["--compare-kernel", args.compare_kernel]
    print(f"[decontam bench] {name} ...", file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True)
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)


def recall_against(truth: dict[str, list], found: dict[str, list]) -> dict:
    """Share of the fast path's exact (row, item) matches that a baseline found."""
    pairs = {(row, m[0]) for row, ms in truth.items() for m in ms}
    got = {(row, m[0]) for row, ms in found.items() for m in ms}
    return {"exact_pairs": len(pairs), "found": len(pairs & got), "extra": len(got - pairs),
            "recall": round(len(pairs & got) / len(pairs), 4) if pairs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-rows", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="small run: 20k rows, 2k baseline rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plant-every", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--skip-minhash", action="store_true")
    parser.add_argument("--bytes-per-length", type=int, default=20_000_000, help="text per row length (per_byte)")
    parser.add_argument("--repeats", type=int, default=3, help="timed kernel runs per length (per_byte)")
    parser.add_argument("--compare-kernel", help="another build of _decon_kernel (.so) to time alternately (per_byte)")
    parser.add_argument("--only", choices=["per_byte"],
                        help="run only this part and merge it into the existing results file")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decontam.json"))
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last allowed one)")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.baseline_rows = 20_000, 2_000
        args.bytes_per_length = 2_000_000
    args.baseline_rows = min(args.baseline_rows, args.rows)
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))

    if args.part:
        os.sched_setaffinity(0, {core})
        result = PARTS[args.part](args)
        result["pinned_cpus"] = sorted(os.sched_getaffinity(0))
        Path(args.result).write_text(json.dumps(result))
        return

    if args.only:
        merge_part(args, core)
        return
    fast = run_part("fast", args, core)
    ref = run_part("reference", args, core)
    minhash = None if args.skip_minhash else run_part("minhash_lsh", args, core)
    truth = fast.pop("subsample_matches")
    ref_matches = ref.pop("subsample_matches")
    ref["agrees_with_fast"] = ref_matches == truth
    ref["recall_vs_fast_exact"] = recall_against(truth, ref_matches)
    if minhash is not None:
        minhash["recall_vs_fast_exact"] = recall_against(truth, minhash.pop("subsample_matches"))
    config = DecontamConfig()
    result = {
        "benchmark": "decontam",
        "config": {**config.model_dump(), "batch_size": args.batch_size},
        "pinned_to_one_core": True, "pinned_core": core,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "processor": platform.machine(),
                    "cpus_available": os.cpu_count(), "datasketch": _version("datasketch")},
        "data": {"rows": args.rows, "baseline_rows": args.baseline_rows, "seed": args.seed,
                 "words_per_row": "user 100-200 (mean 150) + assistant 20-60", "zipf_exponent": ZIPF_EXPONENT,
                 "vocabulary": f"{fast.pop('vocabulary_words')} surface words of the bundled training sources",
                 "plant_every": args.plant_every,
                 "planting": " / ".join(PLANTING) + ", in turn"},
        "target_rows_per_s_per_core": TARGET_ROWS_PER_S,
        "meets_target": fast["rows_per_s_per_core"] >= TARGET_ROWS_PER_S and fast["peak_rss_mb"] < 2048,
        "fast": fast,
        "reference": ref,
        "minhash_lsh": minhash,
        "ratios": {
            "fast_over_reference_rows_per_s": round(fast["rows_per_s_per_core"] / ref["rows_per_s_per_core"], 2),
            "fast_over_minhash_lsh_rows_per_s": (round(fast["rows_per_s_per_core"] / minhash["rows_per_s_per_core"], 2)
                                                 if minhash else None),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # the parts run with --only are kept
        earlier = json.loads(out.read_text())
        result.update({k: earlier[k] for k in ("per_byte",) if k in earlier})
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out)
    summary = {"meets_target": result["meets_target"], "ratios": result["ratios"],
               "fast_rows_per_s_per_core": fast["rows_per_s_per_core"], "fast_peak_rss_mb": fast["peak_rss_mb"],
               "planted_recall": fast["planted_recall"], "reference_agrees": ref["agrees_with_fast"]}
    print(json.dumps(summary, indent=2))


def merge_part(args, core: int) -> None:
    """Run one of the newer parts and write its result into the results file (atomically)."""
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "decontam"}
    part = run_part(args.only, args, core)
    if args.only == "per_byte":
        for row in part["by_row_bytes"].values():
            row["ratio_to_decon_ns_per_byte"] = round(row["ns_per_byte"] / DECON_NS_PER_BYTE, 2)
            row["numpy_ratio_to_decon_ns_per_byte"] = round(row["numpy_ns_per_byte"] / DECON_NS_PER_BYTE, 2)
        part["decon_ns_per_byte"] = round(DECON_NS_PER_BYTE, 2)
        part["target_ns_per_byte"] = round(1.5 * DECON_NS_PER_BYTE, 2)
        part["meets_target"] = (all(r["ns_per_byte"] <= 1.5 * DECON_NS_PER_BYTE for r in part["by_row_bytes"].values())
                                and part["peak_rss_mb"] < 2048)
        part["results_equal_to_numpy"] = all(r["results_equal_to_numpy"] for r in part["by_row_bytes"].values())
    result[args.only] = {**part, "pinned_core": core}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(json.dumps(result[args.only], indent=2)[:4000])


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    main()
