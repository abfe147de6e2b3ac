"""Adaptive Speculative Rejection (--alpha auto): exact rows kept for partial scores we set (informative
scores reject, uninformative ones do not), the residual-variance noise estimate, a scorer's
calibration used at the first decision, pruning that falls as the synthetic noise grows, the
decode API route, and bad input."""

import math

import pytest
import torch

from specalign.decode.adaptive import AdaptiveRejection, residual_variance
from specalign.decode.api import DecodeConfig, Decoder, build_selector
from specalign.decode.generators import Generator
from specalign.errors import SpecError
from specalign.models.scorers import Scorer
from specalign.models.testing import char_tokenizer, tiny_llama


class LetterRows(Generator):
    """No model: row i emits the letter chr(ord('a') + i) once per step, so a scorer can read the row id
    and its length from the text."""

    name = "letters"

    @property
    def states(self):
        return []

    @property
    def cost(self):
        return {}

    def _prefill(self, prompt_ids, n):
        pass

    def _step(self):
        letter = self.tokenizer.convert_tokens_to_ids
        self._emit([[letter(chr(ord("a") + i))] for i in self.active])


class TableScorer(Scorer):
    """score(row, tokens) from a function we set; records each call's (row, tokens) pairs."""

    name = "table"

    def __init__(self, fn, calibration=None):
        super().__init__()
        self.fn, self.seen = fn, []
        if calibration is not None:
            self.calibration = calibration

    def _score(self, candidates):
        keys = [(ord(c.response[0]) - ord("a"), len(c.response)) for c in candidates]
        self.seen.append(keys)
        return [self.fn(r, t) for r, t in keys]


def run(fn, n=4, max_new_tokens=40, decision="tokens:4", calibration=None, **kw):
    tok = char_tokenizer()
    gen = LetterRows(tok, max_new_tokens=max_new_tokens)
    spr = AdaptiveRejection(n=n, decision=decision, **kw)
    scorer = TableScorer(fn, calibration)
    result = spr.run(gen, scorer, "hi", tok("hi")["input_ids"], None)
    return result, scorer


def test_residual_variance_by_hand():
    # y orthogonal to the centred x: the line explains nothing, 4 / (4 - 2)
    assert residual_variance([0, 1, 2, 3], [1, -1, -1, 1]) == pytest.approx(2.0)
    # y a line in x: nothing left
    assert residual_variance([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(0.0, abs=1e-12)
    # constant x: plain variance (n - 1)
    assert residual_variance([5, 5, 5], [0, 1, 2]) == pytest.approx(1.0)
    assert residual_variance([0, 1], [0, 2]) == pytest.approx(2.0)


def test_informative_scores_reject_uninformative_keep():
    """Same first decision (scores 0..3 after 4 tokens: all noise as far as we know -> keep all).
    Second decision: scores unchanged (rate 0: the ranking is settled -> keep the clamp minimum, the best)
    vs changes the earlier scores do not predict (rate = 2/4 per token, sigma = sqrt(0.5 x 32) = 4 -> keep all)."""
    settled, _ = run(lambda r, t: float(r), max_alpha=0.75)
    first = settled["rounds"][0]
    assert first["kept_ids"] == [3, 2, 1, 0]
    assert first["adaptive"]["rate"] == pytest.approx((5 / 3) / 4)          # var(0..3) over 4 tokens
    assert first["adaptive"]["noise_std"] == pytest.approx(math.sqrt((5 / 3) / 4 * 36), abs=1e-6)
    assert first["adaptive"]["alpha"] == 0.0
    second = settled["rounds"][1]
    assert second["decision_tokens"] == 8
    assert second["kept_ids"] == [3]
    assert second["adaptive"]["rate"] == 0.0 and second["adaptive"]["alpha"] == 0.75
    assert settled["best"] == 3

    later = {0: 1.0, 1: 0.0, 2: 1.0, 3: 4.0}
    noisy, _ = run(lambda r, t: float(r) if t <= 4 else later[r], max_alpha=0.75)
    assert noisy["rounds"][0]["kept_ids"] == [3, 2, 1, 0]
    second = noisy["rounds"][1]
    assert second["kept_ids"] == [3, 0, 2, 1]                               # ties: lower row id first
    assert second["adaptive"]["rate"] == pytest.approx(0.5)
    assert second["adaptive"]["noise_std"] == pytest.approx(4.0)
    assert second["adaptive"]["alpha"] == 0.0


def test_fewer_tokens_left_means_less_noise_and_more_pruning():
    """The same score changes with 4 tokens left (sigma = sqrt(0.5 x 4)): L = 4 - 1.414; the rows scoring
    1, 1, 0 have upper bounds 2.414, 2.414, 1.414 < L -> only row 3 survives."""
    later = {0: 1.0, 1: 0.0, 2: 1.0, 3: 4.0}
    result, _ = run(lambda r, t: float(r) if t <= 4 else later[r], max_new_tokens=12, max_alpha=0.75)
    assert result["rounds"][1]["kept_ids"] == [3]
    assert result["rounds"][1]["adaptive"]["noise_std"] == pytest.approx(math.sqrt(2.0))


def test_max_alpha_clamp_and_z_zero():
    """Rate 0 rejects everything but the top; max_alpha 0.5 keeps half the pool. z = 0 ignores noise."""
    result, _ = run(lambda r, t: float(r), max_alpha=0.5)
    assert result["rounds"][1]["kept_ids"] == [3, 2]
    result, _ = run(lambda r, t: float(r), z=0.0, max_alpha=0.75)
    assert result["rounds"][0]["kept_ids"] == [3]                            # greedy from the first decision


def test_calibration_is_used_at_the_first_decision():
    """A scorer that says its partial scores are exact (noise rate 0) is trusted at once."""
    result, _ = run(lambda r, t: float(r), calibration={"noise_rate": 0.0}, max_alpha=0.75)
    assert result["rounds"][0]["kept_ids"] == [3]
    assert result["rounds"][0]["adaptive"]["source"] == "calibration"
    result, _ = run(lambda r, t: float(r), calibration={"noise_rate": 1e6}, max_alpha=0.75)
    assert result["rounds"][0]["kept_ids"] == [3, 2, 1, 0]


def walk(n_rows, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, steps, generator=gen).cumsum(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_falls_as_partial_scores_get_noisier(seed):
    """Synthetic scorer: score = signal_row + noise x W_row(t), W a unit random walk, signal 0..1 across
    8 rows. The rows kept at the second decision rise with the noise: 1 (noise 0) ... 8 (noise 3)."""
    w = walk(8, 64, seed)
    kept = []
    for noise in (0.0, 0.01, 0.03, 0.1, 0.3, 3.0):
        result, _ = run(lambda r, t: r / 7 + noise * float(w[r, t - 1]), n=8, max_new_tokens=64)
        kept.append(result["rounds"][1]["kept"])
    assert kept[0] == 1 and kept[-1] == 8
    assert kept == sorted(kept), kept
    assert len(set(kept)) >= 3, kept


def test_alpha_auto_through_the_decode_api():
    cfg = DecodeConfig(model="unused", method="spec-rejection", n=6, alpha="auto", decision="tokens:3",
                       scorer="loglik:self", max_new_tokens=10, seed=3)
    assert isinstance(build_selector(cfg), AdaptiveRejection)
    from specalign.decode import SamplingGenerator, SamplingParams
    tok = char_tokenizer()
    gen = SamplingGenerator(tiny_llama(seed=1), tok, SamplingParams(1.0), 10)
    record = Decoder(cfg, generator=gen).run(["hi"], progress=False)[0]
    assert record["method"] == "spec-rejection"
    assert record["params"]["alpha"] == "auto"
    assert all("adaptive" in r for r in record["rounds"])
    assert record["rounds"][0]["rows"] == 6


def test_bad_input():
    with pytest.raises(SpecError, match="alpha='auto'"):
        AdaptiveRejection(alpha=0.5)
    with pytest.raises(SpecError, match="z must be"):
        AdaptiveRejection(z=-1.0)
    with pytest.raises(SpecError, match="max_alpha"):
        AdaptiveRejection(max_alpha=1.0)


def test_value_head_training_report_calibrates_the_first_decision(tmp_path):
    """A value:DIR scorer's value_report.json (held-out r at prefix 4 = 0.99999, std 2) says its scores are
    nearly exact at 4 tokens: residual variance 4 (1 - r^2) spread over the 36 tokens left -> the first
    decision keeps only the best; with r = 0.1 the residual std is ~2 and every row stays."""
    import json as _json
    for r, expected in ((0.99999, [3]), (0.1, [3, 2, 1, 0])):
        (tmp_path / "value_report.json").write_text(_json.dumps(
            {"target_std": 2.0, "correlation": {"4": {"value": {"pearson": r}}, "8": {"value": {"pearson": 0.5}},
                                                "final": {"value": {"pearson": 1.0}}}}))
        tok = char_tokenizer()
        gen = LetterRows(tok, max_new_tokens=40)
        scorer = TableScorer(lambda row, t: float(row))
        scorer.name = f"value:{tmp_path}"
        result = AdaptiveRejection(n=4, decision="tokens:4", max_alpha=0.75).run(gen, scorer, "hi",
                                                                                tok("hi")["input_ids"], None)
        first = result["rounds"][0]
        assert first["adaptive"]["source"] == "calibration"
        assert first["adaptive"]["rate"] == pytest.approx(4 * (1 - r * r) / 36, abs=1e-8)
        assert first["kept_ids"] == expected
