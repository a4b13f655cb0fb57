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
    WeightedInitializer,
    make_initializer,
)
from edge_runtime.adapt.nas import DEFAULT_PROXY, LatencyTable, ZeroShotSearch
from edge_runtime.adapt.proxies import PROXIES
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
    ArrayInputs,
    CandidateInputs,
    EncodedInputs,
    FixedArchitecture,
    SearchBudget,
    SearchResult,
    default_search_space,
)
from edge_runtime.adapt.space import default_space, sample_space
from edge_runtime.adapt.worker import AdaptationWorker, JobResult, WorkerBusyError

__all__ = [
    "DEFAULT_PROXY",
    "INITIALIZERS",
    "PROXIES",
    "SEARCH_SPACE",
    "AdaptationWorker",
    "Adaptor",
    "AdaptorArch",
    "ArchitectureSearch",
    "ArrayInputs",
    "CandidateInputs",
    "Domain",
    "DomainRegistry",
    "EncodedInputs",
    "EvictionEvent",
    "FixedArchitecture",
    "Initializer",
    "JobResult",
    "LatencyTable",
    "PrototypeInit",
    "RegistryFullError",
    "RouteDecision",
    "Router",
    "SearchBudget",
    "SearchResult",
    "StandardInit",
    "TrainReport",
    "WeightedInitializer",
    "WorkerBusyError",
    "ZeroShotSearch",
    "build_adaptor",
    "default_search_space",
    "default_space",
    "make_initializer",
    "sample_space",
    "train_adaptor",
]
