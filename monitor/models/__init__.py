"""Real pretrained models featurewatch fetches on request (`featurewatch model fetch`): monitor.models.fetch."""
