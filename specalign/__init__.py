"""specalign: fast inference-time alignment (Speculative Rejection, Reward-Shifted Speculative Sampling)."""

__version__ = "0.1.0"
