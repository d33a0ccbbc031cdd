"""Byte-exact alignment of two tokenizations (groups, batches, one row) and the `gold align` job."""
