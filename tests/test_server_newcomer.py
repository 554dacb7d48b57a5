"""What a new user hits first, on tiny models: the browser's /favicon.ico, /api/show's parameter count for a
quantized model (the float model's, not the packed words'), and a base model (no chat template, like the
default model) refusing chat with the way forward while completions work."""

import httpx
import ollama
import openai
import pytest
from mlx.utils import tree_flatten

import mlxgemma
from reference import hf_model, save_checkpoint
from server_util import serve


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base model's server: the tiny tokenizer has no chat template."""
    served = serve(save_checkpoint(hf_model("gemma3", eos_token_id=1), tmp_path_factory.mktemp("base") / "base"),
                   "--max-tokens", "6", "--api-key", "sesame")
    yield served
    served.stop()


KEY = {"Authorization": "Bearer sesame"}


def test_favicon_is_served_without_the_key(base):
    r = httpx.get(base.url + "/favicon.ico")  # browsers send no Authorization header for it
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.startswith("<svg") and r.text.endswith("</svg>")
    assert httpx.get(base.url + "/v1/models").status_code == 401  # and it opens nothing else


@pytest.mark.parametrize("path, body, instead", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "t9"}]}, "/v1/completions"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "t9"}], "stream": False}, "/api/generate"),
])
def test_chat_on_a_base_model_names_the_next_step(base, path, body, instead):
    r = httpx.post(base.url + path, json=body, headers=KEY)
    assert r.status_code == 400
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert "no chat template" in message and instead in message and "instruction-tuned" in message
    assert "\n" not in message
    if not path.startswith("/api/"):
        assert error["type"] == "invalid_request_error" and error["code"] == "no_chat_template"


def test_completions_and_show_on_a_base_model(base):
    c = openai.OpenAI(base_url=base.url + "/v1", api_key="sesame", max_retries=0)
    assert c.completions.create(model="m", prompt="t10 t11", max_tokens=4).choices[0].text
    shown = ollama.Client(host=base.url, headers=KEY).show("m")
    assert shown.capabilities == ["completion"]  # no tools without a chat template
    assert not shown.template


def test_parameter_count_of_a_quantized_model_is_the_float_models(tmp_path):
    from mlxgemma.convert import convert
    from mlxgemma.server.ollama_api import parameter_count

    src = save_checkpoint(hf_model("gemma3", eos_token_id=1), tmp_path / "src")
    dst = convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    model = mlxgemma.load_model(src)
    floats = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert parameter_count(model) == floats

    served = serve(dst)
    try:
        shown = httpx.post(served.url + "/api/show", json={"model": "m"}).json()
        q = served.engine.model
        bits = {name: m.bits for name, m in q.named_modules() if hasattr(m, "bits")}
        assert 4 in set(bits.values()) <= {4, 5, 6} and "model.embed_tokens" in bits  # budget, the table too
        assert sum(v.size for _, v in tree_flatten(q.parameters())) != floats  # which the old count read
        assert shown["model_info"]["general.parameter_count"] == floats
        assert shown["details"]["parameter_size"] == f"{floats / 1e3:.0f}K"
        assert shown["details"]["quantization_level"] == "Q4"
    finally:
        served.stop()
