"""The act stage: steering directives and policies sent back to the vLLM plugin."""
