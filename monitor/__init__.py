"""featurewatch: watch what happens inside served LLMs.

The package reads like the pipeline: ``receive`` (gRPC ingest) -> ``encode`` (SAEs, probes) ->
``evaluate`` (rules, per-request state) -> ``export`` (Prometheus, events, traces) -> ``act``
(steering). ``plugin`` runs inside vLLM; ``stores`` hold rules and events; ``cli`` ties it together.
"""

__version__ = "0.1.0"
