"""Keep secrets out of every message: config errors, log lines, status and `check` output.

The config loader registers each value that is a secret (a field named like ``password`` or
``api_key``, a ``${VAR}`` whose variable or field name looks secret, the password of a URL's
user-info); :func:`text` then replaces them, and any URL user-info password, by ``***``. Code
that builds a message from something a secret may have reached (an exception from a client
library, a URL) passes it through :func:`text`; the CLI installs :class:`Filter` on its log
handlers so a forgotten call still cannot print a registered secret.

Secrets shorter than :data:`MIN_LENGTH` characters are not registered: replacing every ``ab``
in every log line would make logs unreadable and such a value protects nothing anyway.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
MIN_LENGTH = 4

SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api_?key|private_?key|credential|auth)",
    re.IGNORECASE,
)
"""A field or environment variable name whose value is a secret (``ES_PASSWORD``, ``api_key``,
``aws_secret_access_key``, ``session_token``)."""

# scheme://user:password@host — the password part stops at the last '@' before the host
_URL_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:)(?P<pw>[^\s/]*)@(?=[^\s@]*(?:[\s/]|$))"
)

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def looks_secret(name: str) -> bool:
    """True when a field or variable name says its value is a secret."""
    return bool(SECRET_NAME.search(name))


def register(value: object) -> None:
    """Never print this value again (in this process); short or empty values are ignored."""
    global _pattern
    if not isinstance(value, str) or len(value) < MIN_LENGTH:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        # longest first, so a secret that contains another is masked whole
        alts = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in alts))
    for pw in url_passwords(value):
        register(pw)


def url_passwords(value: str) -> list[str]:
    """The passwords of every ``scheme://user:password@host`` in ``value``."""
    return [m.group("pw") for m in _URL_USERINFO.finditer(value) if m.group("pw")]


def text(s: str) -> str:
    """``s`` with URL user-info passwords and every registered secret replaced by ``***``."""
    if not s:
        return s
    s = _URL_USERINFO.sub(lambda m: f"{m.group('head')}{MASK}@", s)
    pattern = _pattern
    if pattern is not None:
        s = pattern.sub(MASK, s)
    return s


def clear() -> None:
    """Forget every registered secret (tests)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


class Filter(logging.Filter):
    """Redacts a record's final message (and its traceback text) before any handler formats it.

    Installed on handlers, not loggers, so records from every library that propagate to the
    root logger (botocore, elastic_transport, …) are covered too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it, redacted
            message = f"{record.msg!r} {record.args!r}"
        record.msg = text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = text(record.exc_text)
        if record.stack_info:
            record.stack_info = text(record.stack_info)
        return True
