"""Tokenizers and text: loading (hub, local, packaged `pkg:` names), chat templates, exact token bytes, the
student/teacher vocabulary map and the tokenizer pair. Imports nothing from the later stages."""
