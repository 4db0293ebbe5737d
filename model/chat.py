"""Rendering a conversation into prompt tokens with the model's own chat template."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from model.types import ChatMessage

# Meta's Llama-3 Instruct template, used when a tokenizer ships none (e.g. a bare tokenizer.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# OpenAI's newer "developer" role means what "system" means to Llama-3-era templates.
ROLE_ALIASES = {"developer": "system"}

# Tokens that end an assistant turn across the chat formats Llama-family models use. Models often
# declare only <|end_of_text|> as EOS while their template ends turns with <|eot_id|>.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>")


def render_prompt(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of the conversation followed by the assistant's generation header.

    Text in a message that spells a control token (`<|eot_id|>`, `<|start_header_id|>`, ...) is
    encoded as plain text; only the tokens the template itself writes are control tokens, so a
    user cannot forge turns. transformers does this with `sanitize_control_tokens`.
    """
    conversation = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.content} for m in messages]
    template = None if tokenizer.chat_template else LLAMA3_CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template(
        conversation,
        chat_template=template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    return [int(i) for i in ids]


def end_of_turn_ids(tokenizer: Any, declared: Iterable[int]) -> frozenset[int]:
    """Every token id that ends the assistant's turn: those the model declares as EOS, the
    tokenizer's EOS, and every end-of-turn token its vocabulary has."""
    ids = {int(i) for i in declared}
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)
