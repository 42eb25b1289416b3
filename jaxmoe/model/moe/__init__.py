"""Mixture-of-experts block, router and the two dispatch implementations."""

from jaxmoe.model.moe.block import MoEBlock
from jaxmoe.model.moe.capacity import capacity_moe, expert_capacity
from jaxmoe.model.moe.dropless import dropless_moe
from jaxmoe.model.moe.router import MoEStats, Router, RouterBias, Routing, routing_stats

__all__ = ["MoEBlock", "MoEStats", "Router", "RouterBias", "Routing", "capacity_moe",
           "dropless_moe", "expert_capacity", "routing_stats"]
