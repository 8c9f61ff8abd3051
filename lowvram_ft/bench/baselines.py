"""The plain Hugging Face stack the bench measures ours against: transformers + peft + TRL's SFTTrainer,
no Unsloth in the process, set up like the Hugging Face / OpenAI gpt-oss recipe — bf16 weights (MXFP4
dequantized; a random gpt-oss is built directly in GPU memory from its config), eager attention, LoRA
on attention and on the experts through PEFT target_parameters, adapters in float32 as Unsloth keeps
them; other models 4-bit NF4 with double quantization and bf16 compute. On CPU it loads 16/32-bit."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..gptoss_tokenizer import load_gptoss_tokenizer
from ..device import Device
from ..model import expert_target_parameters
from ..train.trainer import sft_config_kwargs
from .matrix import Case, model_config, model_route, random_model_config
from .models import build_in_memory


def load_hf(case: Case, gpu: bool):
    """The plain Hugging Face recipe: no unsloth in this process."""
    import torch

    if model_route(case) == "in-memory":
        model = build_in_memory(random_model_config(case.model), case.dtype, "cuda" if gpu else "cpu", case.seed)
        tokenizer = load_gptoss_tokenizer()  # the tokenizer the lowvram_ft stack's checkpoint carries
        settings = {"requested_bits": "16bit", "weights": f"{case.dtype}, random, built in memory"}
    else:
        model, settings = load_hf_folder(case, gpu)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(case.model_path)
    model, experts = add_hf_lora(model, case)
    name = torch.cuda.get_device_properties(0).name if gpu else "cpu"
    device = Device("cuda" if gpu else "cpu", name, None, case.dtype == "bfloat16", f"hf stack: {case.dtype}")
    settings.update(route=model_route(case), attention=getattr(model.config, "_attn_implementation", None),
                    gradient_checkpointing="true", target_parameters=experts, optimizer=case.optimizer)
    return model, tokenizer, device, settings


def load_hf_folder(case: Case, gpu: bool):
    """(model, settings) from a folder: gpt-oss in bf16 (MXFP4 dequantized) with eager attention, other
    models 4-bit NF4 on GPU (the QLoRA recipe quantizes while loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(case.model_path)
    gpt_oss = config.get("model_type") == "gpt_oss"
    kwargs: dict[str, Any] = {"dtype": getattr(torch, case.dtype), "use_cache": False}
    weights = case.dtype
    if gpt_oss:
        kwargs["attn_implementation"] = "eager"  # the OpenAI cookbook's setting (attention sinks)
        if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            from transformers import Mxfp4Config

            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
            weights = "mxfp4-dequantized-bf16"
    elif gpu:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        weights = "4bit-nf4-double-quant"
    if gpu:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(case.model_path, **kwargs)
    return model, {"requested_bits": "4bit" if weights.startswith("4bit") else "16bit", "weights": weights}


def add_hf_lora(model, case: Case):
    """(PEFT model, expert target_parameters): LoRA on the case's modules and, through target_parameters,
    on fused expert weights. Adapters in float32 as Unsloth keeps them: autocast_adapter_dtype=True (PEFT's
    default, made explicit) upcasts bf16 / fp16 adapters to float32."""
    import torch
    from peft import LoraConfig, get_peft_model

    experts = expert_target_parameters(model, list(case.lora_targets))
    lora = LoraConfig(r=case.lora_r, lora_alpha=case.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(case.lora_targets), task_type="CAUSAL_LM",
                      **({"target_parameters": experts} if experts else {}))
    torch.manual_seed(case.seed)  # the same seed Unsloth sets before get_peft_model: identical LoRA init
    return get_peft_model(model, lora, autocast_adapter_dtype=True), experts


def hf_trainer(cfg: Config, model, tokenizer, dataset, device: Device, run_dir: Path, timer):
    """TRL's SFTTrainer with the same SFTConfig as ours except checkpointing, which the HF recipe leaves
    to the Trainer. On a GPU it is TRL's trainer unchanged; on a CPU its loss runs in plain torch
    (`torch_loss_trainer`), since TRL's fused LM head is a Triton kernel (CUDA / XPU only)."""
    from trl import SFTConfig, SFTTrainer

    kwargs = sft_config_kwargs(cfg, device, str(run_dir / "checkpoints"))
    kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer_class = SFTTrainer if device.kind == "cuda" else torch_loss_trainer()
    return trainer_class(model=model, args=SFTConfig(**kwargs), train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])


def torch_loss_trainer():
    """SFTTrainer whose `compute_loss` (the override point TRL documents for a custom loss) computes
    TRL's SFT loss in plain torch from the model's own logits: the mean negative log-likelihood of the
    labelled next tokens over `num_items_in_batch`, plus the MoE load-balancing loss weighted and
    spread over the accumulation steps as TRL does. The logs keep the loss; TRL's entropy and token
    accuracy metrics, which the bench does not read, are not computed."""
    from trl import SFTTrainer

    class TorchLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, **extra)
            loss = next_token_nll(outputs.logits, labels, num_items_in_batch)
            if self.aux_loss_enabled:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            return (loss, outputs) if return_outputs else loss

    return TorchLossSFTTrainer


def next_token_nll(logits, labels, num_items_in_batch=None):
    """-sum of log p(next label) over the positions whose next label is not -100, in float32, divided by
    num_items_in_batch (the count of those positions when not given): TRL's SFT loss at temperature 1."""
    import torch

    labels = labels[:, 1:]
    mask = labels != -100
    z = logits[:, :-1][mask].float()
    log_probs = z.gather(-1, labels[mask][:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return -log_probs.sum() / torch.as_tensor(count).clamp(min=1)
