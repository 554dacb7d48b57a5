"""Template fidelity beyond Gemma 4: prompts the server's Engine builds (and decode.prompt.apply_template, the
generate/chat path) are transformers' own apply_chat_template render of the same conversation, text and token
ids, for the checkpoints' verbatim chat templates in tests/data (provenance: tests/data/TEMPLATES.md).

Gemma 3's template has no tool support: the server rewrites tools into Google's prompted JSON format
(mlxgemma/server/tools.py), so conversations with tools are checked against transformers' render of that
documented rewrite (setup text in the first user turn, calls as JSON lines, results as tool_output user turns).
FunctionGemma's template is checked the same way, tools included, when its verbatim file is present (it could
not be sourced offline; TEMPLATES.md). T5Gemma 2 has no instruction-tuned checkpoint and no chat template."""

import json
from pathlib import Path

import pytest

from reference import hf_model
from server_util import serve
from mlxgemma.decode.prompt import apply_template
from mlxgemma.server.schemas import ChatRequest, parse
from mlxgemma.server.tools import parse_tools

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DATA = Path(__file__).parent / "data"
GEMMA3 = (DATA / "gemma3_chat_template.jinja").read_text()
FUNCTIONGEMMA_FILE = DATA / "functiongemma_chat_template.jinja"

# Gemma 3's special tokens at their real ids where they fit a tiny vocabulary; the image ones (255999, 256000
# in the real vocabulary) and FunctionGemma's (the real ids are not known here) at free ids below 384.
GEMMA3_SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<start_of_turn>": 105,
                   "<end_of_turn>": 106, "<start_of_image>": 107, "<end_of_image>": 108}
FUNCTIONGEMMA_SPECIALS = dict(GEMMA3_SPECIALS, **{
    "<start_function_declaration>": 46, "<end_function_declaration>": 47, "<start_function_call>": 48,
    "<end_function_call>": 49, "<start_function_response>": 50, "<end_function_response>": 51, "<escape>": 52})
VOCAB_SIZE = 384


def vocab(specials: dict) -> dict:
    """Specials at their ids, "▁", newline and printable ASCII in the free ids, then the 256 bytes, padded to
    VOCAB_SIZE with ids encode never writes (as Gemma's <unused..>)."""
    out = dict(specials)
    free = (i for i in range(10**6) if i not in specials.values())
    for piece in ["▁", "\n"] + [chr(c) for c in range(33, 127)] + [f"<0x{b:02X}>" for b in range(256)]:
        if piece not in out:
            out[piece] = next(free)
    for i in range(VOCAB_SIZE - len(out)):
        out[f"<unused{i}>"] = next(free)
    assert len(out) == VOCAB_SIZE
    return out


def tokenizer(specials: dict, template: str):
    """Gemma's kind of tokenizer (BPE with byte fallback: every character one token, anything else its UTF-8
    bytes) with Gemma's specials, a post-processor that writes <bos> as Gemma's does (so a prompt encoded
    with special tokens on top of a template that writes bos_token would show two), and the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab(specials), [], byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.chat_template = template
    return fast


def save(path: Path, specials: dict, template: str) -> Path:
    """A tiny random Gemma 3 (text) whose tokenizer has the template; eos [1, 106] as the -it checkpoints."""
    model = hf_model("gemma3", vocab_size=VOCAB_SIZE, eos_token_id=[1, 106], bos_token_id=2, pad_token_id=0)
    model.save_pretrained(path)
    tokenizer(specials, template).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106],
                                                             "pad_token_id": 0}))
    return path


def engine_prompt(engine, messages, tools=None):
    """The server's prompt for an OpenAI-shaped request, as test_gemma4_chat builds it."""
    req = parse(ChatRequest, {"messages": messages, "tools": tools})
    parsed = parse_tools(req.tools, None, None, engine.tokenizer.chat_template)
    return engine.chat(req.messages, parsed, engine.template_kwargs(req.chat_template_kwargs, None))


def check(engine, ref_tok, messages, reference, tools=None, reference_tools=None):
    """The engine's prompt for `messages` (OpenAI-shaped) and apply_template's for `reference` (the
    equivalent conversation as the template takes it) are transformers' render of `reference`."""
    expected = ref_tok.apply_chat_template(reference, tools=reference_tools, tokenize=False,
                                           add_generation_prompt=True)
    ids = ref_tok.encode(expected, add_special_tokens=False)
    prompt = engine_prompt(engine, messages, tools)
    assert engine.tokenizer.decode(prompt.ids) == expected
    assert prompt.ids == ids
    assert expected.count("<bos>") == 1 and prompt.ids.count(2) == 1
    assert apply_template(engine.tokenizer, reference, tokenize=False, tools=reference_tools) == expected
    assert apply_template(engine.tokenizer, reference, tools=reference_tools) == ids
    return expected


# Gemma 3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    s = serve(save(tmp_path_factory.mktemp("g3") / "ckpt", GEMMA3_SPECIALS, GEMMA3))
    yield s.engine, tokenizer(GEMMA3_SPECIALS, GEMMA3)
    s.stop()


def test_gemma3_checkpoint_keeps_the_template(gemma3):
    engine, _ = gemma3
    assert engine.tokenizer.chat_template == GEMMA3


def _openai_to_template(messages):
    """The conversation as a template takes it: OpenAI's developer role is the system role."""
    return [dict(m, role="system") if m["role"] == "developer" else m for m in messages]


GEMMA3_CORPUS = [
    ("user", [{"role": "user", "content": "Hi"}]),
    ("system+user", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    ("developer+user", [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    ("multi-turn", [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "  c  "}]),
    ("whitespace and unicode", [{"role": "user", "content": "\n Grüße, 日本 {x}\n\n"},
                                {"role": "assistant", "content": " <b>ok</b> \n"},
                                {"role": "user", "content": "tab\there"}]),
    ("one text part", [{"role": "system", "content": [{"type": "text", "text": " Be brief. "}]},
                       {"role": "user", "content": [{"type": "text", "text": " Hi "}]}]),
]


@pytest.mark.parametrize("name,messages", GEMMA3_CORPUS, ids=[c[0] for c in GEMMA3_CORPUS])
def test_gemma3_prompt_is_transformers_render(gemma3, name, messages):
    engine, ref = gemma3
    check(engine, ref, messages, _openai_to_template(messages))


@pytest.mark.xfail(strict=True, reason="the server joins a message's text parts into one string before the "
                                       "template trims it; Gemma 3's template trims each part (TEMPLATES.md)")
def test_gemma3_several_text_parts(gemma3):
    engine, ref = gemma3
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    check(engine, ref, messages, messages)


def test_gemma3_roles_must_alternate_like_transformers(gemma3):
    """Two user turns in a row: transformers' render raises (the template's own check); so does the server."""
    engine, ref = gemma3
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(Exception, match="alternate"):
        engine_prompt(engine, messages)


# Gemma 3 with tools: Google's prompted JSON format (ai.google.dev/gemma/docs/capabilities/function-calling),
# written out here from the documentation rather than from tools.py's constants.

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}

SETUP = ("You have access to functions. If you decide to invoke any of the function(s),\n"
         "you MUST put it in the format of\n"
         '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
         "You SHOULD NOT include any other text in the response if you call a function\n"
         "To call several functions, put each call on its own line.\n")
LISTED = json.dumps([{"name": "get_weather", "description": "Get weather",
                      "parameters": WEATHER["function"]["parameters"]}], indent=2) + "\n"


def test_gemma3_template_takes_no_tools():
    """Why the rewrite: Gemma 3's template never reads `tools` (transformers' render ignores them)."""
    ref = tokenizer(GEMMA3_SPECIALS, GEMMA3)
    messages = [{"role": "user", "content": "Weather?"}]
    assert "tools" not in GEMMA3
    assert (ref.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_gemma3_tools_go_in_the_first_user_turn(gemma3):
    engine, ref = gemma3
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    expected = check(engine, ref, messages, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": SETUP + LISTED + "Weather in Paris?"}],
                     tools=[WEATHER])
    assert expected.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou have access to functions.")


def test_gemma3_tool_round_trip(gemma3):
    """A call (arguments a JSON string, as OpenAI clients send them) and its result: the call is the JSON line
    the model wrote, the result a user turn in a tool_output block."""
    engine, ref = gemma3
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 15}'},
                {"role": "assistant", "content": "It is 15C."},
                {"role": "user", "content": "Thanks"}]
    rewritten = [{"role": "user", "content": SETUP + LISTED + "Weather in Paris?"},
                 {"role": "assistant", "content": '{"name":"get_weather","parameters":{"city":"Paris","days":2}}'},
                 {"role": "user", "content": 'Result of get_weather:\n```tool_output\n{"temp": 15}\n```'},
                 {"role": "assistant", "content": "It is 15C."},
                 {"role": "user", "content": "Thanks"}]
    check(engine, ref, messages, rewritten, tools=[WEATHER])


def test_gemma3_tool_result_last(gemma3):
    """The generation prompt after a tool result (the usual shape of the request that follows a call)."""
    engine, ref = gemma3
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "15C"}]
    rewritten = [{"role": "user", "content": SETUP + LISTED + "Weather in Paris?"},
                 {"role": "assistant", "content": '{"name":"get_weather","parameters":{"city":"Paris","days":2}}'},
                 {"role": "user", "content": "Result of get_weather:\n```tool_output\n15C\n```"}]
    expected = check(engine, ref, messages, rewritten, tools=[WEATHER])
    assert expected.endswith("```<end_of_turn>\n<start_of_turn>model\n")


# FunctionGemma: its template takes tools, calls and results itself (tools.py's native format)

functiongemma_template = pytest.mark.skipif(
    not FUNCTIONGEMMA_FILE.exists(),
    reason="google/functiongemma-270m-it's verbatim chat template could not be sourced offline (TEMPLATES.md); "
           "put it at tests/data/functiongemma_chat_template.jinja to run these")


@pytest.fixture(scope="module")
def functiongemma(tmp_path_factory):
    template = FUNCTIONGEMMA_FILE.read_text()
    s = serve(save(tmp_path_factory.mktemp("fg") / "ckpt", FUNCTIONGEMMA_SPECIALS, template))
    yield s.engine, tokenizer(FUNCTIONGEMMA_SPECIALS, template)
    s.stop()


def _with_dict_arguments(messages):
    """The conversation as the template takes it: call arguments as mappings (OpenAI clients send JSON
    strings), the developer role as system, a tool result named after its call."""
    calls, out = {}, []
    for m in _openai_to_template(messages):
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [dict(c, function=dict(c["function"], arguments=json.loads(c["function"]["arguments"])))
                               for c in m["tool_calls"]]
            calls.update({c["id"]: c["function"]["name"] for c in m["tool_calls"]})
        if m["role"] == "tool":
            m["name"] = calls[m["tool_call_id"]]
        out.append(m)
    return out


FUNCTIONGEMMA_CORPUS = [
    ("user", [{"role": "user", "content": "Hi"}], None),
    ("system+user", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    ("multi-turn", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}], None),
    ("tools", [{"role": "developer", "content": "You are a model that can do function calling with the following "
                                                 "functions"},
               {"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    ("tool round trip", [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], [WEATHER]),
    ("after the result", [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": "", "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                          {"role": "assistant", "content": "It is sunny."},
                          {"role": "user", "content": "And Rome?"}], [WEATHER]),
]


@functiongemma_template
@pytest.mark.parametrize("name,messages,tools", FUNCTIONGEMMA_CORPUS, ids=[c[0] for c in FUNCTIONGEMMA_CORPUS])
def test_functiongemma_prompt_is_transformers_render(functiongemma, name, messages, tools):
    engine, ref = functiongemma
    check(engine, ref, messages, _with_dict_arguments(messages), tools=tools, reference_tools=tools)


def test_functiongemma_tokens_are_special():
    """The tokens FunctionGemma's template writes are single special tokens of the test tokenizer."""
    tok = tokenizer(FUNCTIONGEMMA_SPECIALS, GEMMA3)
    for piece, i in FUNCTIONGEMMA_SPECIALS.items():
        assert tok.encode(piece, add_special_tokens=False) == [i]
