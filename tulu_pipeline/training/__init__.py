"""Post-training methods. SFT: `tulu_pipeline.training.sft.run_sft` with `sft_config.SFTTrainingConfig`, run as its
own process by `python -m tulu_pipeline.training.sft_job` (dagster-pipes). Importing this package is cheap:
torch, transformers and TRL load only when training starts."""
