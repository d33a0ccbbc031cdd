"""`gold teacher-cache`: teacher completions and per-token top-K log-probs into Parquet shards.

    from gold_pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
    run_teacher_cache(TeacherCacheConfig(dataset="prompts.jsonl", teacher="pkg:smollm2-135m-instruct",
                                         top_k=64, out="data/teacher"))

Backends: hf (transformers, in process), vllm (offline engine, optional extra), openai (a completion server by
base URL). Output: TEACHER_SCHEMA shards + manifest.json (gold_pipeline.schemas, gold_pipeline.shards).
"""

from gold_pipeline.teacher_cache.config import TeacherCacheConfig
from gold_pipeline.teacher_cache.job import bytes_per_teacher_token, run_teacher_cache

__all__ = ["TeacherCacheConfig", "bytes_per_teacher_token", "run_teacher_cache"]
