"""Fine-tuning strategies, one module each: the server-side plan and the aggregation rule."""
from .base import Context, NodeInfo, Strategy, Task, Update
from .caff import Caff
from .fedadapter import FedAdapter
from .fedasync import FedAsync
from .fedbuff import FedBuff
from .fedia3 import FedIA3
from .fedlora import FedLoRA
from .fedra import FedRA
from .full import Full
from .hetlora import HetLoRA
from .legend import Legend

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Full, FedLoRA, FedAdapter, FedIA3, HetLoRA, FedRA, Legend, Caff, FedBuff, FedAsync)}

__all__ = ["STRATEGIES", "Context", "NodeInfo", "Strategy", "Task", "Update"]
