"""Fine-tuning strategies, one module each: the server-side plan and the aggregation rule."""
from .base import Context, NodeInfo, Strategy, Update
from .fedlora import FedLoRA
from .full import Full

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Full, FedLoRA)}

__all__ = ["STRATEGIES", "Context", "NodeInfo", "Strategy", "Update"]
