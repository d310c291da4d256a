"""The operator's scrape of a real `gearshift serve` process: the figures status.load is made of, read
the way the operator reads them (operator/scrape.py), while real streams run through the official client."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from gearshift.engine.crossover import crossover, node_cpu_class
from gearshift.operator.gear import advise
from gearshift.operator.load import LoadWindow, Tick, pods_crossover
from gearshift.operator.scrape import fetch, ready_pods
from server_process import running_server

STREAMS = 6


@pytest.mark.parametrize("engine", ["gguf"])
def test_scrape_sees_the_streams_in_flight_and_the_tokens_served(smollm2_gguf: Path, engine: str) -> None:
    from openai import OpenAI

    with running_server(smollm2_gguf, engine) as server:
        before = fetch("127.0.0.1", server.port)
        assert before is not None and before.running + before.waiting == 0
        client = OpenAI(base_url=server.v1, api_key="none")
        served: list[int] = []

        def stream(i: int) -> None:
            chunks = client.chat.completions.create(
                model="smollm2", max_tokens=40, stream=True, seed=i, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Count from {i} to {i + 30}."}])
            served.extend(c.usage.completion_tokens for c in chunks if c.usage)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        window = LoadWindow(600)
        window.add(Tick(0.0, {"pod": before}))
        for t in threads:
            t.start()
        peak = 0.0
        while any(t.is_alive() for t in threads):
            s = fetch("127.0.0.1", server.port)
            assert s is not None
            peak = max(peak, s.running + s.waiting)
            window.add(Tick(time.monotonic(), {"pod": s}))
            time.sleep(0.2)
        for t in threads:
            t.join()
        after = fetch("127.0.0.1", server.port)
    assert after is not None
    # the gguf runner decodes one request and queues the rest: in flight counts both
    assert peak >= 2, peak
    assert after.running + after.waiting == 0
    assert len(served) == STREAMS and after.generated - before.generated == sum(served)
    assert window.load(time.monotonic()).mean > 0


@pytest.mark.parametrize("engine", ["gguf", "paged"])
def test_both_engines_report_the_crossover_of_this_cpu(smollm2_gguf: Path, engine: str) -> None:
    """The operator's gear advice reads the crossover from the pod: what the real server measures its CPU as
    (on an AVX512-BF16 CPU 2, so 2 streams there advise paged; AVX2-only 4)."""
    with running_server(smollm2_gguf, engine) as server:
        s = fetch("127.0.0.1", server.port)
    cls = node_cpu_class()
    assert s is not None and (s.crossover, s.cpu_class) == (crossover(cls), cls)
    x = pods_crossover({"pod": s})
    assert (x.value, x.cpu_class) == (crossover(cls), cls)


def test_two_streams_on_gguf_get_the_advice_of_this_cpus_crossover(smollm2_gguf: Path) -> None:
    """The observed path end to end on a real server: 2 closed-loop streams on gguf are p95 2 in flight
    (one decoding, one queued). On this CPU's crossover 2 (AVX512-BF16) that advises paged; where it is 4
    (AVX2-only) it is at most half the crossover, so gguf stays."""
    from openai import OpenAI

    stop = threading.Event()
    with running_server(smollm2_gguf, "gguf") as server:
        client = OpenAI(base_url=server.v1, api_key="none")

        def stream(i: int) -> None:
            while not stop.is_set():
                for _ in client.completions.create(model="smollm2", prompt=f"{i} Once upon a time", max_tokens=24,
                                                   stream=True, seed=i):
                    pass

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        window = LoadWindow(3.0)
        try:
            while not (load := window.load(time.monotonic())).covered or load.samples < 10:
                s = fetch("127.0.0.1", server.port)
                if s is not None:
                    window.add(Tick(time.monotonic(), {"pod": s}))
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join()
    advice = advise("gguf", load, "3s")
    x = crossover(node_cpu_class())
    # 2 in flight, or 3 for a scrape that saw a finished request not yet released next to its successor
    assert 2 <= load.p95 <= 3 and load.crossover.value == x, load
    if x <= 2:
        assert (advice.engine, advice.reason) == ("paged", "AboveCrossover"), advice
    else:
        assert advice.engine == "gguf" and advice.reason in ("BelowCrossover", "WithinBand"), advice
    assert f"crossover ({x} on the pods' CPU: {node_cpu_class()})" in advice.message, advice.message


def test_scrape_of_a_closed_port_is_unknown_not_zero() -> None:
    from server_process import free_port

    assert fetch("127.0.0.1", free_port()) is None


def test_only_ready_live_pods_with_an_ip_are_scraped() -> None:
    def pod(name: str, ready: bool = True, ip: str | None = "10.0.0.1", deleting: bool = False) -> dict:
        meta = {"name": name, **({"deletionTimestamp": "2026-11-30T00:00:00Z"} if deleting else {})}
        status = {"containerStatuses": [{"name": "engine", "ready": ready}], **({"podIP": ip} if ip else {})}
        return {"metadata": meta, "status": status}

    pods = [pod("a"), pod("b", ready=False), pod("c", ip=None), pod("d", deleting=True), pod("e", ip="fd00::5")]
    assert ready_pods(pods) == [("a", "10.0.0.1"), ("e", "fd00::5")]
