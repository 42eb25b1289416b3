"""Checkpointing on orbax-checkpoint + tensorstore."""
