"""Where rules live and where alert/audit events go: in memory (the default) or in Redis."""

from monitor.stores.base import EventStore, RuleStore, StoredRules
from monitor.stores.memory import MemoryEventStore, MemoryRuleStore

__all__ = ["EventStore", "RuleStore", "StoredRules", "MemoryEventStore", "MemoryRuleStore"]
