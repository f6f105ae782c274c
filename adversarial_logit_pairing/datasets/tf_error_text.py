"""Turns a TensorFlow error into the one line a user needs ("Invalid JPEG data ...").

TF error messages wrap the reason in graph-function names, a Python traceback of where the
op was defined, tf.data iterator paths and node annotations; error messages of this project
name the file and record themselves, so only the reason is kept.
"""

from __future__ import annotations

import re

_NOISE_LINE = re.compile(
    r"^(Graph execution error:|Detected at node|File \"|\[\[|Traceback|\s*$)")
_PREFIXES = (
    re.compile(r"\{\{[^}]*\}\}\s*"),  # {{function_node ...}}, {{node ...}}
    re.compile(r"Error in user-defined function passed to .*? transformation with "
               r"iterator: (Iterator::[\w:]+: )?"),
    re.compile(r"\s*\[Op:[^\]]*\].*$"),
)
_ASSERTION = re.compile(r"^assertion failed: \[(.*)\] \[(.*)\]$")


def reason(exc: BaseException) -> str:
    """The first informative line of a TensorFlow (or other) exception's message."""
    message = getattr(exc, "message", None) or str(exc)
    for line in message.splitlines():
        line = line.strip()
        if _NOISE_LINE.match(line):
            continue
        for pattern in _PREFIXES:
            line = pattern.sub("", line).strip()
        # tf.debugging.Assert prints "assertion failed: [text] [value]".
        line = _ASSERTION.sub(r"\1 \2", line)
        if line:
            return line
    return type(exc).__name__
