"""Flax NNX model: decoder-only MoE transformer and its parts."""

from jaxmoe.model.decoder import DecoderOutput, GroupSpec, MoETransformer, layer_groups

__all__ = ["DecoderOutput", "GroupSpec", "MoETransformer", "layer_groups"]
