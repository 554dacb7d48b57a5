"""Live servers for the tests: mlxgemma.server's app on uvicorn in a thread of the test process, bound to
127.0.0.1 on a free port, and tiny checkpoints with a chat template."""

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from reference import hf_model, save_checkpoint

# Like Gemma's: a past reply is rendered after the same header the generation prompt ends with (t8).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}t4 {{ m['content'] }} t6 {% elif m['role'] == "
            "'system' %}t5 {{ m['content'] }} t6 {% else %}t8 {{ m['content'] }} t7 {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}t8{% endif %}")


def chat_checkpoint(family, path: Path, **overrides) -> Path:
    """A tiny random checkpoint of the family (tests/reference.py; or a transformers model as it is) whose
    tokenizer has a chat template."""
    model = hf_model(family, eos_token_id=1, **overrides) if isinstance(family, str) else family
    save_checkpoint(model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=TEMPLATE)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    engine: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.scheduler.stop()


def serve(model_path, *options: str) -> Served:
    """The server of `python -m mlxgemma.server --model model_path *options`, started and ready."""
    import uvicorn

    from mlxgemma.server.__main__ import build, check_args, configure_parser

    port = free_port()
    args = configure_parser().parse_args(["--model", str(model_path), "--port", str(port), *options])
    check_args(args)
    app, engine = build(args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return Served(f"http://127.0.0.1:{port}", engine, server, thread)
