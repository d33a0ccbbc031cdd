"""Rows and files: source rows and their validation, explicit Arrow schemas, ragged ids <-> Arrow columns, and
atomic Parquet shards with the manifest written last."""
