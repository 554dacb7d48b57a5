"""Talk to a running `python -m mlxgemma.server` with the official openai client, streaming.

    python -m mlxgemma.server &                                   # the embedded Gemma 3 270M on :8080
    python examples/openai_client.py                              # a completion (a base model continues text)
    python examples/openai_client.py --chat "Name three colours"  # a chat turn (an instruction-tuned --model)
"""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
parser.add_argument("--api-key", default="none", help="what the server's --api-key is, if it has one")
parser.add_argument("--prompt", default="Once upon a time, in a small village,")
parser.add_argument("--chat", default=None, help="send this as a chat message instead of a completion prompt")
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=args.api_key)
model = client.models.list().data[0].id
if args.chat:
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.chat}],
                                            max_tokens=128, stream=True, stream_options={"include_usage": True})
    pieces = (c.choices[0].delta.content if c.choices else None for c in stream)
else:
    stream = client.completions.create(model=model, prompt=args.prompt, max_tokens=64, stream=True,
                                       stream_options={"include_usage": True}, stop=["\n\n"])
    pieces = (c.choices[0].text if c.choices else None for c in stream)
for piece in pieces:
    print(piece or "", end="", flush=True)
print()
