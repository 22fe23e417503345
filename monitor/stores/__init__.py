"""Where rules live and where alert/audit events go: in memory (the default) or in Redis."""

from monitor.stores.base import EventStore, RuleStore, StoredRules, StoreUnavailable
from monitor.stores.memory import MemoryEventStore, MemoryRuleStore

__all__ = ["EventStore", "RuleStore", "StoredRules", "StoreUnavailable", "MemoryEventStore", "MemoryRuleStore"]
