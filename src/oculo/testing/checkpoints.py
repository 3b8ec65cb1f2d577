"""Tiny random-weight checkpoints of real vision-language architectures, built offline.

`build_checkpoint(arch, folder)` writes a folder that `AutoProcessor.from_pretrained(folder)` and
`AutoModelForImageTextToText.from_pretrained(folder)` load unchanged, with nothing downloaded:

- a byte-level BPE tokenizer trained with the `tokenizers` library on a small built-in corpus
  (a few hundred entries; every byte is in the alphabet, so any text, unicode included, encodes),
  carrying the architecture's special tokens, wrapped in `PreTrainedTokenizerFast`;
- the architecture's real processor class with its Pillow image processor (no torchvision needed)
  and a chat template in the style of the real checkpoint's: SmolVLM's for `idefics3`, Gemma 3's
  for `gemma3`, a LLaVA-1.5 (Vicuna) style one for `llava`;
- a model of the real architecture at toy size (hidden size 64, 2 text and 2 vision layers, a 64 px
  image input), its weights drawn after seeding torch, and a `generation_config.json` whose
  eos / pad / bos ids make generation stop the way the real checkpoint's does.

The weights are random, so the text a model writes is gibberish, but every code path a real
checkpoint takes (chat template, image expansion, vision tower, projector, generation) is taken.
Building one takes well under a second and is deterministic for a given seed.

torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

Architecture = Literal["idefics3", "gemma3", "llava"]
ARCHITECTURES: tuple[Architecture, ...] = get_args(Architecture)

IMAGE_SIZE = 64  # pixels per side of the vision tower's input
PATCH_SIZE = 8  # -> 8 x 8 = 64 patches per image
HIDDEN_SIZE = 64
LAYERS = 2
HEADS = 4
CONTEXT_LENGTH = 2048
BPE_VOCAB_SIZE = 400  # the 256 byte symbols and the merges; special tokens come on top

# SmolVLM-256M-Instruct's template, verbatim: capitalised roles ("System:", "User:", "Assistant:"),
# no space after the colon when a turn opens with an image, "<end_of_utterance>" after each turn.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Gemma 3's template (google/gemma-3-*-it), verbatim: a system message becomes a prefix of the
# first user turn, roles must alternate, the assistant is "model", images are "<start_of_image>".
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# LLaVA-1.5 (Vicuna) style: "SYSTEM TEXT USER: <image>\nquestion ASSISTANT: answer</s>". Unlike
# llava-hf's template, which moves every image before the text, parts are rendered in order.
# The tokenizer adds the "<s>" itself (as Llama's does), so the template does not write it.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{{ ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Text the tokenizer learns its merges from: some plain English about pictures, the words the chat
# templates write, digits and punctuation, and a little non-Latin text.
CORPUS = """\
User: What is in this image? Assistant: A red circle on a white background.
USER: Describe the picture in one sentence. ASSISTANT: Two blue squares and a green triangle.
System: You are a helpful assistant that describes images accurately and briefly.
model: The photo shows a small dog sitting on a wooden floor next to a window.
The image contains a cat, a chair, a table and a lamp. The colours are red, green, blue,
yellow, orange, purple, black, white and grey. There is one circle, two squares, three
triangles and four lines. Count the objects: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024.
Answer with JSON: {"objects": ["circle", "square"], "count": 2, "ok": true}.
Is the invoice total above $500? No, the total is $123.45 (tax included).
Read the text in the picture: "Hello, world!" - it says hello to the world.
A photograph of a street at night, with cars, lights, people and a tall building.
Le chat est sur la table. Das Bild zeigt einen Hund. El perro es marrón. Café, naïve, façade.
写真には猫が写っています。图片里有一只狗。Привет, мир! 안녕하세요. 🙂 👍 ✓ → ©
"""


@dataclass(frozen=True)
class Size:
    """How big a model is: the tiny test size by default; training picks bigger ones."""

    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    hidden: int = HIDDEN_SIZE
    layers: int = LAYERS
    heads: int = HEADS
    vision_hidden: int = HIDDEN_SIZE
    vision_layers: int = LAYERS
    vision_heads: int = HEADS
    scale_factor: int = 2  # Idefics3's pixel shuffle: image tokens = patches / scale_factor^2
    context_length: int = CONTEXT_LENGTH
    text_mlp: int = 0  # the language model's MLP width; 0: twice `hidden`


TINY = Size()


@dataclass(frozen=True)
class _TokenizerSpec:
    """The special tokens of one architecture's tokenizer."""

    bos: str
    eos: str
    pad: str
    unk: str | None
    extra: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)  # extra_special_tokens by name
    add_bos: bool = False  # whether encoding adds bos by itself (as Llama's tokenizer does)


_IDEFICS3_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))

_SPECS: dict[Architecture, _TokenizerSpec] = {
    "idefics3": _TokenizerSpec(
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        extra=("<fake_token_around_image>", "<image>", "<global-img>", *_IDEFICS3_ROW_COL),
    ),
    "gemma3": _TokenizerSpec(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        extra=(
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ),
        named={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    ),
    "llava": _TokenizerSpec(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        extra=("<image>",),
        named={"image_token": "<image>"},
        add_bos=True,
    ),
}


def build_checkpoint(arch: Architecture, folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of architecture `arch` into `folder` and return it.

    The folder (created if missing) then holds `config.json`, `generation_config.json`,
    `model.safetensors`, the tokenizer files, `processor_config.json` / `preprocessor_config.json`
    and the chat template. The same `arch` and `seed` always give the same files' contents.
    """
    if arch not in _SPECS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(_SPECS[arch])
    builders = {"idefics3": idefics3_parts, "gemma3": _gemma3, "llava": _llava}
    config, processor = builders[arch](tokenizer)

    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.utils import logging as hf_logging

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = AutoModelForImageTextToText.from_config(config)  # type: ignore[no-untyped-call]
    model.eval()
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=_eos_ids(arch, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    _write_model_card(folder, arch, seed)
    return folder


def build_tokenizer(
    arch: Architecture,
    corpus: str = CORPUS,
    *,
    vocab_size: int = BPE_VOCAB_SIZE,
    isolate: str | None = None,
    context_length: int = CONTEXT_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it with the architecture's special tokens.

    `isolate`, a regex, names characters that always stay tokens of their own (never merged),
    e.g. `[A-Z0-9]` so that a model spells printed words letter by letter.
    """
    return _build_tokenizer(_SPECS[arch], corpus, vocab_size, isolate, context_length)


def _build_tokenizer(
    spec: _TokenizerSpec,
    corpus: str = CORPUS,
    vocab_size: int = BPE_VOCAB_SIZE,
    isolate: str | None = None,
    context_length: int = CONTEXT_LENGTH,
) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (spec.pad, spec.eos, spec.bos, spec.unk) if t is not None]
    specials += [t for t in spec.extra if t not in specials]
    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if isolate is None:
        bpe.pre_tokenizer = byte_level
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(isolate), behavior="isolated"), byte_level]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    bos_id = bpe.token_to_id(spec.bos)
    if spec.add_bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    else:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs: dict[str, Any] = {}
    if spec.named:
        kwargs["extra_special_tokens"] = dict(spec.named)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        clean_up_tokenization_spaces=False,
        model_max_length=context_length,
        **kwargs,
    )
    extra = [t for t in spec.extra if t not in spec.named.values()]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def _eos_ids(arch: Architecture, tokenizer: PreTrainedTokenizerFast) -> int | list[int]:
    """The ids that end an answer: Gemma 3 stops on `<end_of_turn>` as well as `<eos>`."""
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int)
    if arch == "gemma3":
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        assert isinstance(end_of_turn, int)
        return [eos, end_of_turn]
    return eos


def _text_config(tokenizer: PreTrainedTokenizerFast, size: Size = TINY) -> dict[str, Any]:
    """The language model's size, shared by the three architectures."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": size.hidden,
        "intermediate_size": size.text_mlp or 2 * size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": max(1, size.heads // 2),
        "max_position_embeddings": size.context_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def _vision_config(size: Size = TINY) -> dict[str, Any]:
    return {
        "hidden_size": size.vision_hidden,
        "intermediate_size": 2 * size.vision_hidden,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
    }


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"token {token!r} is missing from the tokenizer")
    return token_id


def idefics3_parts(tokenizer: PreTrainedTokenizerFast, size: Size = TINY) -> tuple[Any, Any]:
    """SmolVLM / Idefics3 (config, processor): SigLIP-style tower, pixel-shuffle connector, Llama
    text model, SmolVLM's chat template; one image of `size.image_size` px, no splitting."""
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    scale_factor = size.scale_factor
    image_seq_len = (size.image_size // size.patch_size) ** 2 // scale_factor**2
    config = Idefics3Config(
        vision_config=_vision_config(size),
        text_config={"model_type": "llama", **_text_config(tokenizer, size)},
        scale_factor=scale_factor,
        image_token_id=_token_id(tokenizer, "<image>"),
        tie_word_embeddings=False,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": size.image_size},
        max_image_size={"longest_edge": size.image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    return config, processor


def _gemma3(tokenizer: PreTrainedTokenizerFast) -> tuple[Any, Any]:
    """Gemma 3: SigLIP tower, average-pooled projector, Gemma 3 text model."""
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    mm_tokens_per_image = 16  # 8 x 8 patches pooled 2 x 2 -> 4 x 4
    text = _text_config(tokenizer)
    text.update(
        head_dim=HIDDEN_SIZE // HEADS,
        query_pre_attn_scalar=HIDDEN_SIZE // HEADS,
        sliding_window=64,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config={
            "model_type": "siglip_vision_model",
            "vision_use_head": False,
            **_vision_config(),
        },
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=_token_id(tokenizer, "<start_of_image>"),
        eoi_token_index=_token_id(tokenizer, "<end_of_image>"),
        image_token_index=_token_id(tokenizer, "<image_soft_token>"),
        tie_word_embeddings=False,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_pan_and_scan=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=mm_tokens_per_image,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return config, processor


def _llava(tokenizer: PreTrainedTokenizerFast) -> tuple[Any, Any]:
    """LLaVA-1.5: CLIP tower (CLS dropped), two-layer MLP projector, Llama text model."""
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_vision_config()},
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_index=_token_id(tokenizer, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return config, processor


def _write_model_card(folder: Path, arch: Architecture, seed: int) -> None:
    card = (
        f"# tiny {arch} (random weights)\n\n"
        f"Built offline by `oculo.testing.build_checkpoint({arch!r}, seed={seed})` for tests\n"
        "and benchmarks: the real architecture at toy size, untrained: its answers are noise.\n\n"
        f"```json\n{json.dumps(_summary(arch), indent=2)}\n```\n"
    )
    (folder / "README.md").write_text(card, encoding="utf-8")


def _summary(arch: Architecture) -> dict[str, Any]:
    return {
        "architecture": arch,
        "hidden_size": HIDDEN_SIZE,
        "layers": LAYERS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "context_length": CONTEXT_LENGTH,
    }
