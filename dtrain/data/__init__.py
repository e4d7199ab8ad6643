"""Synthetic reasoning tasks (see dtrain/data/tasks.py). Contract used by the trainer:

    task = build_task(cfg.data)                 # cfg.data: dtrain.config.DataConfig
    task.spec                                   # TaskSpec
    b = task.batch("train" | "val", start, count)
    b.tokens  int64 [count, L]     b.mask bool [count, L] (True = real token)
    b.targets int64 [count] (per-sequence) or [count, L] (per-token), -100 = ignored
    b.difficulty int64 [count]

Example i of a split is a pure function of (data.seed, split, i): any rank builds exactly its own shard, and
val examples never occur in train.
"""
