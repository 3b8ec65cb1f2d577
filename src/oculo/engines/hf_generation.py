"""The machinery around `model.generate`: hand-off, streaming, stopping, penalties and sampling.

- **Hand-off.** A `Job` carries one request through the engine's worker thread and hands its
  `Delta`s (or its error) to the waiting async consumer; its `cancel` event is set when the consumer
  leaves.
- **Streaming.** `DeltaStreamer` decodes the generated tokens incrementally (a window of recent
  tokens, never splitting a multi-byte character) and sends the text as it comes.
- **Leading white space** is dropped: an answer starts with its first visible character.
- **Stop strings** are matched on the decoded text: the answer ends before the first stop string,
  text that might be the start of one is held back until it is known not to be.
- **Stopping.** `Halt` is checked after every token and stops generation once the consumer has left
  or a stop string has been seen, so the worker stops within one decoding step.
- **Penalties.** `OpenAIPenalties` follows OpenAI's definition exactly (not approximated with
  `repetition_penalty`): each logit is lowered by
  `frequency_penalty * count + presence_penalty * (count > 0)`, where `count` is how often that
  token was generated so far in this answer (prompt tokens do not count).
- **Sampling.** `Sampler` samples with `temperature` and `top_p` from a private `torch.Generator`
  seeded from `seed` (or from the OS when no seed is given): the same seed gives the same text,
  whatever other engines in the process do. `temperature == 0` is greedy (no `Sampler`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from oculo.engines.base import Delta, GenerationRequest, SamplingParams

__all__ = ["DeltaStreamer", "Halt", "Job", "OpenAIPenalties", "Sampler"]


@dataclass(eq=False)
class Job:
    """One request on its way through the worker."""

    request: GenerationRequest
    emit: Callable[[Delta | BaseException], None]
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Delta | BaseException) -> None:
        """Hand `item` to the waiting consumer; a consumer whose loop is gone cancels the job."""
        if self.cancel.is_set():
            return
        try:
            self.emit(item)
        except RuntimeError:  # the event loop was closed
            self.cancel.set()


class DeltaStreamer(BaseStreamer):  # type: ignore[misc]
    """Receives token ids from `generate`, decodes them incrementally, and applies stop strings.

    Decoding uses a window of recent tokens (the approach of text-generation-inference and vLLM):
    a token's text is the window's text minus the text of the window without it, and text that
    ends in an incomplete character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], job: Job) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._job = job
        self._prompt_seen = False
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._sent = 0
        self._pending = ""
        self.ids: list[int] = []
        self.stop_hit = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        if self.stop_hit or self._job.cancel.is_set():
            return
        for token in value.reshape(-1).tolist():
            self.ids.append(int(token))
            self._text += self._answer_text(self._decode_step(final=False))
            self._flush(final=False)
            if self.stop_hit:
                return

    def end(self) -> None:
        """Nothing to do: `finish` flushes, once the finish reason is known."""

    def finish(self) -> str:
        """The text still held back (it did not become a stop string); call once, at the end."""
        if not self.stop_hit:
            self._text += self._answer_text(self._decode_step(final=True))
            self._flush(final=True)
        return self._pending

    def _answer_text(self, piece: str) -> str:
        """The answer does not start with white space: chat templates that end the prompt with
        "Assistant:" (SmolVLM's, Idefics3's) leave the model to emit the space after the colon."""
        return piece if self._text else piece.lstrip()

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    def _decode_step(self, *, final: bool) -> str:
        if self._read_offset >= len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def _flush(self, *, final: bool) -> None:
        """Send what is safe to send; at a stop string, send the text before it and halt."""
        end = len(self._text)
        if self._stop:
            found = [i for i in (self._text.find(s, self._sent) for s in self._stop) if i >= 0]
            if found:
                end = min(found)
                self.stop_hit = True
            elif not final:
                end -= _held_back(self._text, self._sent, self._stop, self._hold)
        self._pending = ""
        if end > self._sent:
            piece, self._sent = self._text[self._sent : end], end
            if final or self.stop_hit:
                self._pending = piece  # rides on the final delta
            else:
                self._job.send(Delta(text=piece))


def _held_back(text: str, start: int, stops: tuple[str, ...], longest: int) -> int:
    """Length of the longest end of `text[start:]` that begins some stop string."""
    for size in range(min(longest, len(text) - start), 0, -1):
        tail = text[len(text) - size :]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0


class Halt(StoppingCriteria):  # type: ignore[misc]
    """Stops generation once the consumer has left or a stop string has been seen."""

    def __init__(self, cancel: threading.Event, streamer: DeltaStreamer) -> None:
        self._cancel = cancel
        self._streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self._cancel.is_set() or self._streamer.stop_hit
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class OpenAIPenalties(LogitsProcessor):  # type: ignore[misc]
    """OpenAI's presence and frequency penalties over the tokens generated so far."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self._prompt_length = prompt_length
        self._presence = presence
        self._frequency = frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self._prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)


class Sampler(LogitsProcessor):  # type: ignore[misc]
    """Samples the next token with temperature and nucleus (top-p) filtering, from its own
    generator, and leaves only that token possible (so `generate` runs in greedy mode)."""

    def __init__(self, sampling: SamplingParams, device: torch.device) -> None:
        self._temperature = sampling.temperature
        self._top_p = sampling.top_p
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed % 2**64)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self._temperature
        if self._top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            outside = probs.cumsum(dim=-1) - probs >= self._top_p  # mass before it is enough
            outside[:, 0] = False  # the most likely token always stays
            logits = logits.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
        probs = logits.softmax(dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self._generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter(1, chosen, 0.0)
