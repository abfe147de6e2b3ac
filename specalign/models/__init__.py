"""Models: spec resolver and loading, tiny test models, scorers (rewards, judges, value heads)."""

from .loading import chat_prompt, load_model, load_tokenizer, resolve
from .scorers import Candidate, Scorer, build_scorer

__all__ = ["chat_prompt", "load_model", "load_tokenizer", "resolve", "Candidate", "Scorer", "build_scorer"]
