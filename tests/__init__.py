"""The test suite: an importable package, so helpers are imported by their full name (``tests.hostile``)."""
