"""Loaders: the real SmolLM2 GGUF's metadata, HF directories (sharded safetensors) and hand-written GGUFs of
tiny Llama / Qwen2 / Mistral models checked logit-for-logit against HF transformers, and bad files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from family_models import permute, save_hf_dir, write_gguf
from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import ModelLoadError
from gearshift.engine.loader import open_model
from gearshift.engine.loader.gguf_file import _unpermute
from gearshift.engine.model_runner import ModelRunner
from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

transformers = pytest.importorskip("transformers")


def test_smollm2_gguf_config(smollm2_gguf):
    src = open_model(smollm2_gguf)
    c = src.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and not c.attention_bias and c.rope_theta == 100000.0
    assert c.eos_token_ids == [2] and c.max_position_embeddings == 8192


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).standard_normal((8 * 64, 32)).astype(np.float32)
    assert torch.equal(_unpermute(torch.from_numpy(permute(w, 8)), 8), torch.from_numpy(w))


# ---- tiny real models: HF transformers as the reference --------------------------------------------
def _tiny_hf_model(kind: str):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  eos_token_id=256, bos_token_id=None, pad_token_id=None)
    if kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg, cls = transformers.LlamaConfig(**common, rope_parameters=rope), transformers.LlamaForCausalLM
    elif kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, tie_word_embeddings=True), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # HF inits these to 0 / 1: make them matter
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _check_against_hf(model, runner: ModelRunner) -> None:
    prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    bt = list(range(runner.num_kv_blocks - 1, runner.num_kv_blocks - 1 - 8, -1))
    # Attention gathers whole blocks and masks their unused tail: never-written slots must not hold NaN.
    assert bool(torch.isfinite(runner.kv_cache).all())
    ours = runner.execute(SchedulerOutput(seqs=[ScheduledSeq(0, prompt, 0, bt, True)]))[0]
    nxt = int(ours.argmax())
    ours2 = runner.execute(SchedulerOutput(seqs=[ScheduledSeq(0, [nxt], len(prompt), bt, True)]))[0]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt + [nxt]])).logits[0]
    assert (ours - ref[-2]).abs().max().item() < 1e-4
    assert (ours2 - ref[-1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_hf_directory_matches_transformers(tmp_path, kind):
    model = _tiny_hf_model(kind)
    save_hf_dir(model, tmp_path, max_shard_size="100KB")  # several shards + an index
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    runner = ModelRunner(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_memory="2Mi"))
    assert runner.model_config.architecture == ("llama" if kind == "llama3" else kind)
    assert runner.tokenizer.eos_token_ids == [256]
    assert runner.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi\n"
    _check_against_hf(model, runner)


def test_handwritten_gguf_matches_transformers(tmp_path):
    model = _tiny_hf_model("llama")
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path, "llama")
    runner = ModelRunner(EngineConfig(model=str(path), dtype="float32", kv_cache_memory="2Mi"))
    assert not runner.model_config.tie_word_embeddings
    ids = runner.tokenizer.encode("hé")
    assert len(ids) == 3 and runner.tokenizer.decode(ids) == "hé"  # no merges: one token per UTF-8 byte
    _check_against_hf(model, runner)


# ---- bad files ---------------------------------------------------------------------------------------
def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    write_gguf(_tiny_hf_model("llama"), path, "gpt2")
    with pytest.raises(ModelLoadError, match="UnsupportedModel: architecture 'gpt2' is not implemented"):
        open_model(path)


@pytest.mark.parametrize("keep", [0.6, 0.001])  # cut inside the tensor data / inside the vocabulary
def test_truncated_gguf(tmp_path, smollm2_gguf, keep):
    data = smollm2_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated"):
        ModelRunner(EngineConfig(model=str(path), kv_cache_memory="8Mi"))


@pytest.mark.parametrize("content", [b"", b"not a model at all\n", b"GGUF\xff\xff\xff\xff"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as e:
        open_model(path)
    assert "model.gguf" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_model(tmp_path / "nope.gguf")


def test_bad_hf_directories(tmp_path):
    model = _tiny_hf_model("llama")
    good = tmp_path / "good"
    save_hf_dir(model, good, max_shard_size="100KB")
    other = tmp_path / "other"
    shutil.copytree(good, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="UnsupportedModel: architecture 'GPT2LMHeadModel' is not implemented"):
        open_model(other)
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    shard = sorted(cut.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        ModelRunner(EngineConfig(model=str(cut), kv_cache_memory="2Mi"))
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    sorted(missing.glob("*.safetensors"))[0].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        open_model(missing)
