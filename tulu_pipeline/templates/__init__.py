"""Chat templates and the template lineage recorded with every tokenized dataset and checkpoint."""
