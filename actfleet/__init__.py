"""actfleet: transformer activations at scale on spot Cloud TPUs (see README.md)."""
