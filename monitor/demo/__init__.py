"""The embedded demo: a planted-concept corpus, a tiny Llama, its SAE and probes (``assets/``)."""
