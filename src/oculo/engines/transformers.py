"""The local engine: any Hugging Face image-text-to-text checkpoint, run with transformers.

`TransformersEngine(path)` loads a checkpoint folder (or a hub id, where the hub is reachable) with
`AutoProcessor` and `AutoModelForImageTextToText`, and serves it through the `Engine` protocol. Only
the generic Auto* APIs and the checkpoint's own chat template are used, so SmolVLM (Idefics3),
Gemma 3, LLaVA and the other image-text-to-text architectures work unchanged.

How a request runs:

- **Prompt.** The messages become Hugging Face chat messages (`oculo.engines.hf_chat`, which also
  retries, then refuses, conversations the chat template rejects) and go through
  `processor.apply_chat_template(..., tokenize=True)`, which renders the template and lets the
  processor expand each image placeholder into the model's image positions. Control tokens the
  *user* wrote (`<end_of_turn>`, `<image>`, ...) are encoded as plain text
  (`sanitize_control_tokens=True`), so text cannot forge turns or image slots. Two things are
  probed once at load, never decided by architecture name: whether the tokenizer adds special
  tokens the template does not write (Llama's `<s>` for LLaVA: the engine then adds them itself,
  since sanitizing needs `add_special_tokens=False`), and whether the processor copes with
  sanitized text (Idefics3's / SmolVLM's does not: for it, control tokens in user text stay
  control tokens, as in plain transformers, and text containing the image placeholder is refused
  with `InvalidRequest` rather than crashing the processor).
- **Generation** runs in one worker thread per engine (a single-worker executor: one generation at
  a time, in arrival order); the async side awaits a queue the worker feeds. The streaming, stop
  strings, penalties and sampling around `model.generate` are `oculo.engines.hf_generation`'s.
- **Sampling.** `temperature == 0` is greedy; otherwise the engine samples itself, from a seeded
  generator of its own, and the checkpoint's own sampling defaults (`top_k` etc.) are not applied:
  a request's `temperature` and `top_p` define the distribution.
- **Cancellation.** Closing the async iterator (client gone, task cancelled) sets an event that a
  `StoppingCriteria` checks after every token, so the worker stops within one decoding step.
- **Counts.** The final `Delta` has `prompt_tokens` (the input length the model ran on, image
  positions included), `image_positions` (input ids equal to the config's image token id) and
  `completion_tokens` (tokens the model produced, an end-of-sequence token included, nothing
  after a stop string).

`count_text_tokens(messages)` is what the API bills as text: the tokens of the conversation rendered
by the same template and tokenized by the same tokenizer, **with the image parts removed** (so it
does not change with the number or size of images, which are billed by their own rule). It runs
on the event loop without touching the model, on its own copy of the tokenizer (the worker's copy
may be busy), and caches recent answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
)

from oculo.engines.base import Delta, EngineInfo, FinishReason, GenerationRequest, Message
from oculo.engines.hf_chat import HFMessage, first_rendering, to_hf_messages
from oculo.engines.hf_generation import DeltaStreamer, Halt, Job, OpenAIPenalties, Sampler
from oculo.engines.vector_maths import settle_vector_maths
from oculo.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
    OculoError,
)

__all__ = ["TransformersEngine"]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_COUNT_CACHE_SIZE = 1024
_COUNT_CACHE_MAX_CHARS = 8192  # longer conversations are counted every time
_FALLBACK_CONTEXT = 4096


class TransformersEngine:
    """A local Hugging Face image-text-to-text model behind the `Engine` protocol.

    Args:
        path: a checkpoint folder (loaded with `local_files_only`) or a hub id.
        model_id: the public id in `info`; defaults to the folder's name.
        device: where the model runs (`"cpu"`, `"cuda"`, `"cuda:1"`, `"mps"`).
        dtype: `"auto"` (the checkpoint's own), `"float32"`, `"bfloat16"` or `"float16"`.
        max_new_tokens_default: the answer's length limit when a request sets no `max_tokens`.
        context_length: prompt plus answer limit; defaults to the text model's
            `max_position_embeddings`.

    Loading is synchronous and can take a while for a real model: from async code, construct it
    in a worker thread (`asyncio.to_thread`), as the model registry does.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model_id: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_new_tokens_default: int = 512,
        context_length: int | None = None,
    ) -> None:
        if max_new_tokens_default < 1:
            raise ValueError("max_new_tokens_default must be at least 1")
        started = time.perf_counter()
        settle_vector_maths()  # before any model runs: its first call on one thread
        local = Path(path).is_dir()
        source = str(path)
        # transformers is untyped at these calls: the processor and model are handled as Any.
        auto_processor: Any = AutoProcessor
        auto_model: Any = AutoModelForImageTextToText
        try:
            processor = auto_processor.from_pretrained(source, local_files_only=local)
            model = auto_model.from_pretrained(
                source, local_files_only=local, dtype=_torch_dtype(dtype)
            )
            model.to(device)
        except Exception as exc:
            raise EngineError(f"Could not load the model at {source}: {exc}") from exc
        model.eval()
        self._processor: Any = processor
        self._model: Any = model
        self._device = torch.device(device)
        self._max_new_default = max_new_tokens_default
        tokenizer = processor.tokenizer
        self._chat_template = _resolve_chat_template(processor, tokenizer)
        # The event loop counts tokens on its own copy of the tokenizer: the worker thread's copy
        # changes state while it encodes (the Rust tokenizer refuses concurrent borrows).
        self._count_tokenizer: Any = copy.deepcopy(tokenizer)
        self._special_prefix, self._special_suffix = self._tokenizer_specials()
        self._sanitize = _supports_sanitizing(self._count_tokenizer, self._chat_template)
        if self._sanitize and not self._processor_sanitizes():
            self._sanitize = False
        # Without sanitizing, the image placeholder in user text would be taken for an image.
        placeholder = getattr(processor, "image_token", None)
        self._placeholder = (
            placeholder if isinstance(placeholder, str) and not self._sanitize else None
        )
        config = model.config
        self._context_length = context_length or _context_length(config, tokenizer)
        self._image_token_id = _image_token_id(config, processor)
        self._eos_ids = _eos_ids(model.generation_config, tokenizer)
        self._pad_id = _pad_id(model.generation_config, tokenizer, self._eos_ids)
        architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        parameters = sum(p.numel() for p in model.parameters())
        name = model_id or (Path(source).name if local else source)
        self._info = EngineInfo(
            id=name,
            engine="transformers",
            context_length=self._context_length,
            created=int(time.time()),
            description=f"{architecture} loaded from {source}",
            extra={
                "architecture": architecture,
                "model_type": getattr(config, "model_type", None),
                "parameters": parameters,
                "dtype": str(model.dtype).removeprefix("torch."),
                "device": str(self._device),
            },
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"oculo-{name}")
        self._pending = 0  # requests submitted to the worker and not finished yet
        self._pending_lock = threading.Lock()
        self._live: set[Job] = set()
        self._closed = False
        self._count_cache: OrderedDict[tuple[Message, ...], int] = OrderedDict()
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s (%s, %d parameters) in %.2f s",
            name,
            architecture,
            parameters,
            self.load_seconds,
        )

    # -- the Engine protocol -------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def busy(self) -> bool:
        """Whether a generation is running or waiting for the worker.

        It turns false before the last `Delta` (or error) of the last request is delivered, and
        promptly after a consumer leaves.
        """
        return self._pending > 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the answer to `request`; closing the iterator stops the generation.

        Raises `ContextLengthExceeded` (before generating) when the prompt fills the context,
        `InvalidRequest` when the chat template refuses the conversation, and `EngineError` when
        the model fails.
        """
        if self._closed:
            raise EngineUnavailable(f"The model {self._info.id} has been unloaded.")
        self._refuse_placeholders(request.messages)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = Job(request=request, emit=emit)
        with self._pending_lock:
            self._pending += 1
        try:
            self._executor.submit(self._run, job)
        except RuntimeError:  # the executor was shut down by close()
            with self._pending_lock:
                self._pending -= 1
            raise EngineUnavailable(f"The model {self._info.id} has been unloaded.") from None
        self._live.add(job)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancel.set()
            self._live.discard(job)

    def count_text_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the rendered prompt (generation prompt included), image parts left out.

        The conversation is rendered by the model's chat template without its image parts and
        tokenized by the model's tokenizer (plus the special tokens the tokenizer itself adds,
        such as LLaVA's `<s>`), so the count does not depend on how many images there are.
        Raises `InvalidRequest` when the chat template refuses the conversation.
        """
        key = tuple(messages)
        cached = self._count_cache.get(key)
        if cached is not None:
            self._count_cache.move_to_end(key)
            return cached
        self._refuse_placeholders(key)
        conversation = to_hf_messages(key, images=None)
        ids = first_rendering(conversation, self._count_ids)
        count = len(ids) + len(self._special_prefix) + len(self._special_suffix)
        if sum(len(m.text) for m in key) <= _COUNT_CACHE_MAX_CHARS:  # bounds the cache's memory
            self._count_cache[key] = count
            if len(self._count_cache) > _COUNT_CACHE_SIZE:
                self._count_cache.popitem(last=False)
        return count

    def _refuse_placeholders(self, messages: Sequence[Message]) -> None:
        """Refuse text holding the image placeholder when the processor would take it for one."""
        placeholder = self._placeholder
        if placeholder and any(placeholder in m.text for m in messages):
            raise InvalidRequest(
                f"The message text contains {placeholder!r}, which this model reserves for "
                "images. Remove it from the text.",
                param="messages",
            )

    async def close(self) -> None:
        """Stop what runs, refuse new requests, and free the model's memory.

        Requests still streaming or waiting end with `EngineUnavailable`.
        """
        if self._closed:
            return
        self._closed = True
        for job in list(self._live):
            job.send(EngineUnavailable(f"The model {self._info.id} was unloaded."))
            job.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        with self._pending_lock:
            self._pending = 0  # cancelled jobs never ran
        self._model = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the worker ----------------------------------------------------------------------------

    def _run(self, job: Job) -> None:
        """Generate one answer; runs in the worker thread and reports through `job.send`."""
        outcome: Delta | BaseException | None = None
        try:
            if not job.cancel.is_set() and self._model is not None:
                outcome = self._generate(job)
        except OculoError as exc:
            outcome = exc
        except Exception as exc:
            logger.exception("generation failed for request %r", job.request.request_id)
            outcome = EngineError(f"The model failed while generating: {type(exc).__name__}.")
            outcome.__cause__ = exc
        finally:
            with self._pending_lock:
                self._pending -= 1
        if outcome is not None:
            job.send(outcome)

    def _generate(self, job: Job) -> Delta | None:
        """The streamed answer's last `Delta`, or None if the consumer left."""
        request, sampling = job.request, job.request.sampling
        inputs = self._encode(request)
        input_ids = inputs["input_ids"]
        prompt_tokens = int(input_ids.shape[1])
        image_positions = (
            int((input_ids == self._image_token_id).sum())
            if self._image_token_id is not None
            else 0
        )
        available = self._context_length - prompt_tokens
        if available < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self._context_length} tokens, but the "
                f"prompt uses {prompt_tokens} tokens ({image_positions} of them for images). "
                "Shorten the messages or send fewer or smaller images.",
                param="messages",
            )
        if sampling.max_tokens is not None and sampling.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1.", param="max_tokens")
        max_new = min(sampling.max_tokens or self._max_new_default, available)

        streamer = DeltaStreamer(self._processor.tokenizer, sampling.stop, job)
        halt = Halt(job.cancel, streamer)
        processors = LogitsProcessorList()
        if sampling.ignore_eos and self._eos_ids:
            processors.append(
                SuppressTokensLogitsProcessor(sorted(self._eos_ids), str(self._device))
            )
        if sampling.presence_penalty or sampling.frequency_penalty:
            processors.append(
                OpenAIPenalties(
                    prompt_tokens, sampling.presence_penalty, sampling.frequency_penalty
                )
            )
        if sampling.temperature > 0:
            processors.append(Sampler(sampling, self._device))
        inputs = inputs.to(self._device, dtype=self._model.dtype)
        with torch.inference_mode():
            self._model.generate(
                **inputs,
                generation_config=self._generation_config(max_new),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([halt]),
                streamer=streamer,
            )
        if job.cancel.is_set():
            return None  # nobody is listening
        if streamer.stop_hit or (streamer.ids and streamer.ids[-1] in self._eos_ids):
            finish: FinishReason = "stop"
        else:
            finish = "length" if len(streamer.ids) >= max_new else "stop"
        return Delta(
            text=streamer.finish(),
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            image_positions=image_positions,
            completion_tokens=len(streamer.ids),
        )

    def _encode(self, request: GenerationRequest) -> Any:
        """The model's inputs (a `BatchFeature` of tensors) for the request's conversation."""
        conversation = to_hf_messages(request.messages, images=request.images)
        return first_rendering(conversation, self._processor_inputs)

    def _processor_inputs(self, conversation: list[HFMessage]) -> Any:
        wrap = bool(self._special_prefix or self._special_suffix)
        inputs = self._processor.apply_chat_template(
            conversation,
            chat_template=self._chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=self._sanitize,
            processor_kwargs={"add_special_tokens": False} if wrap else {},
        )
        if wrap:
            _add_special_tokens(inputs, self._special_prefix, self._special_suffix)
        return inputs

    def _processor_sanitizes(self) -> bool:
        """Whether the processor copes with `sanitize_control_tokens` (Idefics3's does not), user
        text holding the image placeholder included.

        Without it, control tokens in user text are read as control tokens, as in plain
        transformers, and text holding the image placeholder is refused (`_refuse_placeholders`).
        """
        controls = (self._count_tokenizer.eos_token, getattr(self._processor, "image_token", None))
        text = " ".join(["Hi", *(t for t in controls if isinstance(t, str))])
        probe = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.new("RGB", (32, 32))},
                    {"type": "text", "text": text},
                ],
            }
        ]
        try:
            first_rendering(probe, self._processor_inputs)
        except Exception as exc:
            logger.info("control tokens in user text stay control tokens for this model: %s", exc)
            return False
        return True

    def _generation_config(self, max_new_tokens: int) -> Any:
        """The checkpoint's generation settings, with sampling left to the engine's processors."""
        config = copy.deepcopy(self._model.generation_config)
        config.update(
            max_new_tokens=max_new_tokens,
            min_new_tokens=None,
            do_sample=False,
            num_beams=1,
            num_return_sequences=1,
            temperature=None,
            top_p=None,
            top_k=None,
            min_p=None,
            typical_p=None,
            repetition_penalty=None,
            stop_strings=None,
            use_cache=True,
            return_dict_in_generate=False,
            output_scores=False,
            output_logits=False,
            eos_token_id=sorted(self._eos_ids),
            pad_token_id=self._pad_id,
        )
        return config

    # -- counting --------------------------------------------------------------------------------

    def _count_ids(self, conversation: list[HFMessage]) -> list[int]:
        ids = self._count_tokenizer.apply_chat_template(
            conversation,
            chat_template=self._chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=self._sanitize,
        )
        return list(ids)

    def _tokenizer_specials(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer adds around a text that the chat template does not write.

        Llama's tokenizer (LLaVA) adds `<s>` itself and its template does not write it, so the
        engine adds it; Gemma's and SmolVLM's templates write their own `<bos>` / `<|im_start|>`.
        """
        tokenizer = self._count_tokenizer
        probe = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        try:
            rendered = tokenizer.apply_chat_template(
                probe, chat_template=self._chat_template, add_generation_prompt=True, tokenize=False
            )
        except TemplateError:
            return [], []
        bos = tokenizer.bos_token
        if isinstance(bos, str) and bos and str(rendered).startswith(bos):
            return [], []
        plain = list(tokenizer("a b", add_special_tokens=False)["input_ids"])
        full = list(tokenizer("a b", add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []


# -- prompt helpers ------------------------------------------------------------------------------


def _add_special_tokens(inputs: Any, prefix: list[int], suffix: list[int]) -> None:
    """Put the tokenizer's own special tokens around every per-position tensor of `inputs`."""
    shape = tuple(inputs["input_ids"].shape)
    for key, value in list(inputs.items()):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            continue
        if key == "input_ids":
            before, after = prefix, suffix
        else:
            fill = 1 if key == "attention_mask" else 0
            before, after = [fill] * len(prefix), [fill] * len(suffix)
        rows = value.shape[0]
        head = torch.tensor(before, dtype=value.dtype).expand(rows, -1)
        tail = torch.tensor(after, dtype=value.dtype).expand(rows, -1)
        inputs[key] = torch.cat([head, value, tail], dim=1)


# -- loading helpers -----------------------------------------------------------------------------


def _torch_dtype(dtype: str) -> str | torch.dtype:
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16"
        ) from None


def _resolve_chat_template(processor: Any, tokenizer: Any) -> str:
    for template in (getattr(processor, "chat_template", None), tokenizer.chat_template):
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str) and template:
            return template
    raise EngineError("The checkpoint has no chat template, so it cannot serve chat requests.")


def _supports_sanitizing(tokenizer: Any, chat_template: str) -> bool:
    """Whether the tokenizer can encode control tokens in user text as plain text."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    with contextlib.suppress(TemplateError):
        try:
            tokenizer.apply_chat_template(
                probe,
                chat_template=chat_template,
                add_generation_prompt=True,
                tokenize=True,
                sanitize_control_tokens=True,
            )
        except (NotImplementedError, TypeError, ValueError):
            return False
    return True


def _context_length(config: Any, tokenizer: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text_config, config):
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return _FALLBACK_CONTEXT


def _image_token_id(config: Any, processor: Any) -> int | None:
    """The id whose positions the model fills with image features."""
    for source, name in (
        (config, "image_token_id"),
        (config, "image_token_index"),
        (processor, "image_token_id"),
    ):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return None


def _eos_ids(generation_config: Any, tokenizer: Any) -> frozenset[int]:
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


def _pad_id(generation_config: Any, tokenizer: Any, eos: frozenset[int]) -> int | None:
    for value in (getattr(generation_config, "pad_token_id", None), tokenizer.pad_token_id):
        if isinstance(value, int):
            return value
    return min(eos) if eos else None
