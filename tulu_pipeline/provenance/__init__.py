"""Row ledger and audit."""
