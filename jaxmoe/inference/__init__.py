"""Inference: sampling (KV-cache decoding and serving arrive with the inference issue)."""
