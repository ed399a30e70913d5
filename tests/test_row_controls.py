"""Per-row logits controls, log-probabilities and scoring, against Hugging Face.

Every control (min_new_tokens, ignore_eos, repetition_penalty, no_repeat_ngram_size, stop,
top_k) and every reported number (logprobs, candidate log-likelihoods) is checked against
the reference that defines it: `generate` with the same setting on the request alone, Hugging
Face's own logits processor on the same scores, or a teacher-forced forward of the unmodified
model (transformers' own attention, loaded separately). Each request runs alone and in one
mixed batch, on the static path and in the step loop."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from promptmux.prompts.errors import InvalidRequestError
from promptmux.prompts.store import PromptStore
from promptmux.serving.config import EngineConfig, ModelConfig
from promptmux.serving.demo.prompts import seed_demo_prompts
from promptmux.serving.engine.core import Engine
from promptmux.serving.engine.plan import StepPlan
from promptmux.serving.engine.sampling import (
    ban_repeated_ngrams,
    penalize_repetition,
    sample_rows,
    seed_words,
)
from promptmux.serving.engine.step.executor import StepExecutor
from promptmux.serving.engine.types import GenerationParams as Params
from promptmux.serving.engine.types import GenerationRequest, GenerationResult
from promptmux.serving.model.loading import load_model

LIMIT = 48


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    loaded = load_model(ModelConfig(source="embedded", dtype="float32"))
    store = PromptStore(tmp_path_factory.mktemp("store"), d_model=loaded.d_model, max_length=128)
    seed_demo_prompts(store)
    config = EngineConfig(max_batch_size=16, max_input_tokens=64, max_new_tokens_limit=LIMIT, prompt_cache_rows=1024)
    return Engine(loaded, store, config)


@pytest.fixture(scope="module")
def reference():
    """The same weights, untouched: transformers' own attention and generate."""
    return load_model(ModelConfig(source="embedded", dtype="float32"))


def encoder_inputs(engine: Engine, reference, request: GenerationRequest):
    """[prompt; input] embeddings of one request, built by hand from the stored prompt."""
    ids = torch.tensor(reference.tokenizer(request.text)["input_ids"])
    embeds = reference.model.get_input_embeddings()(ids)  # [T, D]
    if request.task:
        prompt = engine.store.get("demo", request.task).tensor.to(embeds.dtype)  # [L, D]
        embeds = torch.cat([prompt, embeds])
    return embeds[None], torch.ones(1, embeds.shape[0], dtype=torch.long)


def hf_generate(engine: Engine, reference, request: GenerationRequest) -> list[int]:
    """Hugging Face generate on the request alone, with the request's controls as its own
    arguments; EOS and what follows a stop string's token cut as a caller would."""
    p = request.params
    embeds, mask = encoder_inputs(engine, reference, request)
    kwargs = dict(max_new_tokens=p.max_new_tokens, do_sample=False, num_beams=1)
    if p.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = p.repetition_penalty
    if p.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = p.no_repeat_ngram_size
    if p.min_new_tokens:
        kwargs["min_new_tokens"] = p.min_new_tokens
    if p.ignore_eos:
        kwargs["suppress_tokens"] = [reference.model.config.eos_token_id]
    if p.stop:
        kwargs.update(stop_strings=list(p.stop), tokenizer=reference.tokenizer)
    with torch.no_grad():
        tokens = reference.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)[0, 1:].tolist()
    eos = reference.model.config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens


CASES = [
    ("reverse", "hello", Params(max_new_tokens=20)),
    ("reverse", "hello", Params(max_new_tokens=20, min_new_tokens=9)),
    ("reverse", "abc42", Params(max_new_tokens=14, ignore_eos=True)),
    ("copy", "hellohello", Params(max_new_tokens=24, repetition_penalty=5.0)),
    ("reverse", "hello42", Params(max_new_tokens=24, repetition_penalty=2.0)),
    ("copy", "abcabc", Params(max_new_tokens=24, repetition_penalty=0.7, min_new_tokens=12)),
    ("copy", "hellohello", Params(max_new_tokens=24, no_repeat_ngram_size=2)),
    ("rotate", "abababab", Params(max_new_tokens=24, no_repeat_ngram_size=3, repetition_penalty=1.2)),
    ("copy", "hello world", Params(max_new_tokens=24, stop=("lo",))),
    ("copy", "stophere", Params(max_new_tokens=24, stop=("zzz", "ph"))),
    ("upper", "hello", Params(max_new_tokens=24, stop=("LL",), min_new_tokens=3, no_repeat_ngram_size=1)),
    ("caesar", "hello", Params(max_new_tokens=24, logprobs=3)),
]


def requests_of(cases) -> list[GenerationRequest]:
    return [GenerationRequest("demo", text, task=task, params=params, request_id=str(i))
            for i, (task, text, params) in enumerate(cases)]


def run_steps(engine: Engine, requests: list[GenerationRequest], stagger: bool = False) -> list:
    """Every request through the step executor, admitted together (or one per step)."""
    executor = StepExecutor(engine.context)
    prepared = [engine.prepare(r) for r in requests]
    pending = [(i, p) for i, p in enumerate(prepared) if p.steppable]
    static = tuple((i, p) for i, p in enumerate(prepared) if not p.steppable)
    done: dict = {}
    first = True
    while pending or executor.active_slots or first:
        admit, pending = (pending[:1], pending[1:]) if stagger else (pending, [])
        outputs = executor.execute(StepPlan(admit=tuple(admit), static=static if first else ()))
        first = False
        done.update(outputs.finished)
        assert not outputs.errors, outputs.errors
    return [done[i] for i in range(len(requests))]


def test_each_control_alone_and_mixed_equals_hf_generate(engine, reference):
    requests = requests_of(CASES)
    expected = [hf_generate(engine, reference, r) for r in requests]
    static_mixed = engine.run_batch(requests).results
    steps_mixed = run_steps(engine, requests)
    steps_staggered = run_steps(engine, requests, stagger=True)
    for request, tokens, *ours in zip(requests, expected, static_mixed, steps_mixed, steps_staggered):
        alone = engine.run_batch([request]).results[0]
        for result in (alone, *ours):
            assert isinstance(result, GenerationResult), result
            assert result.token_ids == tokens, (request.task, request.text, request.params)
    # The controls changed what was generated: each case differs from the same request without them.
    plain = engine.run_batch([GenerationRequest("demo", r.text, task=r.task, params=Params(max_new_tokens=r.params.max_new_tokens))
                              for r in requests]).results
    changed = [p.token_ids != s.token_ids for p, s in zip(plain, static_mixed)]
    assert changed[1:11] == [True] * 10, changed


def test_stop_sequences_end_the_row_and_are_cut_from_the_text(engine):
    request = GenerationRequest("demo", "hello world", task="copy", params=Params(max_new_tokens=24, stop=("lo",)))
    for result in (engine.run_batch([request]).results[0], run_steps(engine, [request])[0]):
        assert result.finish_reason == "stop"
        assert result.text == "hel"  # "hello world" stops at "lo", cut before it
        assert engine.detokenize(result.token_ids) == "hello"  # the tokens keep the whole match
    never = GenerationRequest("demo", "hello", task="copy", params=Params(max_new_tokens=24, stop=("zz",)))
    for result in (engine.run_batch([never]).results[0], run_steps(engine, [never])[0]):
        assert (result.text, result.finish_reason) == ("hello", "eos")


def test_min_new_tokens_and_ignore_eos_force_lengths(engine):
    requests = [GenerationRequest("demo", "hello", task="reverse", params=Params(max_new_tokens=n, ignore_eos=True))
                for n in (7, 16, 31)]
    requests.append(GenerationRequest("demo", "hello", task="reverse", params=Params(max_new_tokens=30, min_new_tokens=12)))
    for results in (engine.run_batch(requests).results, run_steps(engine, requests)):
        assert [r.output_tokens for r in results[:3]] == [7, 16, 31]
        assert all(r.finish_reason == "length" and engine.context.eos_token_id not in r.token_ids for r in results[:3])
        assert results[3].output_tokens >= 12 and results[3].finish_reason == "eos"


def teacher_forced_logprobs(engine, reference, request, tokens) -> torch.Tensor:
    """log-softmax of the unmodified model's logits at each generated position: [T, V]."""
    embeds, mask = encoder_inputs(engine, reference, request)
    decoder_input = torch.tensor([[reference.model.config.decoder_start_token_id, *tokens[:-1]]])
    with torch.no_grad():
        logits = reference.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input).logits
    return logits[0].float().log_softmax(-1)


def test_logprobs_equal_a_teacher_forced_forward(engine, reference):
    requests = [
        GenerationRequest("demo", "hello", task="reverse", params=Params(max_new_tokens=16, logprobs=5)),
        GenerationRequest("demo", "abc42", task="caesar", params=Params(max_new_tokens=16, logprobs=0)),
        GenerationRequest("demo", "hello", task="copy",
                          params=Params(max_new_tokens=16, strategy="sample", seed=3, temperature=1.5, logprobs=2)),
        GenerationRequest("demo", "hello", task="upper", params=Params(max_new_tokens=16)),  # none asked
    ]
    for results in (engine.run_batch(requests).results, run_steps(engine, requests)):
        assert results[3].logprobs is None
        for request, result in zip(requests[:3], results[:3]):
            expected = teacher_forced_logprobs(engine, reference, request, result.token_ids)
            assert len(result.logprobs) == len(result.token_ids)
            for position, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
                assert entry.token_id == token
                assert entry.logprob == pytest.approx(expected[position, token].item(), abs=1e-4)
                assert len(entry.top) == request.params.logprobs
                values, ids = expected[position].topk(request.params.logprobs)
                assert [t.token_id for t in entry.top] == ids.tolist()
                assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
                assert entry.text == engine.detokenize([token])


def test_scores_equal_a_teacher_forced_forward_and_pick_the_right_label(engine, reference):
    candidates = ("olleh", "hello", "HELLO")
    scored = GenerationRequest("demo", "hello", task="reverse", choices=candidates)
    upper = GenerationRequest("demo", "abc", task="upper", choices=("abc", "ABC", "CBA", "ABCD"))
    generate = GenerationRequest("demo", "hello", task="rotate", params=Params(max_new_tokens=12))
    for results in (engine.run_batch([scored, generate, upper]).results, run_steps(engine, [scored, generate, upper]),
                    [engine.run_batch([scored]).results[0], None, engine.run_batch([upper]).results[0]]):
        for request, result, best in ((scored, results[0], "olleh"), (upper, results[2], "ABC")):
            assert (result.text, result.finish_reason) == (best, "choice")
            for choice, score in zip(request.choices, result.choice_logprobs, strict=True):
                tokens = reference.tokenizer(choice)["input_ids"]  # EOS included
                expected = teacher_forced_logprobs(engine, reference, request, tokens)
                assert score == pytest.approx(sum(expected[i, t].item() for i, t in enumerate(tokens)), abs=1e-4)
        if results[1] is not None:
            assert results[1].text == "elloh"


# ---------------------------------------------------------------------- the math, against HF's processors
def random_histories(rows: int, columns: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 6, (rows, columns), generator=generator)  # few ids: many repeats
    lengths = torch.randint(1, columns + 1, (rows,), generator=generator)
    scores = torch.randn(rows, vocab, generator=generator) * 3
    return history, lengths, scores


def test_repetition_penalty_and_ngram_bans_equal_hf_processors_row_by_row():
    history, lengths, scores = random_histories(12, 20, 10, seed=1)
    penalty = torch.tensor([1.0, 1.3, 0.7, 2.0] * 3)
    sizes = torch.tensor([0, 1, 2, 3, 4, 2, 3, 0, 5, 2, 1, 3])
    penalized = penalize_repetition(scores, history, lengths, penalty)
    banned = ban_repeated_ngrams(scores, history, lengths, sizes, sorted(set(sizes.tolist()) - {0}))
    for row in range(12):
        ids = history[row : row + 1, : lengths[row]]
        expected = RepetitionPenaltyLogitsProcessor(penalty[row].item())(ids, scores[row : row + 1].clone())
        assert torch.equal(penalized[row], expected[0]), row
        expected = scores[row : row + 1]
        if sizes[row]:
            expected = NoRepeatNGramLogitsProcessor(int(sizes[row]))(ids, expected.clone())
        assert torch.equal(banned[row], expected[0]), row


def test_top_k_keeps_what_hf_top_k_keeps_and_samples_its_distribution():
    draws = 30_000
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.5, -1.0, 0.0]])
    for k, temperature in ((1, 1.0), (2, 1.0), (3, 0.7), (5, 2.0)):
        # HF: temperature, then top-k (ties with the k-th kept: here k=2 keeps the tied 1.0s).
        warped = TopKLogitsWarper(k)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        expected = warped.softmax(-1)[0]
        tokens = sample_rows(
            logits.expand(draws, -1), torch.zeros(draws, dtype=torch.bool), torch.full((draws,), temperature),
            torch.ones(draws), torch.tensor(seed_words(5)).expand(draws, 2), torch.arange(draws),
            top_k=torch.full((draws,), k), top_k_max=k,
        )
        frequencies = torch.bincount(tokens, minlength=6) / draws
        assert set(tokens.unique().tolist()) == set(torch.nonzero(expected).flatten().tolist()), k
        assert torch.allclose(frequencies, expected, atol=0.015), (k, frequencies, expected)
    # A row without top_k, next to one with it, keeps every token.
    mixed = sample_rows(
        logits.expand(draws, -1), torch.zeros(draws, dtype=torch.bool), torch.ones(draws), torch.ones(draws),
        torch.tensor(seed_words(5)).expand(draws, 2), torch.arange(draws),
        top_k=torch.tensor([0, 1]).repeat(draws // 2), top_k_max=1,
    )
    assert set(mixed[1::2].tolist()) == {0} and set(mixed[0::2].tolist()) == set(range(6))


@pytest.mark.parametrize("params, message", [
    (Params(min_new_tokens=40, max_new_tokens=32), "min_new_tokens=40 is out of range"),
    (Params(repetition_penalty=0.0), "repetition_penalty=0.0 is invalid"),
    (Params(repetition_penalty=float("nan")), "repetition_penalty=nan is invalid"),
    (Params(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1 is out of range"),
    (Params(stop=("a", "b", "c", "d", "e")), "stop has 5 sequences"),
    (Params(stop=("",)), "stop sequence '' is 0 bytes"),
    (Params(logprobs=21), "logprobs=21 is out of range"),
    (Params(strategy="beam", logprobs=1), "logprobs is not available with beam search"),
    (Params(strategy="sample", top_k=-2), "top_k=-2 is out of range"),
    (Params(ignore_eos="yes"), "ignore_eos='yes' is not a boolean"),
])
def test_bad_controls_are_refused_with_what_was_expected(engine, params, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.prepare(GenerationRequest("demo", "hello", task="reverse", params=params))


def test_bad_choices_are_refused(engine):
    for choices, message in ((("ok", ""), r"choices\[1\] is 0 bytes"), (tuple("x" * 65), "choices has 65 candidates"),
                             (("y" * LIMIT,), r"choices\[0\] is 49 tokens")):
        with pytest.raises(InvalidRequestError, match=message):
            engine.prepare(GenerationRequest("demo", "hello", task="reverse", choices=choices))


def test_beam_rows_take_the_controls_through_generate(engine, reference):
    request = GenerationRequest("demo", "hellohello", task="copy",
                                params=Params(strategy="beam", num_beams=3, max_new_tokens=20, no_repeat_ngram_size=2,
                                              repetition_penalty=1.2, min_new_tokens=14))
    embeds, mask = encoder_inputs(engine, reference, request)
    with torch.no_grad():
        expected = reference.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=20, num_beams=3,
                                            early_stopping=True, no_repeat_ngram_size=2, repetition_penalty=1.2,
                                            min_new_tokens=14, do_sample=False)[0, 1:].tolist()
    eos = reference.model.config.eos_token_id
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    mixed = engine.run_batch([request, GenerationRequest("demo", "abc", task="upper")]).results
    assert mixed[0].token_ids == expected and mixed[1].text == "ABC"
