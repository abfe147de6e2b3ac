"""Decoding: one batched KV-cache engine; generators x selectors x scorers; cost accounting."""

from .api import DecodeConfig, Decoder, build_generator, build_selector, prompt_seed
from .best_of_n import BestOfN
from .engine import LMState
from .generators import Generator, Row, SamplingGenerator
from .sampling import SamplingParams, processed_logprobs

__all__ = ["DecodeConfig", "Decoder", "BestOfN", "LMState", "Generator", "Row", "SamplingGenerator",
           "SamplingParams", "processed_logprobs", "build_generator", "build_selector", "prompt_seed"]
