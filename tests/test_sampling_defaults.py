"""A model's catalog entry may set the sampling a request gets when it sets none."""

from __future__ import annotations

import json

from oculo.config import ModelSpec
from oculo.models import default_model_spec
from oculo.policy import Limits, SamplingDefaults, build_prompt
from oculo.protocol import parse_chat_request


def request(**fields: object) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}
    return json.dumps(body).encode()


def test_a_request_without_sampling_gets_openais_defaults() -> None:
    sampling = build_prompt(parse_chat_request(request()), Limits()).sampling
    assert (sampling.temperature, sampling.top_p) == (1.0, 1.0)


def test_the_models_defaults_apply_only_where_the_request_is_silent() -> None:
    defaults = SamplingDefaults(temperature=0.0, top_p=0.5)
    silent = build_prompt(parse_chat_request(request()), Limits(), defaults).sampling
    assert (silent.temperature, silent.top_p) == (0.0, 0.5)
    explicit = parse_chat_request(request(temperature=0.8, top_p=1.0))
    sampling = build_prompt(explicit, Limits(), defaults).sampling
    assert (sampling.temperature, sampling.top_p) == (0.8, 1.0)


def test_the_catalog_says_it_and_oculo_tiny_answers_greedily() -> None:
    spec = ModelSpec(id="x", path="/m", temperature=0.7, top_p=0.9)
    assert (spec.temperature, spec.top_p) == (0.7, 0.9)
    assert ModelSpec(id="x", path="/m").temperature is None
    assert default_model_spec().temperature == 0.0
