#!/usr/bin/env python3
"""The first N HumanEval prompts and the first N MT-Bench questions (first turn) as
{"conversation": [...]} lines, the prompts amusd's dataset loader builds, for programs that take a
JSONL of conversations (amusd bench --dataset FILE, llama.cpp through ../shared/peers/llamacpp.sh,
the server load generator).

    scripts/first-turn-prompts.py N DATASETS_DIR > prompts.jsonl
"""
import gzip
import json
import sys

n, root = int(sys.argv[1]), sys.argv[2]
he = [json.loads(l) for l in gzip.open(f"{root}/HumanEval.jsonl.gz", "rt") if l.strip()][:n]
mt = [json.loads(l) for l in open(f"{root}/mt_bench/question.jsonl") if l.strip()][:n]
for p in he:
    text = "Complete the following Python function:\n```python\n" + p["prompt"] + "```"
    print(json.dumps({"conversation": [{"role": "user", "content": text}]}))
for q in mt:
    print(json.dumps({"conversation": [{"role": "user", "content": q["turns"][0]}]}))
