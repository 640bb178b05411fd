"""Command-line entry for the converters; the implementation is ``gmpo_megatron.convert``."""
