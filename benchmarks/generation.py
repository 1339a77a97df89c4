"""Generation throughput: batched decoding against one prompt at a time, same run, same prompts, interleaved.

Model (first that applies): ``--model-dir``; ``$TULU_HOME/models/base_model`` (or ``.tulu/models/base_model``),
the embedded SmolLM2-135M-Instruct converted by the pipeline; ``--random-like smollm2-135m``, random weights
with SmolLM2-135M's exact shapes (for a GPU machine without the converted model: throughput depends on the
shapes, not the weights); else a tiny random 2-layer Llama. The random models need a tokenizer:
``--tokenizer-dir``, else SmolLM2's read from the embedded GGUF.

Workload: 16 fixed chat prompts (below), greedy, ``--max-new-tokens`` (64) each. Modes:

- ``sequential``: ``backend.generate([prompt])`` for each prompt in turn (batch of one);
- ``batched``: one ``backend.generate(prompts)`` call, the backend batching ``--batch-size`` (8) rows at a time
  (the transformers backend) or scheduling them itself (vLLM).

Each repeat runs every mode, their order alternating, after a warm-up (on a GPU the whole batched
workload once). Results are stored
under ``runs[<label>]`` of ``--out`` (default label ``<backend>-<device>-<dtype>-b<batch>``), so CPU and GPU
runs sit side by side. Reported per mode:
generated tokens (EOS included), seconds, tokens/s; the ratio batched / sequential; and how many of the
16 greedy texts are identical in both modes (the batch-independence contract). Load averages are
recorded: the CPU machine is shared.

Needs only torch, transformers and ``tulu_pipeline.generation`` (no Dagster, no pydantic), so it runs on a
GPU image as is::

    .venv/bin/python benchmarks/generation.py [--model-dir DIR] [--batch-size 8] [--repeats 2]
    python3 benchmarks/generation.py --device cuda --random-like smollm2-135m --tokenizer-dir DIR --out ...
    python3 benchmarks/generation.py --backend vllm --model-dir DIR

``--compare`` (CPU) runs, in one invocation, each backend in a fresh child process: the transformers backend
(our batched loop, with transformers' own ``generate`` as the baseline) with this interpreter and vLLM with the
vLLM interpreter (``.venv-vllm``, `tulu_pipeline.vllm_runtime`). Each child's run is stored as above, plus
``startup_s`` (process start to a loaded backend, imports included) and ``peak_rss_mib`` (the child's whole
process tree, sampled every 0.2 s by the parent: vLLM runs an engine and a worker process beside its own); the
parent adds ``runs["cpu-comparison"]`` with the ratios of that same run (the children's runs are stored as
``cpu-compare-transformers-float32-b8`` and ``cpu-compare-vllm-float32``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout, uninstalled

from tulu_pipeline.generation.base import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses for a paperclip.",
    "What is 17 times 23? Show your steps.",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short motivational quote.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Suggest a name for a coffee shop run by cats.",
    "What are the planets of the solar system?",
    "Describe the taste of a lemon to someone who has never had one.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Write a limerick about a programmer.",
]

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}


def _tokenizer(tokenizer_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    from tulu_pipeline.models.base_model import locate_embedded_gguf

    gguf = locate_embedded_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def random_model(target: Path, shapes: dict[str, Any], tokenizer_dir: Path | None) -> Path:
    """A random-weight Llama with ``shapes`` and SmolLM2's tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **shapes)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def pick_model(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    if args.model_dir is not None:
        return args.model_dir, f"{args.model_dir.name} (--model-dir)"
    home = Path(os.environ.get("TULU_HOME") or Path(__file__).resolve().parent.parent / ".tulu")
    if (home / "models" / "base_model" / "config.json").is_file():
        return home / "models" / "base_model", "SmolLM2-135M-Instruct (models/base_model, fp32 weights)"
    if args.random_like == "smollm2-135m":
        return random_model(work / "random-135m", SMOLLM2_135M, args.tokenizer_dir), \
            "random weights with SmolLM2-135M's shapes"
    return random_model(work / "tiny", TINY, args.tokenizer_dir), "tiny random 2-layer Llama (hidden 32)"


def build(args: argparse.Namespace, model_dir: Path) -> Any:
    if args.backend == "vllm":
        from tulu_pipeline.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, "bench", dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                           max_model_len=1024)
    from tulu_pipeline.generation.transformers_backend import TransformersBackend

    return TransformersBackend(model_dir, "bench", device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def _sync(backend: Any) -> None:
    device = str(getattr(backend, "device", ""))
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def hf_generate(backend: Any, prompts: list[list[dict[str, str]]], params: SamplingParams) -> list:
    """The baseline: transformers' own ``model.generate`` (greedy) on the same left-padded batches."""
    import torch

    from tulu_pipeline.generation.base import Completion

    stop_ids = sorted(backend.stop_token_ids)
    results = []
    for start in range(0, len(prompts), backend.batch_size):
        batch = [backend.encoder.prompt_ids(p) for p in prompts[start:start + backend.batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[backend.pad_token_id] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        with torch.inference_mode():
            out = backend.model.generate(input_ids.to(backend.device), attention_mask=mask.to(backend.device),
                                         max_new_tokens=params.max_new_tokens, do_sample=False,
                                         pad_token_id=backend.pad_token_id, eos_token_id=stop_ids)
        for ids, row in zip(batch, out[:, width:].tolist()):
            end = next((k for k, t in enumerate(row) if t in stop_ids), None)
            used = row if end is None else row[:end + 1]
            text = backend.encoder.decode(row if end is None else row[:end])
            results.append([Completion(text, "hf", "length" if end is None else "stop", len(ids), len(used), 0)])
    return results


def run_mode(backend: Any, mode: str, prompts: list[list[dict[str, str]]], params: SamplingParams) -> tuple[float, list]:
    _sync(backend)
    started = time.perf_counter()
    if mode == "sequential":
        results = [backend.generate([p], params)[0] for p in prompts]
    elif mode == "hf_generate_batched":
        results = hf_generate(backend, prompts, params)
    else:
        results = backend.generate(prompts, params)
    _sync(backend)
    return time.perf_counter() - started, results


def machine_info(backend: Any) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    # the vLLM backend has no device attribute: it runs where its build does
    info["device"] = str(getattr(backend, "device", "cuda" if torch.cuda.is_available() else "cpu"))
    return info


def write_run(path: Path, label: str, payload: dict[str, Any]) -> None:
    """Store ``payload`` as ``runs[label]`` of the results file, keeping the other machines' runs."""
    results: dict[str, Any] = {"benchmark": "generation", "runs": {}}
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(existing.get("runs"), dict):
            results["runs"] = existing["runs"]
    results["runs"][label] = payload
    results["runs"] = dict(sorted(results["runs"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def process_start_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def run_child(command: list[str], env: dict[str, str]) -> float:
    """Run ``command`` and return the peak resident memory of its process tree in MiB."""
    import subprocess

    import psutil

    child = subprocess.Popen(command, env=env)
    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:  # a process of the tree exited between listing and reading it
            pass
        time.sleep(0.2)
    if child.returncode != 0:
        raise SystemExit(f"{command} failed with exit code {child.returncode}")
    return peak / 2**20


def compare(args: argparse.Namespace) -> None:
    """The CPU comparison (see the module docstring): transformers and vLLM children, then the ratios."""
    from tulu_pipeline.vllm_runtime import engine_env, require_vllm_python

    script = str(Path(__file__).resolve())
    common = ["--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats), "--out", str(args.out),
              "--dtype", "float32", "--batch-size", str(args.batch_size)]
    if args.model_dir is not None:
        common += ["--model-dir", str(args.model_dir)]
    children = {"transformers": ([sys.executable, script, "--backend", "transformers", "--hf-baseline",
                                  "--label", "cpu-compare-transformers-float32-b8"], dict(os.environ)),
                "vllm": ([str(require_vllm_python()), script, "--backend", "vllm",
                          "--label", "cpu-compare-vllm-float32"],
                         engine_env())}
    peaks = {}
    for name, (command, env) in children.items():
        peaks[name] = round(run_child(command + common, env), 1)
    results = json.loads(args.out.read_text(encoding="utf-8"))["runs"]
    ours, vllm = results["cpu-compare-transformers-float32-b8"], results["cpu-compare-vllm-float32"]
    ours["peak_rss_mib"], vllm["peak_rss_mib"] = peaks["transformers"], peaks["vllm"]
    write_run(args.out, "cpu-compare-transformers-float32-b8", ours)
    write_run(args.out, "cpu-compare-vllm-float32", vllm)
    tps = {"vllm": vllm["modes"]["batched"]["tokens_per_s"],
           "transformers_batched": ours["modes"]["batched"]["tokens_per_s"],
           "hf_generate": ours["modes"]["hf_generate_batched"]["tokens_per_s"]}
    workload_tokens = ours["modes"]["batched"]["tokens"] // args.repeats
    end_to_end = {name: round(run["startup_s"] + workload_tokens / run["modes"]["batched"]["tokens_per_s"], 1)
                  for name, run in (("transformers_batched", ours), ("vllm", vllm))}
    write_run(args.out, "cpu-comparison", {
        "runs": ["cpu-compare-transformers-float32-b8", "cpu-compare-vllm-float32"],
        "batched_tokens_per_s": tps,
        "vllm_over_transformers_batched_tokens_per_s": round(tps["vllm"] / tps["transformers_batched"], 3),
        "startup_s": {"transformers": ours["startup_s"], "vllm": vllm["startup_s"]},
        "peak_rss_mib": peaks,
        "greedy_texts_identical_vllm_vs_transformers": f"{sum(a == b for a, b in zip(ours['texts'], vllm['texts']))}"
                                                       f"/{len(PROMPTS)}",
        # one batched workload (16 prompts) including the process start-up: what a generation job costs
        "one_workload_end_to_end_s": end_to_end,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--device", default="cpu", help="transformers backend: cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--random-like", choices=("tiny", "smollm2-135m"), default="tiny",
                        help="the random model used when there is no converted base model")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer for the random models (default: the GGUF's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hf-baseline", action="store_true",
                        help="also time transformers' model.generate on the same batches (transformers backend)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation.json")
    parser.add_argument("--label", help="key of this run in the results file (default: backend-device-dtype-bN)")
    parser.add_argument("--compare", action="store_true",
                        help="CPU: transformers and vLLM, each in its own process, in one run (module docstring)")
    args = parser.parse_args()
    if args.compare:
        compare(args)
        return

    prompts = [[{"role": "user", "content": text}] for text in PROMPTS]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    with tempfile.TemporaryDirectory(prefix="tulu-bench-gen-") as tmp:
        model_dir, model_name = pick_model(args, Path(tmp))
        load_started = time.perf_counter()
        backend = build(args, model_dir)
        load_s = time.perf_counter() - load_started
        startup_s = process_start_s()
        if args.backend == "vllm" or str(getattr(backend, "device", "")).startswith("cuda"):
            # On a GPU the first call at each batch shape and KV length picks kernels (cuDNN attention
            # plans, cuBLAS heuristics): 6.7 s instead of 1.9 s for the batched bf16 call on an H200.
            backend.generate(prompts, params)
            backend.generate(prompts[:1], params)
        else:
            backend.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.0))
        load_before = os.getloadavg()
        names = ["sequential", "batched"] + (["hf_generate_batched"] if args.hf_baseline else [])
        totals = {mode: {"tokens": 0, "seconds": 0.0} for mode in names}
        texts: dict[str, list[str]] = {}
        finish: dict[str, dict[str, int]] = {}
        for repeat in range(args.repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            for mode in order:
                seconds, results = run_mode(backend, mode, prompts, params)
                totals[mode]["seconds"] += seconds
                totals[mode]["tokens"] += sum(r[0].completion_tokens for r in results)
                texts[mode] = [r[0].text for r in results]
                finish[mode] = {}
                for r in results:
                    finish[mode][r[0].finish_reason] = finish[mode].get(r[0].finish_reason, 0) + 1
        load_after = os.getloadavg()
        info = machine_info(backend)
        dtype = str(getattr(backend, "dtype", args.dtype)).removeprefix("torch.")
        backend.close()

    modes = {mode: {"tokens": t["tokens"], "seconds": round(t["seconds"], 3),
                    "tokens_per_s": round(t["tokens"] / t["seconds"], 1), "finish_reasons": finish[mode]}
             for mode, t in totals.items()}
    identical = sum(a == b for a, b in zip(texts["sequential"], texts["batched"]))
    payload = {
        "backend": args.backend,
        "model": model_name,
        "settings": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
                     "batch_size": args.batch_size if args.backend == "transformers" else "vllm scheduler",
                     "repeats": args.repeats, "dtype": dtype, "model_load_s": round(load_s, 2)},
        "startup_s": round(startup_s, 1),
        "machine": {**info, "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "modes": modes,
        "batched_over_sequential_tokens_per_s": round(modes["batched"]["tokens_per_s"] / modes["sequential"]["tokens_per_s"], 3),
        "greedy_texts_identical": f"{identical}/{len(prompts)}",
        **({"batched_over_hf_generate_tokens_per_s":
            round(modes["batched"]["tokens_per_s"] / modes["hf_generate_batched"]["tokens_per_s"], 3),
            "hf_generate_texts_identical":
            f"{sum(a == b for a, b in zip(texts['hf_generate_batched'], texts['batched']))}/{len(prompts)}"}
           if "hf_generate_batched" in modes else {}),
        "sample": {"prompt": PROMPTS[0], "completion": texts["batched"][0][:200]},
        "texts": texts["batched"],
    }
    device = info["device"]
    label = args.label or f"{args.backend}-{device}-{dtype}-b{args.batch_size}"
    write_run(args.out, label, payload)
    print(json.dumps({label: payload}, indent=2))


if __name__ == "__main__":
    main()
