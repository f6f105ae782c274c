"""Turns a TensorFlow error into the one line a user needs ("Invalid JPEG data ...").

TF error messages wrap the reason in graph-function names, a Python traceback of where the
op was defined (indented), tf.data iterator paths and node annotations; error messages of
this project name the file, record or worker themselves, so only the reason is kept. The one
scraper of TF error text for data, checkpoint and cluster errors alike.
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
    """The first informative line of a TensorFlow (or other) exception's message.

    A cluster error names the lost task on the line after its reason
    (``/job:worker/replica:0/task:1``); that line is kept too.
    """
    message = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in message.splitlines() if not line[:1].isspace()]
    for index, line in enumerate(lines):
        if _NOISE_LINE.match(line):
            continue
        for pattern in _PREFIXES:
            line = pattern.sub("", line).strip()
        # tf.debugging.Assert prints "assertion failed: [text] [value]".
        line = _ASSERTION.sub(r"\1 \2", line)
        if line:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            return f"{line} {following}" if following.startswith("/job:") else line
    return type(exc).__name__
