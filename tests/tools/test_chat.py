"""tquant.tools.chat on a tiny random model: history across turns, streaming, /reset, one-shot answers."""
import io

import pytest
import torch

from tquant.tools.chat import StreamTo, answer, chat_loop, cut_note, prompt_ids, reply
from tests.tiny_models import VOCAB, byte_tokenizer, tiny_model

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = byte_tokenizer()
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def model(tok):
    """Random, but it only ever says lower-case letters (which TextStreamer passes on token by token)."""
    m = tiny_model("llama")
    bias = torch.full((VOCAB,), -1e4)
    bias[tok.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))] = 0
    m.lm_head.bias = torch.nn.Parameter(bias)
    return m


class Recorder(io.StringIO):
    """An output stream that remembers each write and how many forwards the model had run by then."""

    def __init__(self):
        super().__init__()
        self.writes, self.forwards = [], 0

    def count(self, *hook_args):
        self.forwards += 1

    def write(self, text):
        self.writes.append((text, self.forwards))
        return super().write(text)


@pytest.fixture
def prompts(model, monkeypatch):
    """The decoded prompt of every generate() call."""
    seen, generate = [], model.generate

    def spy(ids, **kwargs):
        seen.append(byte_tokenizer().decode(ids[0]))
        return generate(ids, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def run(model, tok, lines, **kwargs):
    out = io.StringIO()
    kwargs = {"max_new_tokens": 6} | kwargs
    messages = chat_loop(model, tok, io.StringIO("".join(f"{line}\n" for line in lines)), out, **kwargs)
    return messages, out.getvalue()


def test_history_is_kept_across_turns(model, tok, prompts):
    messages, _ = run(model, tok, ["first question", "second one"], system="be brief")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    first_reply = messages[2]["content"]
    assert len(first_reply) == 6 and first_reply.isalpha()
    assert prompts[0] == "<|system|>be brief\n<|user|>first question\n<|assistant|>"
    assert prompts[1] == prompts[0][: -len("<|assistant|>")] + (
        f"<|assistant|>{first_reply}\n<|user|>second one\n<|assistant|>")


def test_reset_clears_the_history_but_keeps_the_system_prompt(model, tok, prompts):
    messages, out = run(model, tok, ["one", "/reset", "two", "/exit", "never read"], system="sys")
    assert "(conversation cleared)" in out
    assert "one" not in prompts[1] and prompts[1] == "<|system|>sys\n<|user|>two\n<|assistant|>"
    assert [m["content"] for m in messages[:2]] == ["sys", "two"] and len(messages) == 3 and len(prompts) == 2


def test_replies_stream_as_they_are_generated(model, tok):
    out = Recorder()
    hook = model.register_forward_hook(out.count)
    try:
        messages = chat_loop(model, tok, io.StringIO("hello\n"), out, max_new_tokens=8)
    finally:
        hook.remove()
    start = [i for i, (text, _) in enumerate(out.writes) if text == "> "]
    *pieces, note = out.writes[start[0] + 1 : start[1]]
    assert "".join(text for text, _ in pieces).strip() == messages[-1]["content"]
    assert note[0] == cut_note(8) + "\n"  # the letters-only model never ends its answer
    letters = [(text, n) for text, n in pieces if text.strip()]
    assert len(letters) >= 4  # piece by piece
    assert letters[0][1] < letters[-1][1]  # the first piece was out before the last forward ran


def test_one_shot_answer_is_the_first_greedy_turn(model, tok):
    messages, _ = run(model, tok, ["hi"])
    assert answer(model, tok, "hi", 6) == messages[-1]["content"]
    torch.manual_seed(0)
    sampled = [answer(model, tok, "hi", 12, temperature=1.5) for _ in range(3)]
    assert len(set(sampled)) > 1  # sampling draws


def test_unknown_command_and_a_too_long_conversation(model, tok, prompts):
    messages, out = run(model, tok, ["/help", "hi"], max_new_tokens=300)  # the context is 256 tokens
    assert "unknown command '/help'; commands: /reset" in out
    assert "exceed the model's context of 256 tokens: /reset to start over" in out
    assert messages == [] and prompts == []


def test_plain_transcript_without_a_chat_template(model):
    ids = prompt_ids(byte_tokenizer(), [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                        {"role": "user", "content": "ok"}])
    assert byte_tokenizer().decode(ids[0]) == "user: hi\nassistant: yo\nuser: ok\nassistant:"


def test_bad_sampling_options(model, tok):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        run(model, tok, ["hi"], temperature=-1)


def test_a_reply_cut_at_max_new_tokens_says_so(model, tok):
    """The letters-only model never ends its answer: every reply is cut, and the loop says so after it."""
    said = answer(model, tok, "hi", 6)
    assert said.cut and len(said) == 6
    messages, out = run(model, tok, ["hi"], max_new_tokens=6)
    assert out.endswith(f"{messages[-1]['content']}\n{cut_note(6)}\n> ")
    assert cut_note(6) == "[answer cut at 6 new tokens: --max-new-tokens N for longer]"
    assert type(messages[-1]["content"]) is str  # the history holds plain text


def test_a_reply_that_ends_is_not_cut(tok):
    """A model that ends at once (its only token is <eos>) gives an uncut, empty reply, and no note."""
    m = tiny_model("llama")
    bias = torch.full((VOCAB,), -1e4)
    bias[VOCAB - 1] = 0
    m.lm_head.bias = torch.nn.Parameter(bias)
    said = answer(m, tok, "hi", 6)
    assert said == "" and not said.cut
    _, out = run(m, tok, ["hi"], max_new_tokens=6)
    assert "answer cut" not in out


def test_static_decoder_replies_as_generate_does(model, tok, monkeypatch):
    """static=True (tquant.StaticDecoder, its eager step on the CPU): the greedy reply, its stream and its .cut are
    transformers' generate's, for a reply cut at max_new_tokens and one ending at an end-of-sequence token (here
    a letter the cut reply says, made the generation config's eos, as generate reads it)."""
    messages = [{"role": "user", "content": "first question"}]  # "odiiii": a cut reply with a second letter

    def both():
        said = {}
        for static in (False, True):
            stream = io.StringIO()
            text = reply(model, tok, messages, max_new_tokens=6, static=static, streamer=StreamTo(tok, stream))
            said[static] = (str(text), text.cut, stream.getvalue())
        return said

    cut = both()
    text = cut[True][0]
    assert cut[True] == cut[False] and cut[True][1] and len(text) == 6
    end = next(i for i in range(1, 6) if text[i] not in text[:i])  # a letter the reply has not said before
    monkeypatch.setattr(model.generation_config, "eos_token_id", tok.convert_tokens_to_ids(text[end]))
    ended = both()
    # it ends at that letter (shown: not a special token), uncut
    assert ended[True] == ended[False] and not ended[True][1] and ended[True][0] == text[:end + 1]


def test_static_decoder_refusals(model, tok):
    """static=True with sampling, or for a model the decoder does not run (GPT-2), says why and what to use."""
    with pytest.raises(ValueError, match="the static decoder decodes greedily: temperature=0"):
        run(model, tok, ["hi"], temperature=0.5, static=True)
    with pytest.raises(ValueError, match="got model_type 'gpt2': use model.generate"):
        reply(tiny_model("gpt2"), tok, [{"role": "user", "content": "hi"}], max_new_tokens=2, static=True)
