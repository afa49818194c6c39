"""edgerun.generate: sampling and the decode loop, against a scripted fake model and a toy tokenizer."""

import numpy as np
import pytest

from edgerun.errors import InputError
from edgerun.generate import (
    GenerationResult,
    Sampler,
    SamplingParams,
    candidate_probs,
    generate,
    generate_text,
)

# Toy vocabulary: id -> bytes. 'é' is two ids (UTF-8 0xC3 0xA9), "OP!" is one id spanning several chars.
EOS = 0
PIECES = [b"", b"a", b"b", b"c", b" ", b"S", b"T", b"OP!", b"\xc3", b"\xa9", b"x", b"y"]
VOCAB = len(PIECES)
ID = {p.decode("latin-1"): i for i, p in enumerate(PIECES)}  # "a" -> 1, "\xc3" -> 8, ...
E1, E2 = 8, 9  # the two halves of 'é'


def ids(text_tokens):
    return [ID[t] for t in text_tokens]


class ToyTokenizer:
    """Bytes-level decode like a byte-BPE tokenizer; an incomplete UTF-8 tail decodes as U+FFFD."""

    def decode(self, token_ids):
        return b"".join(PIECES[i] for i in token_ids).decode("utf-8", errors="replace")


class ToyStreamTokenizer(ToyTokenizer):
    """Same, with an incremental stream decoder (the preferred path in the loop)."""

    def stream_decoder(self):
        class Stream:
            def __init__(self):
                self.pending = b""

            def step(self, token_id):
                self.pending += PIECES[token_id]
                try:
                    text, self.pending = self.pending.decode("utf-8"), b""
                    return text
                except UnicodeDecodeError:
                    return None

            def flush(self):
                text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
                return text

        return Stream()


class ScriptedModel:
    """The token at absolute position p+1 is script[p+1] (EOS past its end); other logits are fixed noise.

    Counts step calls and refuses to hold more than max_context tokens, like a real KV cache would.
    """

    def __init__(self, script, max_context=64, margin=10.0):
        self.script = list(script)
        self.max_context = max_context
        self.margin = margin
        self.noise = np.random.default_rng(1234).normal(size=(max_context + 1, VOCAB)).astype(np.float32)
        self.calls = []  # len(ids) of each step call

    def new_state(self):
        return []

    def step(self, state, token_ids):
        self.calls.append(len(token_ids))
        start = len(state)
        state.extend(token_ids)
        assert len(state) <= self.max_context, "context overflow"
        rows = self.noise[start:start + len(token_ids)].copy()  # (T, vocab)
        for r, p in enumerate(range(start, start + len(token_ids))):
            target = self.script[p + 1] if p + 1 < len(self.script) else EOS
            rows[r, target] += self.margin
        return rows


def run(script, n_prompt, tokenizer=ToyTokenizer(), **kwargs):
    model = ScriptedModel(script, **{k: kwargs.pop(k) for k in ("max_context",) if k in kwargs})
    kwargs.setdefault("max_new_tokens", 100)
    kwargs.setdefault("stop_ids", {EOS})
    gen = generate(model, script[:n_prompt], tokenizer=tokenizer, **kwargs)
    pieces = list(gen)
    return model, gen, pieces


# ---------------------------------------------------------------- sampling


def random_logits(seed, vocab=50):
    return np.random.default_rng(seed).normal(scale=2.0, size=vocab).astype(np.float32)


def test_greedy_picks_argmax():
    sampler = Sampler(SamplingParams())
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler.sample(logits, []) == int(np.argmax(logits))


def test_same_seed_same_samples_different_seed_differs():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = random_logits(0)
    s1, s2 = Sampler(params), Sampler(params)
    a = [s1.sample(logits, []) for _ in range(100)]
    b = [s2.sample(logits, []) for _ in range(100)]
    s3 = Sampler(SamplingParams(temperature=1.0, seed=8))
    c = [s3.sample(logits, []) for _ in range(100)]
    assert a == b
    assert a != c


def test_top_k_1_equals_greedy():
    for seed in range(20):
        logits = random_logits(seed, vocab=1000)
        s = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=seed))
        assert all(s.sample(logits, []) == int(np.argmax(logits)) for _ in range(10))


def test_top_k_only_draws_from_the_k_best():
    logits = random_logits(3, vocab=200)
    best3 = set(np.argsort(-logits)[:3].tolist())
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    drawn = {s.sample(logits, []) for _ in range(300)}
    assert drawn == best3


def test_tiny_top_p_equals_greedy():
    for seed in range(20):
        logits = random_logits(seed, vocab=1000)
        s = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=seed))
        assert all(s.sample(logits, []) == int(np.argmax(logits)) for _ in range(10))


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    got, probs = candidate_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert set(got.tolist()) == kept
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_on_a_wide_flat_vocab_matches_full_sort():
    # a flat distribution makes the nucleus large, past the first argpartition look
    logits = random_logits(5, vocab=5000) * 0.05
    got, _ = candidate_probs(logits, SamplingParams(temperature=1.0, top_p=0.9))
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), 0.9)) + 1
    assert set(got.tolist()) == set(order[:n].tolist())
    assert n > 1000


def test_min_p_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    got, probs = candidate_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))  # cut at 0.1
    assert set(got.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(probs, np.array([0.5, 0.3, 0.15]) / 0.95, rtol=1e-5)
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.2, seed=0))
    assert 3 not in {s.sample(logits, []) for _ in range(500)}


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([2.0, 1.5, -0.5, -0.8], dtype=np.float32)
    plain = Sampler(SamplingParams())
    penalised = Sampler(SamplingParams(repetition_penalty=2.0))
    assert plain.sample(logits, [0]) == 0
    assert penalised.sample(logits, [0, 0, 0]) == 1          # 2.0 / 2 = 1.0 < 1.5
    # negative logits are multiplied: -0.5 * 2 = -1.0 falls below -0.8
    neg = np.array([-0.5, -0.8], dtype=np.float32)
    assert plain.sample(neg, [0]) == 0
    assert penalised.sample(neg, [0]) == 1
    assert logits[0] == 2.0  # the caller's logits are not modified


class FixedLogitsModel:
    """Every position gets the same logits row."""

    max_context = 32

    def __init__(self, row):
        self.row = np.asarray(row, dtype=np.float32)

    def new_state(self):
        return []

    def step(self, state, token_ids):
        state.extend(token_ids)
        return np.tile(self.row, (len(token_ids), 1))


def test_repetition_penalty_sees_prompt_and_output_in_generate():
    row = np.full(VOCAB, -5.0)
    row[ID["a"]], row[ID["b"]] = 2.0, 1.5
    model = FixedLogitsModel(row)
    penalty = SamplingParams(repetition_penalty=2.0)
    assert generate_text(model, ids(["c"]), max_new_tokens=1).token_ids == ids(["a"])
    assert generate_text(model, ids(["c"]), max_new_tokens=1, sampling=penalty).token_ids == ids(["a"])
    # "a" in the prompt is penalised; so is "a" once it has been generated
    assert generate_text(model, ids(["a"]), max_new_tokens=1, sampling=penalty).token_ids == ids(["b"])
    assert generate_text(model, ids(["c"]), max_new_tokens=2, sampling=penalty).token_ids == ids(["a", "b"])


def test_temperature_1_matches_softmax_frequencies():
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0], dtype=np.float32)
    expected_p = np.exp(logits) / np.exp(logits).sum()
    n = 5000
    s = Sampler(SamplingParams(temperature=1.0, seed=42))
    counts = np.bincount([s.sample(logits, []) for _ in range(n)], minlength=5)
    expected = expected_p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.0, f"chi2={chi2:.1f} counts={counts} expected={expected.round()}"  # 4 dof: p < 0.001


def test_low_temperature_does_not_overflow():
    logits = np.array([80.0, 79.0, -80.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=1e-3, seed=0))
    assert s.sample(logits, []) == 0


def test_nan_logits_raise():
    with pytest.raises(InputError, match="NaN"):
        Sampler(SamplingParams()).sample(np.array([0.0, np.nan], dtype=np.float32), [])
    with pytest.raises(InputError):
        Sampler(SamplingParams(temperature=1.0)).sample(np.array([np.nan, 0.0], dtype=np.float32), [])


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
])
def test_bad_sampling_params_raise_input_error_naming_the_argument(kwargs, name):
    with pytest.raises(InputError, match=name):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------- decode loop


def test_greedy_generation_follows_the_script_and_eos_is_not_text():
    script = ids(["a", "b", "c", "a", "b"])  # then EOS
    model, gen, pieces = run(script, 2)
    r = gen.result
    assert isinstance(r, GenerationResult)
    assert r.text == "cab" and "".join(pieces) == "cab"
    assert r.token_ids == ids(["c", "a", "b"])
    assert EOS not in r.token_ids
    assert r.finish_reason == "stop" and r.stopped_by == EOS
    assert r.stats.prompt_tokens == 2 and r.stats.generated_tokens == 3
    assert r.stats.prefill_s >= 0 and r.stats.decode_s >= 0
    assert gen.text == r.text and gen.finish_reason == "stop" and gen.stats is r.stats


def test_prefill_is_one_step_call_then_one_token_per_step():
    script = ids(["a", "b", "c", "a", "b", "c", "x"])
    model, gen, _ = run(script, 5)
    assert model.calls == [5, 1, 1]  # prefill -> "c"; step("c") -> "x"; step("x") -> EOS
    assert gen.result.token_ids == ids(["c", "x"])


def test_max_new_tokens_respected_without_a_wasted_step():
    script = ids(["a"] + ["b", "c"] * 10)
    model, gen, pieces = run(script, 1, max_new_tokens=3)
    assert gen.result.token_ids == ids(["b", "c", "b"])
    assert gen.result.finish_reason == "length"
    assert model.calls == [1, 1, 1]
    model, gen, pieces = run(script, 1, max_new_tokens=0)
    assert gen.result.token_ids == [] and gen.result.finish_reason == "length" and model.calls == []


def test_context_full_stops_cleanly_with_length():
    script = ids(["a", "b", "c"] + ["x", "y"] * 20)
    model, gen, pieces = run(script, 3, max_context=8, max_new_tokens=None)
    r = gen.result
    assert r.finish_reason == "length"
    assert len(r.token_ids) == 5  # 3 prompt + 5 output = the whole context
    assert sum(model.calls) == 7   # the last sampled token is never stepped
    assert r.text == "xyxyx" == "".join(pieces)


def test_prompt_filling_the_context_generates_nothing():
    model = ScriptedModel(ids(["a"] * 10), max_context=4)
    r = generate_text(model, ids(["a"] * 4), max_new_tokens=5)
    assert r.token_ids == [] and r.finish_reason == "length" and model.calls == []


def test_prompt_longer_than_context_names_both_numbers():
    model = ScriptedModel(ids(["a"] * 10), max_context=4)
    with pytest.raises(InputError, match=r"(?s)(?=.*\b6\b)(?=.*\b4\b)"):
        generate(model, ids(["a"] * 6), max_new_tokens=5)


def test_bad_generate_arguments():
    model = ScriptedModel(ids(["a", "b"]))
    with pytest.raises(InputError, match="empty prompt"):
        generate(model, [], max_new_tokens=5)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(model, [1], max_new_tokens=-1)
    with pytest.raises(InputError, match="token ids"):
        generate(model, "ab", max_new_tokens=5)
    with pytest.raises(InputError, match="tokenizer"):
        generate(model, [1], max_new_tokens=5, stop_strings=["x"])
    with pytest.raises(InputError, match="stop strings"):
        generate(model, [1], max_new_tokens=5, stop_strings=[""], tokenizer=ToyTokenizer())
    assert model.calls == []  # checked before the model runs


@pytest.mark.parametrize("tokenizer", [ToyTokenizer(), ToyStreamTokenizer()], ids=["full-decode", "stream-decoder"])
def test_multibyte_character_is_held_back_until_complete(tokenizer):
    script = [ID["a"], ID["b"], E1, E2, ID["c"]]
    model = ScriptedModel(script)
    gen = generate(model, script[:2], max_new_tokens=10, stop_ids={EOS}, tokenizer=tokenizer)
    events = list(gen.events())
    assert [e.token_id for e in events] == [E1, E2, ID["c"]]
    assert [e.text for e in events] == ["", "é", "c"]
    assert gen.result.text == "éc"


@pytest.mark.parametrize("tokenizer", [ToyTokenizer(), ToyStreamTokenizer()], ids=["full-decode", "stream-decoder"])
def test_truncated_multibyte_character_is_flushed_at_the_end(tokenizer):
    script = [ID["a"], ID["b"], E1, E2]
    model, gen, pieces = run(script, 2, tokenizer=tokenizer, max_new_tokens=1)
    assert gen.result.text == "\ufffd" == "".join(pieces)  # like tokenizer.decode of the output


@pytest.mark.parametrize("tokenizer", [ToyTokenizer(), ToyStreamTokenizer()], ids=["full-decode", "stream-decoder"])
def test_stop_string_cuts_text_exactly_and_never_streams_past_it(tokenizer):
    # output: "ab" "é" " " "S" "T" "OP!" "x" ... -> the stop string "STOP" ends inside the token "OP!"
    out = ["a", "b", "\xc3", "\xa9", " ", "S", "T", "OP!", "x", "y"]
    script = ids(["c"] + out)
    model, gen, pieces = run(script, 1, tokenizer=tokenizer, stop_strings=["STOP", "zzz"])
    r = gen.result
    assert r.text == "abé "
    assert "".join(pieces) == r.text
    assert all("S" not in p and "\ufffd" not in p for p in pieces)
    assert r.finish_reason == "stop" and r.stopped_by == "STOP"
    assert r.token_ids == ids(out[:8])  # generation stops at the token completing the stop string
    assert model.calls == [1] + [1] * 7


def test_stop_string_prefix_is_held_back_then_released():
    out = ["a", "S", "T", "x", "b"]
    script = ids(["c"] + out)
    model = ScriptedModel(script)
    gen = generate(model, script[:1], max_new_tokens=10, stop_ids={EOS}, stop_strings=["STOP"],
                   tokenizer=ToyTokenizer())
    texts = [e.text for e in gen.events()]
    assert texts == ["a", "", "", "STx", "b"]
    assert gen.result.text == "aSTxb" and gen.result.finish_reason == "stop" and gen.result.stopped_by == EOS


@pytest.mark.parametrize("end", ["eos", "length"])
def test_held_back_stop_prefix_is_released_when_generation_ends(end):
    out = ["a", "S", "T"]
    script = ids(["c"] + out) + ([EOS] if end == "eos" else ids(["x"]))
    model, gen, pieces = run(script, 1, stop_strings=["STOP"], max_new_tokens=3 if end == "length" else 10)
    assert gen.result.text == "aST" == "".join(pieces)
    assert gen.result.finish_reason == ("stop" if end == "eos" else "length")


def test_earliest_stop_string_wins():
    out = ["a", "b", "c", "x"]
    script = ids(["y"] + out)
    model, gen, pieces = run(script, 1, stop_strings=["cx", "bc"])
    assert gen.result.text == "a" and gen.result.stopped_by == "bc"


def test_generation_without_tokenizer_yields_token_events():
    script = ids(["a", "b", "c"])
    model = ScriptedModel(script)
    gen = generate(model, script[:1], max_new_tokens=10, stop_ids={EOS})
    events = list(gen.events())
    assert [e.token_id for e in events] == ids(["b", "c"])
    assert gen.result.text == "" and gen.result.token_ids == ids(["b", "c"])


def test_a_generation_can_be_resumed_after_break_and_finished():
    script = ids(["a", "b", "c", "x", "y"])
    model = ScriptedModel(script)
    gen = generate(model, script[:1], max_new_tokens=10, stop_ids={EOS}, tokenizer=ToyTokenizer())
    for piece in gen:
        assert piece == "b"
        break
    assert gen.token_ids == ids(["b"]) and not gen.done
    r = gen.finish()
    assert r.text == "bcxy" and r.finish_reason == "stop"


def test_same_seed_same_generation():
    script = ids(["a"] * 30)
    kwargs = dict(max_new_tokens=20, sampling=SamplingParams(temperature=2.0, seed=3), tokenizer=ToyTokenizer())
    a = generate_text(ScriptedModel(script, margin=0.0), script[:2], **kwargs)
    b = generate_text(ScriptedModel(script, margin=0.0), script[:2], **kwargs)
    c = generate_text(ScriptedModel(script, margin=0.0), script[:2],
                      **{**kwargs, "sampling": SamplingParams(temperature=2.0, seed=4)})
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
