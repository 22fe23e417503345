"""The dictionary engine: SAEs of every common file format, linear probes, aggregation.

Contract (docs/ARCHITECTURE.md, "Engine contract"): ``load_sae`` returns one class per
architecture with ``encode``/``encode_subset``/``watch``/``encode_top``/``decode``/``clamp``/
``clamp_params``; ``load_probes`` returns a ``ProbeBank``; ``aggregate`` and
``RunningAggregate`` reduce per-token values over a request.
"""

from .aggregate import AGGREGATIONS, SCOPES, RunningAggregate, aggregate
from .architectures import GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE
from .errors import ProbeFormatError, SAEFormatError
from .formats import FORMATS, detect_format, load_sae
from .probes import ProbeBank, load_probes, save_probes
from .sae import SAE, ClampParams, Watch

__all__ = [
    "AGGREGATIONS",
    "FORMATS",
    "SCOPES",
    "SAE",
    "ClampParams",
    "GatedSAE",
    "JumpReLUSAE",
    "ProbeBank",
    "ProbeFormatError",
    "RunningAggregate",
    "SAEFormatError",
    "StandardSAE",
    "TopKSAE",
    "Watch",
    "aggregate",
    "detect_format",
    "load_probes",
    "load_sae",
    "save_probes",
]
