"""Generation backends: the transformers loop on a tiny random Llama (greedy equals transformers' own
``generate``, batch-independent results, seeded sampling, stop handling, log-likelihoods), vLLM request
translation against a fake ``vllm`` module (the real engine: tests/test_vllm_engine.py), the OpenAI-compatible
client against a real local HTTP server, specs/resources, and the generation job end to end."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_sft_support import smollm2_tokenizer

from tulu_pipeline.generation.base import (
    Completion,
    LogLikelihoodUnsupported,
    SamplingParams,
    sample_seed,
)
from tulu_pipeline.generation.chat import ChatEncoder
from tulu_pipeline.generation.spec import BackendSpec, build_backend, resolve_model_path
from tulu_pipeline.storage import Store

PROMPTS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "A much longer prompt with many words in it, so the others get padded"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def _save_model(target: Path, chat_template: bool = True) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer; a wide init so greedy text varies token to token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    if not chat_template:
        (target / "chat_template.jinja").unlink(missing_ok=True)
    return target


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("gen") / "tiny")


@pytest.fixture(scope="module")
def backend(model_dir):
    from tulu_pipeline.generation.transformers_backend import TransformersBackend

    return TransformersBackend(model_dir, "tiny", device="cpu", batch_size=4)


def _texts(results):
    return [[c.text for c in completions] for completions in results]


# -- transformers -----------------------------------------------------------------------------------
def test_greedy_matches_transformers_generate_and_is_batch_independent(backend):
    import torch

    batched = backend.generate(PROMPTS, GREEDY)
    alone = [backend.generate([messages], GREEDY)[0] for messages in PROMPTS]
    assert _texts(batched) == _texts(alone)
    assert len({c[0].text for c in batched}) == 3  # the prompts really differ

    for messages, completions in zip(PROMPTS, batched):
        ids = backend.encoder.prompt_ids(messages)
        reference = backend.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                           max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                           pad_token_id=backend.pad_token_id, eos_token_id=sorted(backend.stop_token_ids))
        new = reference[0, len(ids):].tolist()
        completion = completions[0]
        assert completion.completion_tokens == len(new)
        assert completion.prompt_tokens == len(ids)
        assert completion.text == backend.encoder.decode([t for t in new if t not in backend.stop_token_ids])
        assert completion.finish_reason == ("stop" if new[-1] in backend.stop_token_ids else "length")
        assert completion.model_id == "tiny" and completion.params == GREEDY.to_json()


FEW_SHOT = [m for k in range(3) for m in (
    {"role": "user", "content": f"Example question number {k}: what is the sum of {k} and {k + 1}, step by step?"},
    {"role": "assistant", "content": f"We add {k} and {k + 1} to get {2 * k + 1}. So the answer is {2 * k + 1}."})]


def test_a_shared_few_shot_context_runs_once_and_changes_nothing(backend):
    """Few-shot prompts share their exemplars: that context is run once per call and cached, and each
    prompt's logits, greedy text and samples are those of a plain forward over the whole prompt."""
    import torch

    prompts = [[*FEW_SHOT, {"role": "user", "content": question}]
               for question in ("What is 2 + 2?", "And 3 + 5?", "Is 7 prime? Answer yes or no.")]
    ids = [backend.encoder.prompt_ids(m) for m in prompts]
    split = backend.shared_prefix_length(prompts[0], ids[0])
    assert split >= 64 and all(backend.shared_prefix_length(m, i) == split for m, i in zip(prompts, ids))
    assert len({tuple(i[:split]) for i in ids}) == 1 and all(len(i) > split for i in ids)
    assert backend.shared_prefix_length(PROMPTS[2], backend.encoder.prompt_ids(PROMPTS[2])) == 0  # short context

    calls = []
    forward = backend._forward
    backend._forward = lambda input_ids, *a: calls.append(tuple(input_ids.shape)) or forward(input_ids, *a)
    try:
        batched = backend.generate(prompts, GREEDY)
    finally:
        backend._forward = forward
    assert calls[0] == (1, split) and calls.count((1, split)) == 1  # the context once, then each prompt's rest
    assert sorted(calls[1:4]) == sorted((1, len(i) - split) for i in ids)
    assert _texts(batched) == [_texts(backend.generate([m], GREEDY))[0] for m in prompts]
    for messages, prompt_ids, completions in zip(prompts, ids, batched):
        with torch.inference_mode():
            whole = backend.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
            reference = backend.model.generate(torch.tensor([prompt_ids]), max_new_tokens=GREEDY.max_new_tokens,
                                               attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                               do_sample=False, pad_token_id=backend.pad_token_id,
                                               eos_token_id=sorted(backend.stop_token_ids))
        backend._split = {tuple(prompt_ids): split}
        with torch.inference_mode():
            logits = backend._prefill([_row(prompt_ids)], {})[0][0]
        torch.testing.assert_close(logits, whole, rtol=1e-5, atol=1e-5)
        new = [t for t in reference[0, len(prompt_ids):].tolist() if t not in backend.stop_token_ids]
        assert completions[0].text == backend.encoder.decode(new)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=3)
    assert _texts(backend.generate(prompts, params))[1] == _texts(backend.generate(prompts[1:2], SamplingParams(
        max_new_tokens=8, temperature=1.0, n=2, seed=4)))[0]


def _row(prompt_ids):
    from tulu_pipeline.generation.transformers_backend import _Row

    return _Row(0, 0, list(prompt_ids), seed=0, budget=1)


def test_generate_many_shares_batches_and_returns_each_call_s_result(backend):
    """Requests with different lengths and sampling share batches where they can; each result is the one its
    own ``generate`` call gives (and a backend without generate_many is called once per request)."""
    from tulu_pipeline.generation.base import generate_many

    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=5)
    requests = [(PROMPTS, GREEDY), (PROMPTS[1:], SamplingParams(max_new_tokens=4, temperature=0)),
                (PROMPTS[:2], sampled), ([], GREEDY)]
    decoded = []
    original = backend._decode
    backend._decode = lambda batch, *a: decoded.append(len(batch)) or original(batch, *a)
    try:
        together = backend.generate_many(requests)
    finally:
        backend._decode = original
    assert sum(decoded) == 3 + 2 + 4 and len(decoded) == 3  # greedy rows in batches of 4 (5 rows), then sampled ones
    assert [len(r) for r in together] == [3, 2, 2, 0]
    assert together == [backend.generate(prompts, params) for prompts, params in requests]
    assert together[1][0][0].completion_tokens <= 4 and together[1][0][0].params == requests[1][1].to_json()

    class Plain:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, params):
            self.calls.append(len(prompts))
            return [[p[-1]["content"]] for p in prompts]

    plain = Plain()
    assert generate_many(plain, requests[:2]) == [[[m[-1]["content"]] for m in PROMPTS],
                                                  [[m[-1]["content"]] for m in PROMPTS[1:]]]
    assert plain.calls == [3, 2]


def test_backend_pool_keeps_a_model_until_its_files_or_spec_change(tmp_path, model_dir):
    import os

    from tulu_pipeline.generation.spec import BackendPool

    shutil.copytree(model_dir, tmp_path / "models" / "a")
    shutil.copytree(model_dir, tmp_path / "models" / "b")
    store = Store(str(tmp_path))
    pool = BackendPool(size=1)
    spec = BackendSpec(model="models/a", device="cpu")
    first = pool.get(spec, store)
    assert pool.get(BackendSpec(model="models/a", device="cpu"), store) is first and pool.owns(first)
    assert pool.get(BackendSpec(model="models/a", device="cpu", batch_size=3), store) is not first  # another spec
    assert first.model is None and not pool.owns(first)  # evicted (size 1) and closed
    again = pool.get(spec, store)
    config = tmp_path / "models" / "a" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    assert pool.get(spec, store) is not again  # the checkpoint was rewritten: load it anew
    pool.close()
    assert not pool.owns(again)
    assert BackendPool.key(BackendSpec(kind="openai", model="m", base_url="http://x/v1"), store) is None


def test_greedy_n_copies(backend):
    results = backend.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, temperature=0, n=3, seed=7))
    assert [c.index for c in results[0]] == [0, 1, 2]
    assert len({c.text for c in results[0]}) == 1
    assert {c.seed for c in results[0]} == {7}


def test_seeded_sampling_reproducible_and_independent_of_batch(model_dir, backend):
    from tulu_pipeline.generation.transformers_backend import TransformersBackend

    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=11)
    first = backend.generate(PROMPTS, params)
    assert _texts(backend.generate(PROMPTS, params)) == _texts(first)
    # Prompt 0 alone (request index 0 again) and in batches of one sample row each: same samples.
    single_rows = TransformersBackend(model_dir, "tiny", device="cpu", batch_size=1)
    assert _texts(single_rows.generate(PROMPTS[:1], params)) == _texts(first[:1])
    assert len(set(_texts(first)[0])) == 3  # the three samples differ
    assert [c.seed for c in first[1]] == [12, 12, 12] and [c.index for c in first[1]] == [0, 1, 2]
    # Request i draws from seed + i: request 1 under seed 11 is request 0 under seed 12, for the same prompt.
    same_prompt = backend.generate([PROMPTS[0], PROMPTS[0]], params)
    shifted = backend.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=12))
    assert _texts(same_prompt)[1] == _texts(shifted)[0]
    assert _texts(same_prompt)[0] != _texts(same_prompt)[1]


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(5, 0) == sample_seed(5, 0)
    seeds = {sample_seed(s, j) for s in range(20) for j in range(4)}
    assert len(seeds) == 80 and all(0 <= s < 2**63 for s in seeds)


def test_stop_strings_and_eos_and_length(backend):
    base = backend.generate(PROMPTS[:1], GREEDY)[0][0]
    assert base.finish_reason == "length" and base.completion_tokens == GREEDY.max_new_tokens
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    stopped = backend.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, temperature=0, stop=(stop, "never")))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:text.find(stop)]
    assert stopped.completion_tokens < base.completion_tokens

    # Make the 4th greedy token an end-of-sequence token: the row ends there and the text leaves it out.
    ids = backend.encoder.prompt_ids(PROMPTS[0])
    import torch

    tokens = backend.model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                    pad_token_id=backend.pad_token_id)[0, len(ids):].tolist()
    original = set(backend.stop_token_ids)
    backend.stop_token_ids = original | {tokens[3]}
    try:
        eos = backend.generate(PROMPTS[:1], GREEDY)[0][0]
    finally:
        backend.stop_token_ids = original
    assert eos.finish_reason == "stop" and eos.completion_tokens == 4
    assert eos.text == backend.encoder.decode(tokens[:3])


def test_sampling_params_validation_and_json():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    params = SamplingParams(stop="###")
    assert params.stop == ("###",)
    assert SamplingParams.from_json(params.to_json()) == params
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_json({"temprature": 0.5})
    c = Completion("t", "m", "stop", 1, 2, 3, {"a": 1}, index=1)
    assert Completion.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_tulu_template_when_model_dir_has_none(tmp_path):
    from tulu_pipeline.templates.chat_template import encode_conversation

    encoder = ChatEncoder.from_pretrained(_save_model(tmp_path / "plain", chat_template=False))
    assert encoder.format == "tulu"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
    prompt = encoder.prompt_ids(messages)
    # Exactly the tokens a training conversation has before the reply's first token.
    trained = encode_conversation(messages + [{"role": "assistant", "content": "Fine."}], encoder.tokenizer)
    first_label = next(k for k, label in enumerate(trained["labels"]) if label != -100 and k > len(prompt) - 5)
    assert prompt == trained["input_ids"][:first_label]
    assert encoder.tokenizer.decode(prompt).endswith("<|user|>\nAnd now?\n<|assistant|>\n")
    # The model's own (ChatML) template is used when present.
    own = ChatEncoder(smollm2_tokenizer())
    assert own.format == "model" and "<|im_start|>assistant" in own.prompt_text(PROMPTS[0])
    assert ChatEncoder(smollm2_tokenizer(), template="tulu").format == "tulu"


def test_loglikelihood_matches_a_direct_forward(backend):
    import torch

    # one-token continuations of one prompt share its forward ("A"/"B" after a judge prompt)
    requests = [(PROMPTS[0], " Paris is the capital."), (PROMPTS[1], "Yes"), (PROMPTS[2], ""), (PROMPTS[2], "4"),
                (PROMPTS[1], "No"), (PROMPTS[0], "A"), (PROMPTS[0], "B")]
    assert [len(backend.encoder.continuation_ids(c)) for _, c in requests] == [5, 1, 0, 1, 1, 1, 1]
    scores = backend.loglikelihood(requests)
    assert scores[2] == (0.0, 0)
    alone = backend.loglikelihood(requests[3:4])[0]  # alone or beside others (padding): the same number
    assert alone[1] == 1 and alone[0] == pytest.approx(scores[3][0], abs=1e-5)
    for (messages, continuation), (total, count) in zip(requests, scores):
        if not continuation:
            continue
        prompt, cont = backend.encoder.prompt_ids(messages), backend.encoder.continuation_ids(continuation)
        with torch.no_grad():
            logits = backend.model(torch.tensor([prompt + cont])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + k, token]) for k, token in enumerate(cont))
        assert count == len(cont)
        assert total == pytest.approx(expected, abs=1e-3)
    assert scores[0][0] < 0


# -- vLLM (fake module) ---------------------------------------------------------------------------
class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _fake_vllm(calls: dict) -> types.ModuleType:
    module = types.ModuleType("vllm")

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, inputs, sampling_params=None, use_tqdm=True):
            calls.setdefault("generate", []).append((inputs, sampling_params))
            outputs = []
            for k, prompt in enumerate(inputs):
                sp = sampling_params[k] if isinstance(sampling_params, list) else sampling_params
                if sp.kwargs.get("prompt_logprobs") is not None:
                    ids = prompt["prompt_token_ids"]
                    entries = [None] + [{t: types.SimpleNamespace(logprob=-0.5), 7: types.SimpleNamespace(logprob=-9.0)}
                                        for t in ids[1:]]
                    outputs.append(types.SimpleNamespace(prompt_logprobs=entries, outputs=[]))
                    continue
                samples = [types.SimpleNamespace(text=f"p{k}s{j}", token_ids=[1] * (j + 2),
                                                 finish_reason="length" if j else "stop")
                           for j in range(sp.kwargs["n"])]
                outputs.append(types.SimpleNamespace(outputs=samples, prompt_token_ids=prompt["prompt_token_ids"]))
            return outputs

    module.LLM = LLM
    module.SamplingParams = _FakeSamplingParams
    return module


def test_vllm_backend_translates_requests(monkeypatch, model_dir):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    from tulu_pipeline.generation.vllm_backend import VLLMBackend

    backend = VLLMBackend(model_dir, "tiny-vllm", dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=1024)
    assert calls["init"] == {"model": str(model_dir), "dtype": "bfloat16", "gpu_memory_utilization": 0.5,
                             "tensor_parallel_size": 1, "trust_remote_code": False, "seed": 0, "max_model_len": 1024,
                             "enforce_eager": True}  # no CUDA here: the CPU engine runs eagerly
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, n=2, seed=100, stop=("\n\n",))
    results = backend.generate(PROMPTS[:2], params)
    inputs, sampling = calls["generate"][-1]
    encoder = ChatEncoder.from_pretrained(model_dir)
    assert inputs == [{"prompt_token_ids": encoder.prompt_ids(m)} for m in PROMPTS[:2]]
    assert [s.kwargs for s in sampling] == [
        {"n": 2, "temperature": 0.8, "top_p": 0.9, "max_tokens": 20, "seed": 100 + i, "stop": ["\n\n"],
         "stop_token_ids": sorted(encoder.stop_token_ids())} for i in range(2)]
    assert [[(c.text, c.finish_reason, c.completion_tokens, c.seed, c.index) for c in r] for r in results] == [
        [("p0s0", "stop", 2, 100, 0), ("p0s1", "length", 3, 100, 1)],
        [("p1s0", "stop", 2, 101, 0), ("p1s1", "length", 3, 101, 1)]]
    assert results[1][0].prompt_tokens == len(inputs[1]["prompt_token_ids"])

    greedy = backend.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5, temperature=0, n=3))
    sp = calls["generate"][-1][1][0].kwargs
    assert (sp["n"], sp["temperature"], sp["top_p"], sp["stop"]) == (1, 0.0, 1.0, None)
    assert [c.text for c in greedy[0]] == ["p0s0"] * 3 and [c.index for c in greedy[0]] == [0, 1, 2]

    scores = backend.loglikelihood([(PROMPTS[0], " yes"), (PROMPTS[1], "")])
    cont = encoder.continuation_ids(" yes")
    assert scores == [(pytest.approx(-0.5 * len(cont)), len(cont)), (0.0, 0)]
    assert calls["generate"][-1][1].kwargs["prompt_logprobs"] == 1


def test_vllm_missing_gives_an_install_hint(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    from tulu_pipeline.generation.vllm_backend import VLLMBackend

    with pytest.raises(ImportError, match="make setup"):
        VLLMBackend(model_dir, "x")


# -- OpenAI-compatible HTTP -------------------------------------------------------------------------
SECRET = "sk-test-secret-123"


class _Server:
    """A local chat-completions server: checks the bearer token, replays scripted statuses, records bodies."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.script: list[int] = []  # statuses to return before succeeding
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                server.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if self.headers.get("Authorization") != f"Bearer {SECRET}":
                    return self._send(401, {"error": "bad key " + str(self.headers.get("Authorization"))})
                if server.script:
                    status = server.script.pop(0)
                    # Echo the key back, as a careless server might: the client must not repeat it.
                    return self._send(status, {"error": f"scripted failure for {self.headers['Authorization']}"})
                choices = [{"index": j, "message": {"role": "assistant", "content": f"answer {body['seed']}.{j}"},
                            "finish_reason": "length" if j else "stop"} for j in range(body["n"])]
                self._send(200, {"id": "x", "object": "chat.completion", "choices": choices[::-1],
                                 "usage": {"prompt_tokens": 9, "completion_tokens": 5 * body["n"] + 1}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("TULU_TEST_KEY", SECRET)
    s = _Server()
    yield s
    s.close()


def _http_backend(url, **kwargs):
    from tulu_pipeline.generation.openai_backend import OpenAICompatBackend

    return OpenAICompatBackend(url, "served-model", api_key_env="TULU_TEST_KEY", backoff_s=0.01, **kwargs)


def test_openai_backend_passes_params_and_parses_choices(server):
    backend = _http_backend(server.url, model_id="served")
    params = SamplingParams(max_new_tokens=30, temperature=0.6, top_p=0.8, n=2, seed=40, stop=("END",))
    results = backend.generate(PROMPTS, params)
    assert server.auth == [f"Bearer {SECRET}"] * 3
    by_seed = {b["seed"]: b for b in server.bodies}
    assert sorted(by_seed) == [40, 41, 42]
    assert by_seed[41] == {"model": "served-model", "messages": PROMPTS[1], "n": 2, "max_tokens": 30,
                           "temperature": 0.6, "top_p": 0.8, "seed": 41, "stop": ["END"]}
    assert [[(c.text, c.finish_reason, c.completion_tokens, c.seed, c.index) for c in r] for r in results][2] == [
        ("answer 42.0", "stop", 6, 42, 0), ("answer 42.1", "length", 5, 42, 1)]
    assert all(c.prompt_tokens == 9 and c.model_id == "served" for r in results for c in r)
    assert SECRET not in repr(backend) and SECRET not in json.dumps([c.to_json() for r in results for c in r])
    with pytest.raises(LogLikelihoodUnsupported, match="OpenAICompatBackend"):
        backend.loglikelihood([(PROMPTS[0], "x")])
    backend.close()


def test_openai_backend_retries_5xx_and_429_but_not_400(server):
    backend = _http_backend(server.url, max_retries=3)
    server.script = [500, 429, 503]
    assert backend.generate(PROMPTS[:1], GREEDY)[0][0].text == "answer 0.0"
    assert len(server.bodies) == 4

    from tulu_pipeline.generation.openai_backend import GenerationHTTPError

    server.bodies.clear()
    server.script = [400]
    with pytest.raises(GenerationHTTPError) as info:
        backend.generate(PROMPTS[:1], GREEDY)
    assert len(server.bodies) == 1 and info.value.status == 400
    assert "400" in str(info.value) and SECRET not in str(info.value) and "[redacted]" in str(info.value)

    server.bodies.clear()
    server.script = [502] * 5
    with pytest.raises(GenerationHTTPError, match="after 2 attempts") as info:
        _http_backend(server.url, max_retries=1).generate(PROMPTS[:1], GREEDY)
    assert len(server.bodies) == 2 and SECRET not in str(info.value)


def test_openai_backend_connection_errors_and_missing_key(server, monkeypatch):
    from tulu_pipeline.generation.openai_backend import GenerationHTTPError

    dead = "http://127.0.0.1:9/v1"  # discard port: connection refused
    with pytest.raises(GenerationHTTPError, match="after 2 attempts.*Connect"):
        _http_backend(dead, max_retries=1).generate(PROMPTS[:1], GREEDY)
    monkeypatch.delenv("TULU_TEST_KEY")
    with pytest.raises(GenerationHTTPError, match=r"401.*TULU_TEST_KEY"):
        _http_backend(server.url).generate(PROMPTS[:1], GREEDY)
    assert server.auth[-1] is None


# -- specs, resources, the job ----------------------------------------------------------------------
def test_backend_spec_and_resources(tmp_path, model_dir):
    store = Store(str(tmp_path / "home"))
    assert resolve_model_path("models/sft-1", store) == Path(store.path("models/sft-1"))
    with pytest.raises(ValueError, match="outside TULU_HOME"):  # configs cannot point out of TULU_HOME
        resolve_model_path(str(model_dir), store)
    with pytest.raises(ValueError, match="escapes TULU_HOME"):
        resolve_model_path("models/../../etc", store)
    assert resolve_model_path(store.path("models/sft-1"), store) == Path(store.path("models/sft-1"))
    with pytest.raises(ValueError, match="base_url"):
        BackendSpec(kind="openai", model="m")
    with pytest.raises(ValueError):
        BackendSpec(kind="tgi", model="m")
    spec = BackendSpec.model_validate_json(BackendSpec(model="models/x", batch_size=2).model_dump_json())
    assert spec.resolved_model_id == "models/x" and spec.batch_size == 2

    from resources.generation import GenerationResource, JudgeResource

    gen = GenerationResource().spec("models/sft-abc", "sft-abc")
    assert (gen.kind, gen.device, gen.model, gen.model_id) == ("transformers", "cpu", "models/sft-abc", "sft-abc")
    remote = GenerationResource(kind="openai", base_url="http://h:8000/v1").spec("policy")
    assert remote.kind == "openai" and remote.base_url == "http://h:8000/v1"
    with pytest.raises(ValueError, match="kind"):
        GenerationResource(kind="tgi").spec("m")
    judge = JudgeResource().spec()
    assert (judge.kind, judge.model) == ("transformers", "models/base_model")
    judge = JudgeResource(kind="openai", model="gpt-judge", base_url="http://j/v1", max_retries=5).spec()
    assert (judge.kind, judge.max_retries, judge.api_key_env) == ("openai", 5, "OPENAI_API_KEY")

    backend = build_backend(BackendSpec(model=str(model_dir), model_id="t", device="cpu", batch_size=3))
    assert backend.model_id == "t" and backend.batch_size == 3
    backend.close()


def _write_requests(store: Store, rel: str, count: int) -> list[str]:
    ids = [f"req-{k}" for k in range(count)]
    records = [{"request_id": rid, "messages": PROMPTS[k % len(PROMPTS)]} for k, rid in enumerate(ids)]
    store.write_jsonl(rel, records)
    return ids


def test_run_generation_writes_every_request_and_ignores_chunking(tmp_path, model_dir, backend):
    from tulu_pipeline.generation.job import run_generation
    from tulu_pipeline.progress import NullReporter

    store = Store(str(tmp_path / "home"))
    (Path(store.path("models"))).mkdir(parents=True)
    (Path(store.path("models")) / "tiny").symlink_to(model_dir)
    ids = _write_requests(store, "work/requests.jsonl", 5)
    spec = BackendSpec(model="models/tiny", model_id="tiny", device="cpu", batch_size=2)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3)
    reporter = NullReporter()
    summary = run_generation(store, "work/requests.jsonl", "work/out.jsonl", spec, params, reporter, chunk_size=2)
    lines = [json.loads(line) for line in store.read_bytes("work/out.jsonl").decode().splitlines()]
    assert [line["request_id"] for line in lines] == ids
    assert [[c["seed"] for c in line["completions"]] for line in lines] == [[3 + k, 3 + k] for k in range(5)]
    assert all(c["params"] == params.to_json() and c["model_id"] == "tiny" for line in lines for c in line["completions"])
    assert summary["requests"] == 5 and summary["completions"] == 10
    assert summary["tokens"] == sum(c["completion_tokens"] for line in lines for c in line["completions"])
    assert sum(summary["finish_reasons"].values()) == 10 and summary["model_id"] == "tiny"
    progress = [json.loads(m) for m in reporter.messages if m.startswith("{")]
    assert [p["requests_done"] for p in progress] == [2, 4, 5]

    # One chunk, an already loaded backend: the same file, byte for byte.
    again = run_generation(store, "work/requests.jsonl", "work/out2.jsonl", spec, params, backend=backend,
                           chunk_size=100)
    assert again["output_sha256"] == summary["output_sha256"]
    assert store.read_bytes("work/out2.jsonl") == store.read_bytes("work/out.jsonl")
    assert not [p for p in store.listdir("work") if ".tmp-" in p]


def test_run_generation_rejects_bad_requests_and_leaves_no_output(tmp_path, backend):
    from tulu_pipeline.generation.job import run_generation

    store = Store(str(tmp_path / "home"))
    spec = BackendSpec(model="unused")
    store.write_jsonl("r.jsonl", [{"request_id": "a", "messages": PROMPTS[0]}, {"request_id": "a", "messages": PROMPTS[1]}])
    with pytest.raises(ValueError, match=r"r.jsonl:2: request_id 'a' repeats line 1"):
        run_generation(store, "r.jsonl", "o.jsonl", spec, GREEDY, backend=backend)
    store.write_jsonl("r.jsonl", [{"request_id": "a", "messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"r.jsonl:1: messages\[0\].role"):
        run_generation(store, "r.jsonl", "o.jsonl", spec, GREEDY, backend=backend)

    class Failing:
        model_id = "failing"

        def generate(self, prompts, params):
            raise RuntimeError("device lost")

        def close(self):
            pass

    store.write_jsonl("r.jsonl", [{"request_id": "a", "messages": PROMPTS[0]}])
    with pytest.raises(RuntimeError, match="device lost"):
        run_generation(store, "r.jsonl", "o.jsonl", spec, GREEDY, backend=Failing())
    assert not store.exists("o.jsonl") and not [name for name in store.listdir("") if ".tmp-" in name]


def test_job_main_with_params_file(tmp_path, model_dir, capsys):
    from tulu_pipeline.generation.job import main

    store = Store(str(tmp_path / "home"))
    _write_requests(store, "requests.jsonl", 2)
    shutil.copytree(model_dir, store.path("models/tiny"))  # model paths in job configs live under TULU_HOME
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({
        "tulu_home": str(tmp_path / "home"), "requests": "requests.jsonl", "output": "out/gen.jsonl",
        "backend": BackendSpec(model="models/tiny", model_id="tiny", device="cpu").model_dump_json(),
        "params": {"max_new_tokens": 4, "temperature": 0, "n": 1, "seed": 0, "stop": []},
    }))
    assert main(["--params", str(params_file)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["event"] == "generation_result" and result["requests"] == 2 and result["completions"] == 2
    assert len(store.read_bytes("out/gen.jsonl").decode().splitlines()) == 2
    params_file.write_text(json.dumps({"tulu_home": str(tmp_path / "home"), "requests": "requests.jsonl"}))
    with pytest.raises(ValueError, match=r"lack \['output', 'backend'\]"):
        main(["--params", str(params_file)])
