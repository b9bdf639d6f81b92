"""Statistics over segments: characters, words, a language guess."""

from __future__ import annotations

import bisect
import logging
import re
from collections import Counter

from .model import Document, DocumentStats

logger = logging.getLogger(__name__)

_LANGUAGE_SAMPLE_CHARS = 20_000

_CJK = re.compile(
    "[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)

# --------------------------------------------------------------------------- statistics

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


# `_WORD` on ASCII text, where it means exactly this; about twice as fast as the Unicode
# classes, and most segments are ASCII.
_ASCII_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")


def _words(text: str) -> list[str]:
    return (_ASCII_WORD if text.isascii() else _WORD).findall(text)


def count_words(text: str) -> int:
    """Words in `text`; each CJK character (Han, Kana, Hangul) counts as one word."""
    if text.isascii():
        return len(_ASCII_WORD.findall(text))
    cjk = len(_CJK.findall(text))
    return cjk + len(_WORD.findall(_CJK.sub(" ", text) if cjk else text))


def document_stats(doc: Document) -> DocumentStats:
    """Characters, words, segments and language, in one streaming pass over the segments."""
    characters = words = segments = 0
    sample: list[str] = []
    sample_size = 0
    for segment in doc.segments():
        characters += len(segment)
        words += count_words(segment)
        segments += 1
        if sample_size < _LANGUAGE_SAMPLE_CHARS:
            sample.append(segment)
            sample_size += len(segment)
    return DocumentStats(characters, words, segments, guess_language("\n".join(sample)))


# (first code point, last code point, script); letters outside these count as "other".
_SCRIPT_RANGES = (
    (0x0041, 0x024F, "latin"),
    (0x0370, 0x03FF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0530, 0x058F, "armenian"),
    (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x0980, 0x09FF, "bengali"),
    (0x0B80, 0x0BFF, "tamil"),
    (0x0E00, 0x0E7F, "thai"),
    (0x10A0, 0x10FF, "georgian"),
    (0x1100, 0x11FF, "hangul"),
    (0x1E00, 0x1EFF, "latin"),
    (0x3040, 0x30FF, "kana"),
    (0x3130, 0x318F, "hangul"),
    (0x31F0, 0x31FF, "kana"),
    (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"),
    (0xAC00, 0xD7AF, "hangul"),
    (0xF900, 0xFAFF, "han"),
    (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
    (0xFF66, 0xFF9F, "kana"),
    (0x20000, 0x3134F, "han"),
)
_RANGE_STARTS = [start for start, _, _ in _SCRIPT_RANGES]
_SCRIPT_LANGUAGE = {
    "greek": "el", "armenian": "hy", "hebrew": "he", "devanagari": "hi", "bengali": "bn",
    "tamil": "ta", "thai": "th", "georgian": "ka", "hangul": "ko", "han": "zh", "kana": "ja",
}  # fmt: skip
_STOPWORDS = {
    "en": "the and of to is in that it for with was on are this be as you not have",
    "de": "der die das und ist nicht ein eine zu mit den von sich auf für dem auch ich es",
    "fr": "le la les et des est une un du que dans pour pas qui sur au avec ce il elle nous",
    "es": "el la los las y de que en es un una por con para del se no al lo como más",
    "it": "il di che e la un una per non sono del della con gli è le si da ho anche",
    "pt": "o a os as de que e do da em um uma para com não por mais se ao é são",
    "nl": "de het een en van is dat niet op te zijn met voor ik die aan er maar",
    "pl": "i w na z że nie się do jest to jak co ale o dla są tak",
    "tr": "ve bir bu da de için ile çok ne gibi daha olarak ama değil",
    "vi": "và của là có không được cho những một các người trong với",
}
_STOPWORD_SETS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}
# Letters that, in some quantity, single a language out of its script.
_MARKERS = (
    ("cyrillic", "uk", set("іїєґ")),
    ("cyrillic", "sr", set("ђјљњћџ")),
    ("arabic", "fa", set("پچژگ")),
)


_ASCII_LETTERS = re.compile(r"[A-Za-z]+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _script_counts(sample: str) -> Counter[str]:
    """The letters of ``sample`` by script.

    ASCII letters are all Latin and counted by one regular expression; only the
    others are classified one by one. Most documents are mostly ASCII, and the
    character-by-character loop was most of the cost of pricing a short English one.
    """
    scripts = Counter(s for ch in _NON_ASCII.findall(sample)
                      if ch.isalpha() and (s := _script(ch)))
    latin = sum(map(len, _ASCII_LETTERS.findall(sample)))
    if latin:
        scripts["latin"] += latin
    return scripts


def _script(char: str) -> str | None:
    code = ord(char)
    k = bisect.bisect_right(_RANGE_STARTS, code) - 1
    if k >= 0 and code <= _SCRIPT_RANGES[k][1]:
        return _SCRIPT_RANGES[k][2]
    return None


def guess_language(sample: str) -> str:
    """An ISO 639-1 guess for `sample` ("en", "zh", "ja", ...), or "unknown".

    The script decides most languages; kana among Han means Japanese; Latin-script
    languages are told apart by their commonest words.
    """
    sample = sample[:_LANGUAGE_SAMPLE_CHARS]
    scripts = _script_counts(sample)
    if not scripts:
        return "unknown"
    kana, han, hangul = scripts["kana"], scripts["han"], scripts["hangul"]
    cjk = kana + han + hangul
    # A CJK character carries about as much as a short word, not as a letter.
    if 3 * cjk >= max(scripts.values()):
        if hangul > kana + han:
            return "ko"
        return "ja" if kana >= 0.05 * (kana + han) else "zh"
    script = scripts.most_common(1)[0][0]
    for marked, language, letters in _MARKERS:
        if script == marked and sum(ch in letters for ch in sample) >= 0.01 * scripts[script]:
            return language
    if script == "cyrillic":
        return "ru"
    if script == "arabic":
        return "ar"
    if script != "latin":
        return _SCRIPT_LANGUAGE.get(script, "unknown")
    words = Counter(map(str.lower, _words(sample)))
    hits = {lang: sum(words[w] for w in stop & words.keys())
            for lang, stop in _STOPWORD_SETS.items()}
    (best, top), (_, runner_up) = sorted(hits.items(), key=lambda item: -item[1])[:2]
    return best if top > runner_up else "unknown"  # a tie on "de" or "la" says nothing
