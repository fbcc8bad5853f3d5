"""Prints n conversations of tests/data/shapes.py in OpenAI's vision
fine-tuning format (images inline as data URLs) as JSONL on stdout; each
opens with a greeting whose answer has OpenAI's "weight": 0 (context only,
not trained).
usage: openai_dataset.py N SEED"""
import base64
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
import shapes  # noqa: E402

n, seed = int(sys.argv[1]), int(sys.argv[2])
_, _, items = shapes.dataset(n, seed)
for colour, png in items:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    print(json.dumps({"messages": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! Show me a shape.", "weight": 0},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": shapes.QUESTION}]},
        {"role": "assistant", "content": colour}]}))
