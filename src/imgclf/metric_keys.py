"""MLflow metric keys for per-class metrics, derived reversibly from any class name a folder
can hold.

MLflow accepts only letters, digits, `_ - . / :` and spaces in a key, at most 250 characters;
class names come from folder names (`Corn_(maize)`, `Pepper,_bell`, `it's+1`, any language).
Every other character is written as `:xx`, its UTF-8 bytes in lowercase hex, and `:` itself as
`:3a`, so a key reads almost as the name does and decodes back to exactly it. A name too long
for a key becomes `:class<index>` (never the start of an encoded name: `l` is no hex digit);
the run keeps the whole mapping (`evaluation/class_keys.json`), and every file a person reads
(metrics, plots, report) carries the original names.
"""

from __future__ import annotations

import re

MAX_KEY = 250  # MLflow's limit on a metric key
_KEPT = re.compile(r"[\w.\- ]")  # MLflow's own rule, less '/' (a path) and ':' (our escape)
_ESCAPED = re.compile(r":([0-9a-f]{2})")
_BY_INDEX = re.compile(r":class([0-9]+)")


def _encode(name: str) -> str:
    out = []
    for char in name:
        if _KEPT.fullmatch(char):
            out.append(char)
        else:  # surrogateescape: a file name's undecodable byte is written as that byte
            out.extend(f":{b:02x}" for b in char.encode("utf-8", "surrogateescape"))
    text = "".join(out)
    # MLflow refuses a key that a path normalisation would change ("." or ".." as a part).
    return text.replace(".", ":2e") if text in (".", "..") else text


def class_key(prefix: str, name: str, index: int) -> str:
    """`prefix/<name encoded>`, or `prefix/:class<index>` when that would be too long."""
    key = f"{prefix}/{_encode(name)}"
    return key if len(key) <= MAX_KEY else f"{prefix}/:class{index}"


def class_name(key: str, prefix: str, classes: list[str]) -> str:
    """The class a key made by `class_key(prefix, ...)` stands for."""
    encoded = key.removeprefix(prefix + "/")
    if match := _BY_INDEX.fullmatch(encoded):
        return classes[int(match.group(1))]
    # Runs of escaped bytes decode together: one character may take up to four.
    raw = bytearray()
    pos = 0
    for match in _ESCAPED.finditer(encoded):
        raw += encoded[pos:match.start()].encode()
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += encoded[pos:].encode()
    return raw.decode("utf-8", "surrogateescape")


def class_keys(prefix: str, classes: list[str]) -> dict[str, str]:
    """Key -> class name for every class, in class order."""
    return {class_key(prefix, name, i): name for i, name in enumerate(classes)}
