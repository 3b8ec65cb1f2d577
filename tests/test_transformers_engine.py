"""The transformers engine on tiny random-weight checkpoints of three real architectures.

Each checkpoint is built offline by `oculo.testing.build_checkpoint`; the engine is checked against
plain transformers (same prompt, greedy) and for streaming, sampling, stop strings, limits,
cancellation and token counting.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from oculo.engines.base import (
    Delta,
    Engine,
    GenerationRequest,
    ImageSegment,
    Message,
    SamplingParams,
    TextSegment,
)
from oculo.engines.transformers import TransformersEngine
from oculo.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest
from oculo.testing import ARCHITECTURES, build_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
QUESTION = "What is in this picture? Answer briefly."


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {arch: build_checkpoint(arch, root / arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def engine(arch: str, tiny_checkpoints: dict[str, Path]) -> Iterator[TransformersEngine]:
    loaded = TransformersEngine(tiny_checkpoints[arch], model_id=f"tiny-{arch}")
    yield loaded
    asyncio.run(loaded.close())


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic, non-uniform RGB picture."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            ((x * 7 + seed * 40) % 256, (y * 5 + seed * 90) % 256, ((x + y) * 3) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


IMAGES = [picture(96, 64, 1), picture(40, 120, 2)]


def user(*parts: str | int) -> Message:
    """A user message; ints are image placeholders, strings text."""
    return Message(
        "user",
        tuple(ImageSegment(p) if isinstance(p, int) else TextSegment(p) for p in parts),
    )


def request(
    messages: list[Message],
    images: list[Image.Image] | None = None,
    sampling: SamplingParams = GREEDY,
) -> GenerationRequest:
    return GenerationRequest(messages=messages, images=images or [], sampling=sampling)


async def collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    return [delta async for delta in stream]


async def answer(engine: TransformersEngine, req: GenerationRequest) -> tuple[str, Delta]:
    deltas = await collect(engine.generate(req))
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason is not None
    return "".join(d.text for d in deltas), deltas[-1]


def reference_greedy(
    folder: Path, messages: list[dict[str, Any]], max_new_tokens: int
) -> tuple[str, int, int]:
    """Plain transformers: (answer text, prompt length, image positions) for greedy decoding.

    The answer's leading white space is dropped, as the engine drops it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor: Any = AutoProcessor.from_pretrained(folder, local_files_only=True)  # type: ignore[no-untyped-call]
    model: Any = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    prompt_length = inputs["input_ids"].shape[1]
    text = processor.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    text = text.lstrip()
    image_positions = int((inputs["input_ids"] == model.config.image_token_id).sum())
    return text, prompt_length, image_positions


# -- the checkpoints ---------------------------------------------------------------------------


def test_checkpoints_are_deterministic(tmp_path: Path) -> None:
    for arch in ARCHITECTURES:
        first = build_checkpoint(arch, tmp_path / f"{arch}-a", seed=3)
        second = build_checkpoint(arch, tmp_path / f"{arch}-b", seed=3)
        other = build_checkpoint(arch, tmp_path / f"{arch}-c", seed=4)
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (first / name).read_bytes() == (second / name).read_bytes(), (arch, name)
        assert (first / "model.safetensors").read_bytes() != (
            other / "model.safetensors"
        ).read_bytes()


def test_checkpoints_load_with_auto_classes(tiny_checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    expected = {
        "idefics3": ("Idefics3Processor", "Idefics3ImageProcessorPil", "<|im_start|>System: "),
        "gemma3": ("Gemma3Processor", "Gemma3ImageProcessorPil", "<bos><start_of_turn>user\n"),
        "llava": ("LlavaProcessor", "CLIPImageProcessorPil", "Be brief. USER: "),
    }
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First"},
                {"type": "image"},
                {"type": "text", "text": "then"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Two pictures."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ]
    for arch, folder in tiny_checkpoints.items():
        processor: Any = AutoProcessor.from_pretrained(folder, local_files_only=True)  # type: ignore[no-untyped-call]
        model: Any = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        processor_class, image_processor_class, start = expected[arch]
        assert type(processor).__name__ == processor_class
        assert type(processor.image_processor).__name__ == image_processor_class
        assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
        tokenizer = processor.tokenizer
        assert 300 < len(tokenizer) < 600
        text = "Zebra ünïcödé 中文字符 ☃ 🦄 tab\t end"  # mostly outside the training corpus
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
        rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert rendered.startswith(start), (arch, rendered)
        order = ["Be brief.", "First", "then", "Two pictures.", "Sure?"]
        positions = [rendered.index(part) for part in order]
        assert positions == sorted(positions), (arch, rendered)
        assert rendered.count(processor.image_token) == 2
        assert rendered.index(processor.image_token) > rendered.index("First")
        plain = processor.apply_chat_template(conversation)
        assert rendered.startswith(plain) and len(rendered) > len(plain)
        eos = model.generation_config.eos_token_id
        assert eos is not None and model.generation_config.pad_token_id is not None


# -- generation --------------------------------------------------------------------------------


def test_engine_satisfies_the_protocol(engine: TransformersEngine, arch: str) -> None:
    assert isinstance(engine, Engine)
    info = engine.info
    assert info.id == f"tiny-{arch}"
    assert info.engine == "transformers"
    assert info.context_length == 2048
    assert info.extra["parameters"] > 100_000
    assert "ForConditionalGeneration" in info.extra["architecture"]


async def test_one_image_matches_plain_transformers(
    engine: TransformersEngine, arch: str, tiny_checkpoints: dict[str, Path]
) -> None:
    deltas = await collect(engine.generate(request([user(0, QUESTION)], IMAGES[:1])))
    text = "".join(d.text for d in deltas)
    final = deltas[-1]
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": QUESTION}],
        }
    ]
    expected, prompt_length, image_positions = reference_greedy(
        tiny_checkpoints[arch], conversation, GREEDY.max_tokens or 0
    )
    assert text == expected
    assert len(deltas) > 2  # streamed, not delivered in one piece
    assert final.prompt_tokens == prompt_length
    assert final.image_positions == image_positions > 0
    assert final.completion_tokens is not None and 0 < final.completion_tokens <= 24


async def test_two_images_and_a_system_message(
    engine: TransformersEngine, arch: str, tiny_checkpoints: dict[str, Path]
) -> None:
    _, one = await answer(engine, request([user(0, QUESTION)], IMAGES[:1]))
    messages = [
        Message("system", (TextSegment("You describe pictures."),)),
        user("Compare", 0, "with", 1),
    ]
    text, two = await answer(engine, request(messages, IMAGES))
    conversation: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": "You describe pictures."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image", "image": IMAGES[0]},
                {"type": "text", "text": "with"},
                {"type": "image", "image": IMAGES[1]},
            ],
        },
    ]
    expected, prompt_length, image_positions = reference_greedy(
        tiny_checkpoints[arch], conversation, GREEDY.max_tokens or 0
    )
    assert (text, two.prompt_tokens, two.image_positions) == (
        expected,
        prompt_length,
        image_positions,
    )
    assert two.finish_reason in ("stop", "length")
    assert one.image_positions and two.image_positions == 2 * one.image_positions
    assert two.prompt_tokens and one.prompt_tokens and two.prompt_tokens > one.prompt_tokens
    developer = [Message("developer", (TextSegment("You describe pictures."),)), messages[1]]
    again, three = await answer(engine, request(developer, IMAGES))
    assert (again, three) == (text, two)  # developer is sent as system


async def test_greedy_is_deterministic(engine: TransformersEngine) -> None:
    first, _ = await answer(engine, request([user(0, QUESTION)], IMAGES[:1]))
    second, _ = await answer(engine, request([user(0, QUESTION)], IMAGES[:1]))
    assert first == second


async def test_seed_makes_sampling_reproducible(engine: TransformersEngine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        sampling = SamplingParams(temperature=1.0, max_tokens=16, seed=seed)
        return request([user(0, QUESTION)], IMAGES[:1], sampling)

    first, _ = await answer(engine, sampled(7))
    second, _ = await answer(engine, sampled(7))
    assert first == second
    others = [(await answer(engine, sampled(seed)))[0] for seed in (8, 9, 10)]
    assert any(other != first for other in others)


async def test_ignore_eos_runs_every_answer_to_max_tokens(engine: TransformersEngine) -> None:
    def sampled(seed: int, ignore_eos: bool) -> GenerationRequest:
        sampling = SamplingParams(temperature=1.0, max_tokens=120, seed=seed, ignore_eos=ignore_eos)
        return request([user(0, QUESTION)], IMAGES[:1], sampling)

    plain = [(await answer(engine, sampled(seed, False)))[1] for seed in range(8)]
    # the random model ends some answers early of its own accord...
    assert any(last.finish_reason == "stop" and last.completion_tokens < 120 for last in plain)
    for seed in range(8):
        _, last = await answer(engine, sampled(seed, True))
        # ...and none when told not to
        assert (last.finish_reason, last.completion_tokens) == ("length", 120)


async def test_top_p_and_penalties_change_the_answer(engine: TransformersEngine) -> None:
    plain, _ = await answer(engine, request([user(0, QUESTION)], IMAGES[:1]))
    penalised = SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=2.0)
    other, _ = await answer(engine, request([user(0, QUESTION)], IMAGES[:1], penalised))
    assert other != plain
    narrow = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=24, seed=5)
    nucleus, _ = await answer(engine, request([user(0, QUESTION)], IMAGES[:1], narrow))
    assert nucleus == plain  # a tiny nucleus holds only the most likely token: greedy


def feed(
    engine: TransformersEngine, text: str, stop: tuple[str, ...] = ()
) -> tuple[list[str], str]:
    """Feed `text`'s tokens one at a time to the engine's streamer: (deltas, final text)."""
    import torch

    from oculo.engines.hf_generation import DeltaStreamer, Job

    sent: list[str] = []

    def emit(item: Delta | BaseException) -> None:
        assert isinstance(item, Delta)
        sent.append(item.text)

    tokenizer: Any = engine._processor.tokenizer
    streamer = DeltaStreamer(tokenizer, stop, Job(request=request([]), emit=emit))
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() hands over first
    for token in tokenizer.encode(text, add_special_tokens=False):
        streamer.put(torch.tensor([token]))
        if streamer.stop_hit:
            break
    return sent, streamer.finish()


def test_streaming_never_splits_a_character(engine: TransformersEngine) -> None:
    text = "héllo 🦄 wörld ☃☃ 中文字符 end"
    tokenizer: Any = engine._processor.tokenizer
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text, add_special_tokens=False)]
    assert any("\ufffd" in piece for piece in pieces)  # some tokens hold part of a character
    sent, rest = feed(engine, text)
    assert "".join(sent) + rest == text
    assert not any("\ufffd" in piece for piece in sent)
    assert len(sent) > 5


def test_an_answer_does_not_start_with_white_space(engine: TransformersEngine) -> None:
    # SmolVLM-style templates end the prompt with "Assistant:", so the model emits the space
    sent, rest = feed(engine, "  \n A blue star. The text says  GO")
    assert "".join(sent) + rest == "A blue star. The text says  GO"


def test_stop_strings_hold_back_only_what_may_stop(engine: TransformersEngine) -> None:
    text = "the cat sat on the mat, the end"
    sent, rest = feed(engine, text, stop=("the m", "zzz"))
    assert "".join(sent) + rest == "the cat sat on "
    assert not any("the m" in piece for piece in sent)
    sent, rest = feed(engine, text, stop=("end!",))  # "end" starts the stop string, never ends it
    assert "".join(sent) + rest == text
    assert rest == "end"  # held back until the answer ended


async def test_max_tokens_ends_with_length(engine: TransformersEngine) -> None:
    sampling = SamplingParams(temperature=0.0, max_tokens=3)
    _, final = await answer(engine, request([user(0, QUESTION)], IMAGES[:1], sampling))
    assert final.finish_reason == "length"
    assert final.completion_tokens == 3


async def test_stop_string_cuts_the_answer(engine: TransformersEngine) -> None:
    full, final = await answer(engine, request([user(0, QUESTION)], IMAGES[:1]))
    assert len(full) >= 8, full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    sampling = SamplingParams(temperature=0.0, max_tokens=24, stop=("never-seen", stop))
    deltas = await collect(engine.generate(request([user(0, QUESTION)], IMAGES[:1], sampling)))
    assert "".join(d.text for d in deltas) == cut
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens is not None and final.completion_tokens is not None
    assert deltas[-1].completion_tokens < final.completion_tokens
    # A stop string whose beginning appears but which never completes holds nothing back.
    almost = SamplingParams(temperature=0.0, max_tokens=24, stop=(stop + "\x00\x01",))
    text, last = await answer(engine, request([user(0, QUESTION)], IMAGES[:1], almost))
    assert (text, last.finish_reason) == (full, final.finish_reason)


@contextmanager
def slow_steps(engine: TransformersEngine, seconds: float = 0.02) -> Iterator[list[int]]:
    """Count the model's forward passes, each made `seconds` slower so timing is not a race."""
    calls = [0]

    def hook(module: Any, args: Any, output: Any) -> None:
        calls[0] += 1
        time.sleep(seconds)

    handle = engine._model.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


async def wait_until_idle(engine: TransformersEngine) -> float:
    started = time.perf_counter()
    while engine.busy and time.perf_counter() - started < 5:
        await asyncio.sleep(0.002)
    return time.perf_counter() - started


async def test_closing_the_stream_stops_the_worker(engine: TransformersEngine) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=400)  # about 8 s at 20 ms a step
    with slow_steps(engine) as steps:
        stream = engine.generate(request([user(0, QUESTION)], IMAGES[:1], long))
        first = await anext(stream)
        at_first = steps[0]
        assert first.finish_reason is None
        await stream.aclose()  # type: ignore[attr-defined]
        assert await wait_until_idle(engine) < 0.5
        assert steps[0] <= at_first + 1
    text, final = await answer(engine, request([user(0, QUESTION)], IMAGES[:1]))
    assert final.finish_reason is not None and text


async def test_cancelling_the_consumer_stops_the_worker(engine: TransformersEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        sampling = SamplingParams(temperature=0.0, max_tokens=400)
        async for _ in engine.generate(request([user(QUESTION)], [], sampling)):
            started.set()

    with slow_steps(engine) as steps:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 5)
        at_first = steps[0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_until_idle(engine) < 0.5
        assert steps[0] <= at_first + 2
    _, final = await answer(engine, request([user(QUESTION)]))
    assert final.finish_reason is not None


async def test_concurrent_requests_do_not_interfere(engine: TransformersEngine) -> None:
    results = await asyncio.gather(
        *(answer(engine, request([user(0, f"{QUESTION} {i}")], IMAGES[:1])) for i in range(3))
    )
    for i, (text, final) in enumerate(results):
        alone, again = await answer(engine, request([user(0, f"{QUESTION} {i}")], IMAGES[:1]))
        assert (text, final) == (alone, again)


# -- counting and limits -------------------------------------------------------------------------


async def test_count_text_tokens(engine: TransformersEngine) -> None:
    short = engine.count_text_tokens([user(QUESTION)])
    longer = engine.count_text_tokens([user(QUESTION + " And what colour is it, exactly?")])
    assert 0 < short < longer
    assert engine.count_text_tokens([user(0, QUESTION)]) == engine.count_text_tokens(
        [user(0, 1, QUESTION)]
    )
    with_images = engine.count_text_tokens([user(QUESTION, 0, 1)])
    assert with_images == short
    system = [Message("system", (TextSegment("Be brief."),)), user(QUESTION)]
    assert engine.count_text_tokens(system) > short
    _, final = await answer(engine, request([user(0, 1, QUESTION)], IMAGES))
    assert final.prompt_tokens is not None and final.image_positions
    assert final.prompt_tokens >= with_images + final.image_positions
    _, text_only = await answer(engine, request([user(QUESTION)]))
    assert text_only.prompt_tokens == short  # no image: the count is the engine's own
    assert text_only.image_positions == 0


def test_count_text_tokens_is_cheap(engine: TransformersEngine) -> None:
    # cheap: the tokenizer only, never the model (how fast is for benchmarks, not tests)
    messages = [user(QUESTION + f" {i}", 0) for i in range(4)]
    with slow_steps(engine, 0.0) as steps:
        counts = {engine.count_text_tokens([*messages, user(f"variant {i}")]) for i in range(50)}
    assert steps[0] == 0
    assert counts and min(counts) > 0


async def test_prompt_longer_than_the_context_is_refused(engine: TransformersEngine) -> None:
    words = " ".join(["picture"] * 2500)
    with pytest.raises(ContextLengthExceeded) as caught:
        await answer(engine, request([user(0, words)], IMAGES[:1]))
    assert caught.value.param == "messages"
    assert not engine.busy


async def test_max_tokens_is_clamped_to_the_context(
    arch: str, tiny_checkpoints: dict[str, Path]
) -> None:
    probe = TransformersEngine(tiny_checkpoints[arch])
    try:
        _, first = await answer(probe, request([user(0, QUESTION)], IMAGES[:1]))
        assert first.prompt_tokens is not None
        small = TransformersEngine(tiny_checkpoints[arch], context_length=first.prompt_tokens + 2)
        sampling = SamplingParams(temperature=0.0, max_tokens=100)
        _, final = await answer(small, request([user(0, QUESTION)], IMAGES[:1], sampling))
        assert final.completion_tokens is not None and final.completion_tokens <= 2
        await small.close()
    finally:
        await probe.close()


async def test_control_tokens_in_text_never_crash_the_engine(engine: TransformersEngine) -> None:
    tokenizer: Any = engine._processor.tokenizer
    placeholder = engine._processor.image_token
    for token in {tokenizer.eos_token, tokenizer.bos_token, placeholder}:
        messages = [user(0, f"say {token} now")]
        try:
            _, final = await answer(engine, request(messages, IMAGES[:1]))
        except InvalidRequest as error:  # only the image placeholder, where it can't be escaped
            assert error.param == "messages" and token == placeholder
            with pytest.raises(InvalidRequest):
                engine.count_text_tokens(messages)
        else:
            _, reference = await answer(engine, request([user(0, "x")], IMAGES[:1]))
            assert final.image_positions == reference.image_positions


async def test_template_that_refuses_system_messages(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    folder = tmp_path / "no-system"
    shutil.copytree(tiny_checkpoints["llava"], folder)
    template = (folder / "chat_template.jinja").read_text()
    refusal = (
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
        "{{ raise_exception('System role not supported') }}{%- endif -%}{%- endfor -%}"
    )
    (folder / "chat_template.jinja").write_text(refusal + template)
    strict = TransformersEngine(folder)
    try:
        system = Message("system", (TextSegment("Answer in French."),))
        plain = strict.count_text_tokens([user(0, QUESTION)])
        folded = strict.count_text_tokens([system, user(0, QUESTION)])
        assert folded > plain
        _, final = await answer(strict, request([system, user(0, QUESTION)], IMAGES[:1]))
        assert final.finish_reason is not None
    finally:
        await strict.close()


async def test_turns_that_do_not_alternate_are_merged(
    engine: TransformersEngine, arch: str
) -> None:
    messages = [user(0, QUESTION), user("And the colours?")]
    _, final = await answer(engine, request(messages, IMAGES[:1]))
    assert final.finish_reason is not None
    assert engine.count_text_tokens(messages) > engine.count_text_tokens(messages[:1])


async def test_closing_the_engine_ends_its_streams(tiny_checkpoints: dict[str, Path]) -> None:
    closing = TransformersEngine(tiny_checkpoints["llava"])
    # 400 steps of at least 20 ms: 8 s, unless closing cuts the answers short
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    with slow_steps(closing) as steps:
        streaming = closing.generate(request([user(0, QUESTION)], IMAGES[:1], long))
        waiting = closing.generate(request([user(QUESTION)], [], long))
        assert (await anext(streaming)).finish_reason is None
        queued = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.05)  # the second request now waits for the worker
        started, before = time.perf_counter(), steps[0]
        await closing.close()
        # counted in steps, not seconds, so that a loaded machine does not fail it: the worker
        # stops within a step or two of the close, and the waiting request never starts
        assert steps[0] - before <= 3, steps
        assert time.perf_counter() - started < 4.0
    with pytest.raises(EngineUnavailable):
        async for _ in streaming:
            pass
    with pytest.raises(EngineUnavailable):
        await queued
    with pytest.raises(EngineUnavailable):
        await answer(closing, request([user(QUESTION)]))
