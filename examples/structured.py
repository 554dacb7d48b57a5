"""Structured output with mlxgemma: a pydantic model's JSON parsed back, a regex, a choice; then the same
through a running server (python -m mlxgemma.server): response_format and a tool call with the openai client.

    pip install -e ".[demo,structured]"
    python examples/structured.py [--model PATH] [--server http://127.0.0.1:8080]
"""

import argparse
import json
from typing import List

from pydantic import BaseModel, Field

import mlxgemma


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float = Field(ge=0, le=50)
    landmarks: List[str] = Field(max_length=3)


def library(model_path):
    from mlxgemma.checkpoints.default_model import default_model_path

    model, tokenizer = mlxgemma.load(model_path or default_model_path())
    city = mlxgemma.generate(model, tokenizer, "Paris, the capital of France, as JSON:", json_schema=City,
                             max_tokens=200, parse=True)
    print("json_schema:", city)
    print("regex:", mlxgemma.generate(model, tokenizer, "Today's date (YYYY-MM-DD):",
                                      regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", max_tokens=16))
    print("choices:", mlxgemma.generate(model, tokenizer, "Is the sky blue? Answer:", choices=[" yes", " no"]))


def server(url):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none")
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Describe Paris."}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    print("response_format:", json.loads(reply.choices[0].message.content))
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = client.chat.completions.create(model="gemma", messages=messages, tools=[weather], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    print("tool call:", call.function.name, call.function.arguments)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 4, "sky": "cloudy"}'}]
    final = client.chat.completions.create(model="gemma", messages=messages, tools=[weather], max_tokens=60)
    print("answer:", final.choices[0].message.content)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--server", default=None, help="also talk to this running server")
    args = p.parse_args()
    library(args.model)
    if args.server:
        server(args.server)
