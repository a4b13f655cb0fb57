"""AdaptationPlanner: from the evidence to one plan, with every budget check in one place.

Two questions, each answered by a :class:`Plan`:

- :meth:`AdaptationPlanner.admit`, at a flag: is it worth asking for labels? ``collect``, or
  ``refuse`` with the reason (the adaptor cap or the memory budget would stop any growth the
  labels could lead to). Whatever raised the flag -- the drift monitor, an ambiguous return
  claim, an operator's "adapt now" -- it passes here.
- :meth:`AdaptationPlanner.plan`, with the labels in: ``return`` to a known domain (its memory
  claims most shots and its adaptor still labels them well: no new adaptor), ``extend`` a known
  domain with new classes (``novel_policy="extend"``), ``grow`` a new domain, or ``refuse``. The
  budgets are checked again here: the shots may ask for growth that the flag did not.

Growth policy (``novel_policy``) for shots of classes the device has not seen:

- ``"separate"``: a new domain with an adaptor of its own, as a domain shift gets;
- ``"extend"``: they join the known domain their shots are nearest to, as a new adaptor version
  over the union of labels (the earlier version stays for a rollback);
- ``"auto"`` (default): the evidence decides, and the plan says why. The shots extend the
  nearest known domain when they mix its classes with the new ones (the same look: a separate
  domain would hold a second copy of known classes and split one look between two memories);
  shots of new classes only get a domain of their own (their own memory keeps the known
  domain's threshold, which extending would lower until it claims far-OOD frames too).

At the adaptor cap (``adapt.max_adaptors``) the registry's eviction policy decides:
``"refuse"`` refuses growth, ``"oldest"`` / ``"least_used"`` evict a drift-grown domain at the
install (never the base).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from edge_runtime.adapt.domains import DomainSet
from edge_runtime.drift import NOVEL_CLASS
from edge_runtime.errors import InputError
from edge_runtime.labels import Shots

#: Growth policies for a ``novel_class`` flag.
NOVEL_POLICIES = ("auto", "extend", "separate")
#: ``auto`` extends when at least this share of the shots carries labels the nearest known
#: domain already predicts.
AUTO_KNOWN_SHARE = 0.2
#: Kind of a flag raised by an ambiguous return claim (frames claimed by another known domain).
KNOWN_DOMAIN = "known_domain"
# A collected label set mostly claimed (in-distribution) by one known domain, whose adaptor
# still labels it well, is a return to that domain: no new adaptor.
RETURN_FRACTION = 0.5
RETURN_ACCURACY = 0.6

COLLECT, RETURN, GROW, EXTEND, REFUSE = "collect", "return", "grow", "extend", "refuse"


@dataclass(frozen=True)
class Budgets:
    """The device profile's limits on growth."""

    max_adaptors: int
    memory_budget_mb: float
    label_budget: int
    feature_dim: int
    evicts: bool = False  # at the cap, a drift-grown domain is evicted instead of refusing

    @classmethod
    def from_config(cls, config: Any, feature_dim: int) -> Budgets:
        return cls(
            max_adaptors=int(config.adapt.max_adaptors),
            memory_budget_mb=float(config.device.memory_budget_mb),
            label_budget=int(config.adapt.label_budget),
            feature_dim=int(feature_dim),
            evicts=str(config.adapt.eviction) != "refuse",
        )


@dataclass(frozen=True)
class Plan:
    action: str  # collect | return | grow | extend | refuse
    domain_id: int = -1  # the domain returned to, grown or extended
    reason: str = ""
    report: dict[str, Any] = field(default_factory=dict)


def resident_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class AdaptationPlanner:
    def __init__(
        self,
        budgets: Budgets,
        *,
        novel_policy: str = "auto",
        memory_probe: Callable[[], float] = resident_mb,
    ) -> None:
        if novel_policy not in NOVEL_POLICIES:
            raise InputError(f"novel_policy must be one of {NOVEL_POLICIES}, got {novel_policy!r}")
        self.budgets = budgets
        self.novel_policy = novel_policy
        self.memory_probe = memory_probe

    def _extends(self, kind: str) -> bool:
        return kind == NOVEL_CLASS and self.novel_policy == "extend"

    def _may_extend(self, kind: str) -> bool:
        """At the flag: could these labels end in an extension (no new slot)?"""
        return kind == NOVEL_CLASS and self.novel_policy in ("extend", "auto")

    # -- at the flag ---------------------------------------------------------------------------
    def admit(self, kind: str, domains: DomainSet) -> Plan:
        """Ask for labels, or refuse now when no outcome that needs a new slot could be met.

        Extending a domain needs no new slot. A known-domain claim may still end as a return,
        but if it does not, its labels lead to growth: it is checked like a drift flag.
        """
        if self._extends(kind):
            return Plan(COLLECT)
        refused = self.growth_refusal(domains)
        if refused and self._may_extend(kind) and not refused.startswith("device."):
            # Full, but the shots may extend a known domain: worth the labels.
            return Plan(COLLECT)
        return Plan(REFUSE, reason=refused) if refused else Plan(COLLECT)

    def growth_refusal(self, domains: DomainSet) -> str | None:
        """Why one more domain would break a budget, or None."""
        b = self.budgets
        if len(domains) >= b.max_adaptors and not b.evicts:
            return f"adapt.max_adaptors={b.max_adaptors} reached"
        return self.memory_refusal(domains)

    def memory_refusal(self, domains: DomainSet) -> str | None:
        """Resident memory now plus what a new domain adds: its exemplar codes and re-ranking
        vectors for ``label_budget`` shots, and a head over the encoder features (bounded by
        every known class plus ``label_budget`` new ones)."""
        b = self.budgets
        rss = self.memory_probe()
        n_classes = len(domains.registry.all_labels())
        head = 4 * (b.feature_dim + 1) * (n_classes + b.label_budget)
        need = (domains.bytes_per_shot() * b.label_budget + head) / 2**20
        if rss + need <= b.memory_budget_mb:
            return None
        return (
            f"device.memory_budget_mb={b.memory_budget_mb:g} would be exceeded: resident "
            f"{rss:.0f} MB + {need:.1f} MB for the new domain"
        )

    # -- with the labels in --------------------------------------------------------------------
    def plan(self, shots: Shots, domains: DomainSet, next_id: int, inputs: Any = None) -> Plan:
        """``inputs``: the shots in every adaptor's input space (a
        :class:`~edge_runtime.adapt.search.CandidateInputs`), for the return test of a domain
        whose adaptor is below the last layer; None: pooled features only."""
        kind = shots.trigger.kind
        x, y = shots.features, shots.labels
        routed = domains.route(x)
        d, s = routed.domain, routed.score
        claimed = d[s >= 0]
        if len(claimed):
            top = int(np.bincount(claimed).argmax())
            frac = float(np.count_nonzero(claimed == top)) / len(x)
            acc = _accuracy(domains.get(top).adaptor, x, y, inputs)
            if frac >= RETURN_FRACTION and acc >= RETURN_ACCURACY:
                return Plan(
                    RETURN,
                    top,
                    report={
                        "returned_to": top,
                        "claimed_fraction": frac,
                        "old_adaptor_accuracy": acc,
                    },
                )
        # New classes join the known domain their shots are nearest to (by routing; the active
        # domain when nothing routes), not necessarily the active one: new objects seen by the
        # clean camera belong to the clean domain even after a noisy spell.
        parent = int(np.bincount(d[d >= 0]).argmax()) if (d >= 0).any() else domains.active
        if self._extends(kind):
            return Plan(EXTEND, parent, reason="adapt.novel_policy=extend")
        refused = self.growth_refusal(domains)
        if kind == NOVEL_CLASS and self.novel_policy == "auto":
            known = set(domains.get(parent).labels)
            share = float(np.isin(y, list(known)).mean()) if len(y) else 0.0
            evidence = {"parent": parent, "known_label_share": round(share, 3)}
            if share >= AUTO_KNOWN_SHARE:
                why = (
                    f"{share:.0%} of the shots carry labels domain {parent} already predicts: "
                    "the same look, so its memory and head are extended"
                )
                return Plan(EXTEND, parent, reason=why, report=evidence)
            if refused is not None and not refused.startswith("device."):
                why = f"{refused}: the new classes extend domain {parent} instead"
                return Plan(EXTEND, parent, reason=why, report=evidence)
            if refused is None:
                why = (
                    f"only {share:.0%} of the shots carry labels of domain {parent}: the new "
                    "classes get an adaptor and memory of their own"
                )
                return Plan(GROW, next_id, reason=why, report=evidence)
        if refused is not None:
            return Plan(REFUSE, reason=refused)
        return Plan(GROW, next_id)


def _accuracy(adaptor: Any, x: np.ndarray, y: np.ndarray, inputs: Any) -> float:
    """An adaptor's accuracy on the shots, on its own input (0 when it cannot read them)."""
    arch = adaptor.arch
    if arch.tap is None and arch.condition == "none":
        rows = x
    elif inputs is None:
        return 0.0
    else:
        rows = inputs.get(arch.tap, arch.condition)
    return float(np.mean(adaptor.predict(rows) == y))
