"""Audits that read across every stage: data bills, exposure, licenses, reproduction, checkpoint diffs, template checks."""
