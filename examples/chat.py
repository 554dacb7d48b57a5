"""A two-turn conversation through the chat template, the KV cache kept between turns.
(For an interactive REPL: python -m mlxgemma.chat --model ...)

    python examples/chat.py --model path/to/an/instruction-tuned/gemma
"""

import argparse

import mlxgemma
from mlxgemma.chat import ChatSession
from mlxgemma.checkpoints.default_model import default_model_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
args = parser.parse_args()

model, tokenizer = mlxgemma.load(args.model or default_model_path())
session = ChatSession(model, tokenizer, max_tokens=96)
for question in ["Name three rivers in Europe.", "Which of them is the longest?"]:
    print(f"> {question}")
    for text in session.reply(question):
        print(text, end="", flush=True)
    print()
