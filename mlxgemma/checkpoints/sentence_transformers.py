"""sentence-transformers folders (EmbeddingGemma's release): modules.json lists the pipeline, the encoder is
the folder's root checkpoint (config.json + safetensors, as any), each Dense module a folder of its own
(config.json: in_features, out_features, bias, activation_function; model.safetensors: linear.weight), and
config_sentence_transformers.json / sentence_bert_config.json hold the prompts and the truncation length.
Both the names sentence-transformers 5 writes (sentence_transformers.models.Pooling, pooling_mode_mean_tokens)
and those of 6 (sentence_transformers.base.modules..., pooling_mode "mean") are read."""

import json
import shutil
from pathlib import Path
from typing import Optional

from ..errors import MlxGemmaError

PIPELINE_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity", None)


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MlxGemmaError(f"{path}: cannot read {what}: {e}") from None
    return data


def read_pipeline(path: Path) -> Optional[dict]:
    """The pipeline of a sentence-transformers folder (None without modules.json): {"dense": [(folder, in,
    out)], "normalize", "prompts", "default_prompt_name", "max_seq_length"}; what mlxgemma does not compute
    (another pooling, a Dense with bias or activation, a module it does not know) is one clear error."""
    if not (path / "modules.json").is_file():
        return None
    modules = _json(path / "modules.json", "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise MlxGemmaError(f"{path / 'modules.json'} is not a list of modules")
    out = {"dense": [], "normalize": False}
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind, folder = m["type"].rsplit(".", 1)[-1], path / (m.get("path") or "")
        if kind == "Transformer":
            if m.get("path"):
                raise MlxGemmaError(f"{path}: the encoder sits in {m['path']!r}; mlxgemma reads it from the folder's root")
        elif kind == "Pooling":
            _check_pooling(_json(folder / "config.json", "the pooling config"), folder)
        elif kind == "Dense":
            c = _json(folder / "config.json", "a Dense config")
            if c.get("bias") or c.get("activation_function") not in IDENTITY:
                raise MlxGemmaError(f"{folder}: a Dense module with a bias or an activation "
                                    f"({c.get('activation_function')}) is not supported (EmbeddingGemma has neither)")
            out["dense"].append((m["path"], int(c["in_features"]), int(c["out_features"])))
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise MlxGemmaError(f"{path}: the sentence-transformers module {m['type']} is not supported")
    st = _json(path / PIPELINE_FILES[1], "the prompts") if (path / PIPELINE_FILES[1]).is_file() else {}
    bert = _json(path / PIPELINE_FILES[2], "the max length") if (path / PIPELINE_FILES[2]).is_file() else {}
    out.update(prompts=st.get("prompts") or {}, default_prompt_name=st.get("default_prompt_name"),
               max_seq_length=bert.get("max_seq_length") or _tokenizer_max_length(path))
    return out


def _tokenizer_max_length(path: Path) -> Optional[int]:
    """sentence-transformers 6 keeps max_seq_length as the tokenizer's model_max_length (its "no limit" is a
    huge number: then None)."""
    if not (path / "tokenizer_config.json").is_file():
        return None
    n = _json(path / "tokenizer_config.json", "the tokenizer config").get("model_max_length")
    return n if isinstance(n, int) and 0 < n < 10**9 else None


def _check_pooling(c: dict, folder: Path) -> None:
    mode = c.get("pooling_mode") or [k[len("pooling_mode_"):-len("_tokens")] if k.endswith("_tokens") else
                                     k[len("pooling_mode_"):] for k, v in c.items()
                                     if k.startswith("pooling_mode_") and v is True]
    mode = mode if isinstance(mode, str) else ",".join(mode)
    if mode != "mean" or c.get("include_prompt") is False:
        raise MlxGemmaError(f"{folder}: pooling {mode!r}{' without the prompt' if c.get('include_prompt') is False else ''}"
                            " is not supported (EmbeddingGemma's is the mean over every token)")


def dense_weights(path: Path, pipeline: dict) -> list:
    """Each Dense module's weight (out, in), as stored (linear.weight)."""
    import mlx.core as mx

    out = []
    for folder, n_in, n_out in pipeline["dense"]:
        files = sorted((path / folder).glob("*.safetensors"))
        if not files:
            raise MlxGemmaError(f"{path / folder} holds no weights (model.safetensors)")
        weights = mx.load(str(files[0]))
        w = weights.get("linear.weight")
        if w is None or tuple(w.shape) != (n_out, n_in):
            raise MlxGemmaError(f"{files[0]}: expected linear.weight of shape ({n_out}, {n_in})")
        out.append(w)
    return out


def copy_pipeline(src: Path, out: Path) -> None:
    """The pipeline's files and module folders as they are (convert keeps the Dense modules exact)."""
    pipeline = read_pipeline(src)
    if pipeline is None:
        return
    for name in PIPELINE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for m in json.loads((src / "modules.json").read_text()):
        if m.get("path"):
            shutil.copytree(src / m["path"], out / m["path"], dirs_exist_ok=True)
