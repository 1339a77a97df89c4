"""The IFEval instruction taxonomy as data, and a sampler of verifiable constraints for RLVR prompts.

`sample_constraints(rng, k)` draws k mutually compatible instruction types with concrete kwargs and the
natural-language instruction to append to a prompt (Tülu 3's persona-IF RLVR prompts). What it returns
plugs straight into `verify("ifeval", response, constraints=...)`.
"""

from __future__ import annotations

import random
from typing import Any

from tulu_pipeline.rewards.ifeval import CHECKERS, CONSTRAINED_RESPONSE_OPTIONS, RELATIONS, normalize_kwargs

#: The 25 instruction ids of the official IFEval registry.
INSTRUCTION_TYPES: tuple[str, ...] = tuple(CHECKERS)

#: Types the sampler never draws: repeat_prompt needs the prompt text itself, which the sampler does not see.
NOT_SAMPLED = frozenset({"combination:repeat_prompt"})

LANGUAGES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean",
    "pl": "Polish", "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili",
    "kn": "Kannada", "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}

# Everyday nouns for keyword constraints; none occurs in a fixed phrase the sampler also uses
# (end phrases, section markers, postscripts, the constrained answers) and none has a rare letter
# (a "less than N times" letter constraint is then always satisfiable).
KEYWORDS = (
    "garden", "river", "window", "engine", "bridge", "market", "library", "mountain", "kitchen", "planet",
    "ticket", "candle", "harbor", "forest", "piano", "ladder", "compass", "lantern", "meadow", "village",
    "battery", "blanket", "castle", "desert", "feather", "glacier", "island", "voyage", "lemon", "mirror",
    "notebook", "orchard", "pepper", "rocket", "saddle", "tunnel", "valley", "whistle", "anchor", "basket",
    "canyon", "dragon", "falcon", "helmet", "magnet", "signal", "tomato", "bottle", "cotton", "pencil",
)
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?",
               "Let me know if you have additional questions.", "That is all.")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_SPLITTERS = ("Section", "SECTION")
COMMON_LETTERS = "aeinorst"
RARE_LETTERS = "jqxz"

_ALL = set(INSTRUCTION_TYPES)
# Pairs that cannot (or can hardly) be satisfied together; the official registry's conflicts plus a few
# that follow from the checkers (a lowercase answer cannot contain "Section 1"...).
_CONFLICTS: dict[str, set[str]] = {
    "language:response_language": {
        "detectable_format:multiple_sections", "keywords:existence", "keywords:frequency",
        "keywords:forbidden_words", "startend:end_checker", "change_case:english_capital",
        "change_case:english_lowercase", "change_case:capital_word_frequency", "keywords:letter_frequency",
        "length_constraints:number_words"},
    "length_constraints:number_paragraphs": {
        "length_constraints:nth_paragraph_first_word", "length_constraints:number_sentences"},
    "detectable_format:constrained_response": _ALL,
    "detectable_format:multiple_sections": {
        "detectable_format:number_highlighted_sections", "change_case:english_lowercase",
        "change_case:english_capital"},
    "detectable_format:json_format": _ALL - {"keywords:forbidden_words", "keywords:existence"},
    "combination:two_responses": _ALL - {
        "keywords:forbidden_words", "keywords:existence", "language:response_language", "detectable_format:title",
        "punctuation:no_comma"},
    "change_case:capital_word_frequency": {"change_case:english_lowercase", "change_case:english_capital"},
    "change_case:english_lowercase": {"change_case:english_capital"},
    "startend:quotation": {"detectable_format:title"},
}


def conflicts(a: str, b: str) -> bool:
    """Whether two instruction types must not be combined (symmetric; a type conflicts with itself)."""
    return a == b or b in _CONFLICTS.get(a, set()) or a in _CONFLICTS.get(b, set())


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The natural-language instruction for one constraint (IFEval's wording)."""
    k = kwargs
    texts = {
        "keywords:existence": lambda: f"Include keywords {', '.join(k.get('keywords', []))} in the response.",
        "keywords:frequency": lambda: f"In your response, the word {k.get('keyword')} should appear "
                                      f"{k.get('relation')} {k.get('frequency')} times.",
        "keywords:forbidden_words": lambda: "Do not include keywords "
                                            f"{', '.join(k.get('forbidden_words', []))} in the response.",
        "keywords:letter_frequency": lambda: f"In your response, the letter {k.get('letter')} should appear "
                                             f"{k.get('let_relation')} {k.get('let_frequency')} times.",
        "language:response_language": lambda: f"Your ENTIRE response should be in "
                                              f"{LANGUAGES.get(k.get('language'), k.get('language'))} language, "
                                              "no other language is allowed.",
        "length_constraints:number_sentences": lambda: f"Your response should contain {k.get('relation')} "
                                                       f"{k.get('num_sentences')} sentences.",
        "length_constraints:number_paragraphs": lambda: f"There should be {k.get('num_paragraphs')} paragraphs. "
                                                        "Paragraphs are separated with the markdown divider: ***",
        "length_constraints:number_words": lambda: f"Answer with {k.get('relation')} {k.get('num_words')} words.",
        "length_constraints:nth_paragraph_first_word": lambda: (
            f"There should be {k.get('num_paragraphs')} paragraphs. Paragraphs and only paragraphs are separated "
            "with each other by two new lines as if it was '\\n\\n' in python. "
            f"Paragraph {k.get('nth_paragraph')} must start with word {k.get('first_word')}."),
        "detectable_content:number_placeholders": lambda: (
            f"The response must contain at least {k.get('num_placeholders')} placeholders represented by square "
            "brackets, such as [address]."),
        "detectable_content:postscript": lambda: "At the end of your response, please explicitly add a postscript "
                                                 f"starting with {k.get('postscript_marker')}",
        "detectable_format:number_bullet_lists": lambda: (
            f"Your answer must contain exactly {k.get('num_bullets')} bullet points. Use the markdown bullet points "
            "such as:\n* This is point 1.\n* This is point 2"),
        "detectable_format:constrained_response": lambda: "Answer with one of the following options: "
                                                          f"{', '.join(CONSTRAINED_RESPONSE_OPTIONS)}",
        "detectable_format:number_highlighted_sections": lambda: (
            f"Highlight at least {k.get('num_highlights')} sections in your answer with markdown, i.e. "
            "*highlighted section*."),
        "detectable_format:multiple_sections": lambda: (
            f"Your response must have {k.get('num_sections')} sections. Mark the beginning of each section with "
            f"{k.get('section_spliter')} X, such as:\n{k.get('section_spliter')} 1\n[content of section 1]\n"
            f"{k.get('section_spliter')} 2\n[content of section 2]"),
        "detectable_format:json_format": lambda: "Entire output should be wrapped in JSON format. You can use "
                                                 "markdown ticks such as ```.",
        "detectable_format:title": lambda: "Your answer must contain a title, wrapped in double angular brackets, "
                                           "such as <<poem of joy>>.",
        "combination:two_responses": lambda: "Give two different responses. Responses and only responses should "
                                             "be separated by 6 asterisk symbols: ******.",
        "combination:repeat_prompt": lambda: (
            "First repeat the request word for word without change, then give your answer (1. do not say any words "
            "or characters before repeating the request; 2. the request you need to repeat does not include this "
            "sentence)"),
        "startend:end_checker": lambda: f"Finish your response with this exact phrase {k.get('end_phrase')} "
                                        "No other words should follow this phrase.",
        "change_case:capital_word_frequency": lambda: (
            f"In your response, words with all capital letters should appear {k.get('capital_relation')} "
            f"{k.get('capital_frequency')} times."),
        "change_case:english_capital": lambda: "Your entire response should be in English, and in all capital "
                                               "letters.",
        "change_case:english_lowercase": lambda: "Your entire response should be in English, and in all lowercase "
                                                 "letters. No capital letters are allowed.",
        "punctuation:no_comma": lambda: "In your entire response, refrain from the use of any commas.",
        "startend:quotation": lambda: "Wrap your entire response with double quotation marks.",
    }
    if instruction_id not in texts:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
    return texts[instruction_id]()


def _draw_kwargs(instruction_id: str, rng: random.Random, words: list[str]) -> dict[str, Any]:
    """Concrete kwargs for one type; `words` is a shuffled pool consumed so keywords never repeat."""
    relation = rng.choice(RELATIONS)
    if instruction_id == "keywords:existence":
        return {"keywords": [words.pop(), words.pop()]}
    if instruction_id == "keywords:frequency":
        return {"keyword": words.pop(), "frequency": rng.randint(1, 3), "relation": relation}
    if instruction_id == "keywords:forbidden_words":
        return {"forbidden_words": [words.pop(), words.pop()]}
    if instruction_id == "keywords:letter_frequency":
        # "less than" only for rare letters, "at least" only for common ones: satisfiable with any length
        if relation == "less than":
            return {"letter": rng.choice(RARE_LETTERS), "let_frequency": rng.randint(3, 10), "let_relation": relation}
        return {"letter": rng.choice(COMMON_LETTERS), "let_frequency": rng.randint(2, 10), "let_relation": relation}
    if instruction_id == "language:response_language":
        return {"language": rng.choice(sorted(LANGUAGES))}
    if instruction_id == "length_constraints:number_sentences":
        return {"num_sentences": rng.randint(2, 20) if relation == "less than" else rng.randint(1, 10),
                "relation": relation}
    if instruction_id == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.randint(1, 5)}
    if instruction_id == "length_constraints:number_words":
        return {"num_words": rng.randint(100, 500) if relation == "less than" else rng.randint(50, 300),
                "relation": relation}
    if instruction_id == "length_constraints:nth_paragraph_first_word":
        num = rng.randint(2, 5)
        return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num), "first_word": words.pop()}
    if instruction_id == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.randint(1, 4)}
    if instruction_id == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}
    if instruction_id == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(1, 5)}
    if instruction_id == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 4)}
    if instruction_id == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(2, 5)}
    if instruction_id == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    if instruction_id == "change_case:capital_word_frequency":
        return {"capital_frequency": rng.randint(2, 20) if relation == "less than" else rng.randint(1, 10),
                "capital_relation": relation}
    return {}


def sample_constraints(rng: random.Random, k: int = 1, types: tuple[str, ...] | None = None,
                       word_limit: tuple[int, int] | None = None) -> dict[str, Any]:
    """k random, mutually compatible IFEval constraints with concrete kwargs.

    Returns {"instruction_id_list": [...], "kwargs": [...], "instruction_text": str}; the first two are
    exactly IFEval's input format, `instruction_text` is the instruction to append to a prompt.
    ``types`` restricts the draw to those instruction ids (default: every sampled type); ``word_limit`` =
    (lo, hi) makes ``length_constraints:number_words`` an "answer in less than N words" with N in [lo, hi]
    (default: IFEval-like 50..500-word limits). Deterministic for a given rng state. Raises ValueError when k is
    not between 1 and 6 or ``types`` names an unknown or unsampled type.
    """
    if not isinstance(k, int) or not 1 <= k <= 6:
        raise ValueError(f"k must be an integer between 1 and 6, got {k!r}")
    candidates = sorted(_ALL - NOT_SAMPLED)
    if types is not None:
        unknown = sorted(set(types) - set(candidates))
        if unknown:
            raise ValueError(f"cannot sample constraint types {unknown}; known: {candidates}")
        candidates = sorted(set(types))
    for _attempt in range(100):
        chosen: list[str] = []
        pool = candidates[:]
        rng.shuffle(pool)
        for instruction_id in pool:
            if len(chosen) == k:
                break
            if not any(conflicts(instruction_id, other) for other in chosen):
                chosen.append(instruction_id)
        if len(chosen) == k:
            break
    else:
        raise ValueError(f"could not draw {k} compatible constraints from {candidates}")
    words = list(KEYWORDS)
    rng.shuffle(words)
    kwargs = [_draw_kwargs(instruction_id, rng, words) for instruction_id in chosen]
    if word_limit is not None:
        for instruction_id, kw in zip(chosen, kwargs):
            if instruction_id == "length_constraints:number_words":
                kw.update(num_words=rng.randint(*word_limit), relation="less than")
    for instruction_id, kw in zip(chosen, kwargs):
        normalize_kwargs(instruction_id, kw)  # the sampler must only emit what the verifier accepts
    text = " ".join(describe(instruction_id, kw) for instruction_id, kw in zip(chosen, kwargs))
    return {"instruction_id_list": chosen, "kwargs": kwargs, "instruction_text": text}
