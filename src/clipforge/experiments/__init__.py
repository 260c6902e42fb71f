"""Experiments that reproduce the paper's comparisons on your own data (``clipforge experiment ...``)."""
