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

Growth policy (``novel_policy``): with ``"separate"`` (default) new classes get a new domain as a
domain shift does; with ``"extend"`` they join the known domain their shots are nearest to as a
new adaptor version over the union of labels (the earlier version stays for a rollback). Extending
lowers that domain's threshold, so it then claims far-OOD frames too; compare with
``edge-runtime run --stream S.npz --set adapt.novel_policy=extend``.
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
NOVEL_POLICIES = ("extend", "separate")
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

    @classmethod
    def from_config(cls, config: Any, feature_dim: int) -> Budgets:
        return cls(
            max_adaptors=int(config.adapt.max_adaptors),
            memory_budget_mb=float(config.device.memory_budget_mb),
            label_budget=int(config.adapt.label_budget),
            feature_dim=int(feature_dim),
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
        novel_policy: str = "separate",
        memory_probe: Callable[[], float] = resident_mb,
    ) -> None:
        if novel_policy not in NOVEL_POLICIES:
            raise InputError(f"novel_policy must be one of {NOVEL_POLICIES}, got {novel_policy!r}")
        self.budgets = budgets
        self.novel_policy = novel_policy
        self.memory_probe = memory_probe

    def _extends(self, kind: str) -> bool:
        return kind == NOVEL_CLASS and self.novel_policy == "extend"

    # -- at the flag ---------------------------------------------------------------------------
    def admit(self, kind: str, domains: DomainSet) -> Plan:
        """Ask for labels, or refuse now when no outcome that needs a new slot could be met.

        Extending a domain needs no new slot. A known-domain claim may still end as a return,
        but if it does not, its labels lead to growth: it is checked like a drift flag.
        """
        if self._extends(kind):
            return Plan(COLLECT)
        refused = self.growth_refusal(domains)
        return Plan(REFUSE, reason=refused) if refused else Plan(COLLECT)

    def growth_refusal(self, domains: DomainSet) -> str | None:
        """Why one more domain would break a budget, or None."""
        b = self.budgets
        if len(domains) >= b.max_adaptors:
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
    def plan(self, shots: Shots, domains: DomainSet, next_id: int) -> Plan:
        kind = shots.trigger.kind
        x, y = shots.features, shots.labels
        routed = domains.route(x)
        d, s = routed.domain, routed.score
        claimed = d[s >= 0]
        if len(claimed):
            top = int(np.bincount(claimed).argmax())
            frac = float(np.count_nonzero(claimed == top)) / len(x)
            acc = float(np.mean(domains.get(top).adaptor.predict(x) == y))
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
        if self._extends(kind):
            # New classes join the known domain their shots are nearest to (by routing; the
            # active domain when nothing routes), not necessarily the active one: new objects
            # seen by the clean camera belong to the clean domain even after a noisy spell.
            parent = int(np.bincount(d[d >= 0]).argmax()) if (d >= 0).any() else domains.active
            return Plan(EXTEND, parent)
        refused = self.growth_refusal(domains)
        if refused is not None:
            return Plan(REFUSE, reason=refused)
        return Plan(GROW, next_id)
