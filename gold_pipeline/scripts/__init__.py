"""Scripts with the command lines of other tools' scripts, run by gold (`python -m gold_pipeline.scripts.NAME`)."""
