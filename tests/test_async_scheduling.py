"""Overlapped decode (``Engine(async_scheduling=True)``): step N+1 launched before step N's tokens are read.

The independent check is the engine without a decode runner (``cuda_graphs=False``: every step built to its
batch, nothing in flight), called the same way: every output of every step must be the same, except that a
waiting request whose slot frees when a sequence ends by a token (EOS, stop) starts one step later (its results
are the same). On a CPU the runner runs eagerly, so its "device" is done at launch; ``SimulatedDevice`` shows
the order of launches and reads a GPU would see.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2fast import SamplingParams
from gpt2fast.decode_runner import DecodeRunner
from gpt2fast.engine import Engine
from gpt2fast.outputs import CompletionOutput

CONFIG = '{"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 301, "n_positions": 96, "eos_token_id": %d}'
COMMON = dict(device="cpu", seed=3, max_num_seqs=6, kv_cache_tokens=1024)


def _model(eos: int = 300) -> str:
    return "random:" + CONFIG % eos


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 301, (n,), generator=gen).tolist() for n in lengths]


def _engines(model: str, **kw) -> tuple[Engine, Engine]:
    """(the reference: no runner; the overlapped engine), alike otherwise."""
    args = COMMON | kw
    overlapped = Engine(model, cuda_graphs=True, **args)
    assert overlapped.async_scheduling
    return Engine(model, cuda_graphs=False, **args), overlapped


class _Counting:
    """Counts the decode steps an engine's runner launches ahead (before reading the step before)."""

    def __init__(self, engine: Engine) -> None:
        self.ahead = 0
        launch_ahead = engine._launch_ahead

        def counting(previous):
            flight = launch_ahead(previous)
            self.ahead += flight is not None
            return flight

        engine._launch_ahead = counting


def _drive(engine: Engine, requests, abort_at: dict[int, str] | None = None) -> list[list]:
    """Add ``requests`` [(id, prompt, params)], step to the end (aborting ``abort_at[step]`` first); every step's
    outputs as comparable tuples."""
    engine.add_requests(requests)
    steps, k = [], 0
    while engine.has_unfinished():
        if abort_at and k in abort_at:
            engine.abort(abort_at[k])
        steps.append([dataclasses.astuple(out) for out in engine.step()])
        k += 1
    engine.scheduler.check()
    assert engine.pool.num_free == engine.pool.num_blocks
    return steps


def _same_steps(model: str, requests, min_ahead: int = 1, abort_at=None, **kw) -> list[list]:
    reference, overlapped = _engines(model, **kw)
    counter = _Counting(overlapped)
    want = _drive(reference, requests, abort_at)
    got = _drive(overlapped, requests, abort_at)
    assert got == want
    assert counter.ahead >= min_ahead, counter.ahead
    return got


def _requests(params: list[SamplingParams], lengths=(1, 17, 40, 16, 5, 9), seed=0):
    prompts = _prompts(lengths[: len(params)], seed)
    return [(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))]


def test_greedy_and_seeded_rows_finishing_at_different_steps():
    params = [SamplingParams(max_tokens=m, temperature=t, seed=i, ignore_eos=True)
              for i, (m, t) in enumerate([(9, 0), (7, 0.9), (12, 1.2), (1, 0), (10, 0.7), (2, 0.5)])]
    steps = _same_steps(_model(), _requests(params), min_ahead=5)
    assert len(steps) == 12  # one prefill step, 11 decode steps: each step() still returns one step


def test_top_k_top_p_min_p_rows_sample_on_the_device_ahead():
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=1),
              SamplingParams(max_tokens=8, top_p=0.7, seed=2),
              SamplingParams(max_tokens=9, temperature=1.3, min_p=0.2, seed=3),
              SamplingParams(max_tokens=6, temperature=0)]
    _same_steps(_model(), _requests(params), min_ahead=5)


def _first_new(tokens: list[int], start: int) -> int:
    """The first token from ``start`` on that does not occur before it."""
    return next(t for i, t in enumerate(tokens) if i >= start and t not in tokens[:i])


def test_an_end_found_late_drops_the_token_launched_after_it():
    """EOS, a stop token and a stop string each end a sequence one step after its next step was launched."""
    prompts = _prompts([5, 12, 30], seed=4)
    sampled = [dict(max_tokens=14, temperature=1.0, seed=i) for i in range(3)]
    free = Engine(_model(), cuda_graphs=False, **COMMON)
    free.add_requests([(str(i), p, SamplingParams(**s)) for i, (p, s) in enumerate(zip(prompts, sampled))])
    runs = []
    while free.has_unfinished():
        runs += [o.outputs[0] for o in free.step() if o.finished]
    eos, stop_id = _first_new(runs[0].token_ids, 4), _first_new(runs[1].token_ids, 3)
    stop_text = runs[2].text[len(runs[2].text) // 2:][:2]
    params = [SamplingParams(**sampled[0]),
              SamplingParams(**sampled[1], stop_token_ids=[stop_id], ignore_eos=True),
              SamplingParams(**sampled[2], stop=[stop_text], ignore_eos=True)]
    requests = [(str(i), p, s) for i, (p, s) in enumerate(zip(prompts, params))]
    steps = _same_steps(_model(eos), requests, min_ahead=3)
    finals = {out[0]: CompletionOutput(*out[3][0]) for step in steps for out in step if out[4]}  # by request id
    assert [(finals[r].finish_reason, finals[r].stop_reason) for r in "012"] == [
        ("stop", None), ("stop", stop_id), ("stop", stop_text)]
    assert all(len(finals[r].token_ids) < 14 for r in "012")


def test_n_samples_best_of_and_prefix_caching():
    shared = _prompts([33], seed=5)[0]
    requests = [("a", shared, SamplingParams(max_tokens=7, n=3, temperature=1.0, seed=8)),
                ("b", shared + [7], SamplingParams(max_tokens=5, temperature=0)),
                ("c", shared, SamplingParams(max_tokens=6, n=2, best_of=3, temperature=0.9, seed=2))]
    _same_steps(_model(), requests, min_ahead=1)


def test_host_sampled_rows_pause_the_overlap_and_it_resumes():
    """Penalties, logprobs and min_tokens need the host's sampler: those steps are read before the next is
    launched; once they finish (or min_tokens is reached) the rest overlaps again."""
    params = [SamplingParams(max_tokens=4, temperature=0.8, repetition_penalty=1.3, seed=1),
              SamplingParams(max_tokens=3, temperature=0, logprobs=2),
              SamplingParams(max_tokens=12, temperature=0, min_tokens=5, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.7, seed=6)]
    _same_steps(_model(), _requests(params), min_ahead=3)


def test_waiting_requests_and_preemption_in_a_tight_pool():
    """More requests than max_num_seqs, a pool that forces preemption (and copy-on-write of shared blocks)."""
    params = [SamplingParams(max_tokens=30, temperature=0.8 * (i % 2), seed=i, ignore_eos=True) for i in range(9)]
    requests = _requests(params, lengths=(20, 3, 31, 8, 17, 40, 2, 25, 11), seed=6)
    reference, overlapped = _engines(_model(), kv_cache_tokens=160, max_num_seqs=4, block_size=8)
    counter = _Counting(overlapped)
    want, got = _drive(reference, requests), _drive(overlapped, requests)
    assert got == want
    assert reference.scheduler.num_preemptions > 0 and overlapped.scheduler.num_preemptions > 0
    assert counter.ahead > 10, counter.ahead


def test_a_request_waiting_for_a_slot_that_an_early_stop_frees_starts_one_step_later():
    """A sequence that ends by a token (EOS, a stop id or string) is known to end only when its in-flight token is
    read, after the next step was launched without the waiting request: it starts one step later than without
    overlap (as with vLLM's async scheduling), and every request's result is the same."""
    stops = dict(stop_token_ids=list(range(250)), min_tokens=3, max_tokens=12, temperature=0)
    requests = [("a", [1, 2, 3], SamplingParams(**stops)),
                ("c", [4, 5], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
                ("b", [6, 7, 8], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))]
    reference, overlapped = _engines(_model(), max_num_seqs=2)
    want, got = _drive(reference, requests), _drive(overlapped, requests)
    finals = [{o[0]: o for step in run for o in step if o[4]} for run in (want, got)]
    assert finals[0] == finals[1] and len(finals[0]) == 3
    first_b = [next(i for i, step in enumerate(run) if any(o[0] == "b" for o in step)) for run in (want, got)]
    assert first_b[1] == first_b[0] + 1, first_b


def test_abort_while_a_step_is_in_flight():
    params = [SamplingParams(max_tokens=14, temperature=0.0 if i % 2 else 1.0, seed=i, ignore_eos=True)
              for i in range(4)]
    steps = _same_steps(_model(), _requests(params), min_ahead=3, abort_at={3: "r1", 6: "r2", 7: "r0"})
    assert not any(out[0] in ("r1", "r2") for step in steps[7:] for out in step)


def test_a_step_launched_ahead_is_waited_for_when_nothing_is_left():
    engine = Engine(_model(), cuda_graphs=True, **COMMON)
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine._inflight is None


def test_simulated_device_sees_each_step_launched_before_the_previous_is_read():
    for mode in (dict(temperature=0), dict(temperature=0.8, top_k=40, top_p=0.9, seed=1)):
        logs = {}
        for overlap in (True, False):
            engine = Engine(_model(), cuda_graphs=True, async_scheduling=overlap, **COMMON)
            device = engine.decode_runner.simulate(30.0)
            for i in range(3):
                engine.add_request(str(i), [1 + i, 2], SamplingParams(max_tokens=8, ignore_eos=True, **mode))
            while engine.has_unfinished():
                engine.step()
            logs[overlap] = device.log
        # 7 decode steps; overlapped: launch 0, 1, sync 0, launch 2, sync 1, ...; else launch k, sync k.
        assert logs[False] == [(event, k) for k in range(7) for event in ("launch", "sync")]
        assert logs[True][:3] == [("launch", 0), ("launch", 1), ("sync", 0)]
        assert all(logs[True].index(("launch", k + 1)) < logs[True].index(("sync", k)) for k in range(6))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_staging_a_step_is_one_copy_and_no_allocation():
    """Every value of a step (ids, positions, slots, metadata, sampling settings) goes to the device in one
    copy from the staging buffer; nothing is allocated on the way."""
    engine = Engine(_model(), cuda_graphs=True, **COMMON)
    runner: DecodeRunner = engine.decode_runner
    tables = [[0, 1], [2], [3, 4, 5]]
    with _Ops() as seen:
        runner._stage([5, 6, 7], [20, 3, 40], tables, "sampled", [0.0, 0.5, 1.0], [1, 2, 3], [1, -1, 0],
                      dict(top_k=[0, 5, 9], top_p=[1.0, 0.9, 0.5], min_p=[0.0, 0.0, 0.1]))
    assert seen.ops == ["aten.copy_"]
    v = runner._device_views[4]
    assert v["ids"].tolist() == [5, 6, 7, 0] and v["src"].tolist() == [1, -1, 0, -1]
    assert v["slots"].tolist() == [1 * 16 + 4, 2 * 16 + 3, 5 * 16 + 8, -1]
    assert v["seq_lens"].tolist() == [21, 4, 41, 0] and v["cu_seqlens"].tolist() == [0, 1, 2, 3, 3]
    assert v["tables"].view(4, -1)[:, :3].tolist() == [[0, 1, -1], [2, -1, -1], [3, 4, 5], [-1, -1, -1]]
    assert v["top_k"].tolist() == [0, 5, 9, 0] and v["min_p"].tolist()[2:] == [pytest.approx(0.1), 0.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_overlapped_decode_makes_no_hidden_sync_gpu(backend):
    """After the graphs are captured, steady decode steps raise on any implicit CUDA sync (torch's sync debug
    mode); the only wait is the event before reading the previous step's tokens."""
    engine = Engine("random:gpt2", device="cuda", dtype="float16", backend=backend, max_num_seqs=8)
    for i in range(5):
        engine.add_request(str(i), [1 + i] * (3 + i), SamplingParams(max_tokens=40, temperature=0.8, top_k=20,
                                                                       seed=i, ignore_eos=True))
    for _ in range(12):  # prefill, capture, warm
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            assert engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
