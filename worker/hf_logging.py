"""Keep transformers' noise off our runs, and only its noise.

We use transformers for tokenizers alone (the models are ours, in JAX), so two of its messages are wrong for
us: "PyTorch was not found. Models won't be available..." (an advisory at import, when torch is absent, as
on a TPU VM) and "Token indices sequence length is longer than the specified maximum sequence length..."
(we tokenize whole documents on purpose, and apply our own --max-seq / --context-size). Both are silenced;
every other warning and error of transformers still reaches stderr.
"""

from __future__ import annotations

import logging
import os

_LENGTH = "Token indices sequence length is longer than the specified maximum sequence length"


class _DropLengthWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LENGTH)


def quiet_transformers() -> None:
    """Call before transformers is first imported (the advisory is printed at import)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logger = logging.getLogger("transformers.tokenization_utils_base")
    if not any(isinstance(f, _DropLengthWarning) for f in logger.filters):
        logger.addFilter(_DropLengthWarning())
