"""Final answers of math solutions: extraction and equivalence. No I/O.

`extract_answer` finds a solution's final answer by the first rule that
matches: the last `\\boxed{...}` (or `\\fbox{...}`), the last "#### x", the
last "The answer is x", the last line "A: x", else the last number.
`answers_equivalent` compares two answers with math-verify (0.5 == \\frac{1}{2},
1,000 == 1000, 18 == 18.00, 50 == 50%), falling back to string equality.

math-verify guards its sympy work with `signal.alarm`, which raises
ValueError outside the main thread (the gateway calls this from event-loop and
worker threads) and would fight over SIGALRM inside a server anyway. So its
timeouts are off here (`parsing_timeout=None`, `timeout_seconds=None`) and
the guard is ours: only short answers without exponent towers, exponents of
three digits or more, or huge factorials reach sympy; everything else is
compared as a string. That bounds the known blow-ups (measured here: at most
~2 s, e.g. (x+1)^{99} or \\binom{99999}{50000}) but is no hard deadline; the
engine runs votes on a worker thread so the event loop never waits on sympy.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache

__all__ = ["answers_equivalent", "extract_answer", "normalize_answer", "warm_up"]

# Longer answers are compared as strings: sympy time grows with length, and an
# extracted final answer worth comparing symbolically is short.
MAX_SYMPY_CHARS = 100

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE = re.compile(r"(?<!\\)[{}]")
_BARE_BOX_ARGUMENT = re.compile(r"[^\s$\\][^\s$]*")  # "\\boxed 5", not "\\boxed \\boxed"
_HASH_ANSWER = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ANSWER_IS = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*(.+?)\s*(?:[.!?](?=\s|$)|\n|$)", re.IGNORECASE
)
# Line-anchored: "Publisher A: 5000 cents" in the middle of a line is not an answer.
_A_COLON = re.compile(r"^[ \t]*A:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: <<2*9=18>>
# A run of digits and commas, matched whole (possessive, and never starting
# inside a run) so that long "1,111,111,..." text stays linear; _last_number
# decides whether the commas separate thousands or a list. A minus sign counts
# only where it cannot be subtraction ("5-3" ends in 3, not -3).
_NUMBER = re.compile(r"((?<![\w)\]}])-)?(?<![\d.])(?<!\d,)(\d(?:,?\d)*+)(\.\d+)?(%?)")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
# "18 dollars", "\frac{1}{2} cups": the unit words go, a scale word stays
# ("1.8 billion" is not 1.8). Unit words need a space before them so that
# algebra like "5x" is left alone.
_TRAILING_UNITS = re.compile(
    r"(?<=[\d}%])\s+(?!(?:thousand|million|billion|trillion)\b)[A-Za-z]{2,}"
    r"(?:[ \t]+[A-Za-z]+)*$"
)
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # a word, not a LaTeX command
_PLAIN_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
# A stated value followed by a comma or a clause: "21, as each ...", "380 as a decimal ...".
_LEADING_VALUE = re.compile(
    r"^(-?\d+(?:\.\d+)?%?)\s*(?:,|\s(?:as|because|since|which|so|but|if|when|for|or)\b)"
)
_PROSE_WORDS = 4  # a phrase of this many words without a digit is prose, not an answer
# Inputs that make sympy compute enormous integers (10^{10^{10}}, 99999!) and
# would hang without a timeout.
_UNSAFE_FOR_SYMPY = re.compile(
    r"\^\s*\{[^{}]*\^"  # 2^{2^{2}}
    r"|\^\s*\{?\s*[\d.]+\s*\}?\s*\^"  # 2^2^2, 2^{2}^{2}
    r"|\^\s*\{?\s*\(?\s*\d{3,}"  # (x+1)^{999}, 10^{1000}
    r"|\*\*"
    r"|\d{4,}\s*!"
    r"|\\(?:uparrow|underbrace|overbrace)"
)


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised; None when it has none."""
    if not isinstance(text, str) or not text.strip():
        return None
    for find in (_last_boxed, _last_hash, _last_answer_is, _last_a_colon, _last_number):
        raw = find(text)
        if raw is not None:
            answer = normalize_answer(raw)
            if answer:
                return answer
    return None


def normalize_answer(answer: str) -> str:
    """Light normalisation for display and string comparison: "$1,000." -> "1000"."""
    s = answer
    # Each pass can expose another wrapper ("**$18**", "\\\\,0"); repeat until
    # nothing changes so that normalising twice changes nothing.
    for _ in range(8):
        previous, s = s, _normalize_once(s)
        if s == previous:
            break
    return s


def _normalize_once(answer: str) -> str:
    s = answer.strip().strip("*").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    s = s.replace("\\$", "").replace("$", "")
    s = _TEXT_COMMAND.sub(r" \1", s)
    s = re.sub(r"\\[,;:! ]", " ", s)  # LaTeX spacing commands
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    s = _strip_units(s)
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)


def warm_up() -> bool:
    """Import math-verify/sympy and compare once (~0.6 s), so the first vote is not slow."""
    return answers_equivalent("0.5", "\\frac{1}{2}")


def _strip_units(s: str) -> str:
    units = _TRAILING_UNITS.search(s)
    # Only after a bare quantity: in "3 hours and 20 minutes" the words are the answer.
    if units and not _WORD.search(s[: units.start()]):
        return s[: units.start()].strip()
    return s


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """Whether two final answers are mathematically equal (never raises)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    # math-verify's verify is asymmetric (gold vs prediction); a fixed order
    # keeps equivalence symmetric, which voting relies on, and halves the cache.
    if nb < na:
        na, nb = nb, na
    return _equivalent_normalized(na, nb)


@lru_cache(maxsize=16384)
def _equivalent_normalized(a: str, b: str) -> bool:
    da, db = _plain_decimal(a), _plain_decimal(b)
    if da is not None and db is not None:
        # The GSM8K case: two plain numbers compare exactly, without sympy.
        return da == db
    pa, pb = _parse(a), _parse(b)
    if pa is None or pb is None:
        return False  # the normalised strings already differ
    try:
        from math_verify import verify

        return bool(verify(list(pa), list(pb), timeout_seconds=None, raise_on_error=False))
    except Exception:  # math-verify and sympy raise a wide variety on odd input
        return False


def _plain_decimal(s: str) -> Decimal | None:
    if not _PLAIN_DECIMAL.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


@lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple[object, ...] | None:
    """math-verify's sympy objects for one normalised answer; None if it has none."""
    if len(answer) > MAX_SYMPY_CHARS or _UNSAFE_FOR_SYMPY.search(answer):
        return None
    try:
        # Imported here: sympy takes ~1 s to import and most callers (argmax)
        # never compare answers.
        from math_verify import parse

        # Boxed, because the answer is already extracted: LaTeX such as
        # \frac12 parses only inside a delimiter.
        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None, raise_on_error=False)
    except Exception:
        return None
    objects = tuple(p for p in parsed if not isinstance(p, str))
    return objects or None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...}, nested braces included."""
    commands = list(_BOX_COMMAND.finditer(text))
    if not commands:
        return None
    # One pass for all braces: scanning from each command instead is quadratic
    # on text full of unclosed boxes.
    closing = _matching_braces(text)
    for command in reversed(commands):
        pos = command.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            close = closing.get(pos)
            if close is not None:  # else truncated: a box never closed is no answer
                return text[pos + 1 : close]
        else:  # "\\boxed 5"
            token = _BARE_BOX_ARGUMENT.match(text, pos)
            if token:
                return token.group(0)
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each "{" that closes -> position of its "}"; \\{ and \\} are literal."""
    closing: dict[int, int] = {}
    open_at: list[int] = []
    for match in _BRACE.finditer(text):
        if match.group(0) == "{":
            open_at.append(match.start())
        elif open_at:
            closing[open_at.pop()] = match.start()
    return closing


def _last_hash(text: str) -> str | None:
    matches = _HASH_ANSWER.findall(text)
    return _stated_value(matches[-1]) if matches else None


def _last_answer_is(text: str) -> str | None:
    matches = _ANSWER_IS.findall(text)
    return _stated_value(matches[-1]) if matches else None


def _stated_value(phrase: str) -> str | None:
    """The value a model states after "The answer is" or "####", without the working
    or the prose around it (seen in real model output):

    - "270 / 60 = 4.5 inches", "9 + 7 = 15": the right-hand side of the last "=";
    - "21, as each box cost $1 ...", "380 as a decimal is $38": the leading number;
    - "actually quite simple when you ...": no digit in several words is no answer
      (None: the next rule is tried).

    "3 hours and 20 minutes" and "2x + 3" stay whole.
    """
    s = normalize_answer(phrase)
    if "=" in s:
        rhs = normalize_answer(s.rsplit("=", 1)[1])
        if rhs and not _WORD.search(rhs):
            return rhs
    if not _WORD.search(s):
        return s
    lead = _LEADING_VALUE.match(s)
    if lead:
        return lead.group(1)
    if not re.search(r"\d", s) and len(s.split()) >= _PROSE_WORDS:
        return None
    return s


def _last_a_colon(text: str) -> str | None:
    matches = _A_COLON.findall(text)
    return matches[-1] if matches else None


def _last_number(text: str) -> str | None:
    numbers = list(_NUMBER.finditer(_CALCULATOR.sub(" ", text)))
    if not numbers:
        return None
    sign, digits, decimals, percent = numbers[-1].groups(default="")
    if "," in digits and not _THOUSANDS.fullmatch(digits):
        sign, digits = "", digits.rsplit(",", 1)[1]  # "1,2,3": a list, its last item
    return f"{sign}{digits}{decimals}{percent}"
