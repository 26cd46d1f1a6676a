"""Prompts in chat format: whether ``eval --chat-template auto|on|off|FILE`` renders them through
a chat template, which one, and the rendering (system message, one user turn, the assistant's
generation prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError


def chat_wrapper(tokenizer: Any):
    """Render (description, prompt) as a chat: description as system message (if any), the
    prompt as one user message, followed by the assistant generation prompt."""

    def wrap(system: str, user: str) -> str:
        messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return wrap


def read_chat_template_file(mode: str) -> str | None:
    """The Jinja text when ``mode`` names a template file, None for auto/on/off.

    A file lets every model be scored in one format, e.g. a base model in the chat format its
    fine-tuned copies were trained on (``calibrated-lm train`` saves that template with them).
    """
    if mode in ("auto", "on", "off"):
        return None
    path = Path(mode)
    if not path.is_file():
        raise UserError(
            f"--chat-template must be auto, on, off or a Jinja template file, not {mode!r}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the chat template ({exc})") from None
    if not text.strip():
        raise UserError(f"{path}: the chat template file is empty")
    return text


def use_chat_template(mode: str, tokenizer: Any) -> bool:
    """Whether prompts are chat-rendered; a template file replaces the tokenizer's own."""
    text = read_chat_template_file(mode)
    if text is not None:
        tokenizer.chat_template = text
        return True
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise UserError("--chat-template on, but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"
