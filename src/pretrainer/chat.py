"""Chat templates: how a conversation becomes one token sequence for a decoder, the same way in
pretrainer (instruction tuning, ``pretrainer chat``, ``generate --chat``) and in Hugging Face
``transformers`` (``tokenizer.apply_chat_template``).

A conversation is a list of turns ``{"role": "system" | "user" | "assistant", "content": text}``.
The template is a Jinja string stored with the tokenizer (``chat_template`` in its
``tokenizer_config.json``, which :func:`pretrainer.tokenization.save_tokenizer` writes and an
exported model carries), rendered here with the settings ``transformers`` uses (a sandboxed
environment, ``trim_blocks``, ``lstrip_blocks``, the special tokens by name: ``bos_token``,
``eos_token`` ...), and the rendered text is encoded with no special tokens added, as
``apply_chat_template`` does. A tokenizer without a template gets :func:`default_chat_template`::

    <eos>System text

    User: question

    Assistant: answer<eos>User: next question

    Assistant:

It starts as every decoder prompt of pretrainer starts (:func:`pretrainer.eval.scoring.prefix_ids`:
the end-of-text separator the model saw between documents, or the beginning-of-text token of a
tokenizer that starts every text with one, Llama's ``<s>``), and each answer ends with the
end-of-text token, so generation stops there. No token is added to the vocabulary.

:func:`encode_conversation` also says which tokens belong to the assistant's answers (the loss of
instruction tuning is taken on those only): an answer is the text that rendering the conversation
up to that answer adds to rendering it up to the question with the generation prompt
(``add_generation_prompt``), so any template that renders a conversation as the beginning of its
continuation works, the ones of imported models included.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Callable, Iterable

from .errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


def default_chat_template(tok) -> str:
    """The template for ``tok`` when its files carry none (see the module doc)."""
    from .eval.scoring import prefix_ids

    start = prefix_ids(tok)
    head = ""
    if start:  # the token by role name, as transformers passes it: eos_token, or Llama's bos_token
        role = "eos" if start == [tok.role_id("eos")] else "bos"
        head = "{{ %s_token }}" % role
    return (head
            + "{% for message in messages %}"
            + "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
            + "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
            + "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
            + "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
            + "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; expected system, user "
              "or assistant') }}"
            + "{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def chat_template(tok) -> str:
    """The tokenizer's own template (``chat_template`` of its ``tokenizer_config.json``; of a list
    of named templates, the one named ``default``), else :func:`default_chat_template`."""
    own = tok.config.get("chat_template")
    if isinstance(own, list):
        own = next((t.get("template") for t in own if isinstance(t, dict) and t.get("name") == "default"), None)
    return own if isinstance(own, str) and own else default_chat_template(tok)


def set_chat_template(tok, template: str) -> None:
    """Store ``template`` with ``tok``: it is written into ``tokenizer_config.json`` when the
    tokenizer is saved, and an exported model carries it."""
    tok.config["chat_template"] = template


class _TemplateError(Exception):
    pass


def _raise(message):
    raise _TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as transformers' filter (Jinja's own escapes HTML characters)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %} ... {% endgeneration %}`` (transformers' marker of the assistant's
        text in some templates) renders its body; answers are found by rendering instead."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template: not valid Jinja ({e.message}, line {e.lineno})") from None


def render_chat(template: str, messages: list[dict], tok, add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` under ``template`` (the special tokens of ``tok`` by name, as
    ``transformers`` passes them); a :class:`DataError` for what the template refuses."""
    import jinja2

    from .tokenization import special_tokens_map

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **special_tokens_map(tok))
    except _TemplateError as e:
        raise DataError(f"the chat template refuses the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template failed on the conversation ({type(e).__name__}: {e})") from None


def encode_chat(tok, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """The ids of ``messages`` (by default followed by the generation prompt, so the model answers
    next): ``apply_chat_template(messages, add_generation_prompt=True)`` of the exported tokenizer."""
    text = render_chat(template or chat_template(tok), messages, tok, add_generation_prompt)
    return tok.encode(text)


def encode_conversation(tok, messages: list[dict], template: str | None = None) -> tuple[list[int], list[bool], int]:
    """``(ids, answer, start)``: the ids of the whole conversation (``apply_chat_template(messages)``),
    whether each token belongs to an assistant's answer (the template's text around it included,
    such as the end-of-text token that closes it), and the index of the first token of the last
    answer (what comes before it is the prompt the model answers; ``len(ids)`` when the
    conversation does not end with one)."""
    template = template or chat_template(tok)
    full = render_chat(template, messages, tok)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render_chat(template, messages[:i], tok, add_generation_prompt=True)
        upto = render_chat(template, messages[:i + 1], tok)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConfigError("chat template: it does not render a conversation as the beginning of its "
                              "continuation (with the generation prompt before each answer), so the "
                              "assistant's answers cannot be told from the prompt")
        spans.append((len(before), len(upto)))
    enc = tok.tok.encode(full, add_special_tokens=False)
    answer = [any(s <= start < e for s, e in spans) for start, _ in enc.offsets]
    start = len(enc.ids)
    if messages and messages[-1].get("role") == "assistant":
        s = spans[-1][0]
        start = next((t for t, (a, _) in enumerate(enc.offsets) if a >= s), len(enc.ids))
    return list(enc.ids), answer, start


# ----------------------------------------------------------------------------------------------
# Answering


def reply(model, tok, messages: list[dict], max_new_tokens: int = 200, temperature: float = 0.0,
          top_k: int | None = None, top_p: float | None = None, generator=None,
          template: str | None = None, warn: Callable[[str], None] | None = None) -> str:
    """The assistant's next answer to ``messages`` (a decoder, the tokenizer's chat template): up
    to ``max_new_tokens`` tokens, ending at end-of-text, greedy at ``temperature=0``. A conversation
    longer than the model's context loses its oldest exchanges (a system message is kept)."""
    import torch

    eos = tok.need("eos", "to end an answer")
    window = model.cfg.max_seq_len
    msgs = list(messages)
    ids = encode_chat(tok, msgs, template)
    while len(ids) + max_new_tokens > window and _drop_oldest(msgs):
        ids = encode_chat(tok, msgs, template)
        if warn is not None:
            warn(f"note: the conversation is longer than the model's {window}-token context; "
                 f"its oldest exchange is left out")
    device = next(model.parameters()).device
    y = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_id=eos, generator=generator)
    new = [i for i in y[0, len(ids):].tolist() if i != eos]
    return tok.decode(new).strip()


def _drop_oldest(msgs: list[dict]) -> bool:
    """Remove the oldest exchange (a user turn and what follows it up to the next user turn) when
    another one is left after it; a leading system message stays."""
    first = 1 if msgs and msgs[0].get("role") == "system" else 0
    users = [i for i, m in enumerate(msgs) if i >= first and m.get("role") == "user"]
    if len(users) < 2:
        return False
    del msgs[users[0]:users[1]]
    return True


def chat_loop(model, tok, lines: Iterable[str], write: Callable[[str], None], system: str | None = None,
              prompt: Callable[[], None] | None = None, warn: Callable[[str], None] | None = None,
              **generation) -> int:
    """A conversation on a stream of lines: each line is the user's next message and the answer is
    written; ``/reset`` starts over (the system message stays); blank lines are skipped. Returns
    the number of answers. ``generation``: the options of :func:`reply`."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    answers = 0
    if prompt is not None:
        prompt()
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == "/reset":
            del history[start:]
            write("(conversation reset)")
        elif text.strip():
            history.append({"role": "user", "content": text})
            answer = reply(model, tok, history, warn=warn, **generation)
            history.append({"role": "assistant", "content": answer})
            write(answer)
            answers += 1
        if prompt is not None:
            prompt()
    return answers


def stderr_prompt() -> None:
    print("> ", end="", file=sys.stderr, flush=True)
