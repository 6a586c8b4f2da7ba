"""The embedded default: `actfleet local` (`make demo`) runs the whole system on one machine (docs/local.md).

The demo wing: its command, its process fleet (local processes observed through the same decide() that
reconciles the TPU fleet), its live view and summary, the tiny random-weight model and the bundled dataset.
"""
