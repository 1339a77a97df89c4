"""File names under TULU_HOME that several layers read (training writes them; provenance, evaluation and
preference read them)."""

MANIFEST_FILE = "training_manifest.json"  # last file written into a published checkpoint: its presence = complete
