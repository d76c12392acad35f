"""Task types of the real-content instruction suite (issue 20): facts from well-kept sources.

Every task is a :class:`RealTask`: a name, a kind (``knowledge``: a look-up of many independent
facts, where adapter capacity should matter; ``transformation``: a rule applied to an input;
``classification``: a small closed label set), its own instruction wording, the source of its
facts, and ``items()``: the task's whole pool of ``(input, output)`` pairs, built offline and
deterministically (sorted, one output per input) from

* the Python standard library: ``unicodedata`` (Unicode database of this Python), ``html.entities``,
  ``http.HTTPStatus``, ``calendar`` / ``datetime`` (proleptic Gregorian calendar), ``keyword`` /
  ``builtins``, ``mimetypes`` (the built-in table only, never the system's files);
* ``zoneinfo`` over the ``tzdata`` package (IANA time zone database, read from the package, never
  from the system's zone files);
* ``pycountry`` (ISO 3166-1 countries, ISO 4217 currencies, ISO 639 languages);
* ``periodictable`` (chemical elements: names, symbols, atomic numbers, standard atomic weights).

Facts therefore follow the installed versions (see :func:`source_versions`), which the suite
records beside its data. (Over 400 lines on purpose: one generator per task and the one table
that names each task's wording and source read best side by side.)
"""
from __future__ import annotations

import calendar
import datetime as dt
import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RealTask", "TASKS", "KINDS", "task_names", "source_versions", "number_words", "roman"]

KINDS = ("knowledge", "transformation", "classification")
Pairs = list[tuple[str, str]]


@dataclass(frozen=True, kw_only=True)
class RealTask:
    name: str
    kind: str
    instruction: str
    source: str
    build: Callable[[], Pairs]

    def items(self) -> Pairs:
        """The task's pool: sorted ``(input, output)`` pairs, unique inputs (cached)."""
        return _pool(self.name)


# ---------------------------------------------------------------------------------------------- sources
def _chars() -> list[str]:
    """Letters, digits and symbols of the Latin, Greek, Cyrillic, Armenian, Hebrew, Arabic and
    symbol blocks (U+00A1..U+2BFF) that have a Unicode name."""
    import unicodedata

    out = []
    for cp in range(0xA1, 0x2C00):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        if name and unicodedata.category(ch)[0] in "LNS" and len(name) <= 48 and unicodedata.combining(ch) == 0:
            out.append(ch)
    return out


_CATEGORY = {"Lu": "uppercase letter", "Ll": "lowercase letter", "Lt": "titlecase letter", "Lm": "modifier letter",
             "Lo": "other letter", "Nd": "decimal digit", "Nl": "letter number", "No": "other number",
             "Sm": "math symbol", "Sc": "currency symbol", "Sk": "modifier symbol", "So": "other symbol"}
_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "HEBREW", "ARABIC", "DEVANAGARI", "BENGALI", "THAI",
            "GEORGIAN", "ETHIOPIC", "CHEROKEE", "RUNIC", "OGHAM", "KHMER", "MONGOLIAN", "TAMIL", "TELUGU")


def _unicode_name() -> Pairs:
    import unicodedata
    return [(c, unicodedata.name(c)) for c in _chars()]


def _unicode_char() -> Pairs:
    return [(n, c) for c, n in _unicode_name()]


def _unicode_category() -> Pairs:
    import unicodedata
    return [(c, _CATEGORY[unicodedata.category(c)]) for c in _chars() if unicodedata.category(c) in _CATEGORY]


def _unicode_script() -> Pairs:
    import unicodedata
    out = []
    for c in _chars():
        first = unicodedata.name(c).split(" ")[0]
        if unicodedata.category(c).startswith("L") and first in _SCRIPTS:
            out.append((c, first.capitalize()))
    return out


def _codepoint() -> Pairs:
    return [(c, f"U+{ord(c):04X}") for c in _chars()]


def _utf8() -> Pairs:
    return [(c, " ".join(f"{b:02X}" for b in c.encode("utf-8"))) for c in _chars()]


def _digit_value() -> Pairs:
    import unicodedata
    return [(chr(cp), str(unicodedata.decimal(chr(cp)))) for cp in range(0x80, 0x10000)
            if unicodedata.category(chr(cp)) == "Nd"]


def _html_entity() -> Pairs:
    import unicodedata
    from html.entities import name2codepoint
    # spaces and invisible format characters (&nbsp;, &zwnj;, ...) would be blank answers
    return [(f"&{n};", chr(cp)) for n, cp in name2codepoint.items() if unicodedata.category(chr(cp))[0] not in "ZC"]


def _http_reason() -> Pairs:
    from http import HTTPStatus
    return [(str(s.value), s.phrase) for s in HTTPStatus]


def _http_class() -> Pairs:
    from http import HTTPStatus
    classes = {1: "informational", 2: "success", 3: "redirection", 4: "client error", 5: "server error"}
    return [(str(s.value), classes[s.value // 100]) for s in HTTPStatus]


def _country(c) -> str:
    return getattr(c, "common_name", None) or c.name


def _countries():
    import pycountry
    return sorted(pycountry.countries, key=lambda c: c.alpha_2)


def _country_name() -> Pairs:
    return [(c.alpha_2, _country(c)) for c in _countries()]


def _country_alpha3() -> Pairs:
    return [(_country(c), c.alpha_3) for c in _countries()]


def _country_numeric() -> Pairs:
    return [(_country(c), c.numeric) for c in _countries()]


def _country_official() -> Pairs:
    return [(_country(c), c.official_name) for c in _countries() if getattr(c, "official_name", None)]


def _currencies():
    import pycountry
    return sorted(pycountry.currencies, key=lambda c: c.alpha_3)


def _currency_name() -> Pairs:
    return [(c.alpha_3, c.name) for c in _currencies()]


def _currency_numeric() -> Pairs:
    return [(c.name, c.numeric) for c in _currencies() if getattr(c, "numeric", None)]


def _languages():
    import pycountry
    return sorted((lang for lang in pycountry.languages if getattr(lang, "alpha_2", None)), key=lambda x: x.alpha_2)


def _plain(name: str) -> str:
    return re.sub(r"\s*\(.*?\)", "", name).strip()


def _language_name() -> Pairs:
    return [(lang.alpha_2, _plain(lang.name)) for lang in _languages()]


def _language_alpha3() -> Pairs:
    return [(_plain(lang.name), lang.alpha_3) for lang in _languages()]


def _elements():
    import periodictable
    return [e for e in periodictable.elements if 1 <= e.number <= 118]


def _element_symbol() -> Pairs:
    return [(e.name, e.symbol) for e in _elements()]


def _element_name() -> Pairs:
    return [(str(e.number), e.name) for e in _elements()]


def _element_mass() -> Pairs:
    from decimal import ROUND_HALF_UP, Decimal
    # round the published decimal (55.845 -> 55.85), not its binary float (55.84499...)
    return [(e.symbol, str(Decimal(repr(e.mass)).quantize(Decimal("0.01"), ROUND_HALF_UP)))
            for e in _elements() if e.number <= 94 and e.mass]


_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)


def _element_period() -> Pairs:
    return [(e.name, str(next(i + 1 for i, end in enumerate(_PERIOD_ENDS) if e.number <= end))) for e in _elements()]


def _sort_symbols() -> Pairs:
    symbols = [e.symbol for e in _elements()]
    rng = random.Random("sort_symbols")
    out = {}
    while len(out) < 400:
        pick = rng.sample(symbols, rng.randint(3, 5))
        out[" ".join(pick)] = " ".join(sorted(pick))
    return list(out.items())


def _zones() -> list[str]:
    from importlib.resources import files

    regions = ("Africa/", "America/", "Asia/", "Atlantic/", "Australia/", "Europe/", "Indian/", "Pacific/")
    return sorted(z for z in (files("tzdata") / "zones").read_text().split() if z.startswith(regions))


@functools.lru_cache(maxsize=None)
def _zone(key: str):
    from importlib.resources import files
    from zoneinfo import ZoneInfo

    with (files("tzdata") / "zoneinfo").joinpath(*key.split("/")).open("rb") as fh:
        return ZoneInfo.from_file(fh, key=key)


def _utc_offset(key: str, month: int) -> dt.timedelta:
    return dt.datetime(2024, month, 15, 12, tzinfo=dt.timezone.utc).astimezone(_zone(key)).utcoffset()


def _fmt_offset(delta: dt.timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _tz_offset() -> Pairs:
    return [(z, _fmt_offset(_utc_offset(z, 1))) for z in _zones()]


def _tz_dst() -> Pairs:
    return [(z, "yes" if _utc_offset(z, 1) != _utc_offset(z, 7) else "no") for z in _zones()]


def _mime_type() -> Pairs:
    import mimetypes
    table = mimetypes.MimeTypes(filenames=()).types_map[True]    # the built-in table, not /etc/mime.types
    return [(ext, typ) for ext, typ in table.items()]


def _python_keyword() -> Pairs:
    import builtins
    import keyword
    names = [b for b in dir(builtins) if b.isidentifier() and b.islower() and not b.startswith("_")]
    return [(k, "yes") for k in keyword.kwlist] + [(b, "no") for b in names if not keyword.iskeyword(b)]


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _dates(tag: str, n: int = 1500) -> list[dt.date]:
    rng = random.Random(tag)
    start, span = dt.date(1900, 1, 1).toordinal(), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    return sorted({dt.date.fromordinal(start + rng.randint(0, span)) for _ in range(n)})


def _weekday() -> Pairs:
    return [(d.isoformat(), _DAYS[d.weekday()]) for d in _dates("weekday")]


def _date_words() -> Pairs:
    return [(d.isoformat(), f"{d.day} {_MONTHS[d.month - 1]} {d.year}") for d in _dates("date_words")]


def _days_in_month() -> Pairs:
    return [(f"{_MONTHS[m - 1]} {y}", str(calendar.monthrange(y, m)[1])) for y in range(1900, 2100) for m in (2, 4, 7)]


def _leap_year() -> Pairs:
    return [(str(y), "yes" if calendar.isleap(y) else "no") for y in range(1600, 2401)]


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """English cardinal words (US style, no "and"), 0 <= n < 10**9."""
    if not 0 <= n < 10**9:
        raise ValueError(f"n must be in [0, 1e9), got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    for size, word in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            return number_words(n // size) + " " + word + (" " + number_words(n % size) if n % size else "")
    raise AssertionError(n)


def roman(n: int) -> str:
    """Roman numerals, 1 <= n <= 3999 (subtractive notation)."""
    if not 1 <= n <= 3999:
        raise ValueError(f"n must be in [1, 3999], got {n}")
    out = []
    for value, sym in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                       (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        count, n = divmod(n, value)
        out.append(sym * count)
    return "".join(out)


def _numbers(tag: str, hi: int, n: int = 1500) -> list[int]:
    rng = random.Random(tag)
    return sorted({rng.randint(1, hi) for _ in range(n)})


def _number_words() -> Pairs:
    return [(str(n), number_words(n)) for n in _numbers("number_words", 999_999)]


def _roman() -> Pairs:
    return [(str(n), roman(n)) for n in _numbers("roman", 3999)]


# ---------------------------------------------------------------------------------------------- the table
_UNI = "unicodedata (the Unicode Character Database of this Python)"
_ISO3166, _ISO4217, _ISO639 = ("pycountry: ISO 3166-1 (common name where ISO gives one)", "pycountry: ISO 4217",
                               "pycountry: ISO 639-1/639-3 (parenthesised qualifiers dropped)")
_PT = "periodictable: elements 1-118"
_TZ = "zoneinfo over the tzdata package (IANA database), instants 2024-01-15 and 2024-07-15 12:00 UTC"
_CAL = "datetime/calendar (proleptic Gregorian calendar), dates 1900-2099 drawn with a fixed seed"

_TABLE = (
    # knowledge look-ups
    ("unicode_name", "knowledge", "Give the official Unicode name of this character.", _UNI, _unicode_name),
    ("unicode_char", "knowledge", "Write the single character that has this Unicode name.", _UNI, _unicode_char),
    ("html_entity", "knowledge", "Which character does this HTML named character reference stand for?",
     "html.entities.name2codepoint (HTML 4.01 entities)", _html_entity),
    ("http_reason", "knowledge", "State the standard reason phrase of this HTTP status code.",
     "http.HTTPStatus (RFC 9110 and related RFCs)", _http_reason),
    ("country_name", "knowledge", "Name the country that has this ISO 3166-1 alpha-2 code.", _ISO3166, _country_name),
    ("country_alpha3", "knowledge", "What is the ISO 3166-1 alpha-3 code of this country?", _ISO3166, _country_alpha3),
    ("country_numeric", "knowledge", "Give the three-digit ISO 3166-1 numeric code of this country.", _ISO3166,
     _country_numeric),
    ("country_official", "knowledge", "What is the full official name of this country?", _ISO3166, _country_official),
    ("currency_name", "knowledge", "Which currency does this ISO 4217 code denote?", _ISO4217, _currency_name),
    ("currency_numeric", "knowledge", "Give the ISO 4217 numeric code of this currency.", _ISO4217, _currency_numeric),
    ("language_name", "knowledge", "Which language has this two-letter ISO 639-1 code?", _ISO639, _language_name),
    ("language_alpha3", "knowledge", "Give the three-letter ISO 639-3 code of this language.", _ISO639,
     _language_alpha3),
    ("element_symbol", "knowledge", "Write the chemical symbol of this element.", _PT, _element_symbol),
    ("element_name", "knowledge", "Which chemical element has this atomic number?", _PT, _element_name),
    ("element_mass", "knowledge", "Give the standard atomic weight of the element with this symbol, to two decimals.",
     _PT + " (up to plutonium)", _element_mass),
    ("tz_offset", "knowledge", "What was the UTC offset of this IANA time zone on 15 January 2024?", _TZ, _tz_offset),
    ("mime_type", "knowledge", "Give the MIME type for files with this extension.",
     "mimetypes (Python's built-in table, strict types)", _mime_type),
    # transformations
    ("roman_numeral", "transformation", "Write this number in Roman numerals.",
     "Roman numeral rules (subtractive notation), numbers 1-3999 drawn with a fixed seed", _roman),
    ("number_words", "transformation", "Spell out this number in English words.",
     "English cardinal number rules (US style), numbers below one million drawn with a fixed seed", _number_words),
    ("date_words", "transformation", "Rewrite this ISO 8601 date as day, month name and year.", _CAL, _date_words),
    ("weekday", "transformation", "On which day of the week did or will this date fall?", _CAL, _weekday),
    ("days_in_month", "transformation", "How many days are in this month?",
     "calendar.monthrange (February, April, July of 1900-2099)", _days_in_month),
    ("utf8_bytes", "transformation", "Write the UTF-8 encoding of this character as hexadecimal bytes.", _UNI,
     _utf8),
    ("code_point", "transformation", "Give the Unicode code point of this character in U+ notation.", _UNI,
     _codepoint),
    ("sort_symbols", "transformation", "Sort these chemical element symbols alphabetically.",
     _PT + ", 3-5 symbols drawn with a fixed seed", _sort_symbols),
    ("digit_value", "transformation", "What is the decimal value of this digit character?",
     _UNI + ": characters of category Nd outside ASCII", _digit_value),
    # classification
    ("unicode_category", "classification", "Classify this character by its Unicode general category.", _UNI,
     _unicode_category),
    ("unicode_script", "classification", "Which writing system does this letter belong to?",
     _UNI + ": the script word that opens the character's name", _unicode_script),
    ("http_class", "classification", "Classify this HTTP status code as informational, success, redirection, "
     "client error or server error.", "http.HTTPStatus (class = first digit, RFC 9110 section 15)", _http_class),
    ("leap_year", "classification", "Is this year a leap year in the Gregorian calendar? Answer yes or no.",
     "calendar.isleap, years 1600-2400", _leap_year),
    ("python_keyword", "classification", "Is this word a reserved keyword in Python? Answer yes or no.",
     "keyword.kwlist (yes) and the lowercase names of builtins (no)", _python_keyword),
    ("tz_dst", "classification", "Does this IANA time zone observe daylight saving time in 2024? Answer yes or no.",
     _TZ + " (yes when the two offsets differ)", _tz_dst),
    ("element_period", "classification", "In which period of the periodic table is this element?",
     _PT + "; period from the atomic number (periods end at 2, 10, 18, 36, 54, 86, 118)", _element_period),
)

TASKS: dict[str, RealTask] = {name: RealTask(name=name, kind=kind, instruction=instr, source=src, build=fn)
                              for name, kind, instr, src, fn in _TABLE}


@functools.lru_cache(maxsize=None)
def _pool(name: str) -> Pairs:
    pairs = TASKS[name].build()
    seen: dict[str, str] = {}
    for inp, out in pairs:
        seen.setdefault(inp, out)        # first fact wins (mimetypes lists an extension once per type)
    return sorted(seen.items())


def task_names(kind: str | None = None) -> list[str]:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [n for n, t in TASKS.items() if kind is None or t.kind == kind]


def source_versions() -> dict[str, str]:
    """The versions the facts come from (recorded with an exported suite)."""
    import sys
    import unicodedata
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "unicode": unicodedata.unidata_version}
    for pkg in ("pycountry", "periodictable", "tzdata"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out
