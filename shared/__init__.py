"""The contract both sides import: site-data schema and validation, task specs, encoding, models, metrics."""
