"""The outputs that must not depend on the process, printed as one JSON object (run by test_determinism.py).

    python tests/determinism_probe.py MODEL_DIR DATA_DIR

Seeded generation and greedy decoding on a tiny model, the evaluation's seeded samples and bootstrap interval,
IFEval constraint sampling, language detection and verdicts: each must come out the same in every fresh
process, whatever its PYTHONHASHSEED.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PROMPTS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
]
# short, ambiguous texts: langdetect's answer on them depends on its seed
LANGUAGE_TEXTS = ["Ok sure yes", "Si claro", "ja nein vielleicht", "The quick brown fox jumps over the lazy dog."]


def generation(model_dir: Path) -> dict:
    from tulu_pipeline.generation.base import SamplingParams
    from tulu_pipeline.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(model_dir, "tiny", device="cpu", batch_size=2)
    sampled = backend.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, n=2, seed=11))
    greedy = backend.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    return {"sampled": [[c.text for c in cs] for cs in sampled], "greedy": [[c.text for c in cs] for cs in greedy]}


def evaluation(data_dir: Path) -> dict:
    from tulu_pipeline.evaluation import scoring
    from tulu_pipeline.evaluation.benchmarks import BenchmarkConfig, load_samples

    graded = [0.1, 0.35, 0.9, 0.42, 0.77, 0.05, 0.6]
    return {
        "bootstrap_ci": list(scoring.bootstrap_ci(graded, 200, seed=1)),
        "gsm8k_sample": [s.item_id for s in load_samples("gsm8k", BenchmarkConfig(sample_size=8, seed=5), data_dir)],
    }


def ifeval() -> dict:
    from tulu_pipeline.rewards import verify
    from tulu_pipeline.rewards.constraints import sample_constraints

    samples = [sample_constraints(random.Random(seed), k=1 + seed % 3) for seed in range(12)]
    language = {text: verify("ifeval", text, constraints={"instruction_id_list": ["language:response_language"],
                                                          "kwargs": [{"language": "en"}]}).ok
                for text in LANGUAGE_TEXTS}
    verdicts = [verify("ifeval", "Some response text. It has two sentences.", constraints=s).score for s in samples]
    return {"constraints": samples, "language_en": language, "scores": verdicts}


def main() -> None:
    model_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps({"generation": generation(model_dir), "evaluation": evaluation(data_dir), "ifeval": ifeval()},
                     sort_keys=True))


if __name__ == "__main__":
    main()
