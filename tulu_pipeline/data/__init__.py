"""Row schema, source registry and loaders."""
