"""Published config.json files of the presets (package data).

Each file is the model's hub config.json as published: phi3-* and phi3.5-mini from the
microsoft/Phi-3* repositories; phi4-mini-instruct from microsoft/Phi-4-mini-instruct (the copy
found here carried an MLX converter's added `quantization`/`quantization_config` keys, removed);
phi4 from microsoft/phi-4. (Phi-4-mini-reasoning shares Phi-4-mini-instruct's architecture; its
own file was not available here, so it has no preset: export it from its checkpoint folder.)
"""
