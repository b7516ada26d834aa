"""Token usage from the last bytes of a response, without parsing or re-serialising it.

vLLM puts ``usage`` at the end of a non-streamed body and in the last data event of a
stream (when ``stream_options.include_usage`` is set). Pure.
"""

from __future__ import annotations

import re
from typing import Final

_USAGE: Final = b'"usage"'
_PROMPT: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_COMPLETION: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
_WINDOW: Final = 512


def extract_usage(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from the last ``usage`` object in ``tail``."""
    at = tail.rfind(_USAGE)
    if at < 0:
        return None, None
    window = tail[at : at + _WINDOW]
    prompt = _PROMPT.search(window)
    completion = _COMPLETION.search(window)
    return (
        int(prompt.group(1)) if prompt else None,
        int(completion.group(1)) if completion else None,
    )
