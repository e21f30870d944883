"""Stage 8, export: a training checkpoint -> a folder in Kyutai's layout that `python app.py --model
<folder>` (and `moshi.server`, `moshi.run_inference`) loads.

    config.json         the LM config (with the speaker/emotion conditioners and the new text_card when
                        training added them), moshi_name/mimi_name/tokenizer_name, and for an unfused
                        export "lora": true, "lora_rank", "lora_scaling", "lora_name" as Kyutai's loader reads them
    model.safetensors   the base weights, with the trained text layers and conditioner tables in place
                        (unfused), or everything with the LoRA folded in (fused)
    lora.safetensors    unfused only: the LoRA A/B matrices (moshi.models.loaders.get_lora_moshi loads them)
    mimi.safetensors    the codec the shards were encoded with (+ mimi_config.json when it is not Kyutai's)
    tokenizer.model     the text tokenizer the model was trained with
    training.json       provenance: base, steps, losses, data licences (CC-BY data needs attribution)

A PersonaPlex base (it takes voice and text prompts; see agent/models/personaplex.py) is always exported fused,
with the user-codebook depformer steps that loading dropped put back from the base's own weights, and its
preset voices copied to voices/: the folder loads as PersonaPlex again and still takes prompts.

Unfused keeps the adapter separate (small to ship when the base is already at hand, and swappable);
fused has no LoRA matmuls at inference. Both are self-contained: when the tokenizer or conditioners
changed, the base weights changed too, so model.safetensors is always written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.modules.lora import replace_lora_with_linear
from safetensors.torch import load_file

from agent.errors import ModelLoadError
from agent.models import LoadedModel, personaplex, resolve_dtype
from agent.models.checkpoint import LORA_FILE, CheckpointFiles, staged_folder, write_checkpoint
from agent.train.common import UsageError, atomic_write_json
from agent.train.trainer import (
    CHECKPOINTS,
    RUN_FILE,
    TRAINABLE_FILE,
    TrainConfig,
    TrainModel,
    build_train_model,
    latest_checkpoint,
    load_trainable,
)

PERSONAPLEX_LICENCE = ("PersonaPlex weights: NVIDIA Open Model License (Moshi and Mimi underneath: CC-BY 4.0, Kyutai); "
                       "keep its notice and attribute your data sources")
KYUTAI_LICENCE = "Moshi and Mimi weights: CC-BY 4.0 (Kyutai); attribute them and your data sources"
RANDOM_INIT_LICENCE = ("MIT, as this repository: trained from random initialisation; no Kyutai weights are inside "
                       "(only moshi's code and architecture); attribute your data sources")


def weights_licence(base: LoadedModel) -> str:
    """The licence the exported weights inherit from the base they were trained from."""
    if base.takes_prompts:
        return PERSONAPLEX_LICENCE
    if base.weights_licence:
        return base.weights_licence  # stated by the base folder (e.g. an earlier export, the toy's base)
    return RANDOM_INIT_LICENCE if base.random_weights else KYUTAI_LICENCE


@dataclass
class ExportConfig:
    inp: Path  # a training run folder (its latest checkpoint is exported) or one checkpoint folder (step-N)
    out: Path
    fused: bool = False
    dtype: str = "bf16"  # of the weights written
    force: bool = False
    quiet: bool = False


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    fused: bool
    files: dict[str, int]

    def line(self) -> str:
        size = sum(self.files.values()) / 2 ** 20
        kind = "fused" if self.fused else "base + LoRA adapter"
        return f"export: {self.checkpoint.name} -> {self.out} ({kind}, {len(self.files)} files, {size:.1f} MiB)"


def _locate(inp: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder)."""
    if (inp / TRAINABLE_FILE).is_file():
        return inp.parent.parent, inp
    if (inp / RUN_FILE).is_file():
        checkpoint = latest_checkpoint(inp)
        if checkpoint is None:
            raise UsageError(f"{inp} has no checkpoint yet (under {inp / CHECKPOINTS})")
        return inp, checkpoint
    raise UsageError(f"{inp} is neither a training run folder (with {RUN_FILE}) nor a checkpoint")


def run_train_config(run: Path) -> TrainConfig:
    """The settings a training run folder was made with (its run.json)."""
    saved = json.loads((run / RUN_FILE).read_text())["config"]
    for key in ("inp", "out", "tokenizer"):
        if saved.get(key) is not None:
            saved[key] = Path(saved[key])
    return TrainConfig(**saved)


def restored_personaplex(state: dict[str, torch.Tensor], base_weights: Path | None) -> dict[str, torch.Tensor]:
    """Fused trained weights with the base's user-codebook depformer steps put back (PersonaPlex's layout)."""
    if base_weights is None or Path(base_weights).suffix != ".safetensors":
        raise UsageError(f"cannot find the PersonaPlex base's weights ({base_weights}) to restore its depformer")
    return personaplex.restore_depformer(state, load_file(str(base_weights)))


def _files(model: TrainModel, train_config: TrainConfig, step: int, fused: bool, dtype: torch.dtype) -> CheckpointFiles:
    """The trained model as a checkpoint folder's contents: fused, PersonaPlex's layout, or base + LoRA."""
    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}

    lm, base = model.lm.eval(), model.base
    lm_config, lora, voices = dict(model.lm_config), None, {}
    if fused:
        replace_lora_with_linear(lm)
        state = lm.state_dict()
        if base.takes_prompts:
            state, voices = restored_personaplex(state, base.lm_weights), base.preset_voices
    else:
        full = lm.state_dict()
        lora = {k: v for k, v in full.items() if ".lora_A." in k or ".lora_B." in k}
        state = {k.replace(".frozen_W.", "."): v for k, v in full.items() if k not in lora}
        lm_config.update(lora=True, lora_rank=train_config.lora_rank, lora_scaling=train_config.lora_scaling,
                         lora_name=LORA_FILE)
    model_id = {"base": train_config.model, "step": step, "fused": fused, "weights_licence": weights_licence(base)}
    return CheckpointFiles(lm=cast(state), mimi=base.mimi.state_dict(), tokenizer=Path(model.tokenizer_path),
                           lm_config=lm_config, mimi_config=base.mimi_config, model_id=model_id,
                           lm_gen_config=base.lm_gen_config or None, lora=cast(lora) if lora is not None else None,
                           voices=voices)


def run_export(config: ExportConfig) -> ExportResult:
    try:
        dtype = resolve_dtype(config.dtype, torch.device("cpu"))
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from exc
    run, checkpoint = _locate(Path(config.inp))
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.force:
        raise UsageError(f"{out} is not empty; pass --force to overwrite it")
    train_config = run_train_config(run)
    run_info = json.loads((run / RUN_FILE).read_text())
    # Rebuild the training model on the CPU exactly as training built it, then put the trained values in.
    model = build_train_model(train_config, torch.device("cpu"), torch.float32)
    load_trainable(model.lm, checkpoint)
    personaplex_base = model.base.takes_prompts
    # moshi's loader cannot put a LoRA on PersonaPlex's weights; a full fine-tune has no LoRA to keep apart
    fused = config.fused or personaplex_base or train_config.lora_rank == 0
    step = int(checkpoint.name.removeprefix("step-"))
    files = _files(model, train_config, step, fused, dtype)
    with staged_folder(out, replace=True) as tmp:
        write_checkpoint(tmp, files)
        atomic_write_json(tmp / "training.json", {
            "base": train_config.model, "checkpoint": str(checkpoint), "step": step,
            "fused": fused, "dtype": config.dtype, "notes": model.notes, "takes_prompts": personaplex_base,
            "prompted_training": train_config.prompts,
            "data_licences": run_info.get("licences", []), "train_dialogues": run_info.get("train_dialogues"),
            "weights_licence": files.model_id["weights_licence"]})
    files_written = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return ExportResult(out, checkpoint, fused, files_written)
