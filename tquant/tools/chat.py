"""Chatting with a (quantized) model: one-shot answers and an interactive multi-turn loop that streams its replies.

    print(answer(model, tok, "What is the capital of France?"))        # greedy, one user message
    chat_loop(model, tok, sys.stdin, sys.stdout, system="Be brief.")   # /reset clears the history, /exit ends

Prompts go through the tokenizer's chat template; a tokenizer without one gets a plain "role: text" transcript.
temperature 0 is greedy decoding; above 0 samples (with top_p nucleus sampling). A reply is a str whose .cut says
whether it stopped at max_new_tokens rather than at the end of its answer; chat_loop then says so (cut_note).
Greedy replies decode with tquant.StaticDecoder (static cache, fused steps, CUDA graphs) on CUDA where the model
allows it (dense Llama-style models, Mixtral, Qwen3-MoE), else with transformers' generate; static=True asks for the
static decoder anywhere (on the CPU: its eager torch step), static=False for transformers'.
"""
from __future__ import annotations

import torch
from transformers import TextStreamer

HELP = "commands: /reset (forget the conversation), /exit (or end of input)"


class Reply(str):
    """A reply's text; .cut: it stopped at max_new_tokens, not at an end-of-sequence token."""

    cut: bool = False


def cut_note(max_new_tokens: int) -> str:
    return f"[answer cut at {max_new_tokens} new tokens: --max-new-tokens N for longer]"


def _stop_ids(model, tok) -> set[int]:
    """The token ids that end generation: the generation config's end-of-sequence id(s) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _start(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def prompt_ids(tok, messages: list[dict]) -> torch.Tensor:
    """Token ids [1, t] of the conversation so far, ending where the assistant's reply begins."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True)["input_ids"]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tok(text, return_tensors="pt").input_ids


def _sampling(temperature: float, top_p: float, static: bool | None = None) -> dict:
    """generate()'s sampling keywords; ValueError for a bad option, or sampling asked of the static decoder."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 (0: greedy) and top_p in (0, 1]; got {temperature}, {top_p}")
    if static and temperature > 0:
        raise ValueError(f"the static decoder decodes greedily: temperature=0, or transformers' generate to sample "
                         f"(got temperature={temperature})")
    return {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature, "top_p": top_p}


def _static_greedy(dec, ids: torch.Tensor, max_new_tokens: int, stop: set[int], streamer) -> torch.Tensor:
    """Greedy tokens [n] after the prompt ids [1, t] from a StaticDecoder, up to and including the first stop id,
    at most max_new_tokens; streamed as transformers' generate streams (the prompt, then each token, then end)."""
    if streamer is not None:
        streamer.put(ids.cpu())
    new, nxt = [], dec.prefill(ids).argmax(-1)
    while True:
        new.append(nxt)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if len(new) == max_new_tokens or int(nxt) in stop:
            break
        nxt = dec.step(nxt).argmax(-1)
    if streamer is not None:
        streamer.end()
    return torch.cat(new)


def reply(model, tok, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
          top_p: float = 1.0, streamer=None, static: bool | None = None) -> Reply:
    """The assistant's next message after messages ([{"role", "content"}, ...]); tokens go to streamer as they
    are generated; .cut is True when it stopped at max_new_tokens. static: decode with tquant.StaticDecoder (module
    docstring; None: on CUDA where the model allows it and the reply is greedy). ValueError when the conversation
    and max_new_tokens exceed the model's context, or static=True meets sampling or a model the decoder refuses."""
    from .speed import static_decoder

    sampling = _sampling(temperature, top_p, static)
    ids = prompt_ids(tok, messages)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and ids.shape[1] + max_new_tokens > context:
        raise ValueError(f"the conversation ({ids.shape[1]} tokens) and max_new_tokens={max_new_tokens} exceed the "
                         f"model's context of {context} tokens: /reset to start over, or lower --max-new-tokens")
    ids = ids.to(next(model.parameters()).device)
    stop = _stop_ids(model, tok)
    dec, _ = static_decoder(model, 1, ids.shape[1] + max_new_tokens, False if sampling["do_sample"] else static)
    if dec is not None:
        new = _static_greedy(dec, ids, max_new_tokens, stop, streamer)
    else:
        pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, streamer=streamer, **sampling)
        new = out[0, ids.shape[1]:]
    said = Reply(tok.decode(new, skip_special_tokens=True).strip())
    said.cut = len(new) >= max_new_tokens > 0 and int(new[-1]) not in stop
    return said


def answer(model, tok, prompt: str, max_new_tokens: int = 48, *, system: str | None = None, **sampling) -> Reply:
    """The reply to one user message (greedy unless temperature= is given; .cut: it stopped at max_new_tokens)."""
    return reply(model, tok, _start(system) + [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                 **sampling)


class StreamTo(TextStreamer):
    """A TextStreamer that writes the reply's text to a stream (flushed as it comes), not to stdout, token by token:
    transformers' own put() holds text back to the last space (a long word appears only once it ends), here only
    an incomplete UTF-8 sequence waits for its next bytes."""

    def __init__(self, tok, stream):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def put(self, value) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if not text.endswith("\ufffd"):
            self.on_finalized_text(text[self.print_len:])
            self.print_len = len(text)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def chat_loop(model, tok, stdin, stdout, *, system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.0, top_p: float = 1.0, static: bool | None = None,
              prompt: str = "> ") -> list[dict]:
    """Read user lines from stdin and stream each reply to stdout, the history kept across turns, until /exit
    or the end of input; returns the conversation (messages). A reply cut at max_new_tokens is followed by a
    line saying so. static: the decoder of each reply (reply's)."""
    _sampling(temperature, top_p, static)  # a bad option fails before the first turn
    messages = _start(system)
    stdout.write(HELP + "\n")
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        text = line.strip()
        if not line or text == "/exit":
            return messages
        if text == "/reset":
            messages = _start(system)
            stdout.write("(conversation cleared)\n")
        elif text.startswith("/"):
            stdout.write(f"unknown command {text!r}; {HELP}\n")
        elif text:
            messages.append({"role": "user", "content": text})
            try:
                said = reply(model, tok, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, static=static, streamer=StreamTo(tok, stdout))
            except ValueError as err:
                messages.pop()
                stdout.write(f"({err})\n")
            else:
                messages.append({"role": "assistant", "content": str(said)})
                if said.cut:
                    stdout.write(cut_note(max_new_tokens) + "\n")
