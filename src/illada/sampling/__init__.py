"""Sampling from masked diffusion LMs (reference §5): fixed canvas and variable-length generation, remasking
rules, parallel decoding, approximate KV caches, end-think boost and streaming."""
from illada.sampling.generate import GenerationOutput, SamplingConfig, StepEvent, generate, left_pad, stream
from illada.sampling.infill import InfillConfig, InfillOutput, fill_masks, infill, infill_stream

__all__ = ["generate", "stream", "left_pad", "fill_masks", "infill", "infill_stream", "InfillConfig", "SamplingConfig",
           "GenerationOutput", "InfillOutput", "StepEvent"]
