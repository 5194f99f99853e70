"""What a printed line may show: URLs with their credentials masked, names with every control
or invisible character escaped. Everything the project prints goes through here (cli.run
applies `safe_line` to its error line and to every log record), so a new message cannot leak a
password or rewrite the terminal even when its author forgot to mask or quote.

Run as a module it masks the URL on stdin (scripts/mlflow_server.sh prints its database URI
that way: on stdin, never in an argv that `ps` shows).
"""

from __future__ import annotations

import re
import sys

# scheme://userinfo@: all of the user info goes, the user name too. A name can be the secret
# (GitHub takes a token as the user name, with x-oauth-basic as the password, or alone).
# A password may hold '/', '?' or '#' unencoded (SQLAlchemy's URL parser accepts that), so after
# a ':' anything up to the '@' counts; without a ':' the user info ends at the first '/?#'.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:[^:/@\s]*:[^@\s]*|[^:/?#@\s]*)@")
# Every query value: which parameter carries a secret differs by service (password=, token=,
# key=, sig= for Azure, X-Amz-Signature for S3, ...), and none is needed to read a message.
_QUERY_VALUE = re.compile(r"(?P<key>[?&;][^=&;#\s'\"]+)=[^&;#\s'\"]*")
# A URL inside free text: up to white space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def masked(url: str) -> str:
    """`url` fit for a message or a log: its user info (name and password) becomes *** and
    every query parameter's value becomes ***."""
    url = _USERINFO.sub(r"\g<scheme>***@", url)
    path, mark, query = url.partition("?")
    if not mark:
        return url
    return path + _QUERY_VALUE.sub(r"\g<key>=***", mark + query)


def masked_text(text: str) -> str:
    """`text` with every URL in it masked as `masked` does."""
    return _URL_IN_TEXT.sub(lambda m: masked(m.group(0)), text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (Python's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` as one line a terminal shows as it is: newlines, escape sequences, bidi overrides
    and undecodable bytes (lone surrogates) become backslash escapes."""
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def quoted(name: object) -> str:
    """A name (a file, a class, a key) for a message: quoted, every unprintable character
    escaped (undecodable file-name bytes as \\xNN), so it cannot end or rewrite the line."""
    text = str(name)
    return "'" + printable(text.replace("\\", "\\\\").replace("'", "\\'")) + "'"


def is_utf8(name: str) -> bool:
    """Whether a file name (as os.fsdecode gives it) was valid UTF-8: undecodable bytes come as
    lone surrogates, which no UTF-8 file (a CSV, JSON, the terminal) can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: object) -> str:
    """A name as typed when it is plain printable text, else `quoted`: messages stay as they
    read for ordinary names, and an odd one cannot pass for part of the message."""
    text = str(name)
    return text if text.isprintable() and text.strip() == text and "'" not in text else quoted(text)


def safe_line(text: str) -> str:
    """A message as one printable line with every URL masked."""
    return printable(masked_text(text))


if __name__ == "__main__":
    sys.stdout.write(masked(sys.stdin.read().rstrip("\n")) + "\n")
