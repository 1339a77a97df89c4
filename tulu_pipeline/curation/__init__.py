"""Prompt curation: normalization, exact and near-duplicate removal, n-gram decontamination.

Each step is a small streaming class: constructed with its config and a `DecisionSink`
(`tulu_pipeline.provenance.ledger`), called on an iterable of rows, it yields the rows it keeps and
records one ledger event per decision. No Dagster imports here.
"""
