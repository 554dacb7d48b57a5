"""python -m mlxgemma.chat --model PATH: a multi-turn REPL.

The conversation goes through the tokenizer's chat template. The KV cache is kept across turns: the cache
holds the tokens of the last prompt and reply, each turn re-renders the conversation, keeps the longest
common prefix (trimming the rest exactly, or starting over when a window-bounded cache cannot trim that far)
and prefills only what is new. /reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply. Gemma 4's
thoughts (--think) are shown dimmed before the answer, or not at all (--hide-thinking); the conversation keeps
each reply's thought as its `reasoning`, which the template drops once a later user turn follows.
Under mlx.launch the model is sharded (distributed.py); rank 0 reads each line and every rank acts on it.
"""

import argparse
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from .cli import (Terminated, add_generation_options, add_thinking_options, interrupt_ends_run, launched, load_draft,
                  load_for_cli, run, sampling_kwargs, share, shared_input, thinking_kwargs)
from .errors import MlxGemmaError
from .files import regular_file
from .decode.prompt import apply_template, check_prompt, prompt_ids, with_marks, with_system
from .generate import Chunk, check_options, stream_generate
from .media.features import block_start, encode_prompt, media_from, media_tokens
from .models import has_vision, is_encoder_decoder
from .decode.thinking import template_args
from .reply import Shown


class ChatSession:
    """tokenizer: the model's tokenizer, or its processor (Gemma 3 with images, Gemma 4: turns may carry
    images, and for Gemma 4 audio clips and videos where its processor reads them, which stay in the
    conversation; an item already encoded is not encoded again). options: stream_generate's
    (think and chat_template_args render every turn; the last reply's thought is `last_reasoning`)."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, prompt_cache_file=None, **options):
        if is_encoder_decoder(model):
            raise MlxGemmaError("chat keeps a decoder-only cache across turns; for T5Gemma 2 use "
                                "python -m mlxgemma.generate (with --image for pictures)")
        self.processor = tokenizer if has_vision(model) else None
        tokenizer = tokenizer.tokenizer if self.processor else tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise MlxGemmaError("this model's tokenizer has no chat template (a pretrained model, which continues "
                                "text): use python -m mlxgemma.generate, or an instruction-tuned checkpoint")
        self.model, self.tokenizer, self.system, self.options = model, tokenizer, system, options
        self.template_args = template_args(tokenizer, options.get("think"), options.get("chat_template_args"),
                                           options.get("max_thinking_tokens"))
        self.prompt_cache_file = prompt_cache_file
        self.last_reasoning = ""
        self.reset()

    def reset(self) -> None:
        self.messages: List[dict] = []
        self.images: list = []  # every image of the conversation, in order
        self.audio: list = []  # every audio clip of the conversation, in order
        self.videos: list = []  # every video of the conversation (its frames and timestamps), in order
        self.cache, self.cached = self._fresh()  # the cache, and the token ids it holds in order
        self.prefix = list(self.cached)  # a --prompt-cache-file's tokens: the conversation follows them

    def _fresh(self):
        """An empty cache, or the --prompt-cache-file's (the prompt it holds is never prefilled again)."""
        max_kv_size = self.options.get("max_kv_size")
        if self.prompt_cache_file is None:
            return self.model.make_cache(max_kv_size=max_kv_size), []
        from .checkpoints.cache_file import load

        return load(self.prompt_cache_file, self.model, max_kv_size)

    def _reuse(self, ids: List[int]) -> int:
        """Keep the cached prefix shared with ids (at least one token must stay new); returns its length."""
        common = 0
        for a, b in zip(self.cached, ids[:-1]):
            if a != b:
                break
            common += 1
        if self.processor is not None:  # a prefill may not start inside an image block
            common = block_start(ids, common, set(media_tokens(self.model)))
        drop = len(self.cached) - common
        if drop and not all(c.trim(drop) == drop for c in self.cache):
            self.cache, fresh = self._fresh()
            common = len(fresh)  # (ids always begin with the file's prompt)
        self.cached = self.cached[:common]
        return common

    def reply(self, text: str, images: Sequence = (), audio: Sequence = (), videos: Sequence = ()) -> Iterator[str]:
        """Stream the answer to a user message, as stream() does (its thought, if any, is then
        last_reasoning)."""
        for chunk in self.stream(text, images, audio, videos):
            yield chunk.text

    def stream(self, text: str, images: Sequence = (), audio: Sequence = (), videos: Sequence = ()) -> Iterator[Chunk]:
        """Stream the reply to a user message (and its images, audio clips and videos, placed before the text
        unless it holds placeholders) as Chunks. The turn joins the conversation when it ends or is interrupted
        (Ctrl-C keeps what was said); a turn refused as bad input (longer than the context, say) leaves the
        conversation as it was, so the next turn works."""
        media = {"image": list(images), "audio": list(audio), "video": list(videos)}
        for kind, items in media.items():
            if items and (self.processor is None or kind not in self.processor.marks
                          or (kind == "video" and not _sees_video(self))):
                raise MlxGemmaError(f"{type(self.model).__name__} takes no {kind}")
        if any(media.values()):
            text = with_marks(self.processor, text, media)
        messages = self.messages + [{"role": "user", "content": text}]
        ids, features = self._prompt(messages, self.images + media["image"], self.audio + media["audio"],
                                     self.videos + media["video"])
        if self.prefix:  # the conversation continues the cached prompt: one <bos>, the file's
            ids = self.prefix + ids[1:] if ids[:1] == [self.tokenizer.bos_token_id] else self.prefix + ids
        check_prompt(self.model, ids)
        start = self._reuse(ids)
        extra = {}
        if self.processor is not None:  # the images after start (those of the file's prompt are in its cache)
            n = len(self.prefix)
            extra["image_features"] = media_from(ids[n:], features, start - n, set(media_tokens(self.model)))
        generated, chunks = [], []
        self.last_reasoning = ""
        try:
            for chunk in stream_generate(self.model, self.processor or self.tokenizer, ids[start:],
                                         prompt_cache=self.cache, history=ids[:start], **extra, **self.options):
                generated.append(chunk.token)
                chunks.append(chunk)
                self.last_reasoning += chunk.reasoning
                yield chunk
        except MlxGemmaError:
            messages = None
            raise
        finally:
            # mlx-lm feeds each token before yielding it: the cache holds the prompt and every yielded token
            # (an interruption during the prefill leaves it partial: trust its offset).
            self.cached = (ids + generated)[: self.cache[0].offset]
            if messages is not None:
                self.messages = messages + [_assistant(chunks)]
                self.images += media["image"]
                self.audio += media["audio"]
                self.videos += media["video"]

    def _prompt(self, messages, images, audio=(), videos=()):
        """(ids, the media's features): the conversation through the template (and the processor)."""
        if self.processor is None:
            return prompt_ids(self.tokenizer, messages, self.system, **self.template_args), None
        text = apply_template(self.tokenizer, with_system(self.system, messages), tokenize=False,
                              **self.template_args)
        return encode_prompt(self.model, self.processor, text, images, audio, videos)


def _assistant(chunks) -> dict:
    """A reply as the conversation keeps it: the answer, its thought as `reasoning` and its native calls as
    tool_calls (the chat template writes both back as the model wrote them)."""
    out = {"role": "assistant", "content": "".join(c.text for c in chunks)}
    thought = "".join(c.reasoning for c in chunks)
    calls = [call for c in chunks for call in c.calls]
    if thought:
        out["reasoning"] = thought
    if calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    return out


def repl(session: ChatSession, read=None, group=None, hide_thinking: bool = False) -> int:
    """read: input (the default), or under mlx.launch shared_input (rank 0's line on every rank; group: the
    ranks, which /image, /audio and /video files reach too). Thoughts are shown before the answer, dimmed on a
    terminal, unless hide_thinking."""
    read = read or input
    marks = session.processor.marks if session.processor is not None else {}
    print("[mlxgemma chat] /reset starts over, /quit leaves, Ctrl-C stops a reply"
          + (", /image PATH adds a photo to your next message" if "image" in marks else "")
          + (", /audio PATH a recording" if _hears(session) else "")
          + (", /video PATH a video" if _sees_video(session) else ""), file=sys.stderr)
    pending = {kind: [] for kind in COMMANDS}  # what /image, /audio and /video read, for the next message
    while True:
        try:
            line = read("> ")
        except EOFError:
            return 0
        except Terminated:
            raise
        except KeyboardInterrupt:
            print("\n(/quit leaves)", file=sys.stderr)
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            session.reset()
            pending = {kind: [] for kind in COMMANDS}
            print("[conversation reset]", file=sys.stderr)
            continue
        kind = next((k for k in COMMANDS if line.startswith("/" + k)), None)
        if kind is not None:
            try:
                pending[kind].append(COMMANDS[kind][0](session, line, group))
                print(f"[{len(pending[kind])} {COMMANDS[kind][1]} for your next message]", file=sys.stderr)
            except MlxGemmaError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        shown = Shown(sys.stdout, sys.stdout, hide_thinking)
        try:
            turn, pending = pending, {kind: [] for kind in COMMANDS}
            for chunk in session.stream(line, turn["image"], turn["audio"], turn["video"]):
                shown.write(chunk)
        except Terminated:
            raise
        except KeyboardInterrupt:
            shown.close()
            print(" [stopped]", end="", file=sys.stderr)
        except MlxGemmaError as e:
            shown.close()
            print(f"error: {e}", file=sys.stderr)
        print()


def _image_command(session: ChatSession, line: str, group=None):
    """/image PATH: the image, read now (so a bad file is reported before the message is typed); under
    mlx.launch rank 0 reads the file and every rank gets its bytes."""
    from .media.processor import decode_image, load_image

    if session.processor is None:
        raise MlxGemmaError(f"{type(session.model).__name__} is a text-only model: it takes no image")
    path = line[len("/image"):].strip()
    if not path:
        raise MlxGemmaError("/image needs a path: /image photo.jpg")
    if group is None:
        return load_image(path)
    data, error = None, None
    if group.rank() == 0:
        try:
            load_image(path)
            data = Path(path).expanduser().read_bytes()
        except (MlxGemmaError, OSError) as e:
            error = e
    data = share(group, data)
    if error is not None or data is None:
        raise MlxGemmaError(str(error) if error else f"image {path!r} could not be read by rank 0")
    return decode_image(data, f"image {path!r}")


def _hears(session: ChatSession) -> bool:
    """Gemma 4 E2B/E4B: a processor with a feature extractor (the 31B's marks <|audio|> too, but has no tower)."""
    return getattr(session.processor, "feature_extractor", None) is not None


def _audio_command(session: ChatSession, line: str, group=None) -> bytes:
    """/audio PATH: the clip's bytes, decoded now to check them (so a bad file is reported before the message
    is typed); under mlx.launch rank 0 reads the file and every rank gets its bytes."""
    from .media.audio import load_audio

    if not _hears(session):
        raise MlxGemmaError(f"{type(session.model).__name__} takes no audio")
    path = line[len("/audio"):].strip()
    if not path:
        raise MlxGemmaError("/audio needs a path: /audio memo.m4a")
    data, error = None, None
    if group is None or group.rank() == 0:
        try:
            file = Path(path).expanduser()
            regular_file(file)
            data = file.read_bytes()
            load_audio(data)
        except MlxGemmaError as e:
            error = e
    if group is not None:
        data = share(group, data if error is None else None)
    if error is not None or data is None:
        raise MlxGemmaError(str(error) if error else f"audio {path!r} could not be read by rank 0")
    return data


def _sees_video(session: ChatSession) -> bool:
    """Gemma 4 (the 12B Unified too): a processor with a video processor (Gemma 3's has none)."""
    return getattr(session.processor, "video_processor", None) is not None


def _video_command(session: ChatSession, line: str, group=None) -> tuple:
    """/video PATH: the video's sampled frames and their timestamps, decoded now (so a bad file is reported
    before the message is typed, and the file is decoded once however many turns follow); under mlx.launch
    rank 0 reads the file and every rank gets its bytes."""
    from .media.gemma4_video import load_video

    if not _sees_video(session):
        raise MlxGemmaError(f"{type(session.model).__name__} takes no video")
    path = line[len("/video"):].strip()
    if not path:
        raise MlxGemmaError("/video needs a path: /video clip.mp4")
    frames = session.processor.video_processor.num_frames
    if group is None:
        return load_video(path, frames)
    data, error = None, None
    if group.rank() == 0:
        try:
            file = Path(path).expanduser()
            regular_file(file)
            data = file.read_bytes()
        except (MlxGemmaError, OSError) as e:
            error = e
    data = share(group, data if error is None else None)
    if error is not None or data is None:
        raise MlxGemmaError(str(error) if error else f"video {path!r} could not be read by rank 0")
    return load_video(data, frames)


# /image, /audio and /video: (the reader, what the REPL calls what it read)
COMMANDS = {"image": (_image_command, "image(s)"), "audio": (_audio_command, "audio clip(s)"),
            "video": (_video_command, "video(s)")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlxgemma.chat", description="Chat with a Gemma model.")
    add_generation_options(p, max_tokens=256)  # mlx_lm.chat's default
    add_thinking_options(p, "shown before the answer")
    args = p.parse_args(argv)
    options = sampling_kwargs(args)

    def body() -> int:
        check_options(**options)  # before the model loads and the REPL starts
        thinking = thinking_kwargs(args)
        group = launched(args)
        model, tokenizer = load_for_cli(args, sharded=True)
        if group is not None:  # mlx.launch: rank 0 reads, every rank hears it
            interrupt_ends_run()
        session = ChatSession(model, tokenizer, args.system, prompt_cache_file=args.prompt_cache_file,
                              draft_model=load_draft(args), **options, **thinking)
        return repl(session, shared_input(group) if group is not None else None, group, args.hide_thinking)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
