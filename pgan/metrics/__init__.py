"""Sample-diversity metrics, the collapse detector and mode coverage."""
