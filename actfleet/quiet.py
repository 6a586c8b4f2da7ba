"""Third-party noise kept off actfleet's stderr, and only the noise we name here.

On a normal run a command's stderr holds actfleet's own lines (progress, work events, its log records,
one-line errors). Each function below drops one known-benign class of third-party output; every other
warning, and every error, of every library still reaches stderr. (transformers' two messages: worker/hf_logging.py.)
"""

from __future__ import annotations

import logging
import sys
import warnings

# The jsii-generated packages the stacks import (infra/stacks.py). Their argument checks call typeguard.
CDKTF_BINDINGS = r"(cdktf|cdktf_cdktf_provider_google|cdktf_cdktf_provider_google_beta|constructs)(\.|$)"
# typeguard >= 3 (4.2 when the saelens extra shares the venv) cannot check jsii's non-runtime protocols
# (IResolvable, ITerraformIterator, ...) and warns once per call site: ~20 lines a synth. jsii checks those
# values itself; typeguard 2.13 (the cloud-only venv) says nothing.
TYPEGUARD_PROTOCOL = r"Typeguard cannot check the \S+ protocol because it is a non-runtime protocol"


def quiet_cdktf_bindings() -> None:
    """Drop typeguard's non-runtime-protocol warning, raised from the cdktf bindings only. Idempotent."""
    warnings.filterwarnings("ignore", message=TYPEGUARD_PROTOCOL, category=UserWarning, module=CDKTF_BINDINGS)


def log_to_stderr(fmt: str = "%(asctime)s %(name)s %(levelname)s %(message)s") -> None:
    """Log records on stderr: actfleet's from INFO, every library's from WARNING.

    Libraries' INFO records are not ours to print: jax, for one, says at INFO on every CPU start that it
    found no TPU ("Unable to initialize backend 'tpu'"), which a worker log would show on each restart."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger("actfleet").setLevel(logging.INFO)
