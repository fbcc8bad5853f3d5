#!/usr/bin/env python3
"""Regenerates tests/fixtures/<variant>/infer.json: what transformers answers
to an image question on each tiny model, end to end (Gemma4Processor's chat
template and image processor, then greedy generate, then decode), with the
base model and with the golden PEFT adapters (adapter_final), so that
`gemmaforge infer [--adapter]` can be checked against it as a whole.

Needs torch, transformers 5.17, peft 0.21 and Pillow: python3 tools/gen_infer_golden.py
"""
import json
import os

import peft
import torch
from PIL import Image
import transformers
from transformers import AutoModelForImageTextToText, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CASES = [
    {"image": "wide.png", "prompt": "What is in this picture?", "system": None, "max_new_tokens": 12},
    {"image": "tall.jpg", "prompt": "Describe it.", "system": "Answer briefly.", "max_new_tokens": 8},
    {"image": None, "prompt": "Hello, who are you?", "system": None, "max_new_tokens": 10},
]


def load_processor(d):
    """Gemma4Processor from its parts (the tiny models ship no audio feature extractor)."""
    with open(os.path.join(d, "processor_config.json")) as f:
        ip_cfg = json.load(f)["image_processor"]
    ip_cfg = {k: v for k, v in ip_cfg.items() if k not in ("image_processor_type",)}
    image_processor = transformers.Gemma4ImageProcessorPil(**ip_cfg)
    tokenizer = AutoTokenizer.from_pretrained(d)
    with open(os.path.join(d, "chat_template.jinja")) as f:
        template = f.read()
    # Audio and video parts are unused here: their default settings will do.
    from transformers.models.gemma4 import feature_extraction_gemma4 as fe, video_processing_gemma4 as vp
    fe_cls = next(getattr(fe, n) for n in dir(fe) if n.startswith("Gemma4") and "FeatureExtractor" in n)
    vp_cls = next(getattr(vp, n) for n in dir(vp) if n.startswith("Gemma4") and "VideoProcessor" in n)
    return transformers.Gemma4Processor(feature_extractor=fe_cls(), image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=vp_cls(), chat_template=template,
                                        image_seq_length=ip_cfg.get("max_soft_tokens", 280))


def run_case(model, processor, case):
    content = []
    if case["image"]:
        content.append({"type": "image", "image": Image.open(os.path.join(ROOT, "images", case["image"]))})
    content.append({"type": "text", "text": case["prompt"]})
    messages = [{"role": "user", "content": content}]
    if case["system"]:
        messages.insert(0, {"role": "system", "content": case["system"]})
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=case["max_new_tokens"])
    prompt_ids = inputs["input_ids"][0].tolist()
    new_ids = out[0][len(prompt_ids):].tolist()
    text = processor.tokenizer.decode(new_ids, skip_special_tokens=True)
    return dict(case, input_ids=prompt_ids, output_ids=new_ids, text=text)


def main():
    torch.manual_seed(0)
    for variant in ("dense", "ple", "moe"):
        d = os.path.join(ROOT, variant)
        processor = load_processor(d)
        model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
        cases = [run_case(model, processor, c) for c in CASES]
        adapted = {}
        for kind in ("lora_lm", "lora_all"):
            adir = os.path.join(d, kind, "adapter_final")
            if not os.path.isdir(adir):
                continue
            base = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
            peft_model = peft.PeftModel.from_pretrained(base, adir).eval()
            adapted[kind] = [run_case(peft_model, processor, c) for c in CASES[:2]]
        with open(os.path.join(d, "infer.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "peft": peft.__version__, "cases": cases,
                       "adapters": adapted}, f, indent=1, ensure_ascii=False)
        print(variant, [c["text"] for c in cases], {k: [c["text"] for c in v] for k, v in adapted.items()})


if __name__ == "__main__":
    main()
