"""IFEval: check a response against verifiable instructions (Zhou et al. 2023, google-research
`instruction_following_eval`), all 25 instruction types of the official registry, strict and loose.

Each checker reimplements the official `check_following` logic, so the verdicts reproduce the official
checker's (measured on its published GPT-4 outputs in benchmarks/verify.py). Deliberate differences:

* Sentence counting uses `nupunkt` (a pure-Python Punkt implementation) instead of NLTK punkt, whose data
  cannot be downloaded here: nupunkt's sentence-break algorithm with its bundled model's sentence starters and
  collocations, but a general-English abbreviation list (its own list comes from legal text and treats
  words like "sun." as abbreviations). Punkt-style splitting keeps "Dr. Smith", "3.5", "e.g. this" and
  "U.S. economy" in one sentence, where a naive regex splitter breaks them.
* `change_case:capital_word_frequency` tokenizes words with a small Treebank-like splitter instead of
  `nltk.word_tokenize` (which needs punkt data too): same splits for punctuation and contractions.
* User strings (keywords, postscript markers, starters) are matched literally (`re.escape`); the official
  code compiles them as regular expressions, which crashes or mismatches on "C++" or "P.S.".
* Missing or unknown kwargs raise ValueError instead of silently drawing random values.
"""

from __future__ import annotations

import collections
import functools
import json
import re
from collections.abc import Callable
from typing import Any

from tulu_pipeline.rewards.verdict import Verdict

LESS_THAN, AT_LEAST = "less than", "at least"
RELATIONS = (LESS_THAN, AT_LEAST)
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class ConstraintError(ValueError):
    """An instruction id or its kwargs are not valid IFEval input."""


# ---- text helpers -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _langdetect():
    import langdetect

    # langdetect is randomized; the seed makes a verdict reproducible
    langdetect.DetectorFactory.seed = 0
    return langdetect


def detect_language(text: str) -> str | None:
    """ISO 639-1 code langdetect assigns to `text`, or None when it cannot tell (no letters...)."""
    langdetect = _langdetect()
    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def count_words(text: str) -> int:
    """Words as IFEval counts them: runs of \\w characters."""
    return len(re.findall(r"\w+", text))


# Abbreviations of general English prose. nupunkt's bundled model was trained on legal text and knows
# ~5,900 "abbreviations", many of them ordinary words ("sun.", "win."), which would swallow sentence
# breaks; only its dotted ones (e.g., u.s., p.m.) are kept, plus this list (no entry is also a common
# sentence-final word: "no.", "sat.", "wed." are left out on purpose).
GENERAL_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co", "corp", "jan", "feb",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "vol", "fig", "figs", "approx", "dept", "govt",
    "capt", "lt", "sgt", "mt", "ft", "blvd", "al", "cf", "ca", "pp", "ph.d", "hrs", "lbs", "oz", "univ", "assn",
    "bros", "mfg", "mgr", "e.g", "i.e", "u.s", "u.k", "a.m", "p.m", "u.s.a", "d.c",
})


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    import nupunkt
    from nupunkt import PunktParameters, PunktSentenceTokenizer

    bundled = nupunkt.load_default_model()._params
    dotted = {a for a in bundled.abbrev_types if re.fullmatch(r"[a-z](?:\.[a-z])+", a)}
    params = PunktParameters(abbrev_types=dotted | set(GENERAL_ABBREVIATIONS),
                             collocations=set(bundled.collocations), sent_starters=set(bundled.sent_starters))
    return PunktSentenceTokenizer(params, include_common_abbrevs=True)


def split_sentences(text: str) -> list[str]:
    """Punkt sentence split (nupunkt's algorithm, general-English abbreviations; see above)."""
    if not text.strip():
        return []
    return [s for s in _sentence_tokenizer().tokenize(text) if s.strip()]


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


# Treebank (nltk.word_tokenize) splits these off as their own tokens; hyphens, slashes, periods inside
# words and asterisks stay attached.
_TREEBANK_PUNCT = re.compile(r"(--|[;@#$%&?!\[\](){}<>,\"“”:]|''|``)")
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")


def word_tokens(text: str) -> list[str]:
    """Treebank-like word tokens (what IFEval's capital-word check counts)."""
    tokens: list[str] = []
    for chunk in text.split():
        for piece in _TREEBANK_PUNCT.split(chunk):
            if not piece:
                continue
            if piece.endswith(".") and len(piece) > 1 and not re.search(r"\.\w", piece):
                piece = piece[:-1]  # sentence-final period, not "U.S."
            match = _CONTRACTION.match(piece)
            tokens.extend(match.groups() if match else [piece])
    return tokens


def _relation_ok(actual: int, relation: str, threshold: int) -> bool:
    return actual < threshold if relation == LESS_THAN else actual >= threshold


# ---- the 25 checkers: each returns (followed, what was observed) ---------------------------------------


def _keywords_existence(r: str, *, keywords: list[str]) -> tuple[bool, str]:
    missing = [k for k in keywords if not re.search(re.escape(k), r, flags=re.IGNORECASE)]
    return not missing, f"missing keywords {missing}" if missing else "all keywords present"


def _keywords_frequency(r: str, *, keyword: str, frequency: int, relation: str) -> tuple[bool, str]:
    # substring count, case-insensitive, as the official checker does ("cat" counts in "category")
    n = len(re.findall(re.escape(keyword.strip()), r, flags=re.IGNORECASE))
    return _relation_ok(n, relation, frequency), f"{keyword!r} appears {n} times, needs {relation} {frequency}"


def _forbidden_words(r: str, *, forbidden_words: list[str]) -> tuple[bool, str]:
    used = [w for w in forbidden_words if re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE)]
    return not used, f"uses forbidden words {used}" if used else "no forbidden word"


def _letter_frequency(r: str, *, letter: str, let_frequency: int, let_relation: str) -> tuple[bool, str]:
    letter = letter.strip().lower()
    n = collections.Counter(r.lower())[letter]
    return (_relation_ok(n, let_relation, let_frequency),
            f"letter {letter!r} appears {n} times, needs {let_relation} {let_frequency}")


def _response_language(r: str, *, language: str) -> tuple[bool, str]:
    detected = detect_language(r)
    if detected is None:  # official: undetectable counts as followed
        return True, "language undetectable"
    return detected == language, f"detected {detected!r}, expected {language!r}"


def _number_sentences(r: str, *, num_sentences: int, relation: str) -> tuple[bool, str]:
    n = count_sentences(r)
    return _relation_ok(n, relation, num_sentences), f"{n} sentences, needs {relation} {num_sentences}"


def _number_paragraphs(r: str, *, num_paragraphs: int) -> tuple[bool, str]:
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    n = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                n -= 1
            else:
                return False, "an empty paragraph between two *** dividers"
    return n == num_paragraphs, f"{n} paragraphs (*** dividers), needs exactly {num_paragraphs}"


def _number_words(r: str, *, num_words: int, relation: str) -> tuple[bool, str]:
    n = count_words(r)
    return _relation_ok(n, relation, num_words), f"{n} words, needs {relation} {num_words}"


def _nth_paragraph_first_word(r: str, *, num_paragraphs: int, nth_paragraph: int,
                              first_word: str) -> tuple[bool, str]:
    paragraphs = re.split(r"\n\n", r)
    n = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > n or not paragraphs[nth_paragraph - 1].strip():
        return False, f"{n} paragraphs, paragraph {nth_paragraph} missing or empty"
    word = paragraphs[nth_paragraph - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        found += ch.lower()
    expected = first_word.lower()
    ok = n == num_paragraphs and found == expected
    return ok, (f"{n} paragraphs (needs {num_paragraphs}); paragraph {nth_paragraph} starts with {found!r}, "
                f"needs {expected!r}")


def _count_placeholders(text: str) -> int:
    r"""Matches of the official r"\[.*?\]" in one linear pass (the regex is quadratic on "[[[[…")."""
    count = 0
    for line in text.split("\n"):
        pos = 0
        while (start := line.find("[", pos)) >= 0 and (end := line.find("]", start + 1)) >= 0:
            count += 1
            pos = end + 1
    return count


def _number_placeholders(r: str, *, num_placeholders: int) -> tuple[bool, str]:
    n = _count_placeholders(r)
    return n >= num_placeholders, f"{n} [placeholders], needs at least {num_placeholders}"


def _postscript(r: str, *, postscript_marker: str) -> tuple[bool, str]:
    marker = postscript_marker.strip()
    # the official patterns are wrapped in r"\s*…" and r"….*$", which never change whether they match
    # but make the search quadratic on long whitespace runs
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    found = re.search(pattern, r.lower()) is not None
    return found, f"postscript {marker!r} {'found' if found else 'not found'}"


def _number_bullet_lists(r: str, *, num_bullets: int) -> tuple[bool, str]:
    # official: r"^\s*\*[^\*].*$" and r"^\s*-.*$"; a match's \s* may span blank lines, but the marker is then
    # also preceded by whitespace only on its own line, so [^\S\n]* counts the same, in linear time
    n = (len(re.findall(r"^[^\S\n]*\*[^\*].*$", r, flags=re.MULTILINE))
         + len(re.findall(r"^[^\S\n]*-.*$", r, flags=re.MULTILINE)))
    return n == num_bullets, f"{n} bullet points, needs exactly {num_bullets}"


def _constrained_response(r: str) -> tuple[bool, str]:
    ok = any(option in r.strip() for option in CONSTRAINED_RESPONSE_OPTIONS)
    return ok, "contains one of the allowed answers" if ok else f"none of {list(CONSTRAINED_RESPONSE_OPTIONS)}"


def _number_highlighted_sections(r: str, *, num_highlights: int) -> tuple[bool, str]:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())
    return n >= num_highlights, f"{n} *highlighted* sections, needs at least {num_highlights}"


def _multiple_sections(r: str, *, section_spliter: str, num_sections: int) -> tuple[bool, str]:
    splitter = section_spliter.strip()
    n = len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", r)) - 1
    return n >= num_sections, f"{n} sections marked '{splitter} N', needs at least {num_sections}"


def _json_format(r: str) -> tuple[bool, str]:
    value = r.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if value.startswith(prefix):
            value = value[len(prefix):]
            break
    value = value.removesuffix("```")
    try:
        json.loads(value.strip())
    except ValueError as exc:
        return False, f"not valid JSON ({exc})"
    except RecursionError:  # "[[[[…" thousands deep: not JSON a reader could use either
        return False, "not valid JSON (nested too deeply)"
    return True, "valid JSON"


def _has_title(text: str) -> bool:
    r"""The official r"<<[^\n]+>>" check, per line in linear time: the greedy match runs from a line's first
    "<<" to its last ">>"; the title must not be blank."""
    for line in text.split("\n"):
        start, end = line.find("<<"), line.rfind(">>")
        if start >= 0 and end >= start + 3 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def _title(r: str) -> tuple[bool, str]:
    ok = _has_title(r)
    return ok, "has a <<title>>" if ok else "no <<title>>"


def _two_responses(r: str) -> tuple[bool, str]:
    parts = r.split("******")
    valid = []
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False, "an empty response between ****** separators"
        else:
            valid.append(part)
    ok = len(valid) == 2 and valid[0].strip() != valid[1].strip()
    return ok, f"{len(valid)} responses separated by ******" + ("" if len(valid) != 2 or ok else " (identical)")


def _repeat_prompt(r: str, *, prompt_to_repeat: str) -> tuple[bool, str]:
    ok = r.strip().lower().startswith(prompt_to_repeat.strip().lower())
    return ok, "starts with the request repeated" if ok else "does not start with the request repeated verbatim"


def _end_checker(r: str, *, end_phrase: str) -> tuple[bool, str]:
    ok = r.strip().strip('"').lower().endswith(end_phrase.strip().lower())
    return ok, f"{'ends' if ok else 'does not end'} with {end_phrase.strip()!r}"


def _capital_word_frequency(r: str, *, capital_frequency: int, capital_relation: str) -> tuple[bool, str]:
    n = sum(1 for w in word_tokens(r) if w.isupper())
    return (_relation_ok(n, capital_relation, capital_frequency),
            f"{n} all-capital words, needs {capital_relation} {capital_frequency}")


def _english_case(r: str, upper: bool) -> tuple[bool, str]:
    what = "capital" if upper else "lowercase"
    if not (r.isupper() if upper else r.islower()):
        return False, f"not all {what} letters"
    detected = detect_language(r)
    if detected is None:  # official: undetectable counts as followed
        return True, f"all {what} letters; language undetectable"
    return detected == "en", f"all {what} letters; detected language {detected!r}"


def _english_capital(r: str) -> tuple[bool, str]:
    return _english_case(r, upper=True)


def _english_lowercase(r: str) -> tuple[bool, str]:
    return _english_case(r, upper=False)


def _no_comma(r: str) -> tuple[bool, str]:
    n = r.count(",")
    return n == 0, f"{n} commas"


def _quotation(r: str) -> tuple[bool, str]:
    value = r.strip()
    ok = len(value) > 1 and value[0] == '"' and value[-1] == '"'
    return ok, "wrapped in double quotes" if ok else "not wrapped in double quotes"


Checker = Callable[..., "tuple[bool, str]"]

#: instruction id -> (checker, {kwarg: type}); every kwarg listed is required.
CHECKERS: dict[str, tuple[Checker, dict[str, type]]] = {
    "keywords:existence": (_keywords_existence, {"keywords": list}),
    "keywords:frequency": (_keywords_frequency, {"keyword": str, "frequency": int, "relation": str}),
    "keywords:forbidden_words": (_forbidden_words, {"forbidden_words": list}),
    "keywords:letter_frequency": (_letter_frequency, {"letter": str, "let_frequency": int, "let_relation": str}),
    "language:response_language": (_response_language, {"language": str}),
    "length_constraints:number_sentences": (_number_sentences, {"num_sentences": int, "relation": str}),
    "length_constraints:number_paragraphs": (_number_paragraphs, {"num_paragraphs": int}),
    "length_constraints:number_words": (_number_words, {"num_words": int, "relation": str}),
    "length_constraints:nth_paragraph_first_word": (
        _nth_paragraph_first_word, {"num_paragraphs": int, "nth_paragraph": int, "first_word": str}),
    "detectable_content:number_placeholders": (_number_placeholders, {"num_placeholders": int}),
    "detectable_content:postscript": (_postscript, {"postscript_marker": str}),
    "detectable_format:number_bullet_lists": (_number_bullet_lists, {"num_bullets": int}),
    "detectable_format:constrained_response": (_constrained_response, {}),
    "detectable_format:number_highlighted_sections": (_number_highlighted_sections, {"num_highlights": int}),
    "detectable_format:multiple_sections": (_multiple_sections, {"section_spliter": str, "num_sections": int}),
    "detectable_format:json_format": (_json_format, {}),
    "detectable_format:title": (_title, {}),
    "combination:two_responses": (_two_responses, {}),
    "combination:repeat_prompt": (_repeat_prompt, {"prompt_to_repeat": str}),
    "startend:end_checker": (_end_checker, {"end_phrase": str}),
    "change_case:capital_word_frequency": (
        _capital_word_frequency, {"capital_frequency": int, "capital_relation": str}),
    "change_case:english_capital": (_english_capital, {}),
    "change_case:english_lowercase": (_english_lowercase, {}),
    "punctuation:no_comma": (_no_comma, {}),
    "startend:quotation": (_quotation, {}),
}

_RELATION_KWARGS = {"relation", "let_relation", "capital_relation"}
_POSITIVE_KWARGS = {"nth_paragraph", "num_paragraphs", "num_sections"}


def normalize_kwargs(instruction_id: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Validate one instruction's kwargs; drop None-valued keys (HF's IFEval copy fills every key with null)."""
    if instruction_id not in CHECKERS:
        raise ConstraintError(f"unknown IFEval instruction id {instruction_id!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConstraintError(f"{instruction_id}: kwargs must be an object, got {type(kwargs).__name__}")
    spec = CHECKERS[instruction_id][1]
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConstraintError(f"{instruction_id}: unexpected kwargs {unknown} (expected {sorted(spec)})")
    missing = sorted(set(spec) - set(given))
    if missing:
        raise ConstraintError(f"{instruction_id}: missing kwargs {missing}")
    out: dict[str, Any] = {}
    for key, expected_type in spec.items():
        value = given[key]
        if expected_type is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
                raise ConstraintError(f"{instruction_id}: {key} must be a non-negative integer, got {value!r}")
            value = int(value)
            if key in _POSITIVE_KWARGS and value < 1:
                raise ConstraintError(f"{instruction_id}: {key} must be at least 1, got {value}")
        elif expected_type is list:
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                    not all(isinstance(v, str) and v for v in value):
                raise ConstraintError(f"{instruction_id}: {key} must be a list of non-empty strings, got {value!r}")
            value = list(value)
        elif not isinstance(value, str) or not value.strip():
            raise ConstraintError(f"{instruction_id}: {key} must be a non-empty string, got {value!r}")
        if key in _RELATION_KWARGS and value not in RELATIONS:
            raise ConstraintError(f"{instruction_id}: {key} must be one of {list(RELATIONS)}, got {value!r}")
        out[key] = value
    if instruction_id == "keywords:letter_frequency" and len(out["letter"].strip()) != 1:
        raise ConstraintError(f"{instruction_id}: letter must be a single character, got {out['letter']!r}")
    return out


def parse_constraints(constraints: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """[(instruction_id, kwargs)] from IFEval's {"instruction_id_list": [...], "kwargs": [...]}."""
    if not isinstance(constraints, dict):
        raise ConstraintError("ifeval needs constraints={'instruction_id_list': [...], 'kwargs': [...]}")
    ids = constraints.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ConstraintError("constraints.instruction_id_list must be a non-empty list of instruction ids")
    kwargs_list = constraints.get("kwargs")
    if kwargs_list is None:
        kwargs_list = [{} for _ in ids]
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise ConstraintError(f"constraints.kwargs must be a list with one object per instruction "
                              f"({len(ids)}), got {kwargs_list!r}"[:300])
    return [(iid, normalize_kwargs(iid, kw)) for iid, kw in zip(ids, kwargs_list)]


def loose_variants(response: str) -> list[str]:
    """The official loose-mode rewrites: first/last/both lines removed, with and without asterisks."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), remove_first, remove_last, remove_both,
            remove_first.replace("*", ""), remove_last.replace("*", ""), remove_both.replace("*", "")]


def check_instruction(instruction_id: str, kwargs: dict[str, Any], response: str,
                      mode: str = "strict") -> tuple[bool, str]:
    """One instruction on one response: (followed, observation). kwargs must be normalized."""
    checker = CHECKERS[instruction_id][0]
    candidates = [response] if mode == "strict" else loose_variants(response)
    first_note = None
    for index, candidate in enumerate(candidates):
        if not candidate.strip():  # official: an empty response follows nothing
            ok, note = False, "empty response"
        else:
            ok, note = checker(candidate, **kwargs)
        if first_note is None:
            first_note = note
        if ok:
            return True, note if index == 0 else f"{note} (loose variant {index})"
    return False, first_note or "empty response"


def verify_ifeval(response: str, constraints: dict[str, Any] | None, mode: str = "strict") -> Verdict:
    """Score a response against IFEval constraints: score = fraction followed, ok = all followed."""
    if mode not in ("strict", "loose"):
        raise ValueError(f"ifeval mode must be 'strict' or 'loose', got {mode!r}")
    parsed = parse_constraints(constraints)
    results = []
    for instruction_id, kwargs in parsed:
        ok, note = check_instruction(instruction_id, kwargs, response, mode)
        results.append({"instruction_id": instruction_id, "ok": ok, "observed": note})
    followed = sum(r["ok"] for r in results)
    failed = [r for r in results if not r["ok"]]
    if failed:
        reason = f"{followed}/{len(results)} instructions followed ({mode}); failed: " + "; ".join(
            f"{r['instruction_id']} ({r['observed']})" for r in failed)
    else:
        reason = f"all {len(results)} instructions followed ({mode})"
    return Verdict(score=followed / len(results), ok=not failed, reason=reason,
                   details={"mode": mode, "instructions": results,
                            "follow_instruction_list": [r["ok"] for r in results]})
