"""Text that crosses a trust boundary: file names and bundle strings shown on terminals, in
spreadsheets, in Markdown and in HTML. Names come from whoever made the files; none of them may
forge a line, start a formula or become markup."""

from __future__ import annotations

import html
import re

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides that can
# make a terminal or an editor show something other than what the bytes say.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(code) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: object) -> str:
    """``text`` safe for a terminal line: control characters escaped (``\\n``, ``\\x1b``...), and
    bytes that are not UTF-8 (file names decoded with surrogate escapes) shown as ``\\xNN``."""
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(_escape, text)


def csv_cell(value: object) -> str:
    """A CSV cell that a spreadsheet never runs: a leading ``= + - @``, tab or carriage return gets a
    ``'`` in front (OWASP's advice), and so does a leading ``'``, so that no two values make one cell
    (:func:`csv_value` undoes it); bytes that are not UTF-8 are shown as ``\\xNN``."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "'" + text if text.startswith((*_FORMULA_START, "'")) else text


def csv_value(cell: str) -> str:
    """The value :func:`csv_cell` made ``cell`` from (for names that are UTF-8)."""
    return cell[1:] if cell.startswith("'") else cell


def markdown_text(value: object) -> str:
    """A string from a bundle or a file name, as inert Markdown: one line, no HTML, no markup."""
    text = printable(value)
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]#!|~])", r"\\\1", text)


UNDEFINED = "undefined"


def number(value, digits: int = 3) -> str:
    """A metric for people: ``undefined`` where it is (never a number that could read as zero)."""
    return UNDEFINED if value is None else f"{value:.{digits}f}"


def with_ci(report: dict, key: str) -> str:
    """A metric with its 95% interval, as ``0.972 (0.958-0.983)``."""
    from pneumoscan.core.metrics import undefined_reason

    if report.get(key) is None:  # never an interval next to a metric that has no value
        reason = undefined_reason(report, key)
        return UNDEFINED + (f" ({reason})" if reason else "")
    ci = (report.get("ci95") or {}).get(key)
    return number(report.get(key)) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
