"""Authoring: from a recording of live traffic to features, probes and calibrated rules.

One concept per module: ``sets`` (request sets: labels, metadata, rules, regexes), ``text``
(detokenising recorded token ids), ``stats`` (AUROC, thresholds at a target FPR), ``compare``
(ranking SAE features), ``train`` (logistic probes), ``replay`` (the sidecar's compiled evaluator
over a recording), ``calibrate`` (rule thresholds), ``rewrite`` (rules file edits), ``cli``.
"""

from monitor.author.errors import AuthorError

__all__ = ["AuthorError"]
