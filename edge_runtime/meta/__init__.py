"""Meta-learned fast adaptation (MOL-style): Proto-MAML + Meta-SGD with ``torch.func``.

* :mod:`~edge_runtime.meta.episodes`: few-shot episodes from base data under simulated shifts
  (on pooled features, or on an encoder tap's maps with base replay for the conv family);
* :mod:`~edge_runtime.meta.maml`: the functional inner/outer loop over any adaptor family;
* :mod:`~edge_runtime.meta.detector`: the new domain's learned OOD-threshold correction;
* :mod:`~edge_runtime.meta.store`: meta-init files (safetensors + JSON manifest, by encoder);
* :mod:`~edge_runtime.meta.train`: the ``edge-runtime meta-train`` driver.

The runtime uses a meta-init through :class:`edge_runtime.adapt.init.MetaInit`. learn2learn is
not used: its last release (0.2.0) does not build on Python 3.11 and imports torchvision, which
does not import beside the CPU build of torch; ``torch.func`` gives the same inner loop.
"""

from edge_runtime.meta.detector import ThresholdCorrection, domain_threshold
from edge_runtime.meta.episodes import EpisodeSampler, ReplayEpisodeSampler, build_tap_domains
from edge_runtime.meta.maml import MetaParams, ProtoMAML, family_name, initial_meta_params
from edge_runtime.meta.store import (
    MetaInitFile,
    find_meta_init,
    load_meta_init,
    meta_cache_dir,
    save_meta_init,
)
from edge_runtime.meta.train import (
    MetaTrainConfig,
    conv_family_archs,
    meta_train_family,
    run_meta_train,
)

__all__ = [
    "EpisodeSampler",
    "MetaInitFile",
    "MetaParams",
    "MetaTrainConfig",
    "ProtoMAML",
    "ReplayEpisodeSampler",
    "ThresholdCorrection",
    "build_tap_domains",
    "conv_family_archs",
    "domain_threshold",
    "family_name",
    "find_meta_init",
    "initial_meta_params",
    "load_meta_init",
    "meta_cache_dir",
    "meta_train_family",
    "run_meta_train",
    "save_meta_init",
]
