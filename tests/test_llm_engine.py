"""The engine end to end on the real SmolLM2-135M-Instruct GGUF (fp32, CPU): LLM and LLMEngine.

One small engine for the module: 4-token blocks and a KV cache of BLOCKS blocks, so that a batch of 32
requests outgrows the cache and must preempt. Outputs are short to keep the CPU time low.
"""

from __future__ import annotations

import pytest
from gearshift.engine import LLM, InvalidRequestError, SamplingParams

BLOCK = 4
BLOCKS = 150
# SmolLM2-135M: 30 layers, 3 KV heads of 64; fp32 K and V per token = 2 * 30 * 3 * 64 * 4 bytes.
KV_BYTES = BLOCKS * BLOCK * 2 * 30 * 3 * 64 * 4
MAX_LEN = 256

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_gguf) -> LLM:
    llm = LLM(model=smollm2_gguf, dtype="float32", max_model_len=MAX_LEN, kv_cache_memory=KV_BYTES,
              block_size=BLOCK, max_num_seqs=32, max_num_batched_tokens=512)
    assert llm.llm_engine.block_manager.num_blocks == BLOCKS
    return llm


def assert_no_leak(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks == BLOCKS
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    engine.block_manager.check([])  # every block free or cached, no reference left behind


def mixed_prompts(tok) -> list[list[int]]:
    """32 prompts, 6 to ~60 tokens; most share one of two long prefixes (prefix-cache hits)."""
    system = tok.encode("You are a careful assistant. Answer in one short sentence, and never make up facts. ")
    other = tok.encode("Translate the following English words into French, one per line, no comments: ")
    topics = ["the moon", "rivers", "bread", "violins", "glaciers", "chess", "tea", "bees", "volcanoes",
              "maps", "owls", "salt", "clocks", "whales", "paper", "rain"]
    prompts = []
    for i, topic in enumerate(topics):
        also = "".join(f" and {t}" for t in topics[:i % 6])
        prompts.append(system + tok.encode(f"Question {i}: what is interesting about {topic}{also}?"))
        if i % 2:
            prompts.append(other + tok.encode(", ".join(topics[i:i + 1 + i % 5])))
        else:
            prompts.append(tok.encode(f"Tell me about {topic}{' in detail' * (i % 4)}."))
    return prompts


def test_batch_invariance_with_prefix_hits_and_preemption(llm: LLM) -> None:
    prompts = mixed_prompts(llm.get_tokenizer())
    assert len(prompts) == 32 and len({len(p) for p in prompts}) > 10
    engine = llm.llm_engine
    before = engine.stats()
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    stats = engine.stats()
    assert stats.num_preemptions > before.num_preemptions, "the batch was meant to outgrow the KV cache"
    assert stats.prefix_cache_hits > before.prefix_cache_hits
    assert_no_leak(llm)
    for prompt, out in zip(prompts, batched, strict=True):
        [alone] = llm.generate([{"prompt_token_ids": prompt}], GREEDY)
        assert out.token_ids == alone.token_ids and len(out.token_ids) == 4
        assert out.text == alone.text and out.finish_reason == "length"
        assert out.prompt_token_ids == prompt
    assert_no_leak(llm)


def test_generate_text_chat_and_tokenizer(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    outs = llm.generate(["The capital of France is", {"prompt_token_ids": tok.encode("1, 2, 3,")}],
                        SamplingParams(temperature=0.0, max_tokens=4))
    assert outs[0].prompt_token_ids == tok.encode("The capital of France is")  # input order
    assert "Paris" in outs[0].text
    assert outs[1].text == tok.decode(outs[1].token_ids)
    [chat] = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0.0, max_tokens=40))
    assert chat.finish_reason == "stop" and "4" in chat.text  # ended on EOS (<|im_end|>), not the length
    assert chat.token_ids[-1] in tok.eos_token_ids and "<|im_end|>" not in chat.text
    assert_no_leak(llm)


def test_stop_strings_truncate_and_never_retract_streamed_text(llm: LLM) -> None:
    prompt = "Once upon a time"
    [full] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    text = full.text
    stop = text[6:9]
    cut = text.find(stop)
    [stopped] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, stop=[stop, "zzzz"]))
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    assert stopped.text == text[:cut]
    [kept] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, stop=stop,
                                                 include_stop_str_in_output=True))
    assert kept.text == text[:cut + len(stop)]
    # Stepping by hand: each cumulative text extends the previous one (servers stream the difference).
    engine = llm.llm_engine
    engine.add_request("stream", prompt, SamplingParams(temperature=0.0, max_tokens=10, stop=[stop]))
    seen = ""
    while engine.has_unfinished():
        for out in engine.step():
            assert out.text.startswith(seen)
            seen = out.text
    assert seen == text[:cut]
    # A stop token id ends the output on that token, and its text is not included.
    third = full.token_ids[2]
    [by_id] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[third]))
    assert by_id.token_ids == full.token_ids[:3] and by_id.outputs[0].stop_reason == third
    assert by_id.finish_reason == "stop"
    assert_no_leak(llm)


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("a", list(range(300, 340)), SamplingParams(temperature=0.0, max_tokens=50))
    engine.add_request("b", list(range(400, 420)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    used = engine.stats().num_total_blocks - engine.stats().num_free_blocks
    out = engine.abort("a")
    assert out is not None and out.finished and out.finish_reason == "abort" and out.outputs[0].token_ids
    assert engine.stats().num_total_blocks - engine.stats().num_free_blocks < used
    engine.block_manager.check(list(engine.scheduler.seqs.values()))
    assert engine.abort("a") is None and engine.abort("never-was") is None
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finals] == ["b"] and len(finals[0].token_ids) == 3
    assert_no_leak(llm)


def test_n_choices_and_seeds_are_reproducible(llm: LLM) -> None:
    prompt = "My favourite animal is the"
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=4, seed=1234, ignore_eos=True)
    [a] = llm.generate(prompt, params)
    assert [c.index for c in a.outputs] == [0, 1, 2] and all(len(c.token_ids) == 4 for c in a.outputs)
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1, "three seeded draws should not all agree"
    # The same request again, now inside a batch of other (unseeded) sampling requests.
    others = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(["Hi there", prompt, "Bonjour"], [others, params, others])
    assert [c.token_ids for c in outs[1].outputs] == [c.token_ids for c in a.outputs]
    # Greedy n>1: the forks share the prompt's blocks and all decode the same tokens.
    [g] = llm.generate(prompt, SamplingParams(n=2, temperature=0.0, max_tokens=3, ignore_eos=True))
    [g1] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert g.outputs[0].token_ids == g.outputs[1].token_ids == g1.token_ids
    assert_no_leak(llm)


def test_logprobs(llm: LLM) -> None:
    [out] = llm.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=3, logprobs=3))
    lps = out.outputs[0].logprobs
    assert len(lps) == 3
    for tok_id, lp in zip(out.token_ids, lps, strict=True):
        assert lp.token_id == tok_id and next(iter(lp.top)) == tok_id and len(lp.top) == 3
        assert lp.logprob == pytest.approx(lp.top[tok_id]) and lp.logprob <= 0


@pytest.mark.parametrize(("prompt", "params", "param"), [
    ("", SamplingParams(), "prompt"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": [1, 2, 10**7]}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": [1, -3]}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": [5] * MAX_LEN}, SamplingParams(max_tokens=1), "prompt"),
    ({"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=100), "max_tokens"),
    ("Hello", SamplingParams(n=33), "n"),
    (42, SamplingParams(), "prompt"),
])
def test_bad_input_raises_before_anything_is_queued(llm: LLM, prompt, params, param) -> None:
    engine = llm.llm_engine
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(["A fine prompt", prompt], [SamplingParams(), params])  # the good one must not run
    assert e.value.param == param and "prompt 1" in str(e.value)
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", prompt if not isinstance(prompt, dict) else prompt["prompt_token_ids"], params)
    assert not engine.has_unfinished() and engine.stats().num_waiting == 0
    assert_no_leak(llm)


def test_sampling_params_errors_name_the_field() -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(temperature=-1)
    assert e.value.param == "temperature"


def test_unknown_llm_option_is_named(smollm2_gguf) -> None:
    from gearshift.engine import GearshiftError

    with pytest.raises(GearshiftError, match="max_num_seq\\b"):
        LLM(model=smollm2_gguf, max_num_seq=4)


def test_bench_command_prints_a_table(smollm2_gguf, capsys) -> None:
    from gearshift.engine.cli import main

    assert main(["bench", "--prompt-len", "9:3"]) == 2  # refused before any model loads
    assert "LO <= HI" in capsys.readouterr().err
    rc = main(["bench", "--model", str(smollm2_gguf), "--num-requests", "3", "--prompt-len", "8:12",
               "--output-len", "2:3", "--dtype", "float32", "--kv-cache-memory", "32Mi", "--max-model-len", "128"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("| gearshift paged"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "float32" and int(cells[4]) >= 6 and float(cells[5]) > 0  # output tokens, tok/s


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024


def test_kv_cache_pages_are_zero_and_resident_only_once_written() -> None:
    import torch
    from gearshift.engine.kv_cache import lazy_zeros

    size = 256 << 20
    before = _rss_bytes()
    kv = lazy_zeros((2, size // 2 // 16 // 4, 16), torch.float32)  # [2, slots, 16] fp32
    assert not bool(kv.any())  # never-written slots read as zeros (no NaN garbage: commit 766e566)
    assert _rss_bytes() - before < size // 8  # reading the zeros made nothing resident
    kv[0].fill_(1.0)  # write half of it
    grown = _rss_bytes() - before
    assert size // 2 * 0.9 < grown < size * 0.75, grown
    assert float(kv[0].sum()) == kv[0].numel() and not bool(kv[1].any())


def test_a_guided_request_among_plain_ones_follows_its_grammar(llm: LLM) -> None:
    """A step scans for grammar rows only while some request has a grammar (a count kept as requests come
    and go): a guided request queued after an aborted guided one, beside plain ones, still follows it."""
    from gearshift.engine.pipeline.guided import GuidedSpec, compile_guide, vocab_from_hf_json

    tok = llm.get_tokenizer()
    guide = compile_guide(GuidedSpec("regex", r"[0-9]{3}-[a-c]{2}"),
                          vocab_from_hf_json(tok._tok.to_str(), tok.vocab_size, tok.eos_token_ids))
    engine = llm.llm_engine
    prompt = tok.encode("Write a serial number:")
    engine.add_request("guided-aborted", prompt, SamplingParams(temperature=0.0, max_tokens=12, guide=guide.fork()))
    engine.step()
    engine.abort("guided-aborted")
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("plain-0", prompt, plain)
    engine.add_request("guided", prompt, SamplingParams(temperature=0.0, max_tokens=12, guide=guide.fork()))
    engine.add_request("plain-1", prompt, plain)
    texts = {}
    while engine.has_unfinished():
        texts.update((out.request_id, out.text) for out in engine.step() if out.finished)
    out = texts["guided"]
    assert len(out) == 6 and out[:3].isdigit() and out[3] == "-" and set(out[4:]) <= set("abc"), out
    assert texts["plain-0"] == texts["plain-1"] and texts["plain-0"] != out
    assert_no_leak(llm)
