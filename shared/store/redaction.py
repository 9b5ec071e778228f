"""Keeping passwords out of everything candlekeep prints or logs.

A connection string reaches output by many roads: our own messages, the worker's start log,
psycopg's errors (which can echo parts of the conninfo), exceptions' text. So there are two
nets, and text that leaves the program goes through both (:func:`redact`):

- the *form*: every spelling libpq accepts is masked where it stands: URLs (any scheme, with
  raw or percent-encoded special characters in the password), ``password=`` in a query string,
  and ``key=value`` strings (quoted or not);
- the *value*: the password of each configured connection string, as libpq itself reads it
  (:func:`remember`), is masked wherever it appears, whatever surrounds it.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

MASK = "***"
#: A remembered password shorter than this is masked only by its form: masking every "ab" in
#: the output would garble it while hiding little.
MIN_SECRET_LENGTH = 4

#: ``scheme://user:password@``: the password runs to the *last* ``@`` of the whitespace-free
#: run, so raw ``#``, ``?``, ``/`` and ``@`` in it are masked too (urlsplit stops at the first).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/?#@]*:)(\S*)@")
#: ``password=…`` / ``sslpassword=…`` in a query string or a libpq ``key=value`` string; a
#: quoted value may hold spaces and escaped quotes.
_KEYWORD = re.compile(
    r"(?i)\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&'\"]*)"
)
#: Where libpq (or a reader of URLs) may cut a password written raw or percent-encoded.
_SPECIAL = re.compile(r"[#?/@&=:;\s]|%2F|%23|%3F|%40", re.IGNORECASE)

_secrets: set[str] = set()


def remember(conninfo: str | None) -> None:
    """Mask this connection string's password wherever it appears from now on.

    The password is the one libpq reads (``conninfo_to_dict`` is libpq's own parser), and the
    one the URL's text shows, in case libpq reads the URL differently from how it is written.
    """
    if not conninfo:
        return
    candidates: set[str] = set()
    match = _URL_USERINFO.search(conninfo)
    if match:
        candidates.update((match.group(2), unquote(match.group(2))))
    for keyword in _KEYWORD.finditer(conninfo):
        candidates.add(keyword.group(2).strip("'\""))
    try:
        from psycopg.conninfo import conninfo_to_dict

        parsed = conninfo_to_dict(libpq_spelling(conninfo))
    except Exception:  # not a conninfo libpq takes: the text's own forms are all there is
        parsed = {}
    for key in ("password", "sslpassword"):
        if parsed.get(key):
            candidates.add(str(parsed[key]))
    # libpq's errors quote the rest of a URL it cannot read from a special character on: the
    # pieces between such characters are masked too.
    candidates.update(piece for c in list(candidates) for piece in _SPECIAL.split(c))
    for secret in candidates:
        if len(secret) >= MIN_SECRET_LENGTH:
            _secrets.update({secret, quote(secret, safe=""), quote(secret)})


def remember_secret(value: str | None) -> None:
    """Mask ``value`` itself (an API key: no form to recognise it by) wherever it appears."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _secrets.update({value, quote(value, safe="")})


def libpq_spelling(url: str) -> str:
    """A SQLAlchemy spelling (``postgresql+psycopg://``) as libpq's ``postgresql://``."""
    return re.sub(r"(?i)^postgres(?:ql)?\+\w+://", "postgresql://", url)


def redact(text: str) -> str:
    """``text`` with every password in it replaced by ``***``: safe to print or log."""
    if not text:
        return text
    text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _KEYWORD.sub(lambda m: m.group(1) + MASK, text)
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(secret, MASK)
    return text


def url_password(url: str) -> str | None:
    """The password a URL's text shows (percent-decoded), None when it shows none."""
    match = _URL_USERINFO.match(url.strip())
    return unquote(match.group(2)) if match else None
