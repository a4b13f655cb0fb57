"""Adaptation: adaptors on frozen features, search and init plug points, domains and routing."""

from edge_runtime.adapt.adaptor import (
    Adaptor,
    AdaptorArch,
    TrainReport,
    build_adaptor,
    train_adaptor,
)
from edge_runtime.adapt.init import (
    INITIALIZERS,
    Initializer,
    PrototypeInit,
    StandardInit,
    make_initializer,
)
from edge_runtime.adapt.registry import (
    Domain,
    DomainRegistry,
    EvictionEvent,
    RegistryFullError,
)
from edge_runtime.adapt.router import RouteDecision, Router
from edge_runtime.adapt.search import (
    SEARCH_SPACE,
    ArchitectureSearch,
    FixedArchitecture,
    SearchBudget,
    SearchResult,
    default_search_space,
)
from edge_runtime.adapt.worker import AdaptationWorker, JobResult, WorkerBusyError

__all__ = [
    "INITIALIZERS",
    "SEARCH_SPACE",
    "AdaptationWorker",
    "Adaptor",
    "AdaptorArch",
    "ArchitectureSearch",
    "Domain",
    "DomainRegistry",
    "EvictionEvent",
    "FixedArchitecture",
    "Initializer",
    "JobResult",
    "PrototypeInit",
    "RegistryFullError",
    "RouteDecision",
    "Router",
    "SearchBudget",
    "SearchResult",
    "StandardInit",
    "TrainReport",
    "WorkerBusyError",
    "build_adaptor",
    "default_search_space",
    "make_initializer",
    "train_adaptor",
]
