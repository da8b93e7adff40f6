"""Behaviour of the sampler chain, its parameters' validation and streaming stop strings."""

import math

import numpy as np
import pytest

from engine.runtime.sampling import (
    InvalidSamplingParams,
    Sampler,
    SamplingParams,
    StopChecker,
    _pick,
)


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


def draw(params, logits, n, prompt=()):
    sampler = Sampler(params, prompt)
    return [sampler.sample(logits)[0] for _ in range(n)]


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, 1000).astype(np.float32)


# --- greedy ---------------------------------------------------------------------------------

def test_greedy_is_argmax(logits):
    assert draw(SamplingParams(), logits, 5) == [int(np.argmax(logits))] * 5


def test_greedy_ties_go_to_lowest_id():
    assert draw(SamplingParams(), np.array([0, 3, 1, 3], np.float32), 1) == [1]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(logits, temperature):
    params = SamplingParams(temperature=temperature, top_k=1, seed=3)
    assert draw(params, logits, 20) == [int(np.argmax(logits))] * 20


# --- seeds and independence -----------------------------------------------------------------

def test_same_seed_same_tokens_different_seed_different_tokens():
    flat = np.zeros(1000, np.float32)
    first = draw(SamplingParams(temperature=1.0, seed=7), flat, 30)
    assert draw(SamplingParams(temperature=1.0, seed=7), flat, 30) == first
    assert draw(SamplingParams(temperature=1.0, seed=8), flat, 30) != first


def test_seed_none_draws_a_seed_that_reproduces_the_run(logits):
    params = SamplingParams(temperature=1.0)
    sampler = Sampler(params)
    tokens = [sampler.sample(logits)[0] for _ in range(20)]
    assert isinstance(sampler.seed, int)
    assert draw(SamplingParams(temperature=1.0, seed=sampler.seed), logits, 20) == tokens


def test_tokens_do_not_depend_on_other_requests_in_the_batch(logits):
    params = SamplingParams(temperature=1.0, seed=11)
    alone = draw(params, logits, 20)
    a, b = Sampler(params), Sampler(params)
    together = []
    for _ in range(20):
        b.sample(logits[::-1].copy())  # a neighbour drawing on different logits in between
        together.append(a.sample(logits)[0])
    assert together == alone


# --- filters --------------------------------------------------------------------------------

def test_top_k_only_yields_the_k_best(logits):
    best = set(np.argsort(-logits)[:5].tolist())
    tokens = draw(SamplingParams(temperature=3.0, top_k=5, seed=1), logits, 2000)
    assert set(tokens) == best  # never outside, and every one of them reachable


def test_top_k_ties_at_the_boundary_go_to_the_lowest_ids():
    tokens = draw(SamplingParams(temperature=1.0, top_k=2, seed=0),
                  np.array([0, 1, 1, 1], np.float32), 500)
    assert set(tokens) == {1, 2}


# Probabilities 0.5, 0.3, 0.15, 0.05 placed at ids 2, 0, 3, 1.
HAND = np.log(np.array([0.3, 0.05, 0.5, 0.15], np.float32))


@pytest.mark.parametrize("top_p, kept", [(0.45, {2}), (0.79, {2, 0}), (0.81, {2, 0, 3}),
                                         (0.96, {2, 0, 3, 1})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    ids, probs = Sampler(SamplingParams(temperature=1.0, top_p=top_p)).distribution(HAND)
    assert set(ids.tolist()) == kept
    mass = np.exp(HAND.astype(np.float64))[ids]
    np.testing.assert_allclose(probs, mass / mass.sum())
    assert set(draw(SamplingParams(temperature=1.0, top_p=top_p, seed=2), HAND, 400)) == kept


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_top_p_on_a_wide_distribution_matches_a_full_sort(top_p):
    # Nucleus of thousands of tokens: exercises the widening search past its first guesses.
    x = np.random.default_rng(5).normal(0, 0.5, 49152).astype(np.float32)
    ids, _ = Sampler(SamplingParams(temperature=1.0, top_p=top_p)).distribution(x)
    order = np.argsort(-x.astype(np.float64), kind="stable")
    p = np.exp(log_softmax(x))[order]
    n = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    assert ids.size > 1024  # past the first two widening steps
    assert set(ids.tolist()) == set(order[:n].tolist())


def test_top_p_ties_resolve_to_the_lowest_ids():
    # 20 tokens at each of 10 levels, shuffled; the cut falls inside the 20 tied best tokens.
    levels = np.repeat(np.arange(10, dtype=np.float32) * 5, 20)
    x = levels[np.random.default_rng(0).permutation(200)]
    ids, probs = Sampler(SamplingParams(temperature=1.0, top_p=0.4)).distribution(x)
    best = np.flatnonzero(x == x.max())
    assert ids.tolist() == best[: ids.size].tolist() and 5 < ids.size < 20
    np.testing.assert_allclose(probs, 1 / ids.size)


def test_draw_never_lands_on_a_zero_weight_token():
    below_one = np.nextafter(1.0, 0.0)
    weights = np.zeros(1000, np.float32)
    weights[[10, 700]] = 1.0
    assert [_pick(weights, u) for u in (0.0, 0.49, 0.5, below_one)] == [10, 10, 700, 700]
    # A block whose running sum rounds below its pairwise sum: u near 1 lands in the gap and
    # must still come back as an index of a token with mass.
    weights = np.array([1.0] + [1e-17] * 254 + [0.0], np.float32)
    assert weights[_pick(weights, below_one)] > 0


def test_min_p_drops_tokens_below_min_p_times_p_max():
    # Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.25 keeps p >= 0.125, min_p 0.65 keeps p >= 0.325.
    ids, _ = Sampler(SamplingParams(temperature=1.0, min_p=0.25)).distribution(HAND)
    assert set(ids.tolist()) == {2, 0, 3}
    ids, _ = Sampler(SamplingParams(temperature=1.0, min_p=0.65)).distribution(HAND)
    assert set(ids.tolist()) == {2}
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.25, seed=4), HAND, 400)) == {2, 0, 3}


def test_temperature_1_frequencies_match_softmax():
    # Eight live tokens spread over a 1000-token vocabulary (several draw blocks), rest masked.
    live = np.array([3, 255, 256, 300, 511, 700, 998, 999])
    x = np.full(1000, -np.inf, np.float32)
    x[live] = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]
    n = 20000
    counts = np.bincount(draw(SamplingParams(temperature=1.0, seed=123), x, n), minlength=1000)
    assert counts.sum() == counts[live].sum()  # masked tokens never drawn
    expected = n * np.exp(log_softmax(x[live]))
    chi2 = ((counts[live] - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_temperature_scales_the_distribution():
    x = np.array([2.0, 1.0, 0.0], np.float32)
    _, probs = Sampler(SamplingParams(temperature=0.5)).distribution(x)
    np.testing.assert_allclose(probs, np.exp(log_softmax(x / 0.5)))


# --- penalties ------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    x = np.array([2.0, -2.0, 3.0, -1.0, 0.5], np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1, 1])
    np.testing.assert_array_equal(sampler.apply_penalties(x), [1.0, -4.0, 3.0, -1.0, 0.5])


def test_presence_and_frequency_penalties_follow_the_formula():
    x = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, prompt_ids=[3, 3])  # the prompt does not count
    for token in ([2], [2], [2], [1]):  # teacher-force: greedy on logits peaked at `token`
        peaked = np.full(4, -50.0, np.float32)
        peaked[token] = 50.0
        sampler.sample(peaked)
    # token 2 generated 3 times, token 1 once: logit -= count * 0.25 + 0.5
    np.testing.assert_allclose(sampler.apply_penalties(x), [1.0, 0.25, -0.25, 1.0])


def test_penalty_window_only_sees_the_last_n_tokens():
    x = np.array([1.0, 1.0, 1.0], np.float32)
    params = SamplingParams(repetition_penalty=2.0, penalty_last_n=2)
    sampler = Sampler(params, prompt_ids=[0, 1, 2])
    np.testing.assert_array_equal(sampler.apply_penalties(x), [1.0, 0.5, 0.5])
    whole = Sampler(SamplingParams(repetition_penalty=2.0, penalty_last_n=-1), [0, 1, 2])
    np.testing.assert_array_equal(whole.apply_penalties(x), [0.5, 0.5, 0.5])


def test_penalties_change_the_greedy_choice():
    # Token 0 leads by 0.3; once generated, a 0.5 presence penalty hands the lead to token 1.
    x = np.array([1.3, 1.0, 0.0], np.float32)
    assert draw(SamplingParams(presence_penalty=0.5), x, 3) == [0, 1, 0]


# --- logprobs -------------------------------------------------------------------------------

def test_logprob_is_log_softmax_of_the_raw_logits(logits):
    params = SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=9)
    sampler = Sampler(params)
    reference = log_softmax(logits)
    for _ in range(10):
        token, logprob = sampler.sample(logits)
        assert logprob == pytest.approx(reference[token], abs=1e-6)


def test_logprobs_top(logits):
    top = Sampler(SamplingParams()).logprobs_top(logits, 3)
    reference = log_softmax(logits)
    assert [t for t, _ in top] == np.argsort(-logits)[:3].tolist()
    np.testing.assert_allclose([lp for _, lp in top], reference[[t for t, _ in top]], atol=1e-6)
    assert Sampler(SamplingParams()).logprobs_top(logits, 0) == []


def test_max_tokens_is_tracked(logits):
    sampler = Sampler(SamplingParams(max_tokens=2))
    sampler.sample(logits)
    assert not sampler.at_max_tokens
    sampler.sample(logits)
    assert sampler.at_max_tokens and sampler.num_generated == 2


def test_rejects_bad_logits():
    sampler = Sampler(SamplingParams(temperature=1.0))
    with pytest.raises(ValueError):
        sampler.sample(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError):
        sampler.sample(np.zeros((2, 3), np.float32))


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1),
    ("top_k", -1), ("top_k", 2.5), ("max_tokens", 0), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("presence_penalty", 3.0), ("penalty_last_n", -2),
    ("seed", -1), ("stop", ("ok", "")),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field
    assert field in str(err.value) and repr(value) in str(err.value)


def test_validation_message_shows_the_value():
    with pytest.raises(InvalidSamplingParams, match=r"top_p must be in \(0, 1\], got 1\.5"):
        SamplingParams(top_p=1.5)


def test_stop_accepts_a_string_or_list():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


# --- stop strings ---------------------------------------------------------------------------

def test_stop_string_across_token_boundaries():
    checker = StopChecker(["WORLD"])
    assert checker.push("Hel") == ("Hel", False)
    assert checker.push("lo WOR") == ("lo ", False)  # "WOR" held back: might become WORLD
    assert checker.push("LD") == ("", True)
    assert checker.matched == "WORLD"
    assert checker.push("more") == ("", True)
    assert checker.flush() == ""


def test_text_after_the_stop_string_is_dropped():
    checker = StopChecker(["\n\n"])
    assert checker.push("a\n") == ("a", False)
    assert checker.push("\nb") == ("", True)


def test_held_back_prefix_is_released_when_it_does_not_complete():
    checker = StopChecker(["WORLD"])
    assert checker.push("Hello WO") == ("Hello ", False)
    assert checker.push("W") == ("WO", False)  # "WOW" fails, but its last "W" might start one
    assert checker.flush() == "W"
    assert checker.flush() == ""


def test_earliest_stop_string_wins():
    checker = StopChecker(["world", "lo w"])
    assert checker.push("hello world") == ("hel", True)
    assert checker.matched == "lo w"


def test_no_stop_strings_passes_text_through():
    checker = StopChecker([])
    assert checker.push("abc") == ("abc", False)
    assert checker.flush() == ""


def test_stop_checker_rejects_empty_stop_strings():
    with pytest.raises(ValueError):
        StopChecker([""])


# --- extreme but valid values (issue 13): the sampler must never raise on finite logits ---------

@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 1e-45, 5e-324])
def test_a_tiny_temperature_samples_the_best_token(logits, temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, seed=1))
    token, logprob = sampler.sample(logits)
    assert token == int(np.argmax(logits))
    assert np.isfinite(logprob)


@pytest.mark.parametrize("penalty", [1e-38, 1e-300, 1e38])
def test_an_extreme_repetition_penalty_stays_finite(logits, penalty):
    sampler = Sampler(SamplingParams(temperature=0.7, repetition_penalty=penalty, seed=3), prompt_ids=[1, 2, 3])
    for _ in range(5):
        token, logprob = sampler.sample(logits)
        assert 0 <= token < logits.size and np.isfinite(logprob)
    assert np.isfinite(sampler.apply_penalties(logits)).all()


def test_non_finite_logits_raise_a_named_error():
    from engine.runtime.sampling import NonFiniteLogits
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    bad = np.zeros(8, np.float32)
    bad[3] = np.nan
    with pytest.raises(NonFiniteLogits, match="NaN"):
        sampler.sample(bad)
