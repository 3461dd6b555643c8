"""genai_config.json: how onnxruntime-genai runs the graph (I/O names, KV cache, search defaults)."""

from __future__ import annotations

from typing import Any

from phi3_onnx.spec import ModelSpec
from phi3_onnx.targets import Target, graph_capture_ok
from phi3_onnx.targets.providers import PROVIDERS

def decoder_inputs(target: Target) -> dict[str, str]:
    """genai input-name map; position_ids only where the graph takes it."""
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if target.graph.position_ids_input:
        names["position_ids"] = "position_ids"
    names.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    return names


def default_max_length(spec: ModelSpec) -> int:
    """KV buffers are allocated at max_length: never default to a 128k context."""
    return min(spec.max_position_embeddings, 4096)


def genai_config(spec: ModelSpec, target: Target, max_length: int) -> dict[str, Any]:
    ep = PROVIDERS[target.provider]
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", **ep.session_threads,
                               "provider_options": ep.provider_options(capture=graph_capture_ok(spec, target))}
    eos = list(spec.eos_token_ids) or [spec.pad_token_id]
    return {
        "model": {
            "bos_token_id": spec.bos_token_id,
            "context_length": spec.max_position_embeddings,
            "decoder": {
                "session_options": session,
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": decoder_inputs(target),
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": spec.pad_token_id,
            "type": "phimoe" if spec.moe is not None else "phi3small" if spec.small is not None else "phi3",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
