"""Published config.json files of the presets (package data).

Each file is the model's hub config.json as published: phi3-* and phi3.5-mini from the
microsoft/Phi-3* repositories; phi4-mini-instruct from microsoft/Phi-4-mini-instruct (the copy
found here carried an MLX converter's added `quantization`/`quantization_config` keys, removed);
phi4 from microsoft/phi-4. (Phi-4-mini-reasoning shares Phi-4-mini-instruct's architecture; its
own file was not available here, so it has no preset: export it from its checkpoint folder.)
phi3-small-8k: microsoft/Phi-3-small-8k-instruct's config.json as reproduced (Python dict, key order kept,
turned back into JSON) in scale-ai/llm-engine's tests, which cite the hub file; that copy has no
`dummy_token_indices` (so the preset's spec masks no logits; a real checkpoint's config.json names them).
Phi-3-small-128k's config.json (its LongRoPE factors) was not found in the reference corpora: no preset;
export it from its checkpoint folder (LongRoPE "su" is read from its config.json).
"""
