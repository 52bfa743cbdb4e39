"""Retrieval evaluation: protocols on the Grocery Store dataset, the scoring harness, reports, `visearch eval`."""
